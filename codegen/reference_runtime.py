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
    num_splits: int = 1  # split-KV forward only (decoding shapes): key-range splits per query tile


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
    if kernel == "dkdv":  # one stage above 64: feature maps recomputed per tile spilled with two (sm_90)
        return _KernelConfig(16 if heavy and width > 64 else 32, 32, warps, stages if width <= 64 else 1)
    if heavy:  # above 64: 16×16 tiles for gathers; 32×16 for float32 weights (16×16 spilled there on sm_90)
        return _KernelConfig(
            32 if heavy == 1 and width > 64 else 16, 32 if width <= 64 else 16, warps, stages
        )
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
    heavy: int = 0  # KernelWriter.heavy: 2 gathers per (i, j) or tile summaries, 1 float32 weights
    summaries: tuple = ()  # ((q_fn(b, h, hk, i), k_fn(b, hk, j)), ...): `A(i) == B(j)` terms of the mask
    fwd_split: object = None  # split-KV forward for decoding shapes, and the kernel merging its partials
    combine: object = None
    layout: object = None  # _KernelLayout: an explicit runtime block layout of this call, or None


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
        split = _split_config(spec, B, H, M, N, D, E, q.device)
        if split is not None:
            _split_forward(spec, split, q, k, v, o, oraw, stat)
            ctx.spec = spec
            ctx.save_for_backward(q, k, v, o, oraw, stat)
            return o, stat
        cfg = _fit_layout(_config(spec, "fwd", D, E), spec.layout)
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
            *_layout_args(spec.layout, stat),
            *_visits("fwd", (B * H, grid[0]), stat, cfg),
            **_launch(cfg, q, D, E),
            _LAYOUT=spec.layout is not None,
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
        cfg = _fit_layout(_config(spec, "dkdv", D, E), spec.layout)
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
            *_layout_args(spec.layout, stat),
            *_visits("dkdv", (B * G, triton_cdiv(N, cfg.block_n)), stat, cfg),
            **_launch(cfg, q, D, E),
            _LAYOUT=spec.layout is not None,
        )
        cfg = _fit_layout(_config(spec, "dq", D, E), spec.layout)
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
            *_layout_args(spec.layout, stat),
            *_visits("dq", (B * H, triton_cdiv(M, cfg.block_m)), stat, cfg),
            **_launch(cfg, q, D, E),
            _LAYOUT=spec.layout is not None,
        )
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---- split-KV decoding (FlashDecoding: Dao, Haziza, Massa, Sizov, 2023) ------------------------------------
# With few query rows (decoding against a KV cache) the one-pass forward runs B·H programs that each walk all
# of N: most of the GPU idles. The split path gives each (query tile, b·h) program S key ranges on a third
# grid axis; each writes a float32 partial, and a small kernel merges them and runs the forward's epilogue.
# S comes from host-known shapes only (no device read, so CUDA-graph capturable); the autotuner may own it
# through the "fwd_split" entry of `_TritonSpec.configs` (its `num_splits`).

_SPLIT_MAX_M = 16  # query rows up to which a forward counts as decoding (one 16-row tile)
_SPLIT_MIN_TILES = 4  # key tiles per split at least: enough work per program to pay for the partials
_SPLIT_MAX = 64  # splits per query tile at most (the combine reads them all per row)
_SPLIT_WAVES = 2  # on CUDA, stop splitting once the grid fills the SMs this many times over


def _default_split_config(D, E, heavy):
    """The split forward's schedule: the forward's key tile, one 16-row query tile (tl.dot's minimum), four
    warps (FlashDecoding's choice for so small a tile); heavy specs do not pipeline their loads (a second
    stage spills on sm_90 with a per-pair gather)."""
    base = _default_config(D, E, "fwd", heavy)
    return _KernelConfig(16, base.block_n, 4, 1 if heavy else base.num_stages)


