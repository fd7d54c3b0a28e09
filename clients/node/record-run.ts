// An agent that records a run: RunService.StartRun, one RecordTurns call per prompt, then
// CompleteRun, all authenticated with the agent's token.
//
//   CAR_AGENT_ID=my-agent CAR_AGENT_TOKEN=$(car-grpc agents add my-agent) \
//       npx tsx record-run.ts [--step] <intent> <prompt>...
//
// Each turn records the prompt, the tool "shell", some parameters and the prompt in upper
// case as its output. With --step it waits for a line on stdin before each turn and before
// completing, so that a watcher can be seen to receive every record live.
import * as readline from "node:readline";
import { client, fail, headers, log, toValue } from "./lib/car.js";
import { RunOutcomeStatus, RunService } from "./gen/car/v1/runs_pb.js";

const args = process.argv.slice(2);
const step = args[0] === "--step";
const [intent = "", ...prompts] = step ? args.slice(1) : args;
const agent = { headers: headers({ token: process.env.CAR_AGENT_TOKEN, agentId: process.env.CAR_AGENT_ID }) };
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function wait(): Promise<void> {
  if (step && (await lines.next()).done) process.exit(0); // the driver went away
}

// guide:record-run
try {
  const runs = client(RunService);
  const call = { ...agent, timeoutMs: 10000 };
  const started = await runs.startRun({ intent }, call);
  log("started", { run_id: started.runId, agent_id: started.agentId });
  for (const [i, prompt] of prompts.entries()) {
    await wait();
    const parameters = { argv: ["echo", prompt], step: i + 1, env: { LANG: "C", dry_run: false, limit: null } };
    const turn = { prompt, tool: "shell", parameters: toValue(parameters), output: toValue(prompt.toUpperCase()) };
    const recorded = await runs.recordTurns({ runId: started.runId, turns: [turn] }, call);
    log("recorded", { ok: recorded.ok, base_index: recorded.baseIndex, count: recorded.count });
  }
  await wait();
  // statusEnum alone: the server fills `status` ("success") from it.
  const outcome = { statusEnum: RunOutcomeStatus.SUCCESS, summary: "recorded from TypeScript" };
  await runs.completeRun({ runId: started.runId, outcome }, call);
  log("completed", { run_id: started.runId });
  process.exit(0);
} catch (err) {
  fail(err);
}
// guide:end
