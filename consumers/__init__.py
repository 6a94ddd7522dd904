"""The client side of generation jobs, framed for each transport: REST, SSE and WebSocket."""
