// A small Node.js client of the car.v1 gRPC API, built on nothing but the protos.
//
// proto/ is loaded at run time with @grpc/proto-loader, so there is no code generation
// step: the stubs are made from the same .proto files the server is built from.
//
//   const car = require("./lib/car");
//   const session = await car.connect({ agentId, token });   // SessionService.Connect
//   const runs = car.client("RunService");                   // a typed service
//   runs.StartRun(req, car.metadata({ token, sessionId: session.sessionId }), cb);
"use strict";

const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { EventEmitter } = require("node:events");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

// Where the protos are: proto/ of this repository, or CAR_PROTO_DIR (e.g. a copy of it).
const PROTO_DIR = process.env.CAR_PROTO_DIR || path.resolve(__dirname, "..", "..", "..", "proto");
const PROTO_FILES = fs
  .readdirSync(path.join(PROTO_DIR, "car", "v1"))
  .filter((f) => f.endsWith(".proto"))
  .map((f) => `car/v1/${f}`);

// Messages as plain objects: snake_case field names as in the proto (keepCase), 64-bit
// integers as Numbers (our int64 values are unix ms and counters), enums as their names
// ("RUN_STATUS_COMPLETED"), unset scalars as their defaults, and for every oneof a virtual
// field naming the member that is set (frame.body === "agent_chat").
const LOAD_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

const definition = protoLoader.loadSync(PROTO_FILES, LOAD_OPTIONS);
const v1 = grpc.loadPackageDefinition(definition).car.v1;

// ------------------------------------------------------------------ configuration

// The gRPC address of the server (`car-grpc serve` listens on 127.0.0.1:9102).
function address() {
  return process.env.CAR_GRPC_ADDRESS || "127.0.0.1:9102";
}

// The directory of the token files, as the server writes them (docs/grpc-guide.md §2).
function tokenDir() {
  if (process.env.CAR_HOME) return path.join(process.env.CAR_HOME, "ai.parslee.car");
  if (process.env.XDG_RUNTIME_DIR) return path.join(process.env.XDG_RUNTIME_DIR, "ai.parslee.car");
  return path.join(os.homedir(), ".config", "ai.parslee.car");
}

function readTokenFile(name) {
  try {
    return fs.readFileSync(path.join(tokenDir(), name), "utf8").trim();
  } catch {
    return "";
  }
}

// The daemon token: CAR_AUTH_TOKEN, else the `auth-token` file the server wrote.
function daemonToken() {
  return process.env.CAR_AUTH_TOKEN || readTokenFile("auth-token");
}

// The host token (host role: may read every run, resolve any chat): CAR_HOST_TOKEN, else
// the `host-token` file.
function hostToken() {
  return process.env.CAR_HOST_TOKEN || readTokenFile("host-token");
}

// ------------------------------------------------------------------ typed services

const clients = new Map();

// The client of one service, e.g. client("RunService"). One channel per service.
function client(service) {
  if (!clients.has(service)) {
    clients.set(service, new v1[service](address(), grpc.credentials.createInsecure()));
  }
  return clients.get(service);
}

// The call metadata that authenticates a typed RPC and, with sessionId, binds it to a live
// Connect session (its tools, state and current run).
function metadata({ token, agentId, sessionId } = {}) {
  const md = new grpc.Metadata();
  if (token) md.set("authorization", `Bearer ${token}`);
  if (agentId) md.set("car-agent-id", agentId);
  if (sessionId) md.set("car-session-id", sessionId);
  return md;
}

// A unary RPC as a promise: await unary("RunService", "StartRun", request, md).
function unary(service, rpc, request, md = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client(service)[rpc](request, md, (err, response) => {
      if (err) reject(fromStatus(err));
      else resolve(response);
    });
  });
}

// ------------------------------------------------------------------ errors

// proto-loader makes no standalone decoders, so car.v1.Error is decoded with protobufjs
// (the library under proto-loader). Its google/protobuf imports resolve to the built-in
// copies that protobufjs (and proto-loader, above) register.
const root = new protobuf.Root();
root.resolvePath = (_origin, target) => path.join(PROTO_DIR, target);
root.loadSync("car/v1/errors.proto", { keepCase: true });
const ErrorType = root.lookupType("car.v1.Error");

// A failure with a JSON-RPC code (errors.proto): what a ServerFrame.error says, or what a
// typed RPC's `car-error-bin` trailer carries.
class CarError extends Error {
  constructor(code, message, data) {
    super(message);
    this.name = "CarError";
    this.code = code;
    this.data = data;
  }
}

// The CarError of a failed typed RPC: decoded from its `car-error-bin` trailer (the exact
// JSON-RPC code and data), or built from the gRPC status when there is none.
function fromStatus(err) {
  const bin = err.metadata && err.metadata.get("car-error-bin")[0];
  if (bin) {
    const e = ErrorType.toObject(ErrorType.decode(bin), LOAD_OPTIONS);
    return Object.assign(new CarError(e.code, e.message, fromValue(e.data)), { grpcCode: err.code });
  }
  return Object.assign(new CarError(0, err.details || err.message), { grpcCode: err.code });
}

