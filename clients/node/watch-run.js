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
// Read the token at every (re)connect: the server writes a new host token when it restarts.
function credentials() {
  return process.env.CAR_AGENT_ID
    ? car.metadata({ token: process.env.CAR_AGENT_TOKEN, agentId: process.env.CAR_AGENT_ID })
    : car.metadata({ token: car.hostToken() });
}

// A RunRecord as plain JSON: its `detail` oneof says which of started / turn / ended it is.
function describe(record) {
  const detail = record[record.detail];
  if (record.detail === "turn") {
    const { index, prompt, tool } = detail;
    return { kind: "turn", index, prompt, tool, parameters: car.fromValue(detail.parameters), output: car.fromValue(detail.output) };
  }
  if (record.detail === "ended") return { kind: "ended", status: detail.status };
  return { kind: "started", agent_id: detail.agent_id, intent: detail.intent };
}

// Reconnect every 200 ms while the server is unreachable, for at most ~10 s in a row.
const RETRY_MS = 200;
const RETRIES = 50;

function watch(cursor, retries) {
  const call = car.client("RunService").WatchRun({ run_id: runId, cursor }, credentials());
  call.on("data", (item) => {
    cursor = item.cursor; // records seen so far: where to resume
    retries = RETRIES;
    car.log("record", { cursor: item.cursor, status: item.status, ...describe(item.record) });
  });
  // Every call ends with a status; OK means the run ended and every record was seen.
  call.on("status", (status) => {
    if (status.code === car.grpc.status.OK) car.log("end", { cursor });
  });
  call.on("error", (err) => {
    // The server's own answers (run not found, auth failed) carry a car-error-bin trailer
    // and are final; any other failure is the connection: resume after the last record.
    const answered = err.metadata && err.metadata.get("car-error-bin").length > 0;
    if (!answered && retries > 0) {
      if (retries === RETRIES) car.log("reconnecting", { cursor, reason: err.details });
      setTimeout(() => watch(cursor, retries - 1), RETRY_MS);
      return;
    }
    const e = car.fromStatus(err);
    car.log("error", { code: e.code, message: e.message, grpc_code: e.grpcCode });
    process.exitCode = 1;
  });
}

watch(Number(from), RETRIES);
