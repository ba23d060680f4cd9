"""llmrelay: serve many local LLMs behind one OpenAI-compatible API."""

__version__ = "0.1.0"
