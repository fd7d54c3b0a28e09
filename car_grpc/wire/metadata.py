"""The gRPC metadata keys of the bridge: how a typed call names its session and agent,
and how the core tells a gateway, on a new Connect stream, whether it must authenticate."""

from __future__ import annotations

#: A typed call bound to a live session: that session's id.
SESSION_ID_KEY = "car-session-id"
#: A typed call with an agent token: the agent it is for.
AGENT_ID_KEY = "car-agent-id"
#: Initial metadata of a Connect stream, sent as soon as the core has taken the stream in:
#: "required" when the session must authenticate, "off" when auth is off. The gateway
#: paces the streams it opens by it, and starts its authentication deadline there.
AUTH_KEY = "car-auth"
