// Watches a run with RunService.WatchRun: every record from a cursor on, live, until the
// run's `ended` record. When the connection drops it resumes from the last cursor it saw,
// so no record is missed or repeated.
//
//   node watch-run.js <run_id> [cursor]
//
// Reads with the host token (the host role may read every run); set CAR_AGENT_ID and
// CAR_AGENT_TOKEN instead to watch the runs of that agent.
"use strict";

const car = require("./lib/car");

const [runId, from = "0"] = process.argv.slice(2);
const md = process.env.CAR_AGENT_ID
  ? car.metadata({ token: process.env.CAR_AGENT_TOKEN, agentId: process.env.CAR_AGENT_ID })
  : car.metadata({ token: car.hostToken() });

// A RunRecord as plain JSON: its `detail` oneof says which of started / turn / ended it is.
function describe(record) {
  const detail = record[record.detail];
  if (record.detail === "turn") {
    return { kind: "turn", index: detail.index, prompt: detail.prompt, tool: detail.tool, output: car.fromValue(detail.output) };
  }
  if (record.detail === "ended") return { kind: "ended", status: detail.status };
  return { kind: "started", agent_id: detail.agent_id, intent: detail.intent };
}

function watch(cursor, retries) {
  const call = car.client("RunService").WatchRun({ run_id: runId, cursor }, md);
  call.on("data", (item) => {
    cursor = item.cursor; // records seen so far: where to resume
    car.log("record", { cursor: item.cursor, status: item.status, ...describe(item.record) });
  });
  call.on("end", () => car.log("end", { cursor }));
  call.on("error", (err) => {
    if (err.code === car.grpc.status.UNAVAILABLE && retries > 0) {
      setTimeout(() => watch(cursor, retries - 1), 200); // resume after the last record seen
      return;
    }
    const e = car.fromStatus(err);
    car.log("error", { code: e.code, message: e.message, grpc_code: e.grpcCode });
    process.exitCode = 1;
  });
}

watch(Number(from), 5);
