"""The one attnc version (pyproject.toml states the same)."""

__version__ = "0.2.0"
