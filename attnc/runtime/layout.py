"""Explicit runtime block layouts (`NAME(..., block_layout=BlockLayout(...))`): checks, the transpose the
backward walks, the kernels' view of a layout and the reference's (a dense mask), and the block arithmetic
shared with the Triton launches."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .reference import _full_bool


def triton_cdiv(a, b):
    return (a + b - 1) // b


def _next_pow2(n):
    return max(16, 1 << (int(n) - 1).bit_length())


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


def _layout_args(layout):
    """The kernels' layout group: the four lists, their strides and the block sizes; None without a layout
    (the launch then binds None to the group and False to its `_LAYOUT` gate)."""
    if layout is None:
        return None
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
