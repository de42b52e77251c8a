"""Runtime helpers of the PyTorch reference backend.

The text of this file from the marker below is copied verbatim into every generated reference module, so
that a generated module imports with nothing but torch installed. It is also an ordinary module, so it is
linted and unit-tested in place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

MARKER = "# --- attnc reference runtime (copied into generated modules) ---"
_OP_KEY = ""  # set by each generated module (hash of spec and compiler)

# --- attnc reference runtime (copied into generated modules) ---
_REF_CHUNK_ELEMENTS = 1 << 22  # score entries per query-row chunk: bounds memory in forward and backward
_NEG_INF = float("-inf")


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
    return float(value) if kind == "float" else int(value)


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


def _sigmoid_scalar(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _full(x, shape, like):
    """Broadcast a (possibly Python-scalar) value to `shape` in like's dtype/device."""
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(x, dtype=like.dtype, device=like.device)
    elif x.dtype is not torch.bool:
        x = x.to(like.dtype)
    return x.broadcast_to(shape)


def _full_bool(x, shape, device):
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(bool(x), device=device)
    return x.broadcast_to(shape)


class _Spec(NamedTuple):
    """The expressions of one attention variant, as functions of the index variables."""

    norm: str  # "softmax" | "sigmoid" | "none" | "sum"
    score: object  # (b, h, hk, i, j, qk) -> score
    mask: object = None  # (b, h, hk, i, j) -> bool
    sink: object = None  # (b, h, hk, i) -> extra softmax logit
    bias: object = None  # (b, h, hk, i, j) -> sigmoid bias
    eps: object = None  # (b, h, hk, i) -> sum normaliser epsilon
    output: object = None  # (o, b, h, hk, i, e) -> output epilogue
    feature_q: object = None  # (q, b, h, hk, i, d) -> feature map
    feature_k: object = None  # (k, b, hk, j, d) -> feature map


