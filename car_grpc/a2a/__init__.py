"""The A2A server of the core (docs/protocol.md, "A2A"): every attached agent is an A2A
agent that any A2A peer can reach.

The protocol work is the official `a2a-sdk`'s (its JSON-RPC + SSE routes, its gRPC
servicer, its request handler and task lifecycle); what is ours is the bridge between A2A
tasks and chats:

- `callers.py`: the bearer tokens of the A2A callers (`car-grpc a2a-clients`);
- `tasks.py`: the SDK's TaskStore over the store's A2A task repository;
- `bridge.py`: the AgentExecutor that turns an A2A message into a chat with the agent and
  the chat's events into task updates;
- `server.py`: the agent cards, the HTTP listener and the gRPC service, and `A2aServer`,
  built once in core/wiring.py.
"""
