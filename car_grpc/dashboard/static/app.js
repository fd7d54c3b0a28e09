// The car-grpc dashboard page: plain JavaScript, no build step.
//
// State comes from the dashboard's JSON API (/api/status, /api/approvals, /api/runs) and
// two live Server-Sent Event streams: /api/events (host events: approvals come and go)
// and /api/runs/<id>/events (one run's records). EventSource reconnects by itself and
// sends Last-Event-ID, so a trace resumes right after the last record it showed.
"use strict";

const STATUS_POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

const page = {
  view: "approvals",
  agent: null, // the agent whose runs are listed
  run: null, // the run whose trace is shown
  runStream: null,
  hostStream: null,
  status: null,
};

// ------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

// Local time as "2025-01-31 14:05:09" (the Swedish locale writes ISO 8601).
function time(ms) {
  if (!ms) return "—";
  return new Date(ms).toLocaleString("sv-SE");
}

function duration(ms) {
  const s = Math.floor(ms / 1000);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function short(id) {
  return id ? String(id).slice(0, 8) : "—";
}

// A status word on a badge: the word carries the meaning, the colour only repeats it.
function badge(word) {
  const key = String(word || "unknown").replace(/[^a-z_]/gi, "");
  return el("span", { class: `badge badge-${key}`, text: key.replace(/_/g, " ") });
}

function pretty(value) {
  if (value === undefined || value === null) return "";
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function fill(tbody, rows, emptyId) {
  tbody.replaceChildren(...rows);
  tbody.closest("table").hidden = rows.length === 0;
  if (emptyId) $(emptyId).hidden = rows.length !== 0;
}

function notice(text) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    notice("You are logged out. Open the login link printed in the car-grpc server log.");
    throw new Error("unauthorized");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

// ------------------------------------------------------------------ views

function showView() {
  const [view, agent, run] = location.hash.slice(1).split("/").map(decodeURIComponent);
  page.view = ["approvals", "runs", "sessions", "surfaces"].includes(view) ? view : "approvals";
  for (const link of document.querySelectorAll(".tabs a")) {
    if (link.dataset.view === page.view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const name of ["approvals", "runs", "sessions", "surfaces"]) {
    $(`view-${name}`).hidden = name !== page.view;
  }
  if (page.view === "runs") {
    selectAgent(agent || null);
    openRun(agent && run ? run : null);
  }
  if (page.view === "surfaces") refreshSurfaces(); // surfaces.js
}

// ------------------------------------------------------------------ status line, sessions

async function refreshStatus() {
  let status;
  try {
    status = await api("/api/status");
  } catch (e) {
    $("health").textContent = `Server unreachable: ${e.message}`;
    return;
  }
  notice("");
  page.status = status;
  const sessions = status.session_count;
  $("health").textContent = [
    `Up ${duration(status.uptime_ms)}`,
    `${sessions} session${sessions === 1 ? "" : "s"}`,
    `${status.chats.length} chat${status.chats.length === 1 ? "" : "s"} in flight`,
    `store ${bytes(status.store_bytes)}`,
    `auth ${status.auth_enabled ? "on" : "off"}`,
    `approval gate ${status.approvals_enabled ? "on" : "off"}`,
    `protocol ${status.server_version}`,
  ].join(" · ");
  renderSessions(status);
  renderCluster(status);
  renderRunAgents(status.run_agents);
  if (page.view === "runs" && page.agent) refreshRuns();
}

// Every core of the cluster (a PostgreSQL store shared by several cores); hidden for a
// core of its own. Sessions, agents and chats are each core's; this page lists this
// core's own below.
function renderCluster(status) {
  const cores = status.cluster || [];
  $("cluster-section").hidden = cores.length === 0;
  fill(
    $("cluster").tBodies[0],
    cores.map((c) =>
      el(
        "tr",
        {},
        el("td", {}, el("code", { text: c.core_id }), c.this_core ? " (this core)" : ""),
        el("td", {}, el("code", { text: c.advertise })),
        el("td", {}, badge(c.alive ? "alive" : "expired")),
        el("td", { text: c.sessions || 0 }),
        el("td", { text: c.agents || 0 }),
        el("td", { text: c.chats || 0 }),
        el("td", { text: c.runs || 0 }),
        el("td", { text: c.approvals || 0 }),
        el("td", { text: time(c.joined_at) }),
      ),
    ),
    null,
  );
}

function renderSessions(status) {
  fill(
    $("sessions").tBodies[0],
    status.sessions.map((s) =>
      el(
        "tr",
        {},
        el("td", {}, el("code", { text: short(s.session_id), title: s.session_id })),
        el("td", {}, badge(s.role)),
        el("td", { text: s.agent_id || "—" }),
        el("td", { text: time(s.connected_at) }),
        el("td", { text: s.tools }),
        el("td", {}, s.current_run ? el("code", { text: short(s.current_run) }) : "—"),
        el("td", { text: s.peer || "—" }),
      ),
    ),
    "no-sessions",
  );
  const agents = status.sessions.filter((s) => s.role === "agent");
  $("agents").replaceChildren(
    ...agents.map((s) =>
      el("li", {}, el("strong", { text: s.agent_id }), ` attached since ${time(s.connected_at)}`),
    ),
  );
  $("no-agents").hidden = agents.length !== 0;
  fill(
    $("chats").tBodies[0],
    status.chats.map((c) =>
      el(
        "tr",
        {},
        el("td", {}, el("code", { text: c.session_id })),
        el("td", { text: c.agent_id }),
        el("td", {}, el("code", { text: short(c.host_session_id) })),
        el("td", {}, badge(c.accepted ? "streaming" : "waiting_for_ack")),
      ),
    ),
    "no-chats",
  );
}

// ------------------------------------------------------------------ approvals

async function refreshApprovals() {
  let listing;
  try {
    listing = await api("/api/approvals");
  } catch (e) {
    return;
  }
  const pending = listing.approvals.filter((a) => a.status === "pending");
  const history = listing.approvals.filter((a) => a.status !== "pending");
  $("pending").replaceChildren(...pending.map(approvalCard));
  $("no-pending").hidden = pending.length !== 0;
  $("pending-count").textContent = pending.length ? `(${pending.length} waiting)` : "";
  fill(
    $("history").tBodies[0],
    history.map((a) =>
      el(
        "tr",
        {},
        el("td", { text: time(a.resolved_at) }),
        el("td", {}, el("code", { text: a.action })),
        el("td", { text: a.agent_id || "—" }),
        el("td", {}, badge(a.status)),
        el("td", { text: a.notes || "" }),
      ),
    ),
    "no-history",
  );
}

function approvalCard(approval) {
  const titleId = `approval-${approval.id}`;
  const details = approval.details || {};
  const preview = details.params_preview || details.description || "";
  const decide = (approved) => (event) => resolve(approval, approved, event.target);
  return el(
    "li",
    { class: "card", "data-approval-id": approval.id },
    el("h3", { id: titleId }, el("code", { text: approval.action })),
    el(
      "p",
      { class: "meta" },
      badge("pending"),
      ` raised ${time(approval.created_at)}`,
      approval.agent_id ? ` by agent ${approval.agent_id}` : "",
      approval.client_id ? "" : " by the approval gate",
    ),
    preview ? el("pre", { class: "preview", text: preview }) : null,
    el(
      "div",
      { class: "actions", role: "group", "aria-labelledby": titleId },
      el("button", { type: "button", class: "approve", onclick: decide(true) }, "Approve"),
      el("button", { type: "button", class: "deny", onclick: decide(false) }, "Deny"),
    ),
  );
}

async function resolve(approval, approved, button) {
  const buttons = button.parentElement.querySelectorAll("button");
  buttons.forEach((b) => (b.disabled = true));
  const verb = approved ? "Approved" : "Denied";
  try {
    await api(`/api/approvals/${encodeURIComponent(approval.id)}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ approved }),
    });
    $("approval-result").textContent = `${verb}: ${approval.action}`;
  } catch (e) {
    $("approval-result").textContent = `Could not resolve ${approval.action}: ${e.message}`;
    buttons.forEach((b) => (b.disabled = false));
  }
  refreshApprovals();
}

// ------------------------------------------------------------------ runs

function renderRunAgents(agents) {
  $("run-agents").replaceChildren(
    ...agents.map((a) => {
      const label = `${a.agent_id} — ${a.runs} run${a.runs === 1 ? "" : "s"}` +
        (a.in_progress ? `, ${a.in_progress} in progress` : "");
      const link = el("a", { href: `#runs/${encodeURIComponent(a.agent_id)}`, text: label });
      if (a.agent_id === page.agent) link.setAttribute("aria-current", "true");
      return el("li", {}, link);
    }),
  );
  $("no-run-agents").hidden = agents.length !== 0;
}

function selectAgent(agent) {
  if (agent === page.agent) return;
  page.agent = agent;
  $("agent-runs-title").textContent = agent ? `Runs of ${agent}` : "Choose an agent";
  $("agent-runs").hidden = true;
  if (page.status) renderRunAgents(page.status.run_agents);
  if (agent) refreshRuns();
}

async function refreshRuns() {
  const agent = page.agent;
  let listing;
  try {
    listing = await api(`/api/runs?agent_id=${encodeURIComponent(agent)}`);
  } catch (e) {
    return;
  }
  if (agent !== page.agent) return;
  fill(
    $("agent-runs").tBodies[0],
    listing.runs.map((r) => {
      const href = `#runs/${encodeURIComponent(agent)}/${encodeURIComponent(r.run_id)}`;
      const row = el(
        "tr",
        {},
        el("td", { text: time(r.started_at) }),
        el("td", {}, el("a", { href, text: r.intent || r.run_id })),
        el("td", {}, badge(r.status)),
        el("td", { text: r.turn_count }),
      );
      if (r.run_id === page.run) row.setAttribute("aria-current", "true");
      return row;
    }),
  );
}

function openRun(runId) {
  if (runId === page.run) return;
  if (page.runStream) page.runStream.close();
  page.runStream = null;
  page.run = runId;
  $("trace").hidden = !runId;
  $("records").replaceChildren();
  if (!runId) return;
  $("trace-title").textContent = `Trace of run ${runId}`;
  traceState("connecting", "Loading the trace…");
  const stream = new EventSource(`/api/runs/${encodeURIComponent(runId)}/events?cursor=0`);
  page.runStream = stream;
  stream.addEventListener("open", () => traceState("live", "Live: new turns appear as they are recorded."));
  stream.addEventListener("error", () => {
    if (stream.readyState !== EventSource.CLOSED) {
      traceState("reconnecting", "Connection lost: reconnecting, then resuming after the last turn shown…");
    }
  });
  stream.addEventListener("record", (event) => {
    const item = JSON.parse(event.data);
    $("records").append(renderRecord(item.record, item.cursor));
  });
  stream.addEventListener("end", () => {
    stream.close();
    traceState("ended", "The run has ended: this is its whole trace.");
  });
  stream.addEventListener("failed", (event) => {
    stream.close();
    traceState("failed", `Cannot show this run: ${JSON.parse(event.data).message}`);
  });
}

function traceState(state, text) {
  const line = $("trace-state");
  line.dataset.state = state;
  line.textContent = text;
}

function field(label, value, code = false) {
  if (value === undefined || value === null || value === "") return null;
  return el(
    "div",
    { class: "field" },
    el("dt", { text: label }),
    el("dd", {}, el(code ? "pre" : "p", { text: pretty(value) })),
  );
}

function renderRecord(record, cursor) {
  if (record.record === "started") {
    return el(
      "li",
      { class: "record started" },
      el("h4", {}, badge("started"), ` ${time(record.timestamp)}`),
      el("dl", {}, field("Intent", record.intent), field("Expected outcome", record.outcome_description)),
    );
  }
  if (record.record === "ended") {
    const outcome = record.outcome || {};
    return el(
      "li",
      { class: "record ended" },
      el("h4", {}, badge(record.status), ` ${time(record.timestamp)}`),
      el("dl", {}, field("Outcome", outcome.status), field("Summary", outcome.summary), field("Evidence", outcome.evidence, true)),
    );
  }
  const verdict = record.verifier_verdict || "not_run";
  return el(
    "li",
    { class: "record turn", "data-cursor": cursor },
    el(
      "h4",
      {},
      `Turn ${(record.index || 0) + 1}`,
      record.tool ? el("code", { class: "tool", text: record.tool }) : null,
      record.policy_rejected ? badge("policy_rejected") : null,
      el("span", { class: "verdict" }, "verifier: ", badge(verdict)),
    ),
    el(
      "dl",
      {},
      field("Prompt", record.prompt),
      field("Parameters", record.parameters, true),
      field("Output", record.output, true),
      field("CLI outcome", record.cli_outcome, true),
    ),
  );
}

// ------------------------------------------------------------------ host events

function followHostEvents() {
  const stream = new EventSource("/api/events");
  page.hostStream = stream;
  const live = $("live");
  stream.addEventListener("open", () => {
    live.dataset.state = "connected";
    live.textContent = "Live updates: connected";
    refreshApprovals(); // catch up on whatever happened while disconnected
    refreshStatus();
    if (page.view === "surfaces") refreshSurfaces();
  });
  stream.addEventListener("error", () => {
    live.dataset.state = "reconnecting";
    live.textContent = "Live updates: reconnecting…";
  });
  stream.addEventListener("host", (event) => {
    const kind = JSON.parse(event.data).kind || "";
    if (kind.startsWith("approval.")) refreshApprovals();
    if (kind.startsWith("a2ui.") && page.view === "surfaces") refreshSurfaces();
    refreshStatus(); // sessions, agents and the health line move with most events
  });
  stream.addEventListener("failed", () => {
    // The resume point is from before a server restart: start over from now.
    stream.close();
    setTimeout(followHostEvents, 1000);
  });
}

// ------------------------------------------------------------------ start

$("logout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", credentials: "same-origin" });
  notice("Logged out. Open a fresh login link from the car-grpc server log to come back.");
  if (page.hostStream) page.hostStream.close();
  if (page.runStream) page.runStream.close();
});
window.addEventListener("hashchange", showView);
showView();
refreshStatus();
refreshApprovals();
followHostEvents();
setInterval(refreshStatus, STATUS_POLL_MS);
