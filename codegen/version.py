"""Versions that go into generated-file headers and cache keys."""

from __future__ import annotations

from attnc.dsl.ir import LANGUAGE_VERSION

from attnc.version import __version__ as ATTNC_VERSION  # one version (pyproject says the same)

# Bump when generated code changes for the same spec (invalidates cached modules).
CODEGEN_VERSION = "2"  # 2: modules import attnc.runtime; kernels built as structure

__all__ = ["ATTNC_VERSION", "CODEGEN_VERSION", "LANGUAGE_VERSION"]
