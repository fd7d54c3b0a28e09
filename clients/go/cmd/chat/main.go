// chat is a host: it opens a chat with an attached agent through ChatService.Chat and
// prints the reply as it streams, until the chat's terminal event.
//
//	chat <agent_id> <prompt>      # authenticates with the daemon token
package main

import (
	"context"
	"io"
	"os"
	"time"

	"github.com/parslee-ai/car-grpc/clients/go/car"
	carv1 "github.com/parslee-ai/car-grpc/clients/go/gen/car/v1"
)

func main() {
	if len(os.Args) != 3 {
		os.Stderr.WriteString("usage: chat <agent_id> <prompt>\n")
		os.Exit(2)
	}
	agentID, prompt := os.Args[1], os.Args[2]
	conn, err := car.Dial()
	if err != nil {
		car.Fail(err)
	}
	defer conn.Close()
	chats := carv1.NewChatServiceClient(conn)

	ctx := car.Authorize(context.Background(), car.Credentials{Token: car.DaemonToken()})
	// Cancelling the call (the deadline, or cancel()) cancels the chat at the agent.
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	// guide:chat
	stream, err := chats.Chat(ctx, &carv1.ChatRequest{AgentId: agentID, Prompt: prompt})
	text := ""
	for err == nil {
		var item *carv1.ChatResponse
		if item, err = stream.Recv(); err != nil {
			break
		}
		switch it := item.Item.(type) {
		case *carv1.ChatResponse_Accepted: // first: the agent took the chat
			// ChatId is the chat's id (`session_id` on the JSON wire).
			car.Emit("accepted", map[string]interface{}{"session_id": it.Accepted.ChatId})
		case *carv1.ChatResponse_Event: // then every event, up to a terminal one
			event := it.Event.Event
			var delta interface{}
			if event.Delta != nil {
				delta = event.GetDelta()
			}
			// KindEnum is Kind as an enum (UNSPECIFIED for a kind outside it).
			if event.KindEnum == carv1.ChatEventKind_CHAT_EVENT_KIND_TOKEN {
				text += event.GetDelta()
			}
			car.Emit("event", map[string]interface{}{"kind": event.Kind, "delta": delta})
			switch event.KindEnum {
			case carv1.ChatEventKind_CHAT_EVENT_KIND_DONE,
				carv1.ChatEventKind_CHAT_EVENT_KIND_ERROR,
				carv1.ChatEventKind_CHAT_EVENT_KIND_AUTH_REQUIRED:
				car.Emit("reply", map[string]interface{}{"text": text})
			}
		}
	}
	if err != io.EOF {
		if stream != nil {
			car.Fail(car.FromStatus(err, stream.Trailer()))
		}
		car.Fail(err)
	}
	car.Emit("end", nil)
	// guide:end
}
