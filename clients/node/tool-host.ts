// A tool host on the session stream (SessionService.Connect): it registers its tools on
// its session, submits a proposal that calls them, and answers the server's `tools.execute`
// callbacks on the same stream. (serve-tools.ts is the simpler typed way to host tools.)
//
//   npx tsx tool-host.ts          # authenticates with the daemon token file (or CAR_AUTH_TOKEN)
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import { ActionStatusSchema, ActionType, FailureBehavior, ToolService } from "./gen/car/v1/tools_pb.js";
import { client, daemonToken, enumName, fail, fromValue, headers, log, Session, toValue } from "./lib/car.js";

// The tools this host implements: parameters in, output out (any JSON), or a throw.
const num = (v: JsonValue | undefined) => (typeof v === "number" ? v : 0);
const tools: Record<string, (params: JsonObject) => JsonValue> = {
  add: ({ a, b }) => num(a) + num(b),
  divide: ({ a, b }) => {
    if (num(b) === 0) throw new Error("division by zero");
    return num(a) / num(b);
  },
};
const numbers = { type: "object", properties: { a: { type: "number" }, b: { type: "number" } } };

const token = daemonToken();
const session = new Session();
// One tools.execute callback (ExecuteToolRequest): run the tool, answer with its output
// (ClientFrame.tools_execute) or with an error (ClientFrame.error). An error with data
// {terminal: true} would also abort the proposal and halt the session.
session.onRequest = (frame) => {
  if (frame.body.case !== "toolsExecute") {
    session.answerError(frame.id, -32601, `unknown method: ${frame.body.case}`);
    return;
  }
  const call = frame.body.value;
  try {
    const output = tools[call.tool](call.parameters ?? {});
    session.answer(frame.id, "toolsExecute", { output: toValue(output) });
  } catch (err) {
    session.answerError(frame.id, -32603, err instanceof Error ? err.message : String(err));
  }
};

try {
  const authed = await session.request("sessionAuth", { token });
  await session.request("serverHandshake", { protocolVersionNumber: 3, clientVersion: "car-grpc-node-examples" });
  const count = await session.request("toolsRegister", {
    tools: [
      { name: "add", description: "a + b", parameters: numbers },
      { name: "divide", description: "a / b", parameters: numbers },
    ],
  });
  // A typed RPC bound to this session (car-session-id) sees the tools just registered.
  const bound = headers({ token, sessionId: authed.sessionId });
  const listed = await client(ToolService).listTools({}, { headers: bound });
  log("registered", { count: count.count, tools: listed.tools.map((t) => t.name) });

  // `half` uses the output of `sum` ("$sum.output"), so the server runs it after `sum`;
  // `oops` fails and, with failure_behavior skip, does not abort the others.
  const call = (id: string, tool: string, parameters: JsonObject) => ({ id, type: ActionType.TOOL_CALL, tool, parameters });
  const answer = await session.request(
    "proposalSubmit",
    {
      proposal: {
        id: "node-proposal",
        actions: [
          call("sum", "add", { a: 2, b: 3 }),
          call("half", "divide", { a: "$sum.output", b: 2 }),
          { ...call("oops", "divide", { a: 1, b: 0 }), failureBehavior: FailureBehavior.SKIP },
        ],
      },
    },
    30000,
  );
  const result = answer.result;
  log("result", {
    proposal_id: result?.proposalId,
    results: result?.results.map((r) => ({
      action_id: r.actionId,
      status: enumName(ActionStatusSchema, r.status),
      output: fromValue(r.output),
      error: r.error ?? null,
    })),
    tool_calls: result?.cost?.toolCalls,
  });
  session.close();
  process.exit(0);
} catch (err) {
  fail(err);
}