def _split_config(spec, B, H, M, N, D, E, device):
    """The split-KV schedule for a decoding shape, or None for the one-pass forward: num_splits is
    ceil(N / (_SPLIT_MIN_TILES · BLOCK_N)), capped by _SPLIT_MAX and, on CUDA, by the SMs the grid would
    otherwise leave idle; never more splits than key tiles, and no empty trailing split."""
    if spec.fwd_split is None or M > _SPLIT_MAX_M or N == 0:
        return None
    tuned = (spec.configs or {}).get("fwd_split")
    cfg = _fit_layout(tuned or _default_split_config(D, E, spec.heavy), spec.layout)
    tiles = triton_cdiv(N, cfg.block_n)
    if tuned is not None:
        splits = tuned.num_splits
    else:
        splits = min(_SPLIT_MAX, triton_cdiv(tiles, _SPLIT_MIN_TILES))
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count  # host-side, cached
            programs = B * H * triton_cdiv(M, cfg.block_m)
            splits = min(splits, max(1, triton_cdiv(_SPLIT_WAVES * sms, programs)))
    per = triton_cdiv(tiles, max(1, min(splits, tiles)))  # key tiles per split
    splits = triton_cdiv(tiles, per)
    return cfg._replace(num_splits=splits) if splits > 1 else None


def _split_forward(spec, cfg, q, k, v, o, oraw, stat):
    """Split forward (grid: query tiles, B·H, splits) into float32 partials [B·H, S, M, E] and [B·H, S, M],
    then the combine (grid: query tiles, B·H) into o, oraw and stat, exactly as the one-pass forward writes
    them. Each split covers `per_split` keys, a multiple of BLOCK_N, so tiles never straddle two splits."""
    B, H, M, D = q.shape
    G, N, E = k.shape[1], k.shape[2], v.shape[3]
    S = cfg.num_splits
    per_split = triton_cdiv(triton_cdiv(N, cfg.block_n), S) * cfg.block_n
    opart = torch.empty((B * H, S, M, E), dtype=torch.float32, device=q.device)
    lpart = torch.empty((B * H, S, M), dtype=torch.float32, device=q.device)
    tiles_m = triton_cdiv(M, cfg.block_m)
    shared = (*spec.extra, *_strides(q, k, v, o), H, G, M, N, D, E)
    summaries = _summaries(spec, q, k, cfg)
    layout = _layout_args(spec.layout, stat)
    spec.fwd_split[(tiles_m, B * H, S)](
        q,
        k,
        v,
        opart,
        lpart,
        per_split,
        *shared,
        *summaries,
        *layout,
        *_visits("fwd_split", (B * H, S, tiles_m), stat, cfg),
        **_launch(cfg, q, D, E),
        _LAYOUT=spec.layout is not None,
    )
    merge = _KernelConfig(cfg.block_m, cfg.block_n, 4, 1)
    spec.combine[(tiles_m, B * H)](
        opart,
        lpart,
        S,
        o,
        oraw,
        stat,
        *shared,
        *summaries,
        *layout,
        stat,
        False,
        **_launch(merge, q, D, E),
        _LAYOUT=False,
    )


# ---- explicit runtime block layouts (routing-style variants: BiFormer, landmark / top-k retrieval) ----------


