"""Loading the generated operators of the zoo's specs.

Zoo modules are generated at first use (not committed): `load(spec)` compiles `zoo/specs/<spec>.attn`
through `codegen.compile_file`, whose on-disk cache (keyed by the spec's hash and the compiler version, in
`~/.cache/attnc` or `$ATTNC_CACHE_DIR`) makes every later import of the same spec a file load. A compiler
change therefore regenerates the zoo's operators by itself; there is no generated code to keep in sync.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

SPEC_DIR = Path(__file__).resolve().parent / "specs"


def spec_path(spec: str) -> Path:
    """`zoo/specs/<spec>.attn`; raises KeyError when the zoo has no such spec file."""
    path = SPEC_DIR / f"{spec}.attn"
    if not path.is_file():
        raise KeyError(f"no zoo spec {spec!r} (looked for {path})")
    return path


@functools.cache
def load(spec: str) -> ModuleType:
    """The generated module of `zoo/specs/<spec>.attn`, compiled once per process (and cached on disk)."""
    import codegen

    return codegen.compile_file(spec_path(spec))


def op(spec: str, name: str | None = None) -> Callable[..., object]:
    """The generated operator `name` (default: the spec's stem) of `zoo/specs/<spec>.attn`."""
    return getattr(load(spec), name or spec)
