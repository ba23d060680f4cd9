"""GET /v1/models and /v1/models/{id}: response types (protocol.py), serving (serving.py)."""
