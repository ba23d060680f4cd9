"""POST /v1/embeddings: request and response types (protocol.py), serving (serving.py)."""
