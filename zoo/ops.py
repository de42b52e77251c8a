"""Loading the generated operators of the zoo's specs.

Zoo modules are generated at first use (nothing generated is committed): `load(spec)` compiles
`zoo/specs/<spec>.attn` through `codegen.compile_file`, whose on-disk cache (keyed by the spec's hash and
the compiler's version and source fingerprint, in `~/.cache/attnc` or `$ATTNC_CACHE_DIR`) makes every later
load of the same spec a file read. A compiler change therefore regenerates the zoo's operators by itself.

`op(spec)` returns a callable that compiles only what a call needs: calls that run on the PyTorch reference
(`backend="reference"`, or `backend=None` with CPU tensors) load the reference-only module, so CPU users
never wait for Triton tile planning; calls that run the kernels load the full module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from attnc.settings import settings

SPEC_DIR = Path(__file__).resolve().parent / "specs"


def spec_path(spec: str) -> Path:
    """`zoo/specs/<spec>.attn`; raises KeyError when the zoo has no such spec file."""
    path = SPEC_DIR / f"{spec}.attn"
    if not path.is_file():
        raise KeyError(f"no zoo spec {spec!r} (looked for {path})")
    return path


@functools.cache
def load(spec: str, *, reference_only: bool = False) -> ModuleType:
    """The generated module of `zoo/specs/<spec>.attn`, compiled once per process (and cached on disk)."""
    from attnc.codegen.module import Target

    from attnc import codegen

    target = Target.REFERENCE if reference_only else Target.ALL
    module = codegen.compile_file(spec_path(spec), target=target)
    if settings().autotune:  # the zoo's modules tune an untuned key on first call, as attnc.compile's do
        from attnc.autotune.online import install

        install(module)
    return module


class Operator:
    """The generated operator `name` of `zoo/specs/<spec>.attn`; called exactly like the generated
    function: `(q, k, v, *aux, *scalars, return_lse=False, backend=None)`."""

    def __init__(self, spec: str, name: str) -> None:
        self.spec, self.name = spec, name
        self._fns: dict[bool, Callable[..., Any]] = {}  # reference_only -> the generated function

    def __repr__(self) -> str:
        return f"<zoo operator {self.name} from {spec_path(self.spec).name}>"

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        on_gpu = any(getattr(a, "is_cuda", False) for a in args)
        reference = backend == "reference" or (backend is None and not on_gpu)
        fn = self._fns.get(reference)
        if fn is None:
            import torch

            if torch.compiler.is_compiling():  # generating code is not traceable: do it eagerly first
                raise RuntimeError(
                    f"zoo operator {self.name} is not loaded yet: run the model once eagerly (or call "
                    f"zoo.ops.load({self.spec!r})) before torch.compile"
                )
            fn = self._fns[reference] = getattr(load(self.spec, reference_only=reference), self.name)
        return fn(*args, backend=backend, **kwargs)


_OPERATORS: dict[tuple[str, str], Operator] = {}


def op(spec: str, name: str | None = None) -> Operator:
    """The operator `name` (default: the spec's stem) of `zoo/specs/<spec>.attn`, one object per process
    (a plain dict rather than functools.cache, so torch.compile traces the lookup instead of re-creating it)."""
    key = (spec, name or spec)
    found = _OPERATORS.get(key)
    if found is None:
        found = _OPERATORS[key] = Operator(*key)
    return found