// ------------------------------------------------------------------ free-form JSON

// google.protobuf.Value / Struct <-> plain JavaScript values. proto-loader decodes a Value
// as `{kind: "numberValue", numberValue: 5}` (the set member of its `kind` oneof) and a
// Struct as `{fields: {name: Value}}`. Note the camelCase: proto-loader takes the
// well-known types from protobufjs's built-in copies, which keepCase does not touch.
function toValue(js) {
  if (js === null || js === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof js === "number") return { numberValue: js };
  if (typeof js === "string") return { stringValue: js };
  if (typeof js === "boolean") return { boolValue: js };
  if (Array.isArray(js)) return { listValue: { values: js.map(toValue) } };
  return { structValue: toStruct(js) };
}

function fromValue(value) {
  if (!value || !value.kind) return null;
  switch (value.kind) {
    case "numberValue":
      return value.numberValue;
    case "stringValue":
      return value.stringValue;
    case "boolValue":
      return value.boolValue;
    case "listValue":
      return (value.listValue.values || []).map(fromValue);
    case "structValue":
      return fromStruct(value.structValue);
    default:
      return null;
  }
}

function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj || {})) fields[k] = toValue(v);
  return { fields };
}

function fromStruct(struct) {
  const out = {};
  for (const [k, v] of Object.entries((struct && struct.fields) || {})) out[k] = fromValue(v);
  return out;
}

// ------------------------------------------------------------------ the session stream

// One SessionService.Connect stream: a client session. Requests get fresh ids and are
// matched to their answers; the server's own requests (tools.execute, agent.chat, ...) are
// emitted as "request" events, its notifications as "notification" events, each with the
// whole ServerFrame (`frame.body` names the member that is set).
class Session extends EventEmitter {
  constructor(md = new grpc.Metadata()) {
    super();
    this.call = client("SessionService").Connect(md);
    this.sessionId = "";
    this.nextId = 1;
    this.waiting = new Map();
    this.call.on("data", (frame) => this.onFrame(frame));
    this.call.on("error", (err) => this.end(err));
    this.call.on("end", () => this.end(null));
  }

  onFrame(frame) {
    const pending = this.waiting.get(frame.id);
    if (pending) {
      this.waiting.delete(frame.id);
      pending(frame);
    } else if (frame.id) {
      this.emit("request", frame);
    } else {
      this.emit("notification", frame);
    }
  }

  end(err) {
    if (this.ended) return;
    this.ended = true;
    if (this.closing) err = null; // the cancel of our own close() is no failure
    for (const pending of this.waiting.values()) {
      pending({ body: "error", error: { code: 0, message: "stream ended" } });
    }
    this.waiting.clear();
    this.emit("end", err);
  }

  // Sends `ClientFrame{id, [member]: message}`; resolves with the response message or
  // rejects with a CarError (ServerFrame.error).
  request(member, message, timeoutMs = 10000) {
    const id = String(this.nextId++);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new CarError(0, `${member}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.set(id, (frame) => {
        clearTimeout(timer);
        if (frame.body === "error") {
          const e = frame.error;
          reject(new CarError(e.code, e.message, fromValue(e.data)));
        } else {
          resolve(frame[member]);
        }
      });
      this.call.write({ id, [member]: message });
    });
  }

  // Answers the server request `id` (a `cb-N`) with `ClientFrame{id, [member]: message}`.
  answer(id, member, message) {
    this.call.write({ id, [member]: message });
  }

  // Fails the server request `id`. data `{terminal: true}` on a tools.execute answer means
  // "do not retry": the proposal aborts and the session is halted.
  answerError(id, code, message, data) {
    const error = { code, message };
    if (data !== undefined) error.data = toValue(data);
    this.call.write({ id, error });
  }

  // Sends a notification (no id, no answer), e.g. agent_chat_event.
  notify(member, message) {
    this.call.write({ id: "", [member]: message });
  }

  close() {
    this.closing = true;
    this.call.end();
    this.call.cancel();
  }
}

// Opens a session: Connect, `session.auth` (first, always), then `server.handshake`.
// token: the daemon token, or an agent token together with agentId (the session is then
// attached as that agent and receives its chats); hostToken: the host role.
async function connect({ token, agentId, hostToken: host } = {}) {
  const session = new Session();
  const auth = {};
  if (token) auth.token = token;
  if (agentId) auth.agent_id = agentId;
  if (host) auth.host_token = host;
  const authed = await session.request("session_auth", auth);
  session.sessionId = authed.session_id || "";
  session.credentials = { token: token || host, agentId };
  await session.request("server_handshake", {
    protocol_version: toValue(3),
    client_version: "car-grpc-node-examples",
  });
  return session;
}

// Prints one JSON line on stdout: how the example programs report what they do.
function log(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

module.exports = {
  v1,
  grpc,
  address,
  tokenDir,
  daemonToken,
  hostToken,
  client,
  metadata,
  unary,
  CarError,
  fromStatus,
  toValue,
  fromValue,
  toStruct,
  fromStruct,
  Session,
  connect,
  log,
};