class BlockLayout(NamedTuple):
    """Which key blocks each query block attends, decided at run time (e.g. by a router), for
    `NAME(..., block_layout=BlockLayout(...))`. Positions are grouped in blocks of `q_block` queries and
    `kv_block` keys (multiples of 16): query block a holds rows [a·q_block, (a+1)·q_block), and so on.

    kv_indices: [B, H, ceil(M / q_block), K] int: for each (batch, query head, query block), the key blocks
        it attends, in its first kv_counts entries (distinct; the rest is ignored).
    kv_counts: [B, H, ceil(M / q_block)] int.
    q_indices, q_counts: [B, H, ceil(N / kv_block), Kq] and [B, H, ceil(N / kv_block)]: the transpose (for
        each key block, the query blocks that attend it), which the backward walks; built on the device from
        kv_indices when omitted. Given, it must list exactly the same pairs.
    B and H may be 1 (the layout is then shared). The spec's own mask still applies inside listed blocks.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    q_block: int
    kv_block: int
    q_indices: torch.Tensor | None = None
    q_counts: torch.Tensor | None = None


class _KernelLayout(NamedTuple):
    """A checked BlockLayout as the kernels read it: int32 lists expanded to [B, H, ...] (stride 0 where
    shared), with the transpose."""

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    q_indices: torch.Tensor
    q_counts: torch.Tensor
    q_block: int
    kv_block: int


def _layout_op_args(layout):
    """The layout as custom-op arguments (the op's schema takes tensors and numbers only)."""
    if layout is None:
        return None, None, None, None, 0, 0
    # Any generated module's BlockLayout will do (each module defines its own class): checked by its fields.
    if not all(hasattr(layout, f) for f in BlockLayout._fields):
        raise ValueError(f"block_layout: expected a BlockLayout, got {type(layout).__name__}")
    return (
        layout.kv_indices,
        layout.kv_counts,
        layout.q_indices,
        layout.q_counts,
        layout.q_block,
        layout.kv_block,
    )


def _layout_from_op_args(kv_indices, kv_counts, q_indices, q_counts, q_block, kv_block):
    if kv_indices is None:
        return None
    return BlockLayout(kv_indices, kv_counts, q_block, kv_block, q_indices, q_counts)


def _check_layout_list(name, t, counts_name, counts, B, H, blocks, device):
    for n, x, rank in ((name, t, 4), (counts_name, counts, 3)):
        if not isinstance(x, torch.Tensor) or x.dim() != rank:
            raise ValueError(f"block_layout.{n}: expected a {rank}-d integer tensor")
        if x.is_floating_point() or x.is_complex() or x.dtype is torch.bool:
            raise ValueError(f"block_layout.{n}: expected an integer dtype, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"block_layout.{n}: expected a tensor on {device} (where q is), got {x.device}")
        for axis, (got, want) in enumerate(zip(x.shape[:3], (B, H, blocks), strict=True)):
            if got != want and not (axis < 2 and got == 1):
                raise ValueError(
                    f"block_layout.{n}: dimension {axis} should be {want}"
                    f"{' (or 1)' if axis < 2 else ''}, got shape {list(x.shape)}"
                )


def _check_layout(layout, q, k):
    """Shapes, dtypes and block sizes of a BlockLayout (host-known facts only: no device read)."""
    B, H, M = q.shape[:3]
    N = k.shape[2]
    for n in ("q_block", "kv_block"):
        size = getattr(layout, n)
        if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size % 16:
            raise ValueError(
                f"block_layout.{n}: expected a positive multiple of 16 (kernel tiles are 16 to 128 wide and "
                f"must divide it), got {size!r}"
            )
    Mb, Nb = triton_cdiv(M, layout.q_block), triton_cdiv(N, layout.kv_block)
    _check_layout_list("kv_indices", layout.kv_indices, "kv_counts", layout.kv_counts, B, H, Mb, q.device)
    if (layout.q_indices is None) != (layout.q_counts is None):
        raise ValueError("block_layout: give both q_indices and q_counts (the transpose), or neither")
    if layout.q_indices is not None:
        _check_layout_list("q_indices", layout.q_indices, "q_counts", layout.q_counts, B, H, Nb, q.device)
    return Mb, Nb


def _layout_dense(indices, counts, blocks):
    """[b, h, rows, K] lists + [b, h, rows] counts -> [b, h, rows, blocks] bool, on the device (entries past
    the count and out-of-range indices list nothing)."""
    K = indices.shape[-1]
    listed = torch.arange(K, device=indices.device) < counts[..., None]
    ok = listed & (indices >= 0) & (indices < blocks)
    cols = torch.where(ok, indices.long(), blocks)  # a spill column, dropped below
    dense = torch.zeros((*indices.shape[:-1], blocks + 1), dtype=torch.bool, device=indices.device)
    return dense.scatter_(-1, cols, True)[..., :blocks]


def _layout_transpose(indices, counts, blocks):
    """The transpose of a block list, on the device without host synchronisation: per key block, the query
    blocks listing it in ascending order (sorting puts them first), and their count."""
    dense = _layout_dense(indices, counts, blocks).transpose(-1, -2)  # [b, h, key blocks, query blocks]
    rows = dense.shape[-1]
    order = torch.where(dense, torch.arange(rows, device=dense.device), rows)
    return order.sort(-1).values.to(torch.int32), dense.sum(-1).to(torch.int32)


def _kernel_layout(layout, q, k):
    """A BlockLayout, checked, as the kernels read it (the transpose built when not given)."""
    if layout is None:
        return None
    B, H = q.shape[:2]
    Mb, Nb = _check_layout(layout, q, k)
    q_indices, q_counts = layout.q_indices, layout.q_counts
    if q_indices is None:
        q_indices, q_counts = _layout_transpose(layout.kv_indices, layout.kv_counts, Nb)

    def expand(t, rows):
        return t.to(torch.int32).expand(B, H, rows, *t.shape[3:])

    return _KernelLayout(
        expand(layout.kv_indices, Mb),
        expand(layout.kv_counts, Mb),
        expand(q_indices, Nb),
        expand(q_counts, Nb),
        layout.q_block,
        layout.kv_block,
    )


def _layout_args(layout, dummy):
    """The kernels' layout arguments: the four lists, their strides and the block sizes (placeholders when
    there is no layout: the kernels then do not read them)."""
    if layout is None:
        return (dummy,) * 4 + (0,) * 14 + (16, 16)
    lists = layout[:4]
    return (*lists, *(s for t in lists for s in t.stride()), layout.q_block, layout.kv_block)


def _fit_layout(cfg, layout):
    """Kernel tiles inside the layout's blocks: BLOCK_M divides q_block and BLOCK_N divides kv_block (both
    powers of two, the blocks multiples of 16), so a tile belongs to exactly one listed block."""
    if layout is None:
        return cfg
    return cfg._replace(
        block_m=math.gcd(cfg.block_m, layout.q_block), block_n=math.gcd(cfg.block_n, layout.kv_block)
    )


def _with_block_layout(spec, layout, q, k):
    """The reference's view of a layout: the spec's mask AND "key block listed for the query block", dense.
    Both backends then compute the same function."""
    if layout is None:
        return spec
    B, H = q.shape[:2]
    Mb, Nb = _check_layout(layout, q, k)
    dense = _layout_dense(layout.kv_indices, layout.kv_counts, Nb).expand(B, H, Mb, Nb)
    qb, kb, inner = layout.q_block, layout.kv_block, spec.mask

    def mask(b, h, hk, i, j):
        listed = dense[b, h, i // qb, j // kb]
        return listed if inner is None else listed & _full_bool(inner(b, h, hk, i, j), listed.shape, q.device)

    return spec._replace(mask=mask)


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


# ---- tuned schedules: the autotuner's best configs (autotune/), looked up once per key, then a dict hit ----

_BAKED_CONFIGS = {}  # key text -> config; `attnc codegen --tuned-from` assigns it in the generated module
_TUNED_TABLE = None  # the exported best-config table (key text -> config), read once per process
_TUNED_MEMO = {}  # (kernel, dtype, device, D, E, M bucket, N bucket) -> {kernel name: _KernelConfig} | None
_KERNEL_IDS = {}  # id(fwd kernel) -> (attention name, kernels-file content hash)
_FORCED_CONFIGS = None  # the tuner's probe: {kernel name: _KernelConfig} wins over every lookup while set
_AUTOTUNE_HOOK = None  # installed by attnc's autotuner; called on an untuned key only if ATTNC_AUTOTUNE=1
_TUNED_KERNELS = ("fwd", "dkdv", "dq")  # tuned online (ATTNC_AUTOTUNE=1); the split-KV kernel: from a table


def _tune_settings():
    """(best-config table path, ATTNC_AUTOTUNE): this module's mirror of codegen.settings, which a generated
    module cannot import. Read on each table load, so a test can point it elsewhere."""
    import os
    from pathlib import Path

    env = os.environ
    home = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = env.get("ATTNC_CACHE_DIR") or str(home / "attnc")
    table = env.get("ATTNC_TUNED_CONFIGS") or str(Path(cache) / "tune" / "best.json")
    return table, env.get("ATTNC_AUTOTUNE", "") not in ("", "0")


def _reset_tuned():
    """Forget the loaded table and every memoised lookup (after the tuner exported a new table)."""
    global _TUNED_TABLE
    _TUNED_TABLE = None
    _TUNED_MEMO.clear()


def _tuned_table():
    """The user's exported table over the configs baked into this module (a local tuning is newer)."""
    global _TUNED_TABLE
    if _TUNED_TABLE is None:
        import json
        import warnings

        path, _ = _tune_settings()
        table = {}
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != "attnc-tuned-configs":
                raise ValueError("not an attnc-tuned-configs table")
            table = {key: entry["config"] for key, entry in data["configs"].items()}
        except FileNotFoundError:
            pass  # nothing tuned: the heuristic defaults
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            warnings.warn(f"attnc: ignoring tuned-config table {path}: {err}", RuntimeWarning, stacklevel=3)
        _TUNED_TABLE = {**_BAKED_CONFIGS, **table}
    return _TUNED_TABLE


def _kernel_identity(kernel):
    """(attention name, content hash of the generated kernels file) of a fwd kernel object."""
    ident = _KERNEL_IDS.get(id(kernel))
    if ident is None:
        fn = kernel
        while hasattr(fn, "fn"):  # JITFunction / InterpretedFunction -> the Python function
            fn = fn.fn
        name = fn.__name__.removeprefix("_").removesuffix("_fwd_kernel")
        digest = ""
        try:
            with open(fn.__code__.co_filename, encoding="utf-8") as f:
                for line in (f.readline() for _ in range(4)):
                    if line.startswith("# content-sha256: "):
                        digest = line.split(":", 1)[1].strip()[:16]
        except OSError:
            pass
        ident = _KERNEL_IDS[id(kernel)] = (name, digest)
    return ident


def _device_identity(device):
    """(GPU name, compute capability, triton version, torch version) as autotune.key.DeviceInfo has them."""
    import importlib.metadata

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    torch_version = torch.__version__.split("+")[0]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return torch.cuda.get_device_name(device), major * 10 + minor, triton_version, torch_version
    return "cpu", 0, triton_version, torch_version


def _tune_key_text(attention, kernel, kernels_hash, device, dtype, D, E, M, N):
    """The tuning key, exactly as autotune.key.TuningKey.text() writes it (a test checks they agree)."""
    gpu, cc, triton_version, torch_version = device
    return "|".join(
        [
            f"attn={attention}",
            f"kernel={kernel}",
            f"kh={kernels_hash}",
            f"attnc={globals().get('ATTNC_VERSION', '')}",
            f"gpu={gpu}",
            f"cc={cc}",
            f"triton={triton_version}",
            f"torch={torch_version}",
            f"dtype={str(dtype).removeprefix('torch.')}",
            f"D={D}",
            f"E={E}",
            f"M={_next_pow2(M)}",
            f"N={_next_pow2(N)}",
        ]
    )


def _tuned_entry(attention, kernel, kernels_hash, q, D, E, M, N):
    """(key, the exported or baked table entry for it or None) of one kernel for this call."""
    key = _tune_key_text(attention, kernel, kernels_hash, _device_identity(q.device), q.dtype, D, E, M, N)
    return key, _tuned_table().get(key)


def _config_from(cls, entry):
    """A schedule NamedTuple (_KernelConfig, _LinConfig) from a table entry; None when the entry lacks a field
    that has no default."""
    values = {f: int(entry[f]) for f in cls._fields if f in entry}
    missing = [f for f in cls._fields if f not in values and f not in cls._field_defaults]
    return None if missing else cls(**values)


def _tuned_configs(fwd_kernel, q, k, v, heavy=0):
    """{kernel name: _KernelConfig} of the tuned kernels for this call's key, or None (heuristic defaults).
    Computed once per (kernel, dtype, device, head dims, sequence buckets); a dictionary hit after that.
    Never tunes unless ATTNC_AUTOTUNE=1 and attnc's autotuner installed its hook."""
    if _FORCED_CONFIGS is not None:
        return _FORCED_CONFIGS
    D, E, M, N = q.shape[-1], v.shape[-1], q.shape[-2], k.shape[-2]
    memo = (id(fwd_kernel), q.dtype, q.device, D, E, _next_pow2(M), _next_pow2(N))
    if memo in _TUNED_MEMO:
        return _TUNED_MEMO[memo]
    attention, kernels_hash = _kernel_identity(fwd_kernel)
    found = {}
    for kernel in (*_TUNED_KERNELS, "fwd_split"):
        if kernel == "fwd_split" and M > _SPLIT_MAX_M:
            continue  # not a decoding shape: the one-pass forward runs
        key, entry = _tuned_entry(attention, kernel, kernels_hash, q, D, E, M, N)
        if entry is None and kernel in _TUNED_KERNELS and _AUTOTUNE_HOOK is not None and _tune_settings()[1]:
            entry = _AUTOTUNE_HOOK(key, kernel, q, k, v, heavy)
        cfg = None if entry is None else _config_from(_KernelConfig, entry)
        if cfg is not None:
            found[kernel] = cfg
    result = _TUNED_MEMO[memo] = found or None
    return result


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
