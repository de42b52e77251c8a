"""The runtime library that generated modules import (the way Helion's generated code imports helion.runtime).

A generated module holds only what is specific to its spec (the argument checks, the spec's expressions as
closures, the custom-op wrappers) and calls into this package for the rest:

    checks     argument binding and validation (shapes, dtypes, devices, scalars, checked loads)
    reference  the exact PyTorch reference: the chunked driver `_attend` and `_Spec`
    layout     explicit runtime block layouts (`BlockLayout`) and block arithmetic
    triton     loading a module's kernels file, default schedules, the fused autograd function, split-KV
    tuning     per-module state (`ModuleState`), tuned/baked/forced configs, the online-autotune hook
    ops        torch.library custom-op registration
    linear     the linear family's prologue helpers and chunked core (kernels: linear_kernels.py)
    varlen     packed variable-length batches (`NAME_varlen`: cu_seqlens, the kernels' packed views)
    paged      a paged KV cache (`NAME_paged`) and `PagedKVCache`, which appends keys and values to it

A generated module calls `require_runtime(N)` first, then imports `attnc.runtime.api` (the underscore names
generated code is written against) as `_rt`; a module generated for another RUNTIME_VERSION fails on import
with both versions named. The public names below (BlockLayout, ModuleState, forced_configs, ...) are for
users and for attnc's own tools.

This package imports only torch, the standard library and attnc.settings (never the compiler: see the
import-linter contracts in pyproject.toml), so importing a generated module pulls in no parser or sympy;
triton is imported by the kernels files only. `attnc codegen --standalone` vendors these modules into the
generated file (codegen/vendor.py).
"""

from __future__ import annotations

# Bump when the interface generated code calls changes (names, signatures, meaning): modules generated for
# another version then fail on import with both versions named, instead of failing somewhere inside a call.
RUNTIME_VERSION = "5"


class RuntimeVersionError(ImportError):
    """A generated module was written for another version of the attnc runtime."""


def require_runtime(version: str) -> None:
    """Called first by every generated module with the runtime version it was generated for."""
    if str(version) != RUNTIME_VERSION:
        raise RuntimeVersionError(
            f"this module was generated for attnc runtime version {version}, but the installed attnc runtime "
            f"is version {RUNTIME_VERSION}: regenerate it with this attnc (`attnc codegen SPEC`, or "
            "attnc.compile), or install the attnc it was generated with"
        )


# The public API, imported on first use: the package itself stays light, so that the compiler can read
# RUNTIME_VERSION (and a module check it) without importing torch.
_PUBLIC = {
    "BlockLayout": "layout",
    "ModuleState": "tuning",
    "PagedKVCache": "paged",
    "autotune_hook": "tuning",
    "forced_configs": "tuning",
    "module_state": "tuning",
    "reset_tuned": "tuning",
    "set_autotune_hook": "tuning",
    "visit_probe": "triton",
}

__all__ = ["RUNTIME_VERSION", "RuntimeVersionError", "require_runtime", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
