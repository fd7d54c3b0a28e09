// A host in Node.js: opens a chat with an attached agent through ChatService.Chat and
// prints the reply as it streams, until the chat's terminal event.
//
//   node chat.js <agent_id> <prompt>      # authenticates with the daemon token
"use strict";

const car = require("./lib/car");

const [agentId, prompt] = process.argv.slice(2);
const TERMINAL = new Set(["done", "error", "auth_required"]);

const call = car.client("ChatService").Chat(
  { agent_id: agentId, prompt },
  car.metadata({ token: car.daemonToken() }),
);
let text = "";
call.on("data", (item) => {
  if (item.item === "accepted") {
    car.log("accepted", { session_id: item.accepted.session_id });
    return;
  }
  const { kind, delta } = item.event.event; // ChatEventNotice{session_id, agent_id, event}
  if (kind === "token") text += delta;
  car.log("event", { kind, delta: delta || null });
  if (TERMINAL.has(kind)) car.log("reply", { text });
});
call.on("status", (status) => {
  if (status.code === car.grpc.status.OK) car.log("end");
});
call.on("error", (err) => {
  const e = car.fromStatus(err);
  car.log("error", { code: e.code, message: e.message });
  process.exitCode = 1;
});
