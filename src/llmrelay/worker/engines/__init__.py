"""Engines: the only modules that import a model library (one module per library)."""
