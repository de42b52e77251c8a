"""Argument binding and validation of generated entry points: shapes against their size symbols, dtypes,
devices, Python scalars, and bounds of loads the compiler could not prove in range. Every error is a
ValueError naming the parameter and the expected shape."""

from __future__ import annotations

import torch


def _fmt_shape(dims, sizes):
    return "[" + ", ".join(str(sizes.get(d, d)) if isinstance(d, str) else str(d) for d in dims) + "]"


def _bind(sizes, name, t, dims, text):
    """Check that `t` is a tensor of the declared rank and bind/compare its size symbols."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {text}, got {type(t).__name__}")
    if t.dim() != len(dims):
        raise ValueError(
            f"{name}: expected a {len(dims)}-d tensor of shape {text}, got shape {list(t.shape)}"
        )
    for axis, d in enumerate(dims):
        if d is None:
            continue  # an expression dimension, checked once the scalars are known
        want = sizes.get(d) if isinstance(d, str) else d
        if want is None:
            sizes[d] = t.shape[axis]
        elif t.shape[axis] != want:
            raise ValueError(
                f"{name}: expected shape {text} = {_fmt_shape(dims, sizes)}, got {list(t.shape)} "
                f"(dimension {axis} should be {want})"
            )


def _require_tensor(name, t, text, q):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {text}, got {type(t).__name__}")
    if isinstance(q, torch.Tensor) and t.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (where q is), got one on {t.device}")


def _check_dim(name, t, axis, want, dim_text, text):
    if t.shape[axis] != want:
        raise ValueError(
            f"{name}: dimension {axis} must be {dim_text} = {want} (declared shape {text}), got {list(t.shape)}"
        )


def _check_type(name, t, kind, exact, device):
    """kind: 'float' | 'int' | 'bool'; exact: a torch dtype or None for any width."""
    ok = {
        "float": t.is_floating_point(),
        "int": not t.is_floating_point() and not t.is_complex() and t.dtype is not torch.bool,
        "bool": t.dtype is torch.bool,
    }[kind]
    if not ok or (exact is not None and t.dtype is not exact):
        want = str(exact).replace("torch.", "") if exact is not None else f"a {kind} dtype"
        raise ValueError(f"{name}: expected {want}, got {str(t.dtype).replace('torch.', '')}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where q is), got one on {t.device}")


def _check_scalar(name, value, kind):
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind == "int" and isinstance(value, float))
    ):
        raise ValueError(f"{name}: expected a Python {kind}, got {value!r}")
    if kind == "int" and not -(2**63) <= value < 2**63:  # the custom op's schema takes int64
        raise ValueError(f"{name}: {value} is outside the 64-bit integer range")
    return float(value) if kind == "float" else int(value)


def _check_triton_dtype(q):
    """The dtypes the Triton backend takes. bfloat16 on CPU tensors is refused: they run under the Triton
    interpreter, whose bfloat16 `tl.dot` is wrong (errors up to 1e9; triton issue 11584), and upcasting
    silently would make the CPU path differ in precision from the GPU one it stands in for."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"q: the Triton backend takes float16, bfloat16 or float32, got {q.dtype}; use backend='reference'"
        )
    if q.dtype is torch.bfloat16 and not q.is_cuda:
        raise ValueError(
            "q: bfloat16 on CPU tensors: the Triton backend runs them under the Triton interpreter, which "
            "computes bfloat16 products wrongly (triton issue 11584); pass float16 or float32, run on a GPU, "
            "or use backend='reference'"
        )


def _load(t, name, idx, check):
    """t[idx] with the axes in `check` (not proven in range at compile time) checked first."""
    for axis in check:
        ix, n = idx[axis], t.shape[axis]
        if isinstance(ix, int):
            lo = hi = ix
        elif ix.numel() == 0:
            continue
        else:
            lo, hi = int(ix.min()), int(ix.max())
        if lo < 0 or hi >= n:
            raise ValueError(
                f"{name}: index {axis} takes values in [{lo}, {hi}] where the spec reads it, "
                f"outside the dimension's range [0, {n - 1}]"
            )
    return t[idx]


def _eval_error(name, err, context):
    """A ValueError for an expression of the spec that the given inputs make undefined."""
    what = "division by zero" if "ZeroDivision" in f"{type(err).__name__} {err}" else str(err)
    return ValueError(f"{name}: the spec's expressions are undefined for these inputs ({what}); {context}")
