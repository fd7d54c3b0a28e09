// An agent in TypeScript. It attaches over SessionService.Connect with its agent token and
// serves every chat a host opens with it: ack the `agent.chat` request, stream the reply as
// `token` events, end with `done`.
//
//   car-grpc agents add my-agent                      # prints the agent token, once
//   CAR_AGENT_ID=my-agent CAR_AGENT_TOKEN=<token> npx tsx agent.ts
import { fail, log, Session } from "./lib/car.js";
import { ChatEventKind, type AgentChatRequest } from "./gen/car/v1/chats_pb.js";

const agentId = process.env.CAR_AGENT_ID ?? "";
const token = process.env.CAR_AGENT_TOKEN ?? "";

// The agent's brain. A real agent would call a model here and stream what it says.
function reply(prompt: string): string {
  return `Node agent ${agentId} heard: ${prompt}`;
}

// guide:agent
const session = new Session();
const cancelled = new Set<string>();

function serveChat(id: string, chat: AgentChatRequest): void {
  // Ack first: the host's agents.chat returns only once the agent accepted (within 5 s).
  session.answer(id, "agentChat", { accepted: true });
  // chatId is the chat's id (`session_id` on the JSON wire).
  log("chat", { session_id: chat.chatId, prompt: chat.prompt });
  // chatId and kindEnum alone: the server fills `session_id` and `kind` from them.
  const event = (kindEnum: ChatEventKind, delta?: string) =>
    session.notify("agentChatEvent", { chatId: chat.chatId, event: { kindEnum, delta } });
  for (const word of reply(chat.prompt).split(/(?<= )/)) {
    if (cancelled.has(chat.chatId)) return;
    event(ChatEventKind.TOKEN, word);
  }
  event(ChatEventKind.DONE); // terminal: the chat is over
}

// Requests from the server (ids `cb-N`): answer each exactly once.
session.onRequest = (frame) => {
  const body = frame.body;
  if (body.case === "agentChat") serveChat(frame.id, body.value);
  else if (body.case === "agentChatApprove") session.answer(frame.id, "agentChatApprove", { resolved: true });
  else session.answerError(frame.id, -32601, `unknown method: ${body.case}`);
};
// Notifications: the host cancelled a chat.
session.onNotification = (frame) => {
  if (frame.body.case === "agentChatCancel") cancelled.add(frame.body.value.chatId);
};
process.on("SIGTERM", () => session.close());

try {
  // session.auth with {token, agent_id} first: this session is now the agent (a newer
  // attach of the same agent replaces it); then server.handshake.
  const authed = await session.request("sessionAuth", { token, agentId });
  await session.request("serverHandshake", { protocolVersionNumber: 3, clientVersion: "car-grpc-node-examples" });
  log("ready", { agent_id: agentId, session_id: authed.sessionId });
} catch (err) {
  fail(err);
}
// guide:end
const ended = await session.ended;
log("ended", { error: ended ? ended.message : null });
process.exit(ended ? 1 : 0);
