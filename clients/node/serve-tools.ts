// A tool host on the typed stream ToolService.ServeTools: it registers its tools in the
// stream's first message, answers every `call` with one `result`, and stops working on a
// call when a `cancel` names it. No session stream, no frame ids, no tools.execute.
//
//   npx tsx serve-tools.ts [--session <session_id>]
//
// Without --session its tools are shared by name with every session's proposals (the
// daemon token file, or CAR_AUTH_TOKEN). With --session it serves that session's own
// tools (car-session-id, with the session's credentials: the daemon token, or
// CAR_AGENT_ID and CAR_AGENT_TOKEN). It ends cleanly when its stdin closes.
import type { JsonObject, JsonValue, MessageInitShape } from "@bufbuild/protobuf";
import { createWritableIterable } from "@connectrpc/connect/protocol";
import { client, daemonToken, enumName, fail, headers, log, toValue } from "./lib/car.js";
import { CallerRoleSchema } from "./gen/car/v1/options_pb.js";
import { ToolScopeSchema, ToolService, type ServeToolsRequestSchema, type ToolCall } from "./gen/car/v1/tools_pb.js";

// The tools: parameters in, output (any JSON) out, or a throw. `signal` aborts when the
// server cancels the call.
type Tool = (params: JsonObject, signal: AbortSignal) => Promise<JsonValue>;
const num = (v: JsonValue | undefined) => (typeof v === "number" ? v : 0);
const tools: Record<string, Tool> = {
  add: async ({ a, b }) => num(a) + num(b),
  divide: async ({ a, b }) => {
    if (num(b) === 0) throw new Error("division by zero");
    return num(a) / num(b);
  },
  wait: (_params, signal) => new Promise((_resolve, reject) => signal.addEventListener("abort", reject)),
};
const numbers = { type: "object", properties: { a: { type: "number" }, b: { type: "number" } } };

const at = process.argv.indexOf("--session");
const sessionId = at > 0 ? process.argv[at + 1] : undefined;
const agentId = process.env.CAR_AGENT_ID;
const token = agentId ? process.env.CAR_AGENT_TOKEN : daemonToken();

// What the host sends: the registration first, then one result per call.
// guide:serve-tools
const outgoing = createWritableIterable<MessageInitShape<typeof ServeToolsRequestSchema>>();
const running = new Map<string, AbortController>(); // request_id -> its abort

async function serve(call: ToolCall): Promise<void> {
  const abort = new AbortController();
  running.set(call.requestId, abort);
  let outcome: MessageInitShape<typeof ServeToolsRequestSchema>["body"];
  try {
    const output = await tools[call.tool](call.parameters ?? {}, abort.signal);
    outcome = { case: "result", value: { requestId: call.requestId, outcome: { case: "output", value: toValue(output) } } };
  } catch (err) {
    // terminal: true would also abort the proposal and halt the caller's session.
    const message = err instanceof Error ? err.message : String(err);
    outcome = { case: "result", value: { requestId: call.requestId, outcome: { case: "error", value: { message } } } };
  }
  running.delete(call.requestId);
  // A cancelled call is not answered: the server no longer waits for it.
  if (!abort.signal.aborted) await outgoing.write({ body: outcome }).catch(() => {});
}

const stream = client(ToolService).serveTools(outgoing, { headers: headers({ token, agentId, sessionId }) });
const register = { host: "node-tools", tools: Object.keys(tools).map((name) => ({ name, parameters: numbers })) };
outgoing.write({ body: { case: "register", value: register } }).catch(() => {});
// Closing stdin ends the stream cleanly: the server then drops the tools.
process.stdin.on("end", () => outgoing.close()).resume();

// guide:end
// guide:serve-tools-loop
try {
  for await (const { body } of stream) {
    switch (body.case) {
      case "registered":
        log("registered", {
          host: body.value.host,
          scope: enumName(ToolScopeSchema, body.value.scope),
          tools: body.value.tools,
        });
        break;
      case "call": {
        const call = body.value;
        log("call", {
          request_id: call.requestId,
          action_id: call.actionId,
          tool: call.tool,
          parameters: call.parameters,
          caller_role: enumName(CallerRoleSchema, call.caller?.role ?? 0),
          agent_id: call.caller?.agentId ?? "",
        });
        void serve(call);
        break;
      }
      case "cancel":
        log("cancel", { request_id: body.value.requestId, action_id: body.value.actionId, reason: body.value.reason });
        running.get(body.value.requestId)?.abort();
        break;
    }
  }
  log("end");
  process.exit(0);
} catch (err) {
  // A refused registration (PERMISSION_DENIED, INVALID_ARGUMENT, ...) ends here too.
  fail(err);
}
// guide:end
