// Watches a run with RunService.WatchRun: every record from a cursor on, then each new one
// live, until the run's `ended` record. When the connection drops it watches again from the
// last cursor it saw, so no record is missed or repeated.
//
//   npx tsx watch-run.ts <run_id> [cursor]
//
// Reads with the host token (the host role may read every run); set CAR_AGENT_ID and
// CAR_AGENT_TOKEN to watch as the run's agent instead.
import { setTimeout as sleep } from "node:timers/promises";
import { client, enumName, fail, fromError, fromValue, headers, hostToken, log } from "./lib/car.js";
import { RunOutcomeStatusSchema, RunService, RunStatusSchema, type WatchRunResponse } from "./gen/car/v1/runs_pb.js";

const [runId = "", from = "0"] = process.argv.slice(2);

// Read at every (re)connect: a restarted server writes a new host token.
function credentials() {
  const agentId = process.env.CAR_AGENT_ID;
  return headers(agentId ? { token: process.env.CAR_AGENT_TOKEN, agentId } : { token: hostToken() });
}

// A record as flat JSON fields; its `detail` oneof is one of three types.
function describe(item: WatchRunResponse): Record<string, unknown> {
  const fields = { cursor: item.cursor, status: enumName(RunStatusSchema, item.status) };
  const detail = item.record?.detail;
  switch (detail?.case) {
    case "started":
      return { ...fields, kind: "started", agent_id: detail.value.agentId, intent: detail.value.intent };
    case "turn": {
      const turn = detail.value;
      const { index, prompt, tool } = turn;
      return {
        ...fields,
        kind: "turn",
        index,
        prompt,
        tool,
        parameters: fromValue(turn.parameters),
        output: fromValue(turn.output),
      };
    }
    case "ended":
      return {
        ...fields,
        kind: "ended",
        ended_status: enumName(RunStatusSchema, detail.value.status),
        outcome: detail.value.outcome?.status ?? null,
        outcome_enum: enumName(RunOutcomeStatusSchema, detail.value.outcome?.statusEnum ?? 0),
      };
  }
  return fields;
}

// Reconnect every 200 ms while the server is unreachable, for at most ~10 s in a row.
const RETRY_MS = 200;
const RETRIES = 50;

// guide:watch-run
let cursor = BigInt(from);
let left = RETRIES;
const runs = client(RunService);
for (;;) {
  try {
    for await (const item of runs.watchRun({ runId, cursor }, { headers: credentials() })) {
      cursor = item.cursor; // records seen so far: where to resume
      left = RETRIES;
      log("record", describe(item));
    }
    log("end", { cursor }); // the stream ended with OK: the run ended, every record seen
    break;
  } catch (err) {
    // The server's own answers (not found, refused) carry car-error-bin and are final;
    // anything else is the connection: watch again from the last cursor.
    const failure = fromError(err);
    if (failure.answered || left === 0) fail(failure);
    if (left === RETRIES) log("reconnecting", { cursor, reason: failure.message });
    left -= 1;
    await sleep(RETRY_MS);
  }
}
// guide:end
