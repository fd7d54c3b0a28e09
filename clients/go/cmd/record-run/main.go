// record-run is an agent that records a run: RunService.StartRun, one RecordTurns call
// per prompt, then CompleteRun, all authenticated with the agent's token.
//
//	CAR_AGENT_ID=my-agent CAR_AGENT_TOKEN=$(car-grpc agents add my-agent) \
//	    record-run [-step] <intent> <prompt>...
//
// Each turn records the prompt, the tool "shell", some parameters and the prompt in upper
// case as its output. With -step it waits for a line on stdin before each turn and before
// completing, so that a watcher can be seen to receive every record live.
package main

import (
	"bufio"
	"context"
	"flag"
	"os"
	"strings"
	"time"

	"github.com/parslee-ai/car-grpc/clients/go/car"
	carv1 "github.com/parslee-ai/car-grpc/clients/go/gen/car/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
)

func main() {
	step := flag.Bool("step", false, "wait for a line on stdin before each turn and before completing")
	flag.Parse()
	if flag.NArg() < 1 {
		os.Stderr.WriteString("usage: record-run [-step] <intent> <prompt>...\n")
		os.Exit(2)
	}
	intent, prompts := flag.Arg(0), flag.Args()[1:]
	agent := car.Credentials{Token: os.Getenv("CAR_AGENT_TOKEN"), AgentID: os.Getenv("CAR_AGENT_ID")}
	stdin := bufio.NewReader(os.Stdin)
	wait := func() {
		if *step {
			if _, err := stdin.ReadString('\n'); err != nil {
				os.Exit(0) // the driver went away
			}
		}
	}

	conn, err := car.Dial()
	if err != nil {
		car.Fail(err)
	}
	defer conn.Close()
	runs := carv1.NewRunServiceClient(conn)
	// call runs one unary RPC as the agent, with a deadline, keeping its trailer for errors.
	call := func(rpc func(context.Context, ...grpc.CallOption) error) {
		ctx, cancel := context.WithTimeout(car.Authorize(context.Background(), agent), 10*time.Second)
		defer cancel()
		var trailer metadata.MD
		if err := rpc(ctx, grpc.Trailer(&trailer)); err != nil {
			car.Fail(car.FromStatus(err, trailer))
		}
	}

	// guide:record-run
	var started *carv1.StartRunResponse
	call(func(ctx context.Context, opts ...grpc.CallOption) (err error) {
		started, err = runs.StartRun(ctx, &carv1.StartRunRequest{Intent: intent}, opts...)
		return err
	})
	car.Emit("started", map[string]interface{}{"run_id": started.RunId, "agent_id": started.AgentId})

	for i, prompt := range prompts {
		wait()
		parameters, err := structpb.NewValue(map[string]interface{}{
			"argv": []interface{}{"echo", prompt},
			"step": i + 1,
			"env":  map[string]interface{}{"LANG": "C", "dry_run": false, "limit": nil},
		})
		if err != nil {
			car.Fail(err)
		}
		tool := "shell"
		turn := &carv1.RunTurn{
			Prompt:     &prompt,
			Tool:       &tool,
			Parameters: parameters,
			Output:     structpb.NewStringValue(strings.ToUpper(prompt)),
		}
		var recorded *carv1.RecordTurnsResponse
		call(func(ctx context.Context, opts ...grpc.CallOption) (err error) {
			req := &carv1.RecordTurnsRequest{RunId: started.RunId, Turns: []*carv1.RunTurn{turn}}
			recorded, err = runs.RecordTurns(ctx, req, opts...)
			return err
		})
		car.Emit("recorded", map[string]interface{}{
			"ok":         recorded.Ok,
			"base_index": recorded.BaseIndex,
			"count":      recorded.Count,
		})
	}

	wait()
	summary := "recorded from Go"
	call(func(ctx context.Context, opts ...grpc.CallOption) error {
		// StatusEnum alone: the server fills Status ("success") from it.
		outcome := &carv1.RunOutcome{StatusEnum: carv1.RunOutcomeStatus_RUN_OUTCOME_STATUS_SUCCESS, Summary: &summary}
		_, err := runs.CompleteRun(ctx, &carv1.CompleteRunRequest{RunId: started.RunId, Outcome: outcome}, opts...)
		return err
	})
	car.Emit("completed", map[string]interface{}{"run_id": started.RunId})
	// guide:end
}
