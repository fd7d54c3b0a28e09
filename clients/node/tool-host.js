// A tool host in Node.js. It registers its tools on its session, submits a proposal that
// calls them, and answers the server's `tools.execute` callbacks on the same stream.
//
//   node tool-host.js          # authenticates with the daemon token file (or CAR_AUTH_TOKEN)
"use strict";

const car = require("./lib/car");

// The tools this host implements: parameters in, output out (any JSON), or a throw.
const tools = {
  add: ({ a, b }) => a + b,
  divide: ({ a, b }) => {
    if (b === 0) throw new Error("division by zero");
    return a / b;
  },
};

const numbers = car.toStruct({
  type: "object",
  properties: { a: { type: "number" }, b: { type: "number" } },
});

// One tools.execute callback (ExecuteToolRequest): run the tool, answer with its output
// (ClientFrame.tools_execute) or with an error (ClientFrame.error). An error with data
// {terminal: true} would also abort the proposal and halt the session.
function execute(session, frame) {
  const call = frame.tools_execute;
  try {
    const output = tools[call.tool](car.fromStruct(call.parameters));
    session.answer(frame.id, "tools_execute", { output: car.toValue(output) });
  } catch (err) {
    session.answerError(frame.id, -32603, err.message);
  }
}

async function main() {
  const token = car.daemonToken();
  const session = await car.connect({ token });
  session.on("request", (frame) => {
    if (frame.body === "tools_execute") execute(session, frame);
    else session.answerError(frame.id, -32601, `unknown method: ${frame.body}`);
  });

  const count = await session.request("tools_register", {
    tools: [
      { name: "add", description: "a + b", parameters: numbers },
      { name: "divide", description: "a / b", parameters: numbers },
    ],
  });

  // A typed RPC bound to this session (car-session-id) sees the tools just registered.
  const md = car.metadata({ token, sessionId: session.sessionId });
  const listed = await car.unary("ToolService", "ListTools", {}, md);
  car.log("registered", { count: count.count, tools: listed.tools.map((t) => t.name) });

  // `half` uses the output of `sum` ("$sum.output"), so the server runs it after `sum`;
  // `oops` fails and, with failure_behavior skip, does not abort the others.
  const result = await session.request(
    "proposal_submit",
    {
      proposal: {
        id: "node-proposal",
        actions: [
          { id: "sum", type: "ACTION_TYPE_TOOL_CALL", tool: "add", parameters: car.toStruct({ a: 2, b: 3 }) },
          {
            id: "half",
            type: "ACTION_TYPE_TOOL_CALL",
            tool: "divide",
            parameters: car.toStruct({ a: "$sum.output", b: 2 }),
          },
          {
            id: "oops",
            type: "ACTION_TYPE_TOOL_CALL",
            tool: "divide",
            parameters: car.toStruct({ a: 1, b: 0 }),
            failure_behavior: "FAILURE_BEHAVIOR_SKIP",
          },
        ],
      },
    },
    30000,
  );
  car.log("result", {
    proposal_id: result.result.proposal_id,
    results: result.result.results.map((r) => ({
      action_id: r.action_id,
      status: r.status,
      output: car.fromValue(r.output),
      error: r.error || null,
    })),
    tool_calls: result.result.cost.tool_calls,
  });
  session.close();
}

main().catch((err) => {
  car.log("error", { code: err.code, message: err.message });
  process.exit(1);
});
