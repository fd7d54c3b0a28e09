"""The core: ServerState, sessions and the domain handlers behind the gRPC API."""
