"""The Triton path: loading a module's generated kernels file (once per interpreter mode), the default
schedules, the fused autograd function that launches the forward and backward kernels, and the split-KV
forward for decoding shapes. Triton itself is imported only by the kernels files, so a generated module
imports with torch alone."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import torch

from attnc.settings import settings

from .layout import _fit_layout, _layout_args, _next_pow2, triton_cdiv
from .reference import _full
from .signature import TMA_GATE, WS_GATE, BlockABI, Group
from .varlen import packed_view

# ---- kernels files: the generated `*_triton.py` beside a module, and the runtime's own linear core ----

_KERNEL_MODULES = {}  # (path, interpret, content hash) -> the loaded kernels module
_CONTENT_LINE = "# content-sha256: "


def _content_hash(path):
    """The `content-sha256` a generated file carries in its header ("" for a file without one)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in (f.readline() for _ in range(4)):
            if line.startswith(_CONTENT_LINE):
                return line[len(_CONTENT_LINE) :].strip()
    return ""


_VERIFIED = {}  # (path, inode, size, mtime) -> content hash: a file is re-read only when it changed


def _verified_hash(path):
    """The content hash of a generated file whose body matches the hash in its header, else None (missing,
    truncated, edited, not UTF-8). The same check the compiler's cache makes before importing a file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if stamp not in _VERIFIED:
        _VERIFIED[stamp] = _hash_if_intact(path)
    return _VERIFIED[stamp]


def _hash_if_intact(path):
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    head, sep, rest = text.partition(_CONTENT_LINE)
    digest, nl, body = rest.partition("\n")
    if not sep or not nl or head.count("\n") > 3:
        return None
    digest = digest.strip()
    return digest if hashlib.sha256(body.encode()).hexdigest() == digest else None


def _load_kernels(path, interpret, sha256=None, rebuild=None):
    """Import a kernels file once per (file, content, mode); `interpret` runs its kernels under the Triton
    interpreter (CPU tensors), which Triton decides when the kernels are defined. `sha256`: the content hash
    the calling module was generated with. The file is checked before it is imported: a missing, truncated or
    edited file, or one that does not match `sha256` (a stale file, or another spec's), is rebuilt by
    `rebuild()` (the compiler's hook, set on modules it compiled through its cache) or, without one, refused
    with a ValueError saying how to regenerate it; a damaged file is never run."""
    path = Path(path)
    for attempt in range(2):
        if sha256 is None:  # the runtime's own kernels (a file of the installed library): no generated header
            found = _content_hash(path) if path.exists() else None
            if found is not None:
                break
        else:
            found = _verified_hash(path)
            if found == sha256:
                break
        if attempt == 0 and rebuild is not None:
            rebuild()
            continue
        if not path.exists():
            what = "is missing"
        elif found is None:
            what = "is damaged (truncated or edited: its content does not match its hash)"
        else:
            what = f"does not belong to this module (content hash {found[:16]}, expected {sha256[:16]})"
        raise ValueError(f"backend='triton': the kernels file {path} {what}; regenerate the module")
    key = (str(path), interpret, found)
    if key not in _KERNEL_MODULES:
        if interpret:
            # Triton reads this when kernels are defined and when its own helpers import: switching it back
            # and forth within a process is not supported, so CPU tensors leave the process in interpreter mode.
            os.environ["TRITON_INTERPRET"] = "1"
        spec = importlib.util.spec_from_file_location(f"{path.stem}_{found[:8]}_{int(interpret)}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _KERNEL_MODULES[key] = mod
    return _KERNEL_MODULES[key]


def _kernels_path(module_file):
    return Path(module_file).with_name(Path(module_file).stem + "_triton.py")


def _triton_kernels(module_file, interpret, sha256=None, rebuild=None):
    """The Triton kernels beside a generated module (see `_load_kernels`)."""
    return _load_kernels(_kernels_path(module_file), interpret, sha256, rebuild)


class _KernelConfig(NamedTuple):
    """The schedule of one launch (tiles, warps, stages): never part of the spec (Halide's split)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int = 1  # split-KV forward only (decoding shapes): key-range splits per query tile
    # Warp-specialised key loops (`_WS`): a tuned choice for sm_100, where Triton 3.9 partitions them; on sm_90
    # it does not compile a kernel with two key loops (the lean and the boundary one), see autotune/resource.py.
    warp_specialize: int = 0


def _default_config(D, E, kernel="fwd", heavy=False, cc=None, nbytes=2, kv_reads=False):
    """Fixed, sensible schedules per head dim and kernel until the autotuner owns them. The backward kernels
    iterate over narrower tiles than the forward: they keep more fp32 tiles alive (FlashAttention-2,
    section 3.1.2); `heavy` specs (a tensor gathered per (i, j) pair, or unnormalised float32 weights) get narrower
    tiles too. CI compiles
    every default for sm_90 and checks that it does not spill.

    `cc` (the GPU's compute capability, None off a GPU) and `nbytes` (the inputs' element size): on sm_90 and
    later, 16-bit inputs and head dims up to 128, the forward and dQ take FlashAttention-3's 128-row query
    tiles, the largest that compile with no spills for every example spec (sm_90 ahead-of-time compile,
    fp16 at D = 64, bf16 at D = 128, as CI checks): forward 128 x 128 at D <= 64 (max 254 registers over the
    specs), 128 x 64 at D <= 128 (128 x 128 spilled chunked_local); dQ 128 x 64 (max 241); dK/dV 64 x 128
    at D <= 64 (8 warps, 2 stages: max 246, keys as rows). dK/dV at D = 128 keeps its tiles: no larger one
    compiles without spills for every spec (64 x 128 at one stage fits the masks, not linear_elu, prefix_lm or
    softcap; 128 x 64 neither). `kv_reads`: k's feature map reads auxiliary tensors (whose gradient the dK/dV
    kernel reduces): those keep the dK/dV tiles (a learned per-(j, d) map spilled 344 bytes at 64 x 128)."""
    width = max(D, E)
    # `narrow`: q/k or v at most 32 wide. On an H200 (Triton 3.6) the 128-row, 8-warp tiles computed wrong
    # 16-bit forwards with v 24 or 32 wide beside D = 64 or 128 (cross, head_offset: most rows, with or without
    # TMA, at one or three stages; right under the interpreter and with v 64 wide). Those shapes keep the
    # portable tiles, which the float32 runs of the same specs used there and got right.
    narrow = min(D, E) <= 32
    if cc is not None and cc >= 90 and nbytes == 2 and width <= 128 and not heavy and not narrow:
        if kernel == "fwd":
            return _KernelConfig(128, 128 if width <= 64 else 64, 8, 3)
        if kernel == "dq":
            return _KernelConfig(128, 64, 8, 2)
        # dK/dV: keys as rows (`kernels.KEY_ROWS`), FlashAttention-2's backward shape.
        if kernel == "dkdv" and width <= 64 and not kv_reads:
            return _KernelConfig(64, 128, 8, 2)
    warps = 4 if width <= 64 else 8
    stages = 2 if width <= 128 else 1
    if kernel == "fwd":
        return _KernelConfig(64, 64 if width <= 64 and not heavy else 32, warps, stages)
    if kernel == "dkdv":  # one stage above 64: feature maps recomputed per tile spilled with two (sm_90)
        return _KernelConfig(16 if heavy and width > 64 else 32, 32, warps, stages if width <= 64 else 1)
    if heavy:  # above 64: 16×16 tiles for gathers; 32×16 for float32 weights (16×16 spilled there on sm_90)
        # Float32 weights: one stage. With tile loads through TMA, decay_abs's dQ spilled 24 bytes at two stages
        # (D = 64, 96 registers) and none at one; at D = 128 with aux gradients retention's spilled 28 bytes
        # (fp16) and 8 (bf16) at two stages and none at one (128, 130 registers; decay_abs, gated_linear and
        # lightning none either way).
        one = heavy == 1
        # Gathers per (i, j) at 64 and below: eight warps. With dO in the inputs' dtype, t5_bias's dQ (aux
        # gradients, fp16) spilled 28 bytes at four (96 registers) and none at eight (86; relpos_table 139 -> 128,
        # document 122 -> 96).
        return _KernelConfig(
            32 if heavy == 1 and width > 64 else 16,
            32 if width <= 64 else 16,
            8 if heavy == 2 else warps,
            1 if one else stages,
        )
    return _KernelConfig(64 if width <= 128 else 32, 32, warps, stages)


class _TritonSpec(NamedTuple):
    """What the generic autograd function needs to launch one attention block's kernels."""

    fwd: object
    dkdv: object
    dq: object
    norm: str
    args: tuple  # the kernels' spec group: aux tensors with strides and extents, scalars, size symbols
    uniforms: tuple = ()  # the kernels' uniforms group (`_ku<k>`)
    abi: object = None  # the kernels file's `_<name>_ABI` (BlockABI data): the kernels' signatures
    output: object = None  # (o, b, h, hk, i, e) -> epilogue, for the backward through it
    configs: object = None  # {"fwd" | "dkdv" | "dq": _KernelConfig}; None: _default_config per kernel
    heavy: int = 0  # KernelWriter.heavy: 2 gathers per (i, j) or tile summaries, 1 float32 weights
    summaries: tuple = ()  # ((q_fn(b, h, hk, i), k_fn(b, hk, j)), ...): `A(i) == B(j)` terms of the mask
    fwd_split: object = None  # split-KV forward for decoding shapes, and the kernel merging its partials
    combine: object = None
    layout: object = None  # _KernelLayout: an explicit runtime block layout of this call, or None
    grad_numels: tuple = ()  # numel of the aux tensor of each read the dQ kernel reduces (a partial buffer each)
    # per such read, its buffer's rows: None, one per program; (lead b, lead h) for a gathered read, one per
    # query tile times the program variables its indices leave out
    grad_rows: tuple = ()
    pair_grads: tuple = ()  # ((lead b, lead h), aux shape) per dense (i, j) read: a buffer the dQ kernel fills
    # ((lead tile, lead b, lead h), aux shape) per epilogue read: the buffer the dQ kernel fills with its
    # gradient (`kernels.epilogue_lead`: the axes its indices leave out lead, so each element has one writer)
    epilogue_grads: tuple = ()
    # the same per read of q's feature map (dQ kernel) and of k's ((lead key tile, lead b, lead hk), shape:
    # dK/dV kernel)
    feature_grads: tuple = ()
    feature_kv_grads: tuple = ()
    # a packed variable-length batch (`varlen.Varlen`): q, k and v are then `varlen.packed_view`s, and the
    # outputs are packed too
    varlen: object = None
    # a paged KV cache (`paged.Paged`, forward only): k and v are then zero-stride stand-ins of the logical
    # shape, and the launch reads the pages
    paged: object = None
    # context parallelism (attnc.distributed): (q_pos, k_pos), the global positions of the local q's and k's
    # row 0. The spec's i and j are then global; the spec group's size symbols are the global ones.
    shift: tuple = None
    # per summed aux-gradient buffer (`_triton_backward`'s order): whether it is a row term (sink, eps, output
    # epilogue), which one backward over the whole key range counts once (several key ranges: once in all)
    once: tuple = ()


def _rows(spec, B, H, M, X, dtype, device, packed=None):
    """A [B, H, M, X] buffer the kernels write row by row, and what the caller keeps of it: itself, or in a
    varlen launch the packed [total, H, X] tensor behind the 4-D view the kernels index (`packed`: total)."""
    if spec.varlen is None:
        t = torch.empty((B, H, M, X), dtype=dtype, device=device)
        return t, t
    base = torch.empty((packed, H, X), dtype=dtype, device=device)
    return packed_view(base, B, M), base


def _dense_output(fn, o, rep, offset=0):
    """The epilogue `fn(o, b, h, hk, i, e)` over a whole [B, H, M, E] output (the linear family's forward);
    i counts from `offset` (a shard's global position of row 0)."""
    B, H, M, E = o.shape
    dev = o.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    i = torch.arange(M, device=dev).view(1, 1, M, 1) + offset
    e = torch.arange(E, device=dev).view(1, 1, 1, E)
    return _full(fn(o, b, h, h // rep, i, e), o.shape, o)


def _triton_forward(spec, q, k, v):
    """The forward kernel (or the split-KV forward and its combine): (o, oraw, stat). `oraw` is the float32
    output before the epilogue (o itself when the spec has none); `stat` the row statistic the backward reads
    (the log-sum-exp for softmax). q, k and v are contiguous."""
    B, H, M, D = q.shape
    N, E = k.shape[2], v.shape[3]
    total = spec.varlen.total_q if spec.varlen is not None else None
    o, o_out = _rows(spec, B, H, M, E, q.dtype, q.device, total)
    oraw, oraw_out = _rows(spec, B, H, M, E, torch.float32, q.device, total) if spec.output else (o, o_out)
    stat = torch.empty((B, H, M), dtype=torch.float32, device=q.device)
    split = _split_config(spec, B, H, M, N, D, E, q.device)
    if split is not None:
        _split_forward(spec, split, q, k, v, o, oraw, stat)
        return o_out, oraw_out, stat
    cfg = _fit_layout(_config(spec, "fwd", D, E, q), spec.layout)
    grid = (triton_cdiv(M, cfg.block_m), B * H)
    io = {"_Q": q, "_K": k, "_V": v, "_O": o, "_ORAW": oraw, "_STAT": stat}
    _run(spec, "fwd", grid, cfg, io, q, k, v, o, probe=(B * H, grid[0]))
    return o_out, oraw_out, stat


def _lead_buffers(descs, extents, device):
    """Zeroed float32 gradient buffers [lead..., *shape], with their lead-axis counts, one per ((lead tile,
    lead b, lead h|hk), shape): each lead axis present takes its extent from `extents` (tiles, B, H or G)."""
    out = []
    for lead, shape in descs:
        axes = tuple(n for n, on in zip(extents, lead, strict=True) if on)
        out.append((torch.zeros((*axes, *shape), dtype=torch.float32, device=device), len(axes)))
    return out


def _sum_lead(buf, lead):
    """A `_lead_buffers` buffer summed over its lead axes, in a fixed order (deterministic)."""
    return buf.sum(tuple(range(lead))) if lead else buf


def _triton_backward(spec, q, k, v, o, oraw, stat, do, dstat, aux_grad=False, fp32=False):
    """dq, dk, dv (in the inputs' dtypes) from what the forward saved: o, oraw (o when there is no epilogue)
    and stat. No forward runs again: the dQ kernel computes the row delta Σ_e dO·O (minus d lse for softmax)
    from the tiles it loads anyway and stores it, and the dK/dV kernel, launched after it, reads it. q, k and
    v are contiguous; `dstat` may be None (no gradient reaches the log-sum-exp). `aux_grad`: reduce the
    gradients of the auxiliary reads the dQ kernel owns (returned as summed buffers, in the kernel's
    order); without it that code is compiled out (the `_AUX_GRAD` gate) and nothing is allocated for it.
    `fp32`: return dq, dk, dv in float32 (context parallelism accumulates them over key ranges)."""
    B, H, M, D = q.shape
    G, N, E = k.shape[1], k.shape[2], v.shape[3]
    do = do.contiguous()
    lay = spec.varlen
    if lay is not None:  # o, oraw and do arrive packed: the kernels index their 4-D views

        def rows(t):
            return packed_view(t.contiguous(), B, M)
    else:

        def rows(t):
            return t.contiguous()

    if spec.output is not None:
        # The epilogue's chain rule runs in the dQ kernel: it reads dO of the output (`_DOUT`) and the raw
        # output, and writes dO of the raw output here for the dK/dV kernel.
        backward = [rows(oraw), rows(do)]
        do_raw = _rows(spec, B, H, M, E, torch.float32, q.device, lay and lay.total_q)[0]
    else:
        backward = [rows(o)]
        do_raw = rows(do.to(q.dtype))  # the inputs' dtype (`BlockABI._io`)
    if spec.norm != "softmax":
        dstat = stat  # not read: only softmax's dQ kernel subtracts d lse from the delta
    elif dstat is None:
        dstat = torch.zeros_like(stat)
    else:
        dstat = dstat.to(torch.float32).contiguous()
    delta = torch.empty((B, H, M), dtype=torch.float32, device=q.device)
    # dq, dk, dv: with the strides of q, k, v (the kernels store them so); packed in a varlen launch.
    dq, dq_out = _rows(spec, B, H, M, D, torch.float32, q.device, lay and lay.total_q)
    dk, dk_out = _rows(spec, B, G, N, D, torch.float32, q.device, lay and lay.total_k)
    dv, dv_out = _rows(spec, B, G, N, E, torch.float32, q.device, lay and lay.total_k)
    cfg = _fit_layout(_config(spec, "dq", D, E, q), spec.layout)
    programs = triton_cdiv(M, cfg.block_m) * B * H
    # Zeroed: a program that visits no tile still writes its (zero) partial, but a layout may skip programs.
    aux_grad = aux_grad and bool(
        spec.grad_numels
        or spec.pair_grads
        or spec.epilogue_grads
        or spec.feature_grads
        or spec.feature_kv_grads
    )
    numels = spec.grad_numels if aux_grad else ()
    rows = (spec.grad_rows or (None,) * len(numels)) if aux_grad else ()
    tiles = triton_cdiv(M, cfg.block_m)
    parts = [
        torch.zeros(
            (programs if lead is None else tiles * (B if lead[0] else 1) * (H if lead[1] else 1), n),
            dtype=torch.float32,
            device=q.device,
        )
        for n, lead in zip(numels, rows, strict=True)
    ]
    # Dense (i, j) reads: dS tiles stored at their elements, with b and/or h leading where the read leaves
    # them out (every element then has one writer); pairs no program visits stay zero.
    dense = [
        torch.zeros(
            (*([B] if lb else []), *([H] if lh else []), *shape), dtype=torch.float32, device=q.device
        )
        for (lb, lh), shape in (spec.pair_grads if aux_grad else ())
    ]
    # Epilogue reads and reads of q's feature map: the dQ kernel stores each program's reduction at its
    # element, behind the lead axes its indices leave out (the query tile, b, h); the host sums those.
    dev = q.device
    epilogue = _lead_buffers(spec.epilogue_grads if aux_grad else (), (tiles, B, H), dev)
    feature_q = _lead_buffers(spec.feature_grads if aux_grad else (), (tiles, B, H), dev)
    # The backward kernels read dO where the forward writes o: its strides stand in o's.
    grid = (triton_cdiv(M, cfg.block_m), B * H)
    io = {
        "_Q": q,
        "_K": k,
        "_V": v,
        "_DO": do_raw,
        "_STAT": stat,
        "_DELTA": delta,
        "_DQ": dq,
        "_DSTAT": dstat,
    }
    # None: the gated group unbound, `_AUX_GRAD` False
    grads = [*parts, *dense, *(b for b, _ in (*epilogue, *feature_q))] if aux_grad else None
    dq_probe = (B * H, grid[0])
    _run(spec, "bwd_dq", grid, cfg, io, q, k, v, do_raw, dq_probe, "dq", backward=backward, aux_grads=grads)
    cfg = _fit_layout(_config(spec, "dkdv", D, E, q), spec.layout)
    grid = (triton_cdiv(N, cfg.block_n), B * G)
    io = {"_Q": q, "_K": k, "_V": v, "_DO": do_raw, "_STAT": stat, "_DELTA": delta, "_DK": dk, "_DV": dv}
    # Reads of k's feature map: the dK/dV kernel's, behind the key tile, b and hk where the indices leave
    # them out.
    feature_k = _lead_buffers(spec.feature_kv_grads if aux_grad else (), (grid[0], B, G), dev)
    kv_grads = [b for b, _ in feature_k] if feature_k else None
    _run(spec, "bwd_dkdv", grid, cfg, io, q, k, v, do_raw, (B * G, grid[0]), "dkdv", aux_grads=kv_grads)
    # The partials summed over programs in a fixed order: deterministic, no atomics.
    sums = [part.sum(0) for part in parts]
    sums += [
        d.sum(tuple(range(int(lb) + int(lh)))) if lb or lh else d
        for d, ((lb, lh), _) in zip(dense, spec.pair_grads if aux_grad else (), strict=True)
    ]
    sums += [_sum_lead(b, lead) for b, lead in (*epilogue, *feature_q, *feature_k)]
    if fp32:
        return dq_out, dk_out, dv_out, sums
    return dq_out.to(q.dtype), dk_out.to(k.dtype), dv_out.to(v.dtype), sums


class _TritonAttention(torch.autograd.Function):
    """Fused forward and backward kernels; gradients for q, k and v (auxiliary tensors: see the caller).
    The custom op of a generated module calls `_triton_forward` and `_triton_backward` itself."""

    @staticmethod
    def forward(ctx, spec, q, k, v):
        o, oraw, stat = _triton_forward(spec, q, k, v)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, o, oraw, stat)
        return o, stat

    @staticmethod
    def backward(ctx, do, dstat):
        q, k, v, o, oraw, stat = ctx.saved_tensors
        return None, *_triton_backward(ctx.spec, q, k, v, o, oraw, stat, do, dstat)[:3]


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
    warps (FlashDecoding's choice for so small a tile). Heavy specs and head dims above 64 do not pipeline
    their loads: a second stage spills on sm_90 with a per-pair gather, and with tiles through TMA at D = 128
    (sigmoid_attn: 72 registers and 16 bytes of spills at two stages, 70 and none at one; the other example
    specs move by 4 registers at most, either way)."""
    base = _default_config(D, E, "fwd", heavy)
    return _KernelConfig(16, base.block_n, 4, 1 if heavy or max(D, E) > 64 else base.num_stages)


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
    B, H, M = q.shape[:3]
    N, E = k.shape[2], v.shape[3]
    S = cfg.num_splits
    per_split = triton_cdiv(triton_cdiv(N, cfg.block_n), S) * cfg.block_n
    opart = torch.empty((B * H, S, M, E), dtype=torch.float32, device=q.device)
    lpart = torch.empty((B * H, S, M), dtype=torch.float32, device=q.device)
    tiles_m = triton_cdiv(M, cfg.block_m)
    io = {"_Q": q, "_K": k, "_V": v, "_OPART": opart, "_LPART": lpart, "_SPLIT_N": per_split}
    _run(spec, "fwd_split", (tiles_m, B * H, S), cfg, io, q, k, v, o, probe=(B * H, S, tiles_m))
    merge = _KernelConfig(cfg.block_m, cfg.block_n, 4, 1)
    io = {"_OPART": opart, "_LPART": lpart, "_NSPLIT": S, "_O": o, "_ORAW": oraw, "_STAT": stat}
    _run(spec, "fwd_combine", (tiles_m, B * H), merge, io, q, k, v, o)


# ---- binding a launch to its kernel's signature --------------------------------------------------------------

_KERNEL_FIELDS = {
    "fwd": "fwd",
    "bwd_dkdv": "dkdv",
    "bwd_dq": "dq",
    "fwd_split": "fwd_split",
    "fwd_combine": "combine",
}


@functools.lru_cache(maxsize=256)
def _signatures(abi):
    """{kind: KernelSignature} of a block, from its kernels file's ABI data (plain, hashable literals)."""
    return BlockABI.from_data(abi).signatures()


def _run(spec, kind, grid, cfg, io, q, k, v, o, probe=None, name=None, backward=None, aux_grads=None):
    """Launch the block's `kind` kernel on `grid`, every argument bound by group and name to the kernel's
    signature (`KernelSignature.bind`): `io` by parameter name, the spec and uniforms groups as the module
    passed them, strides of (q, k, v, o), extents; the optional groups only where the signature has them,
    the layout and the visit probe only when this call uses them (otherwise None, their gates False).
    `probe`: the shape of the per-program visit counts; `name`: the kernel's name in the probe; `backward`:
    the dQ kernel's backward group (the output read for the row delta); `aux_grads`: its aux-gradient
    buffers, or None (that gated group unbound: the kernel compiles its aux-gradient code out)."""
    sig = _signatures(spec.abi)[kind]
    H, M, D = q.shape[1:]
    G, N, E = k.shape[1], k.shape[2], v.shape[3]
    kw = _launch(cfg, q, D, E)
    if TMA_GATE in sig.group(Group.CONSTEXPRS).names:
        kw[TMA_GATE] = _tma_ok(spec, [t for n, t in io.items() if n in _TMA_TENSORS])
    kw[WS_GATE] = _ws_ok(kw.get(WS_GATE), kw.get(TMA_GATE), spec.layout is not None)
    strides = _strides(q, k, v, o)
    pg = spec.paged
    if pg is not None:  # the pages' rows, wherever the launch reads k and v
        io = {n: {"_K": pg.k, "_V": pg.v}.get(n, t) for n, t in io.items()}
        strides = (*q.stride(), *pg.strides(pg.k), *pg.strides(pg.v), *o.stride())
    groups = {
        "io": io,
        "spec": spec.args,
        "uniforms": spec.uniforms,
        "strides": strides,
        "extents": (H, G, M, N, D, E),  # varlen, paged: the longest sequence's (the buffers' pitch)
        "constexprs": {n: kw.pop(n) for n in sig.group(Group.CONSTEXPRS).names if n in kw},
    }
    if sig.has(Group.BACKWARD):
        groups["backward"] = backward
    if sig.has(Group.AUX_GRADS):
        groups["aux_grads"] = aux_grads
    if sig.has(Group.AUX_GRADS_KV):
        groups["aux_grads_kv"] = aux_grads
    if sig.has(Group.SUMMARIES):
        groups["summaries"] = _summaries(spec, q, k, cfg)
    if sig.has(Group.LAYOUT):
        groups["layout"] = _layout_args(spec.layout)
    if sig.has(Group.PROBE):
        groups["probe"] = _visits(name or kind, probe, q.device, cfg)
    if spec.varlen is not None:
        groups["varlen"] = (spec.varlen.cu_q, spec.varlen.cu_k)
    if pg is not None and sig.has(Group.PAGED):
        groups["paged"] = pg.group()
    if spec.shift is not None:
        groups["shift"] = tuple(int(p) for p in spec.shift)
    getattr(spec, _KERNEL_FIELDS[kind])[grid](**sig.bind(**groups), **kw)


def _ws_ok(asked, tma, layout):
    """Whether a launch (or the ahead-of-time compile of one) warp-specialises its key loops: the schedule
    asks for it, the tiles come through tensor descriptors (Triton 3.9 cannot partition a loop of pointer
    loads) and no block layout wraps the key loop in a loop of its own."""
    return bool(asked) and bool(tma) and not layout


# What the kernels may read or write through tensor descriptors: the key tiles (forward, dQ), the query and dO
# tiles (dK/dV), the forward's q and o tiles.
_TMA_TENSORS = ("_Q", "_K", "_V", "_DO", "_O")


def _tma_ok(spec, tensors):
    """Whether this launch reads its tiles through tensor descriptors (`_TMA`). A descriptor needs a unit
    last stride, 16-byte aligned other strides and a 16-byte aligned base (the TMA unit's rules); the paged
    form gathers rows through the block table and keeps pointer loads. ATTNC_TMA (attnc.settings): "auto"
    takes descriptors on a GPU with TMA (sm_90 and later), "1" wherever the tensors qualify (the Triton
    interpreter runs them too: tests), "0" never."""
    mode = settings().tma
    if mode == "0" or spec.paged is not None or not tensors:
        return False
    if mode == "auto" and (_device_cc(tensors[0]) or 0) < 90:
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    if tensors[0].is_cuda:
        _descriptor_allocator()
    return True


def _descriptor_allocator():
    """Kernels that build tensor descriptors on the device need global scratch for them: Triton asks the
    allocator set with `triton.set_allocator`. Set one (torch's caching allocator) unless the caller has."""
    import triton

    try:  # Triton keeps the current allocator in a context variable (triton/runtime/_allocation.py)
        from triton.runtime import _allocation

        unset = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    except (ImportError, AttributeError):  # another layout: set ours
        unset = True
    if unset:

        def alloc(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")

        triton.set_allocator(alloc)


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
    q_pos, k_pos = spec.shift or (0, 0)  # the tiles' positions (context parallelism: global ones)
    b = torch.arange(B, device=dev).view(B, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1)
    hk = torch.arange(G, device=dev).view(1, G, 1)
    i = (q_pos + torch.arange(M, device=dev)).view(1, 1, M)
    j = (k_pos + torch.arange(N, device=dev)).view(1, 1, N)
    for qfn, kfn in spec.summaries:
        qv = torch.as_tensor(qfn(b, h, h // (H // G), i), device=dev).to(torch.int64).broadcast_to(B, H, M)
        kv = torch.as_tensor(kfn(b, hk, j), device=dev).to(torch.int64).broadcast_to(B, G, N)
        out += [
            *_tile_minmax(qv.reshape(B * H, M), cfg.block_m),
            *_tile_minmax(kv.reshape(B * G, N), cfg.block_n),
        ]
    return out


# A test probe (`visit_probe()`): while set to a dict, every launch records, per program, how many tiles it
# visited (the kernels count only then: `_COUNT_VISITS` is a compile-time switch), and its schedule.
_VISIT_PROBE = None


@contextlib.contextmanager
def visit_probe():
    """`with visit_probe() as probe:` every Triton launch in the block (any module) records its per-program
    tile visits under the kernel's name ("fwd", "dkdv", "dq", "fwd_split") and its config under
    "<name>_config"."""
    global _VISIT_PROBE
    saved, _VISIT_PROBE = _VISIT_PROBE, {}
    try:
        yield _VISIT_PROBE
    finally:
        _VISIT_PROBE = saved


def _visits(kernel, shape, device, cfg):
    """The probe group's values (`_VISITS`: per-program visit counts) while a probe is set, else None (the
    kernel is then launched with `_COUNT_VISITS` False). The probe also records the schedule."""
    if _VISIT_PROBE is None:
        return None
    counts = torch.zeros(shape, dtype=torch.int32, device=device)
    _VISIT_PROBE[kernel] = counts
    _VISIT_PROBE[f"{kernel}_config"] = cfg
    return (counts,)


def _strides(q, k, v, o):
    return (*q.stride(), *k.stride(), *v.stride(), *o.stride())


def _config(spec, kernel, D, E, x=None):
    """The launch's schedule: a tuned one, else the default for the GPU of tensor `x` (None: the portable
    defaults)."""
    tuned = (spec.configs or {}).get(kernel)
    if tuned:
        return tuned
    cc = None if x is None else _device_cc(x)
    nbytes = x.element_size() if x is not None else 2
    return _default_config(D, E, kernel, spec.heavy, cc, nbytes, bool(spec.feature_kv_grads))


def _device_cc(x):
    """The compute capability (90 for sm_90) of the GPU that tensor `x` lives on, or None: a CPU tensor, or the
    Triton interpreter (which runs on the host whatever the tensors' device)."""
    if not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _capability(index):
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _schedule_constexprs(cfg, D, E, fp32):
    """The constexprs a schedule sets (tiles, padded head dims, the dot precision): what every launch and
    the ahead-of-time compile (`codegen.triton.inspect`) bind to the kernel's constexprs group."""
    return {
        "_BLOCK_M": cfg.block_m,
        "_BLOCK_N": cfg.block_n,
        "_BLOCK_D": _next_pow2(D),
        "_BLOCK_E": _next_pow2(E),
        "_DOT_PRECISION": "ieee" if fp32 else "tf32",
        WS_GATE: bool(cfg.warp_specialize),
    }


def _launch(cfg, q, D, E):
    """A launch's constexprs and its launch options (warps, stages)."""
    return {
        **_schedule_constexprs(cfg, D, E, q.dtype is torch.float32),
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
