"""attnc: a compiler for attention mechanisms.

    import attnc
    mod = attnc.compile("examples/specs/alibi.attn")   # a path, or spec text
    o = mod.alibi(q, k, v, slopes)

The pipeline lives in subpackages named for its stages: `attnc.dsl` (grammar -> AST -> IR -> analyses),
`attnc.codegen` (IR -> reference and Triton modules), `attnc.runtime` (what generated modules import),
`attnc.autotune` (schedules) and `attnc.zoo` (the literature's variants). Attributes are imported lazily, so
that a generated module importing `attnc.runtime` pulls in neither the parser nor sympy.
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any

# In a source checkout (a fresh clone, or the tree carried to a GPU machine) the stage folders `dsl/`,
# `codegen/`, `autotune/` and `zoo/` sit beside this package rather than inside it; an installed wheel maps
# them under `attnc/` (pyproject.toml, [tool.setuptools.package-dir]). Extending the package path here makes
# both layouts import as `attnc.dsl`, ... without installing.
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_ROOT, "dsl", "__init__.py")
):
    __path__.append(_ROOT)  # type: ignore[name-defined]

from attnc.version import __version__  # noqa: E402 - after the path set-up above

if TYPE_CHECKING:
    from types import ModuleType

    from attnc.dsl.errors import SpecError

__all__ = ["SpecError", "__version__", "compile", "compile_file", "compile_source"]


def compile(spec: str | _os.PathLike[str], **kwargs: Any) -> ModuleType:
    """Compile a spec to an imported module: `spec` is a path to a `.attn` file or the spec text itself.
    Keyword arguments go to `attnc.codegen.compile_source` (`target=`, `cache_dir=`). Raises SpecError.
    With ATTNC_AUTOTUNE=1 the module tunes a key it has no config for on its first call
    (attnc.autotune.online; the code generator itself installs no tuner)."""
    from attnc.codegen.module import compile_file, compile_source

    text = _os.fspath(spec)
    if "\n" not in text and "{" not in text and (text.endswith(".attn") or _os.path.exists(text)):
        return _autotuned(compile_file(text, **kwargs))
    return _autotuned(compile_source(text, **kwargs))


def _autotuned(module: ModuleType) -> ModuleType:
    """ATTNC_AUTOTUNE=1: install the online autotuner's hook (through the runtime's API). Without the
    variable the autotuner (and optuna) are not even imported."""
    from attnc.settings import settings

    if settings().autotune:
        from attnc.autotune.online import install

        install(module)
    return module


def __getattr__(name: str) -> Any:
    if name == "SpecError":
        from attnc.dsl.errors import SpecError

        return SpecError
    if name in ("compile_file", "compile_source"):
        from attnc.codegen import module

        return getattr(module, name)
    if name in ("dsl", "codegen", "autotune", "zoo", "runtime"):
        import importlib

        return importlib.import_module(f"attnc.{name}")
    raise AttributeError(f"module 'attnc' has no attribute {name!r}")
