// What every TypeScript client of the car.v1 gRPC API needs besides the generated code
// (gen/car/v1, made from proto/ by protoc-gen-es): where the server is, the token files it
// writes, the call metadata that authenticates a typed RPC, the server's own error (the
// `car-error-bin` trailer), and the session stream (SessionService.Connect) with its
// request ids matched to their answers.
//
//   import { client, headers } from "./lib/car.js";
//   import { RunService } from "./gen/car/v1/runs_pb.js";
//   const runs = client(RunService);                  // Connect, over the gRPC protocol
//   const started = await runs.startRun({ intent: "fix it" }, { headers: headers({ token, agentId }) });
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  create,
  fromJson,
  toJson,
  type DescEnum,
  type DescService,
  type JsonValue,
  type MessageInitShape,
} from "@bufbuild/protobuf";
import { ValueSchema, type Value } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, decodeBinaryHeader, type Client } from "@connectrpc/connect";
import { createWritableIterable } from "@connectrpc/connect/protocol";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { ErrorCode, ErrorCodeSchema, ErrorSchema } from "../gen/car/v1/errors_pb.js";
import {
  ClientFrameSchema,
  ServerFrameSchema,
  SessionService,
  type ServerFrame,
} from "../gen/car/v1/session_pb.js";

// ------------------------------------------------------------------ configuration

// The gRPC address of the server (`car-grpc serve` listens on 127.0.0.1:9102).
export function address(): string {
  return process.env.CAR_GRPC_ADDRESS || "127.0.0.1:9102";
}

// The directory of the token files, as the server writes them (docs/grpc-guide.md).
export function tokenDir(): string {
  if (process.env.CAR_HOME) return path.join(process.env.CAR_HOME, "ai.parslee.car");
  if (process.env.XDG_RUNTIME_DIR) return path.join(process.env.XDG_RUNTIME_DIR, "ai.parslee.car");
  return path.join(os.homedir(), ".config", "ai.parslee.car");
}

function readTokenFile(name: string): string {
  try {
    return fs.readFileSync(path.join(tokenDir(), name), "utf8").trim();
  } catch {
    return "";
  }
}

// The daemon token: CAR_AUTH_TOKEN, else the `auth-token` file. The server writes a new one
// at every start, so read it again after a restart.
export function daemonToken(): string {
  return process.env.CAR_AUTH_TOKEN || readTokenFile("auth-token");
}

// The host token (the host role may read every run and chat with every agent):
// CAR_HOST_TOKEN, else the `host-token` file.
export function hostToken(): string {
  return process.env.CAR_HOST_TOKEN || readTokenFile("host-token");
}

// ------------------------------------------------------------------ typed services

// guide:typed-clients
// One HTTP/2 connection for every service, speaking the gRPC protocol (plaintext: the
// server listens on loopback unless it was given --grpc-tls-cert).
const transport = createGrpcTransport({ baseUrl: `http://${address()}` });

// The typed client of a service: client(RunService).startRun(request, { headers }).
export function client<S extends DescService>(service: S): Client<S> {
  return createClient(service, transport);
}

export interface Credentials {
  // The daemon, host or agent token (omit when the server runs --no-auth).
  token?: string;
  // Goes with an agent token: the call acts as that agent.
  agentId?: string;
  // Runs the call as the live SessionService.Connect session with this id (its tools,
  // state and current run); the credentials must be that session's.
  sessionId?: string;
}

// The call metadata of a typed RPC: `authorization: Bearer <token>`, `car-agent-id`,
// `car-session-id`. Pass it as the call option `headers`.
export function headers({ token, agentId, sessionId }: Credentials): Record<string, string> {
  const h: Record<string, string> = {};
  if (token) h.authorization = `Bearer ${token}`;
  if (agentId) h["car-agent-id"] = agentId;
  if (sessionId) h["car-session-id"] = sessionId;
  return h;
}
// guide:end

// ------------------------------------------------------------------ errors

// A failure with a JSON-RPC code (errors.proto): what a ServerFrame.error says, or what a
// typed RPC's `car-error-bin` trailer carries. grpcCode is the gRPC status of a failed
// typed call ("NotFound"), empty for an error answered on the session stream.
export class CarError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly data: JsonValue = null,
    readonly grpcCode = "",
    // True when the server answered (car-error-bin was there): such an answer is final.
    readonly answered = false,
    // The server's code as an enum to switch on (ErrorCode.UNSPECIFIED when there is none).
    readonly errorCode = ErrorCode.UNSPECIFIED,
  ) {
    super(message);
    this.name = "CarError";
  }
}

// guide:errors
// The CarError of a failed call: the server's car.v1.Error, one of the details of the
// call's google.rpc.Status (ConnectError.findDetails), or from the `car-error-bin` trailer
// (Connect puts the trailers of a failed call in ConnectError.metadata); else the gRPC
// status alone (the connection broke, a deadline passed, ...).
export function fromError(err: unknown): CarError {
  if (err instanceof CarError) return err;
  const e = ConnectError.from(err);
  const grpcCode = Code[e.code];
  const bin = e.metadata.get("car-error-bin");
  const car = e.findDetails(ErrorSchema)[0] ?? (bin ? decodeBinaryHeader(bin, ErrorSchema) : undefined);
  if (car) return new CarError(car.code, car.message, fromValue(car.data), grpcCode, true, car.errorCode);
  return new CarError(0, e.rawMessage, null, grpcCode);
}
// guide:end

// ------------------------------------------------------------------ JSON helpers

// google.protobuf.Value <-> plain JSON. (Struct fields are plain JSON objects already.)
export function toValue(json: JsonValue): Value {
  return fromJson(ValueSchema, json);
}

