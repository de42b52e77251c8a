"""A paged KV cache (the block-table layout vLLM and FlashInfer serve from) for the generated `NAME_paged`
entry points, and `PagedKVCache`, a small allocator that appends new keys and values to it.

K and V live in pages [num_pages, page_size, G, D|E]; sequence b's logical key n is row n % page_size of
page block_table[b, n // page_size], and seq_lens[b] says how many keys it has. The forward kernels look
rows up through the table in their key loop (the `_PAGED` constexpr), so the spec's score and mask see j as
the logical position: ALiBi, windows, sinks and soft-capping work unchanged. Queries are [B, H, M, D]; a
spec aligns them with its own size symbols (`mask = j <= i + N - M`: the last M positions of each sequence,
bottom-right). Decoding shapes (M <= 16) take the split-KV path. There is no backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .varlen import cut_to_sequence


class Paged(NamedTuple):
    """A paged launch: the pages of k and v, the block table, the key counts and the page size."""

    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    page_size: int

    def strides(self, t):
        """The kernels' (b, h, n, d) strides of a pages tensor seen as rows: no batch stride (the table
        says where each sequence's rows are), rows along the page's row axis."""
        return (0, t.stride(2), t.stride(1), t.stride(3))

    def group(self):
        return (self.block_table, self.seq_lens, self.block_table.stride(0), self.page_size)


def _int32(name, t, dims, text, q):
    if not isinstance(t, torch.Tensor) or t.dtype is not torch.int32 or t.dim() != dims:
        got = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected an int32 tensor {text}, got {got}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (where q is), got one on {t.device}")


def paged_batch(name, q, k_pages, v_pages, block_table, seq_lens, max_seqlen_k, tensors):
    """Check a paged call: (logical k, logical v, Paged, max_seqlen_k). The logical k and v are zero-stride
    [B, G, max_seqlen_k, D|E] stand-ins with the pages' dtype and device (shapes for the argument checks,
    no storage); the launch reads the pages themselves. The table and the lengths are validated on the host
    when max_seqlen_k is None (one synchronisation) and always for CPU tensors; on CUDA with max_seqlen_k
    given nothing synchronises and they are trusted. `tensors`: the float inputs, none of which may
    require grad (a paged operator has no backward)."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise ValueError(
            f"{name}_paged has no backward (a paged KV cache serves decoding and chunked prefill); call it "
            "under torch.no_grad() or on tensors that do not require grad"
        )
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(
            f"q: expected a tensor of shape [B, H, M, D], got {getattr(q, 'shape', type(q).__name__)}"
        )
    for n, t, last in (("k_pages", k_pages, "D"), ("v_pages", v_pages, "E")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{n}: expected pages [num_pages, page_size, G, {last}], got {got}")
        if t.device != q.device:
            raise ValueError(f"{n}: expected a tensor on {q.device} (where q is), got one on {t.device}")
    if k_pages.shape[:3] != v_pages.shape[:3]:
        raise ValueError(
            f"k_pages, v_pages: expected the same pages, page size and heads, got {list(k_pages.shape)} and {list(v_pages.shape)}"
        )
    pages, page, G = k_pages.shape[:3]
    if page % 16 != 0:
        raise ValueError(f"k_pages: the page size (dimension 1) must be a multiple of 16, got {page}")
    B = q.shape[0]
    _int32("block_table", block_table, 2, "[B, max_pages]", q)
    _int32("seq_lens", seq_lens, 1, "[B]", q)
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(
            f"block_table, seq_lens: expected one row per sequence of q (B = {B}), got {list(block_table.shape)} and {list(seq_lens.shape)}"
        )
    capacity = block_table.shape[1] * page
    if max_seqlen_k is None or not q.is_cuda:
        lens = seq_lens.tolist()  # the only host synchronisation of a paged call
        if any(n < 0 or n > capacity for n in lens):
            raise ValueError(
                f"seq_lens: each length must lie in [0, max_pages * page_size = {capacity}], got {lens}"
            )
        used = [block_table[b, : (n + page - 1) // page] for b, n in enumerate(lens)]
        if any(((u < 0) | (u >= pages)).any() for u in used):
            raise ValueError(f"block_table: the pages a sequence uses must lie in [0, num_pages = {pages})")
        longest = max(lens, default=0)
        if max_seqlen_k is None:
            max_seqlen_k = longest
        elif max_seqlen_k < longest:
            raise ValueError(f"max_seqlen_k: {max_seqlen_k} is below the longest sequence, {longest}")
    if not isinstance(max_seqlen_k, int) or isinstance(max_seqlen_k, bool) or max_seqlen_k < 0:
        raise ValueError(f"max_seqlen_k: expected a non-negative int, got {max_seqlen_k!r}")
    k_pages, v_pages = k_pages.contiguous(), v_pages.contiguous()
    # Zero-stride stand-ins: the argument checks and the schedule read shapes, never values.
    k = k_pages.new_empty(()).expand(B, G, max_seqlen_k, k_pages.shape[3])
    v = v_pages.new_empty(()).expand(B, G, max_seqlen_k, v_pages.shape[3])
    return k, v, Paged(k_pages, v_pages, block_table.contiguous(), seq_lens.contiguous(), page), max_seqlen_k


def gather_pages(pages, block_table, length, b):
    """Sequence b's first `length` keys (or values) from the pages, as [G, length, D] (the reference's and
    the tests' contiguous view of the cache)."""
    page = pages.shape[1]
    rows = torch.arange(length, device=pages.device)
    idx = block_table[b, rows // page].to(torch.int64) * page + rows % page
    return pages.reshape(-1, *pages.shape[2:])[idx].transpose(0, 1)


def paged_reference(fn, args, axes, paged):
    """The reference of a paged call: per sequence, its keys and values gathered from the pages and the
    batched reference `fn` (returning o and lse) on them; a host loop, the readable oracle. `axes`: per
    argument "q", "k" (the pages: replaced by the gathered rows), None (passed whole), or per axis "b"
    (cut to the sequence), "k" (key positions, cut to its length) or None."""
    lens = paged.seq_lens.tolist()
    outs, stats = [], []
    for b, n in enumerate(lens):
        call = []
        for a, ax in zip(args, axes, strict=True):
            if ax == "q":
                a = a[b : b + 1]
            elif ax == "k":
                a = gather_pages(a, paged.block_table, n, b).unsqueeze(0)
            elif ax is not None:
                a = cut_to_sequence(a, ax, b, {"k": n})
            call.append(a)
        o, lse = fn(*call)
        outs.append(o)
        stats.append(lse)
    q = args[axes.index("q")]
    o = torch.cat(outs) if outs else q.new_zeros((0, *q.shape[1:3], paged.v.shape[3]))
    lse = torch.cat(stats) if stats and stats[0] is not None else None
    return o, lse


class PagedKVCache:
    """A paged KV cache for B sequences: pages [num_pages, page_size, G, D] for k and [.., E] for v, a block
    table [B, max_pages] (int32) and the key counts `seq_lens` [B] (int32). `append(k, v)` writes new keys
    and values [B, G, T, D] after each sequence's last one, taking pages from a free list as sequences grow
    (so a sequence's pages are in general not contiguous); `share_prefix(src, dst, n)` makes sequence dst
    start with src's first n keys by pointing at the same full pages (a shared prefix, as prefix caching
    does). The attnc `NAME_paged` operators read `k_pages`, `v_pages`, `block_table` and `seq_lens`."""

    def __init__(
        self,
        batch: int,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        max_pages: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        if page_size % 16 != 0:
            raise ValueError(f"page_size must be a multiple of 16, got {page_size}")
        self.page_size = page_size
        self.k_pages = torch.zeros((num_pages, page_size, kv_heads, head_dim), dtype=dtype, device=device)
        self.v_pages = torch.zeros(
            (num_pages, page_size, kv_heads, value_dim or head_dim), dtype=dtype, device=device
        )
        self.max_pages = max_pages or num_pages
        self.block_table = torch.zeros((batch, self.max_pages), dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros((batch,), dtype=torch.int32, device=device)
        self._lens = [0] * batch  # host copies: the allocator never reads the device
        self._pages: list[list[int]] = [[] for _ in range(batch)]
        order = (
            torch.randperm(num_pages, generator=generator).tolist() if generator else list(range(num_pages))
        )
        self._free = order
        self._shared: set[int] = set()

    def _take(self) -> int:
        if not self._free:
            raise RuntimeError("PagedKVCache: out of pages (raise num_pages)")
        return self._free.pop(0)

    def share_prefix(self, src: int, dst: int, n: int) -> None:
        """Sequence dst (empty) starts with src's first n keys (n a multiple of the page size): its table
        points at src's pages."""
        if n % self.page_size or n > self._lens[src] or self._lens[dst]:
            raise ValueError("share_prefix: n must be a multiple of the page size within src, and dst empty")
        pages = self._pages[src][: n // self.page_size]
        self._pages[dst] = list(pages)
        self._shared.update(pages)
        self._lens[dst] = n
        self.block_table[dst, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.seq_lens[dst] = n

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int] | None = None) -> None:
        """Write k [B, G, T, D] and v [B, G, T, E] after each sequence's keys (`lengths`: how many of the T
        new rows each sequence takes; all T by default)."""
        B, _, T, _ = k.shape
        for b in range(B):
            t = T if lengths is None else lengths[b]
            for r in range(t):
                pos = self._lens[b]
                slot = pos // self.page_size
                if slot >= self.max_pages:
                    raise RuntimeError(f"PagedKVCache: sequence {b} is full ({self.max_pages} pages)")
                if slot == len(self._pages[b]):
                    self._pages[b].append(self._take())
                    self.block_table[b, slot] = self._pages[b][-1]
                page = self._pages[b][slot]
                if page in self._shared:
                    raise RuntimeError("PagedKVCache: appending into a shared page")
                self.k_pages[page, pos % self.page_size] = k[b, :, r]
                self.v_pages[page, pos % self.page_size] = v[b, :, r]
                self._lens[b] = pos + 1
        self.seq_lens.copy_(torch.tensor(self._lens, dtype=torch.int32))

    def gathered(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence b's keys and values as contiguous [G, n, D] and [G, n, E]."""
        n = self._lens[b]
        return (
            gather_pages(self.k_pages, self.block_table, n, b),
            gather_pages(self.v_pages, self.block_table, n, b),
        )
