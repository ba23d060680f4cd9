"""FastChat-compatible entry points (`python -m llmrelay.serve.controller`, ...)."""
