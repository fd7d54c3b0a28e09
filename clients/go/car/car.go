// Package car holds what every client of the car.v1 gRPC API needs besides the generated
// code (package carv1): where the server is, the token files it writes, the call metadata
// that authenticates a typed RPC, and the server's own error (the `car-error-bin` trailer).
//
//	conn, err := car.Dial()
//	runs := carv1.NewRunServiceClient(conn)
//	ctx := car.Authorize(context.Background(), car.Credentials{Token: token, AgentID: "my-agent"})
//	started, err := runs.StartRun(ctx, &carv1.StartRunRequest{Intent: "fix it"})
package car

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	carv1 "github.com/parslee-ai/car-grpc/clients/go/gen/car/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Address is the server's gRPC address: CAR_GRPC_ADDRESS, else 127.0.0.1:9102 (where
// `car-grpc serve` listens by default).
func Address() string {
	if a := os.Getenv("CAR_GRPC_ADDRESS"); a != "" {
		return a
	}
	return "127.0.0.1:9102"
}

// Dial opens a plaintext connection to Address() (the server listens on loopback only
// unless it was given --grpc-tls-cert; dial a TLS server with credentials.NewTLS).
func Dial() (*grpc.ClientConn, error) {
	return grpc.Dial(Address(), grpc.WithInsecure())
}

// TokenDir is where the server writes its token files: $CAR_HOME/ai.parslee.car, else
// $XDG_RUNTIME_DIR/ai.parslee.car, else ~/.config/ai.parslee.car.
func TokenDir() string {
	if home := os.Getenv("CAR_HOME"); home != "" {
		return filepath.Join(home, "ai.parslee.car")
	}
	if run := os.Getenv("XDG_RUNTIME_DIR"); run != "" {
		return filepath.Join(run, "ai.parslee.car")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".config", "ai.parslee.car")
}

func readToken(name string) string {
	data, err := os.ReadFile(filepath.Join(TokenDir(), name))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(data))
}

// DaemonToken is CAR_AUTH_TOKEN, else the `auth-token` file. The server writes a new one
// at every start, so read it again after a restart.
func DaemonToken() string {
	if t := os.Getenv("CAR_AUTH_TOKEN"); t != "" {
		return t
	}
	return readToken("auth-token")
}

// HostToken is CAR_HOST_TOKEN, else the `host-token` file: the host role, which may read
// every run and chat with every attached agent.
func HostToken() string {
	if t := os.Getenv("CAR_HOST_TOKEN"); t != "" {
		return t
	}
	return readToken("host-token")
}

// Credentials authenticate one typed call.
type Credentials struct {
	// Token is the daemon, host or agent token (empty when the server runs --no-auth).
	Token string
	// AgentID goes with an agent token: the call acts as that agent.
	AgentID string
	// SessionID, when set, runs the call as the live SessionService.Connect session with
	// this id (its tools, state and current run); the credentials must be that session's.
	SessionID string
}

// guide:authorize

// Authorize returns ctx with the call metadata for c: `authorization: Bearer <token>`,
// `car-agent-id` and `car-session-id`.
func Authorize(ctx context.Context, c Credentials) context.Context {
	var kv []string
	if c.Token != "" {
		kv = append(kv, "authorization", "Bearer "+c.Token)
	}
	if c.AgentID != "" {
		kv = append(kv, "car-agent-id", c.AgentID)
	}
	if c.SessionID != "" {
		kv = append(kv, "car-session-id", c.SessionID)
	}
	return metadata.AppendToOutgoingContext(ctx, kv...)
}

// guide:end

// Error is a failed call: the gRPC status code and the server's car.v1.Error (its
// JSON-RPC code, message and data), when the server answered with one.
type Error struct {
	GRPCCode codes.Code
	// Car is the decoded `car-error-bin` trailer; nil when the failure is not the
	// server's answer (the connection broke, a deadline passed, ...).
	Car *carv1.Error
	err error
}

func (e *Error) Error() string {
	if e.Car != nil {
		return fmt.Sprintf("%s (%d): %s", e.GRPCCode, e.Car.GetCode(), e.Car.GetMessage())
	}
	return e.err.Error()
}

func (e *Error) Unwrap() error { return e.err }

// Code is the JSON-RPC code of the server's answer (errors.proto), 0 when there is none.
func (e *Error) Code() int32 { return e.Car.GetCode() }

// ErrorCode is the server's answer as an enum to switch on (ERROR_CODE_UNSPECIFIED when
// there is none).
func (e *Error) ErrorCode() carv1.ErrorCode { return e.Car.GetErrorCode() }

// Message is the server's message, else the gRPC status message.
func (e *Error) Message() string {
	if e.Car != nil {
		return e.Car.GetMessage()
	}
	return status.Convert(e.err).Message()
}

// guide:errors

// FromStatus turns the error of a call into an *Error. The server's car.v1.Error is among
// the details of the call's google.rpc.Status (status.Convert(err).Details()); the same
// Error is in the `car-error-bin` trailer, read from `trailer` when given (unary calls
// collect it with grpc.Trailer(&md); a stream has Trailer()).
func FromStatus(err error, trailer metadata.MD) *Error {
	var already *Error
	if errors.As(err, &already) {
		return already
	}
	e := &Error{GRPCCode: status.Code(err), err: err}
	for _, detail := range status.Convert(err).Details() {
		if car, ok := detail.(*carv1.Error); ok {
			e.Car = car
			return e
		}
	}
	if bins := trailer.Get("car-error-bin"); len(bins) > 0 {
		var decoded carv1.Error
		if proto.Unmarshal([]byte(bins[0]), &decoded) == nil {
			e.Car = &decoded
		}
	}
	return e
}

// guide:end

// Emit prints one JSON object on stdout: {"event": event, ...fields}. The example
// programs report what they do this way (the tests read these lines).
func Emit(event string, fields map[string]interface{}) {
	line := map[string]interface{}{"event": event}
	for k, v := range fields {
		line[k] = v
	}
	data, err := json.Marshal(line)
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(append(data, '\n'))
}

// Fail reports err as an `error` event and exits with status 1.
func Fail(err error) {
	e := FromStatus(err, nil)
	Emit("error", map[string]interface{}{
		"grpc_code":  e.GRPCCode.String(),
		"code":       e.Code(),
		"error_code": e.ErrorCode().String(),
		"message":    e.Message(),
	})
	os.Exit(1)
}
