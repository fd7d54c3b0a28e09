// tool-host serves tools over the typed stream ToolService.ServeTools: it registers its
// tools in the stream's first message, answers every ToolCall with one ToolResult (each on
// a goroutine of its own), and stops working on a call when a ToolCancel names it.
//
//	tool-host [-name go-tools] [-session <session_id>]
//
// Without -session its tools are shared by name with every session's proposals (it
// authenticates with the daemon token file, or CAR_AUTH_TOKEN; the host role works too).
// With -session it serves that session's own tools, bound with car-session-id and the
// session's own credentials (the daemon token, or CAR_AGENT_ID and CAR_AGENT_TOKEN). It
// ends cleanly when its stdin closes.
//
// Tools: add {a, b} -> a + b; divide {a, b} -> a / b, failing when b is 0; wait {} ->
// nothing until the call is cancelled.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/parslee-ai/car-grpc/clients/go/car"
	carv1 "github.com/parslee-ai/car-grpc/clients/go/gen/car/v1"
	"google.golang.org/protobuf/types/known/structpb"
)

// host answers the calls of one ServeTools stream.
type host struct {
	stream carv1.ToolService_ServeToolsClient
	// A gRPC stream allows one Send at a time: the goroutines answering calls take turns.
	sending sync.Mutex
	mu      sync.Mutex
	running map[string]context.CancelFunc // request_id -> cancels its goroutine
}

func (h *host) send(m *carv1.ServeToolsRequest) error {
	h.sending.Lock()
	defer h.sending.Unlock()
	return h.stream.Send(m)
}

// guide:serve-tools-start

// start runs one call on its own goroutine and answers it, unless it is cancelled first.
func (h *host) start(parent context.Context, call *carv1.ToolCall) {
	ctx, cancel := context.WithCancel(parent)
	h.mu.Lock()
	h.running[call.RequestId] = cancel
	h.mu.Unlock()
	go func() {
		defer h.cancel(call.RequestId)
		output, err := run(ctx, call)
		if ctx.Err() != nil {
			return // cancelled: the server no longer waits for this call
		}
		result := &carv1.ToolResult{RequestId: call.RequestId}
		if err != nil {
			// Terminal: true would also abort the proposal and halt the caller's session.
			result.Outcome = &carv1.ToolResult_Error{Error: &carv1.ToolError{Message: err.Error()}}
		} else {
			result.Outcome = &carv1.ToolResult_Output{Output: output}
		}
		h.send(&carv1.ServeToolsRequest{Body: &carv1.ServeToolsRequest_Result{Result: result}})
	}()
}

// guide:end

func (h *host) cancel(requestID string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if cancel, ok := h.running[requestID]; ok {
		cancel()
		delete(h.running, requestID)
	}
}

// run is the tools themselves: parameters in, output (any JSON) or an error out.
func run(ctx context.Context, call *carv1.ToolCall) (*structpb.Value, error) {
	params := call.GetParameters().AsMap()
	a, _ := params["a"].(float64)
	b, _ := params["b"].(float64)
	switch call.Tool {
	case "add":
		return structpb.NewNumberValue(a + b), nil
	case "divide":
		if b == 0 {
			return nil, errors.New("division by zero")
		}
		return structpb.NewNumberValue(a / b), nil
	case "wait":
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return nil, fmt.Errorf("unknown tool %q", call.Tool)
}

func main() {
	name := flag.String("name", "go-tools", "the host's name (in logs and errors)")
	session := flag.String("session", "", "serve this session's own tools (car-session-id) instead of shared ones")
	flag.Parse()
	creds := car.Credentials{Token: car.DaemonToken(), SessionID: *session}
	if agentID := os.Getenv("CAR_AGENT_ID"); agentID != "" {
		creds = car.Credentials{Token: os.Getenv("CAR_AGENT_TOKEN"), AgentID: agentID, SessionID: *session}
	}

	conn, err := car.Dial()
	if err != nil {
		car.Fail(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(car.Authorize(context.Background(), creds))
	defer cancel()
	// guide:serve-tools
	stream, err := carv1.NewToolServiceClient(conn).ServeTools(ctx)
	if err != nil {
		car.Fail(err)
	}
	h := &host{stream: stream, running: map[string]context.CancelFunc{}}

	numbers, _ := structpb.NewStruct(map[string]interface{}{
		"type":       "object",
		"properties": map[string]interface{}{"a": map[string]interface{}{"type": "number"}, "b": map[string]interface{}{"type": "number"}},
	})
	register := &carv1.RegisterToolHost{Host: name, Tools: []*carv1.ToolDefinition{
		{Name: "add", Description: "a + b", Parameters: numbers},
		{Name: "divide", Description: "a / b", Parameters: numbers},
		{Name: "wait", Description: "waits until cancelled"},
	}}
	if err := h.send(&carv1.ServeToolsRequest{Body: &carv1.ServeToolsRequest_Register{Register: register}}); err != nil {
		car.Fail(err)
	}
	// Closing stdin ends the stream cleanly: the server then drops the tools.
	go func() {
		io.Copy(io.Discard, os.Stdin)
		h.sending.Lock()
		defer h.sending.Unlock()
		stream.CloseSend()
	}()

	for {
		message, err := stream.Recv()
		if err == io.EOF {
			car.Emit("end", nil)
			return
		}
		if err != nil {
			// A refused registration (ALREADY_EXISTS, PERMISSION_DENIED, ...) ends here too.
			car.Fail(car.FromStatus(err, stream.Trailer()))
		}
		switch body := message.Body.(type) {
		case *carv1.ServeToolsResponse_Registered:
			car.Emit("registered", map[string]interface{}{
				"host":  body.Registered.Host,
				"scope": body.Registered.Scope.String(),
				"tools": body.Registered.Tools,
			})
		case *carv1.ServeToolsResponse_Call:
			call := body.Call
			car.Emit("call", map[string]interface{}{
				"request_id":  call.RequestId,
				"action_id":   call.ActionId,
				"tool":        call.Tool,
				"attempt":     call.Attempt,
				"parameters":  call.GetParameters().AsMap(),
				"caller_role": call.GetCaller().GetRole().String(),
				"agent_id":    call.GetCaller().GetAgentId(),
			})
			h.start(ctx, call)
		case *carv1.ServeToolsResponse_Cancel:
			car.Emit("cancel", map[string]interface{}{
				"request_id": body.Cancel.RequestId,
				"action_id":  body.Cancel.ActionId,
				"reason":     body.Cancel.Reason,
			})
			h.cancel(body.Cancel.RequestId)
		}
	}
	// guide:end
}
