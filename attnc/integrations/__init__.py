"""Integrations of generated operators with other libraries (transformers, ...)."""
