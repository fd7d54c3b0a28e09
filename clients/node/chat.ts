// A host in TypeScript: opens a chat with an attached agent through ChatService.Chat and
// prints the reply as it streams, until the chat's terminal event.
//
//   npx tsx chat.ts <agent_id> <prompt>      # authenticates with the daemon token
import { client, daemonToken, fail, headers, log } from "./lib/car.js";
import { ChatEventKind, ChatService } from "./gen/car/v1/chats_pb.js";

const [agentId = "", prompt = ""] = process.argv.slice(2);
const TERMINAL = new Set([ChatEventKind.DONE, ChatEventKind.ERROR, ChatEventKind.AUTH_REQUIRED]);

let text = "";
// guide:chat
try {
  const items = client(ChatService).chat({ agentId, prompt }, { headers: headers({ token: daemonToken() }) });
  for await (const { item } of items) {
    if (item.case === "accepted") {
      log("accepted", { session_id: item.value.chatId }); // the chat's id
    } else if (item.case === "event") {
      // ChatEventNotice{sessionId, agentId, event}; kindEnum is kind as an enum
      // (UNSPECIFIED for a kind outside it).
      const { kind, kindEnum, delta } = item.value.event ?? { kind: "", kindEnum: ChatEventKind.UNSPECIFIED };
      if (kindEnum === ChatEventKind.TOKEN) text += delta ?? "";
      log("event", { kind, delta: delta ?? null });
      if (TERMINAL.has(kindEnum)) log("reply", { text });
    }
  }
  log("end"); // the stream ended with OK after the terminal event
} catch (err) {
  fail(err);
}
// guide:end
