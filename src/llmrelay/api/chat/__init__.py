"""POST /v1/chat/completions: request and response types (protocol.py), serving (serving.py)."""
