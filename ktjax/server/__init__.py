"""The OpenAI-compatible HTTP server (`ktjax serve`)."""