export function fromValue(value: Value | undefined): JsonValue {
  return value ? toJson(ValueSchema, value) : null;
}

// The proto name of an enum value: enumName(RunStatusSchema, 3) === "RUN_STATUS_COMPLETED".
export function enumName(schema: DescEnum, value: number): string {
  return schema.value[value]?.name ?? String(value);
}

// Prints one JSON line on stdout: how the example programs report what they do (the tests
// read these lines). 64-bit integers (bigint) are printed as numbers.
export function log(event: string, fields: Record<string, unknown> = {}): void {
  const line = JSON.stringify({ event, ...fields }, (_k, v) => (typeof v === "bigint" ? Number(v) : v));
  process.stdout.write(`${line}\n`);
}

// Reports a failure as an `error` event and exits with status 1.
export function fail(err: unknown): never {
  const e = fromError(err);
  const grpc = e.grpcCode ? { grpc_code: e.grpcCode, error_code: enumName(ErrorCodeSchema, e.errorCode) } : {};
  log("error", { ...grpc, code: e.code, message: e.message });
  process.exit(1);
}

// ------------------------------------------------------------------ the session stream

type ClientInit = MessageInitShape<typeof ClientFrameSchema>;
type ClientBody = NonNullable<ClientInit["body"]>;
type ServerBody = ServerFrame["body"];
// A member of ClientFrame.body (a request, answer or notification the client sends).
export type Member = Exclude<ClientBody["case"], undefined | "error">;
// A member of both oneofs: a request and its answer share the member name.
export type Method = Member & ServerBody["case"];
// What a member carries: its message, or an init object for it ({ intent: "fix it" }).
type Request<M> = Extract<ClientBody, { case: M }>["value"];
type Response<M> = Extract<ServerBody, { case: M }>["value"];
type Waiter = (frame: ServerFrame) => void;

// One SessionService.Connect stream. Requests get fresh ids and are matched to their
// answers; the server's own requests (ids `cb-N`: tools.execute, agent.chat, ...) go to
// onRequest, its notifications to onNotification, each as the whole typed ServerFrame.
export class Session {
  sessionId = "";
  onRequest: (frame: ServerFrame) => void = (frame) =>
    this.answerError(frame.id, -32601, `unknown method: ${frame.body.case}`);
  onNotification: (frame: ServerFrame) => void = () => {};
  // Resolves when the stream ends: null when it ended cleanly or by close().
  readonly ended: Promise<CarError | null>;

  private readonly outgoing = createWritableIterable<ClientInit>();
  private readonly abort = new AbortController();
  private readonly waiting = new Map<string, Waiter>();
  private nextId = 1;

  constructor(credentials: Credentials = {}) {
    const frames = client(SessionService).connect(this.outgoing, {
      headers: headers(credentials),
      signal: this.abort.signal,
    });
    this.ended = this.read(frames);
  }

  private async read(frames: AsyncIterable<ServerFrame>): Promise<CarError | null> {
    let failure: CarError | null = null;
    try {
      for await (const frame of frames) {
        const waiter = this.waiting.get(frame.id);
        if (waiter) {
          this.waiting.delete(frame.id);
          waiter(frame);
        } else if (frame.id) {
          this.onRequest(frame);
        } else {
          this.onNotification(frame);
        }
      }
    } catch (err) {
      if (!this.abort.signal.aborted) failure = fromError(err); // close() is no failure
    }
    const gone = create(ServerFrameSchema, { body: { case: "error", value: { message: "stream ended" } } });
    for (const waiter of this.waiting.values()) waiter(gone);
    this.waiting.clear();
    return failure;
  }

  private send(frame: ClientInit): void {
    // A write waits until the stream takes the frame; a failed stream ends `ended`.
    this.outgoing.write(frame).catch(() => {});
  }

  // Sends ClientFrame{id, [method]: message}; resolves with the answer of the same member,
  // or rejects with the CarError of a ServerFrame.error, or after timeoutMs.
  request<M extends Method>(method: M, message: Request<M>, timeoutMs = 10000): Promise<Response<M>> {
    const id = String(this.nextId++);
    return new Promise<Response<M>>((resolve, reject) => {
      const answered = resolve as (value: unknown) => void;
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new CarError(0, `${method}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.set(id, (frame) => {
        clearTimeout(timer);
        if (frame.body.case === method) answered(frame.body.value);
        else if (frame.body.case === "error") {
          const e = frame.body.value;
          reject(new CarError(e.code, e.message, fromValue(e.data), "", false, e.errorCode));
        } else reject(new CarError(0, `${method}: answered with ${frame.body.case}`));
      });
      this.send({ id, body: { case: method, value: message } as ClientBody });
    });
  }

  // Answers the server request `id` (a `cb-N`) with ClientFrame{id, [method]: message}.
  answer<M extends Method>(id: string, method: M, message: Request<M>): void {
    this.send({ id, body: { case: method, value: message } as ClientBody });
  }

  // Fails the server request `id`. data {terminal: true} on a tools.execute answer means
  // "do not retry": the proposal aborts and the session is halted.
  answerError(id: string, code: number, message: string, data?: JsonValue): void {
    const value = create(ErrorSchema, { code, message, data: data === undefined ? undefined : toValue(data) });
    this.send({ id, body: { case: "error", value } });
  }

  // Sends a notification (no id, no answer), e.g. agentChatEvent.
  notify<M extends Member>(method: M, message: Request<M>): void {
    this.send({ id: "", body: { case: method, value: message } as ClientBody });
  }

  close(): void {
    this.outgoing.close();
    this.abort.abort();
  }
}

