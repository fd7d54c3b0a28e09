// watch-run follows a run with RunService.WatchRun: every record from a cursor on, then
// each new one live, until the run's `ended` record. When the connection drops it watches
// again from the last cursor it saw, so no record is missed or repeated.
//
//	watch-run <run_id> [cursor]
//
// It reads with the host token (the host role may read every run); set CAR_AGENT_ID and
// CAR_AGENT_TOKEN to watch as the run's agent instead.
package main

import (
	"context"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/parslee-ai/car-grpc/clients/go/car"
	carv1 "github.com/parslee-ai/car-grpc/clients/go/gen/car/v1"
)

// Reconnect every 200 ms while the server is unreachable, for at most ~10 s in a row.
const (
	retryEvery = 200 * time.Millisecond
	retries    = 50
)

// credentials are read at every (re)connect: a restarted server writes a new host token.
func credentials() car.Credentials {
	if agent := os.Getenv("CAR_AGENT_ID"); agent != "" {
		return car.Credentials{Token: os.Getenv("CAR_AGENT_TOKEN"), AgentID: agent}
	}
	return car.Credentials{Token: car.HostToken()}
}

// describe is a record as flat JSON fields; its `detail` oneof is one of three types.
func describe(item *carv1.WatchRunResponse) map[string]interface{} {
	fields := map[string]interface{}{"cursor": item.Cursor, "status": item.Status.String()}
	switch detail := item.Record.Detail.(type) {
	case *carv1.RunRecord_Started:
		fields["kind"] = "started"
		fields["agent_id"] = detail.Started.AgentId
		fields["intent"] = detail.Started.Intent
	case *carv1.RunRecord_Turn:
		turn := detail.Turn
		fields["kind"] = "turn"
		fields["index"] = turn.GetIndex()
		fields["prompt"] = turn.GetPrompt()
		fields["tool"] = turn.GetTool()
		fields["parameters"] = turn.GetParameters().AsInterface()
		fields["output"] = turn.GetOutput().AsInterface()
	case *carv1.RunRecord_Ended:
		fields["kind"] = "ended"
		fields["ended_status"] = detail.Ended.Status.String()
		fields["outcome"] = detail.Ended.GetOutcome().GetStatus()
		fields["outcome_enum"] = detail.Ended.GetOutcome().GetStatusEnum().String()
	}
	return fields
}

func main() {
	if len(os.Args) < 2 {
		os.Stderr.WriteString("usage: watch-run <run_id> [cursor]\n")
		os.Exit(2)
	}
	runID := os.Args[1]
	var cursor uint64
	if len(os.Args) > 2 {
		c, err := strconv.ParseUint(os.Args[2], 10, 64)
		if err != nil {
			car.Fail(err)
		}
		cursor = c
	}
	conn, err := car.Dial()
	if err != nil {
		car.Fail(err)
	}
	defer conn.Close()
	runs := carv1.NewRunServiceClient(conn)

	// guide:watch-run
	left := retries
	for {
		ctx, cancel := context.WithCancel(car.Authorize(context.Background(), credentials()))
		stream, err := runs.WatchRun(ctx, &carv1.WatchRunRequest{RunId: runID, Cursor: cursor})
		for err == nil {
			var item *carv1.WatchRunResponse
			if item, err = stream.Recv(); err == nil {
				cursor, left = item.Cursor, retries
				car.Emit("record", describe(item))
			}
		}
		cancel()
		if err == io.EOF { // the stream ended with OK: the run ended, every record seen
			car.Emit("end", map[string]interface{}{"cursor": cursor})
			return
		}
		// The server's own answers (not found, refused) carry car-error-bin and are final;
		// anything else is the connection: watch again from the last cursor.
		failure := car.FromStatus(err, nil)
		if stream != nil {
			failure = car.FromStatus(err, stream.Trailer())
		}
		if failure.Car != nil || left == 0 {
			car.Fail(failure)
		}
		if left == retries {
			car.Emit("reconnecting", map[string]interface{}{"cursor": cursor, "reason": failure.Message()})
		}
		left--
		time.Sleep(retryEvery)
	}
	// guide:end
}
