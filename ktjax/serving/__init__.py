"""Concurrent use of one engine: the engine-loop thread, AsyncLLM, and the server's building
blocks."""
