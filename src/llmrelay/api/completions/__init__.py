"""POST /v1/completions: request and response types (protocol.py), serving (serving.py)."""
