"""The .attn language: grammar -> AST -> checks -> typed IR (and its symbolic analyses)."""

from __future__ import annotations

from .errors import SpecError
from .lower import compile_to_ir
from .parser import parse
from .state import lower_recurrence  # registers the lowering of state blocks (dsl.lower.BLOCK_KINDS)

__all__ = ["SpecError", "compile_to_ir", "lower_recurrence", "parse"]