def _attend(q, k, v, spec, return_lse):
    """Exact attention over query-row chunks; `spec` holds the variant's expressions.

    q: [B, H, M, D], k: [B, G, N, D], v: [B, G, N, E], already in the compute dtype.
    Returns o: [B, H, M, E] and, for softmax, lse: [B, H, M].
    """
    B, H, M, _ = q.shape
    G, N, E = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G
    dev = q.device
    if spec.feature_q is not None:
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
        i = torch.arange(M, device=dev).view(1, 1, M, 1)
        d = torch.arange(q.shape[3], device=dev).view(1, 1, 1, -1)
        q = _full(spec.feature_q(q, b, h, h // rep, i, d), q.shape, q)
    if spec.feature_k is not None:
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        hk = torch.arange(G, device=dev).view(1, G, 1, 1)
        j = torch.arange(N, device=dev).view(1, 1, N, 1)
        d = torch.arange(k.shape[3], device=dev).view(1, 1, 1, -1)
        k = _full(spec.feature_k(k, b, hk, j, d), k.shape, k)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)

    def rows(qc, i0):
        mc = qc.shape[2]
        shape = (B, H, mc, N)
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
        i = (i0 + torch.arange(mc, device=dev)).view(1, 1, mc, 1)
        j = torch.arange(N, device=dev).view(1, 1, 1, N)
        qk = torch.matmul(qc, k.transpose(-1, -2))
        if spec.mask is None:
            idx = None
            s = _full(spec.score(b, h, h // rep, i, j, qk), shape, qk)
        else:
            # The score is evaluated only where the mask holds: gather those entries, evaluate, scatter back.
            idx = _full_bool(spec.mask(b, h, h // rep, i, j), shape, dev).nonzero(as_tuple=True)
            bi, hi, ii, ji = idx
            s = _full(spec.score(bi, hi, hi // rep, ii + i0, ji, qk[idx]), bi.shape, qk)
        lse = None
        if spec.norm == "softmax":
            if idx is not None:
                s = qk.new_full(shape, _NEG_INF).index_put(idx, s)
            # Row maxima; with no keys at all (N == 0) every row is fully masked.
            m = s.detach().amax(-1, keepdim=True) if N > 0 else qk.new_full((B, H, mc, 1), _NEG_INF)
            sink = None
            if spec.sink is not None:
                sink = _full(spec.sink(b, h, h // rep, i), (B, H, mc, 1), qk)
                m = torch.maximum(m, sink.detach())
            m = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            if sink is not None:
                denom = denom + torch.exp(sink - m)
            alive = denom > 0
            safe = torch.where(alive, denom, torch.ones_like(denom))
            o = torch.matmul(p, v) / safe
            lse = torch.where(alive, m + torch.log(safe), torch.full_like(m, _NEG_INF)).squeeze(-1)
        else:
            if spec.norm == "sigmoid":
                if idx is None:
                    bias = spec.bias(b, h, h // rep, i, j) if spec.bias is not None else 0.0
                else:
                    bias = spec.bias(bi, hi, hi // rep, ii + i0, ji) if spec.bias is not None else 0.0
                s = torch.sigmoid(s + bias)
            if idx is not None:
                s = qk.new_zeros(shape).index_put(idx, s)
            o = torch.matmul(s, v)
            if spec.norm == "sum":
                eps = spec.eps(b, h, h // rep, i) if spec.eps is not None else 0.0
                denom = _full(s.sum(-1, keepdim=True) + eps, (B, H, mc, 1), qk)
                alive = denom != 0
                o = torch.where(
                    alive, o / torch.where(alive, denom, torch.ones_like(denom)), torch.zeros_like(o)
                )
        if spec.output is not None:
            e = torch.arange(E, device=dev).view(1, 1, 1, E)
            o = _full(spec.output(o, b, h, h // rep, i, e), o.shape, o)
        return (o, lse) if lse is not None else (o,)

    chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, B * H * N))
    pieces = []
    for i0 in range(0, M, chunk):
        qc = q[:, :, i0 : i0 + chunk]
        if M > chunk and torch.is_grad_enabled():
            # Recompute each chunk in backward so at most one chunk of scores is alive at a time.
            pieces.append(checkpoint(rows, qc, i0, use_reentrant=False))
        else:
            pieces.append(rows(qc, i0))
    o = torch.cat([p[0] for p in pieces], dim=2) if pieces else q.new_zeros(B, H, 0, E)
    if spec.norm != "softmax" or not return_lse:
        return o, None
    lse = torch.cat([p[1] for p in pieces], dim=2) if pieces else q.new_zeros(B, H, 0)
    return o, lse


# ---- the Triton path: launch generated kernels (imported lazily from the sibling `*_triton.py` file) ----

_TRITON_MODULES = {}


def _triton_kernels(module_file, interpret):
    """Import the Triton kernels beside this module; `interpret` runs them under the Triton interpreter
    (CPU tensors), which Triton decides when the kernels are defined."""
    import importlib.util
    import os
    from pathlib import Path

    path = Path(module_file).with_name(Path(module_file).stem + "_triton.py")
    key = (str(path), interpret)
    if key not in _TRITON_MODULES:
        if not path.exists():
            raise ValueError(
                f"backend='triton': the kernels file {path.name} was not generated beside this module"
            )
        if interpret:
            # Triton reads this when kernels are defined and when its own helpers import: switching it back
            # and forth within a process is not supported, so CPU tensors leave the process in interpreter mode.
            os.environ["TRITON_INTERPRET"] = "1"
        spec = importlib.util.spec_from_file_location(f"{path.stem}_{int(interpret)}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _TRITON_MODULES[key] = mod
    return _TRITON_MODULES[key]


class _KernelConfig(NamedTuple):
    """The schedule of one launch (tiles, warps, stages): never part of the spec (Halide's split)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _default_config(D, E, kernel="fwd", heavy=False):
    """Fixed, sensible schedules per head dim and kernel until the autotuner owns them. The backward kernels
    iterate over narrower tiles than the forward: they keep more fp32 tiles alive (FlashAttention-2,
    section 3.1.2); `heavy` specs (a tensor gathered per (i, j) pair, or unnormalised float32 weights) get narrower
    tiles too. CI compiles
    every default for sm_90 and checks that it does not spill."""
    width = max(D, E)
    warps = 4 if width <= 64 else 8
    stages = 2 if width <= 128 else 1
    if kernel == "fwd":
        return _KernelConfig(64, 64 if width <= 64 and not heavy else 32, warps, stages)
    if kernel == "dkdv":
        return _KernelConfig(16 if heavy and width > 64 else 32, 32, warps, stages)
    if heavy:
        return _KernelConfig(16, 32 if width <= 64 else 16, warps, stages)
    return _KernelConfig(64 if width <= 128 else 32, 32, warps, stages)


class _TritonSpec(NamedTuple):
    """What the generic autograd function needs to launch one attention block's kernels."""

    fwd: object
    dkdv: object
    dq: object
    norm: str
    extra: tuple  # aux tensors with strides and extents, scalars, sizes, uniforms: the kernels' shared tail
    output: object = None  # (o, b, h, hk, i, e) -> epilogue, for the backward through it
    configs: object = None  # {"fwd" | "dkdv" | "dq": _KernelConfig}; None: _default_config per kernel
    heavy: bool = False  # the score or mask gathers a tensor per (i, j): narrower default tiles
    summaries: tuple = ()  # ((q_fn(b, h, hk, i), k_fn(b, hk, j)), ...): `A(i) == B(j)` terms of the mask


def _next_pow2(n):
    return max(16, 1 << (int(n) - 1).bit_length())


def _dense_output(fn, o, rep):
    B, H, M, E = o.shape
    dev = o.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    i = torch.arange(M, device=dev).view(1, 1, M, 1)
    e = torch.arange(E, device=dev).view(1, 1, 1, E)
    return _full(fn(o, b, h, h // rep, i, e), o.shape, o)


class _TritonAttention(torch.autograd.Function):
    """Fused forward and backward kernels; gradients for q, k and v (auxiliary tensors: see the caller)."""

    @staticmethod
    def forward(ctx, spec, q, k, v):
        B, H, M, D = q.shape
        G, N, E = k.shape[1], k.shape[2], v.shape[3]
        o = torch.empty((B, H, M, E), dtype=q.dtype, device=q.device)
        oraw = torch.empty((B, H, M, E), dtype=torch.float32, device=q.device) if spec.output else o
        stat = torch.empty((B, H, M), dtype=torch.float32, device=q.device)
        cfg = _config(spec, "fwd", D, E)
        grid = (triton_cdiv(M, cfg.block_m), B * H)
        spec.fwd[grid](
            q,
            k,
            v,
            o,
            oraw,
            stat,
            *spec.extra,
            *_strides(q, k, v, o),
            H,
            G,
            M,
            N,
            D,
            E,
            *_summaries(spec, q, k, cfg),
            *_visits("fwd", (B * H, grid[0]), stat, cfg),
            **_launch(cfg, q, D, E),
        )
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, o, oraw, stat)
        return o, stat

    @staticmethod
    def backward(ctx, do, dstat):
        spec = ctx.spec
        q, k, v, o, oraw, stat = ctx.saved_tensors
        B, H, M, D = q.shape
        G, N, E = k.shape[1], k.shape[2], v.shape[3]
        do = do.contiguous()
        if spec.output is not None:
            with torch.enable_grad():
                x = oraw.detach().requires_grad_()
                (do_raw,) = torch.autograd.grad(_dense_output(spec.output, x, H // G), x, do.to(x.dtype))
            o_raw = oraw
        else:
            do_raw, o_raw = do, o
        do_raw = do_raw.to(torch.float32).contiguous()
        delta = (do_raw * o_raw.to(torch.float32)).sum(-1)
        if dstat is not None and spec.norm == "softmax":
            delta = delta - dstat  # d lse / d s = p: folds into ds = p (dp - delta + dlse)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
        strides = _strides(q, k, v, do_raw)
        cfg = _config(spec, "dkdv", D, E)
        spec.dkdv[(triton_cdiv(N, cfg.block_n), B * G)](
            q,
            k,
            v,
            do_raw,
            stat,
            delta,
            dk,
            dv,
            *spec.extra,
            *strides,
            H,
            G,
            M,
            N,
            D,
            E,
            *_summaries(spec, q, k, cfg),
            *_visits("dkdv", (B * G, triton_cdiv(N, cfg.block_n)), stat, cfg),
            **_launch(cfg, q, D, E),
        )
        cfg = _config(spec, "dq", D, E)
        spec.dq[(triton_cdiv(M, cfg.block_m), B * H)](
            q,
            k,
            v,
            do_raw,
            stat,
            delta,
            dq,
            *spec.extra,
            *strides,
            H,
            G,
            M,
            N,
            D,
            E,
            *_summaries(spec, q, k, cfg),
            *_visits("dq", (B * H, triton_cdiv(M, cfg.block_m)), stat, cfg),
            **_launch(cfg, q, D, E),
        )
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _tile_minmax(values, block):
    """[R, L] int values -> ([R, tiles] min, [R, tiles] max) over consecutive blocks of `block` positions."""
    R, L = values.shape
    if L == 0:
        empty = values.new_zeros((R, 0))
        return empty, empty
    tiles = triton_cdiv(L, block)
    pad = tiles * block - L
    # Padding lanes must not move min or max: repeat each row's last value (F.pad's fill goes through float).
    filler = values[:, -1:].expand(R, pad)
    lo = hi = torch.cat([values, filler], dim=1)
    return lo.view(R, tiles, block).amin(-1).contiguous(), hi.view(R, tiles, block).amax(-1).contiguous()


def _summaries(spec, q, k, cfg):
    """The cheap device pre-pass for data-dependent masks: per tile, min and max of each summarised value
    (no host synchronisation). Order: for each term, query min, query max, key min, key max."""
    out = []
    if not spec.summaries:
        return out
    B, H, M = q.shape[:3]
    G, N = k.shape[1], k.shape[2]
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1)
    hk = torch.arange(G, device=dev).view(1, G, 1)
    i = torch.arange(M, device=dev).view(1, 1, M)
    j = torch.arange(N, device=dev).view(1, 1, N)
    for qfn, kfn in spec.summaries:
        qv = torch.as_tensor(qfn(b, h, h // (H // G), i), device=dev).to(torch.int64).broadcast_to(B, H, M)
        kv = torch.as_tensor(kfn(b, hk, j), device=dev).to(torch.int64).broadcast_to(B, G, N)
        out += [
            *_tile_minmax(qv.reshape(B * H, M), cfg.block_m),
            *_tile_minmax(kv.reshape(B * G, N), cfg.block_n),
        ]
    return out


# A test probe: set to a dict and every launch records, per program, how many tiles it visited (the kernels
# count only then: `_COUNT_VISITS` is a compile-time switch).
_VISIT_PROBE = None


def _visits(kernel, shape, dummy, cfg):
    """The kernel's `_VISITS` argument and its `_COUNT_VISITS` switch (the probe also records the schedule)."""
    if _VISIT_PROBE is None:
        return dummy, False
    counts = torch.zeros(shape, dtype=torch.int32, device=dummy.device)
    _VISIT_PROBE[kernel] = counts
    _VISIT_PROBE[f"{kernel}_config"] = cfg
    return counts, True


def triton_cdiv(a, b):
    return (a + b - 1) // b


def _strides(q, k, v, o):
    return (*q.stride(), *k.stride(), *v.stride(), *o.stride())


def _config(spec, kernel, D, E):
    return (spec.configs or {}).get(kernel) or _default_config(D, E, kernel, spec.heavy)


def _launch(cfg, q, D, E):
    return {
        "_BLOCK_M": cfg.block_m,
        "_BLOCK_N": cfg.block_n,
        "_BLOCK_D": _next_pow2(D),
        "_BLOCK_E": _next_pow2(E),
        "_DOT_PRECISION": "ieee" if q.dtype is torch.float32 else "tf32",
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def _aux_args(*tensors):
    """Each auxiliary tensor followed by its strides and extents (the kernels' `_s_*` and `_n_*`)."""
    out = []
    for t in tensors:
        out += [t, *t.stride(), *t.shape]
    return tuple(out)


def _has_triton():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


# ---- torch.library: every block is a custom op, so torch.compile(fullgraph=True) traces models calling it ----


def _lse_dtype(q):
    return torch.float64 if q.dtype is torch.float64 else torch.float32


def _custom_op(name, impl, fake):
    """Register `attnc::<name>_<key>` once per process. The key hashes the spec, the compiler and this file's
    path, so two generated files never share an op (each keeps its own globals), while the same file loaded
    twice reuses the first registration. Returns the op and whether it is new."""
    import hashlib

    where = hashlib.sha256(str(globals().get("__file__", "")).encode()).hexdigest()[:8]
    name = f"{name}_{_OP_KEY}_{where}"
    existing = getattr(torch.ops.attnc, name, None) if _attnc_ns_exists() else None
    if existing is not None:
        return existing, False
    op = torch.library.custom_op(f"attnc::{name}", mutates_args=())(impl)
    op.register_fake(fake)
    return op, True


def _attnc_ns_exists():
    try:
        torch.ops.attnc  # noqa: B018 - the namespace object is created on first registration
    except (AttributeError, RuntimeError):
        return False
    return True


def _with_autograd(fn):
    """Run `fn` with autograd available. A custom op's implementation runs below the autograd dispatch key
    (thread-local), so the backward op recomputes the forward on a helper thread, on the caller's stream."""
    import concurrent.futures

    stream = (
        torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )

    def run():
        with torch.enable_grad():
            if stream is None:
                return fn()
            with torch.cuda.stream(stream):
                return fn()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()
