"""Bake tuned configs into a generated module (`attnc codegen --tuned-from DB`), so that it ships tuned.

The module then holds `_BAKED_CONFIGS = {key text: config}` and hands it to the runtime with its state
(`_STATE = _rt.ModuleState(..., baked_configs=_BAKED_CONFIGS)`); the runtime's lookup reads it like the
exported table, with a local table taking precedence (a tuning on the user's own machine is newer). Keys still name the GPU and library versions: a module baked for an H100 runs
the heuristic defaults elsewhere rather than a config that was never measured there.
"""

from __future__ import annotations

import pprint
from collections.abc import Mapping
from typing import Any

from attnc.dsl.ir import Program

__all__ = ["baked_assignment", "entries_for", "key_fields"]


def key_fields(text: str) -> dict[str, str]:
    """`attn=a|kernel=fwd|...` -> {"attn": "a", "kernel": "fwd", ...}."""
    return dict(part.split("=", 1) for part in text.split("|") if "=" in part)


def entries_for(
    program: Program, kernels_hash: str, table: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """The table rows for this program's attentions and exactly these generated kernels."""
    names = {a.name for a in program.attentions}
    out = {}
    for text, entry in table.items():
        f = key_fields(text)
        if f.get("attn") in names and f.get("kh") == kernels_hash:
            config = entry.get("config", entry)
            out[text] = {str(k): int(v) for k, v in config.items()}
    return dict(sorted(out.items()))


def baked_assignment(
    program: Program, kernels_hash: str, table: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """The `_BAKED_CONFIGS = {...}` statement for the generated module (deterministic text); no lines when
    the table has nothing for these kernels."""
    rows = entries_for(program, kernels_hash, table)
    if not rows:
        return []
    text = pprint.pformat(rows, width=110, sort_dicts=True)  # ints and key strings, as literals
    return [
        f"# Tuned schedules baked in by `attnc codegen --tuned-from` ({len(rows)} keys).",
        f"_BAKED_CONFIGS = {text}",
    ]
