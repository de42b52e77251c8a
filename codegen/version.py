"""Versions that go into generated-file headers and cache keys."""

from __future__ import annotations

from attnc.dsl.ir import LANGUAGE_VERSION

ATTNC_VERSION = "0.1.0"
# Bump when generated code changes for the same spec (invalidates cached modules).
CODEGEN_VERSION = "1"

__all__ = ["ATTNC_VERSION", "CODEGEN_VERSION", "LANGUAGE_VERSION"]
