"""The OpenAI-compatible API server: the only public face of a llmrelay stack."""
