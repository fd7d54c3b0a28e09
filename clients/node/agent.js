// An agent in Node.js. It attaches over SessionService.Connect with its agent token and
// serves every chat a host opens with it: ack the `agent.chat` request, stream the reply as
// `token` events, end with `done`.
//
//   car-grpc agents add my-agent                      # prints the agent token, once
//   CAR_AGENT_ID=my-agent CAR_AGENT_TOKEN=<token> node agent.js
"use strict";

const car = require("./lib/car");

const agentId = process.env.CAR_AGENT_ID;
const token = process.env.CAR_AGENT_TOKEN;

// The agent's brain. A real agent would call a model here and stream what it says.
function reply(prompt) {
  return `Node agent ${agentId} heard: ${prompt}`;
}

async function main() {
  // session.auth with {token, agent_id}: this session is now the agent (a newer attach of
  // the same agent replaces it).
  const session = await car.connect({ agentId, token });
  const cancelled = new Set();

  // Requests from the server (ids `cb-N`): answer each exactly once.
  session.on("request", (frame) => {
    if (frame.body === "agent_chat") {
      serveChat(session, frame, cancelled);
    } else if (frame.body === "agent_chat_approve") {
      session.answer(frame.id, "agent_chat_approve", { resolved: true });
    } else {
      session.answerError(frame.id, -32601, `unknown method: ${frame.body}`);
    }
  });
  // Notifications: the host cancelled a chat.
  session.on("notification", (frame) => {
    if (frame.body === "agent_chat_cancel") cancelled.add(frame.agent_chat_cancel.session_id);
  });
  session.on("end", (err) => {
    car.log("ended", { error: err ? err.details : null });
    process.exit(err ? 1 : 0);
  });
  process.on("SIGTERM", () => session.close());
  car.log("ready", { agent_id: agentId, session_id: session.sessionId });
}

function serveChat(session, frame, cancelled) {
  const chat = frame.agent_chat; // AgentChatRequest: session_id, prompt, stream, ...
  // Ack first: the host's agents.chat returns only once the agent accepted (within 5 s).
  session.answer(frame.id, "agent_chat", { accepted: true });
  car.log("chat", { session_id: chat.session_id, prompt: chat.prompt });
  const event = (e) => session.notify("agent_chat_event", { session_id: chat.session_id, event: e });
  for (const word of reply(chat.prompt).split(/(?<= )/)) {
    if (cancelled.has(chat.session_id)) return;
    event({ kind: "token", delta: word });
  }
  event({ kind: "done" }); // terminal: the chat is over
}

main().catch((err) => {
  car.log("error", { code: err.code, message: err.message });
  process.exit(1);
});
