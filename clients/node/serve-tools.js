// A tool host on the typed stream ToolService.ServeTools: it registers its tools in the
// stream's first message, answers every `call` with one `result`, and stops working on a
// call when a `cancel` names it. No session stream, no frame ids, no tools.execute.
//
//   node serve-tools.js [--session <session_id>]
//
// Without --session its tools are shared by name with every session's proposals (the
// daemon token file, or CAR_AUTH_TOKEN). With --session it serves that session's own
// tools (car-session-id, with the session's credentials: the daemon token, or
// CAR_AGENT_ID and CAR_AGENT_TOKEN). It ends cleanly when its stdin closes.
"use strict";

const car = require("./lib/car");

// The tools: parameters in, output (any JSON) out, or a throw. `signal` aborts when the
// server cancels the call.
const tools = {
  add: async ({ a, b }) => a + b,
  divide: async ({ a, b }) => {
    if (b === 0) throw new Error("division by zero");
    return a / b;
  },
  wait: (_, signal) => new Promise((_resolve, reject) => signal.addEventListener("abort", reject)),
};

function main() {
  const at = process.argv.indexOf("--session");
  const sessionId = at > 0 ? process.argv[at + 1] : undefined;
  const agentId = process.env.CAR_AGENT_ID;
  const token = agentId ? process.env.CAR_AGENT_TOKEN : car.daemonToken();
  const call = car.client("ToolService").ServeTools(car.metadata({ token, agentId, sessionId }));
  const running = new Map(); // request_id -> AbortController

  call.write({
    register: {
      host: "node-tools",
      tools: Object.keys(tools).map((name) => ({ name })),
    },
  });
  call.on("data", async (message) => {
    switch (message.body) {
      case "registered":
        car.log("registered", message.registered);
        break;
      case "call": {
        const { request_id, action_id, tool, parameters, caller } = message.call;
        car.log("call", { request_id, action_id, tool, caller_role: caller.role });
        const abort = new AbortController();
        running.set(request_id, abort);
        const result = { request_id };
        try {
          result.output = car.toValue(await tools[tool](car.fromStruct(parameters), abort.signal));
        } catch (err) {
          // terminal: true would also abort the proposal and halt the caller's session.
          result.error = { message: err.message, terminal: false };
        }
        running.delete(request_id);
        if (!abort.signal.aborted) call.write({ result });
        break;
      }
      case "cancel":
        car.log("cancel", message.cancel);
        running.get(message.cancel.request_id)?.abort();
        break;
    }
  });
  call.on("error", (err) => {
    // A refused registration (ALREADY_EXISTS, PERMISSION_DENIED, ...) ends here too.
    const e = car.fromStatus(err);
    car.log("error", { grpc_code: e.grpcCode, code: e.code, message: e.message });
    process.exit(1);
  });
  call.on("end", () => {
    car.log("end");
    process.exit(0);
  });
  process.stdin.on("end", () => call.end()).resume();
}

main();
