"""Explicit runtime block layouts (routing-style attention: BiFormer, landmark / top-k retrieval).

`NAME(..., block_layout=BlockLayout(kv_indices, kv_counts, q_block, kv_block))` attends, for each (batch, head,
query block), only the listed key blocks, and inside them only what the spec's mask allows. The oracle here is
SDPA in float64 with a dense boolean mask built in this file from the lists (plain loops); both backends must
match it, forward and gradients (q, k, v), and the visit probe shows the kernels visit only listed tiles.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import attnc.runtime.triton
from attnc import codegen
from attnc.runtime import visit_probe
from attnc.runtime.layout import _layout_transpose

pytest.importorskip("triton")

F64 = torch.float64
NEG_INF = float("-inf")
SPEC_DIR = Path(__file__).resolve().parents[1] / "examples" / "specs"
TOL = {torch.float32: 5e-5, torch.float16: 8e-3, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 3e-2, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def mods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    cache = tmp_path_factory.mktemp("block-layout")
    return {
        s: codegen.compile_file(SPEC_DIR / f"{s}.attn", cache_dir=cache)
        for s in ("causal", "sliding_window", "decode")
    }


# ---- layouts and the oracle -------------------------------------------------------------------------------------


def random_lists(
    B: int, H: int, rows: int, blocks: int, seed: int, empty_row: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct block lists [B, H, rows, blocks] (+ counts), padded with junk past each count (negative
    and out-of-range indices included), which the layout must ignore."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-3, blocks + 3, (B, H, rows, blocks), generator=g, dtype=torch.int32)
    cnt = torch.randint(0, blocks + 1, (B, H, rows), generator=g, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for r in range(rows):
                n = int(cnt[b, h, r])
                idx[b, h, r, :n] = torch.randperm(blocks, generator=g)[:n].to(torch.int32)
    if empty_row is not None:
        cnt[:, :, empty_row] = 0
    return idx, cnt


def dense_layout(
    idx: torch.Tensor, cnt: torch.Tensor, M: int, N: int, q_block: int, kv_block: int
) -> torch.Tensor:
    """[B, H, M, N] bool: (i, j) allowed when j's key block is listed for i's query block."""
    B, H, rows, _ = idx.shape
    out = torch.zeros(B, H, M, N, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for r in range(rows):
                for t in range(int(cnt[b, h, r])):
                    c = int(idx[b, h, r, t])
                    out[b, h, r * q_block : (r + 1) * q_block, c * kv_block : (c + 1) * kv_block] = True
    return out


def sdpa_oracle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 SDPA with an explicit mask; rows with no visible key get an all-true mask row and are zeroed
    (SDPA's own answer there is NaN), with log-sum-exp -inf."""
    H, D = q.shape[1], q.shape[3]
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    alive = mask.any(-1, keepdim=True)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~alive, scale=D**-0.5) * alive
    s = torch.where(mask, q @ k.transpose(-1, -2) * D**-0.5, NEG_INF)
    lse = torch.where(alive.squeeze(-1), torch.logsumexp(torch.where(alive, s, 0.0), -1), NEG_INF)
    return o, lse


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    want = want.detach().to(F64)
    finite = want[want.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(
        got.detach().to(F64), want, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}"
    )


def _qkv(B: int, H: int, G: int, M: int, N: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, M, 16), (B, G, N, 16), (B, G, N, 16)]
    return [torch.randn(*s, generator=g, dtype=F64).to(dtype).to(F64) for s in shapes]


def _check_against_oracle(
    mod: ModuleType,
    name: str,
    base: list[torch.Tensor],
    layout: object,
    visible: torch.Tensor,
    dtype: torch.dtype,
    backend: str,
    **scalars: int,
) -> dict[str, object]:
    """Forward, log-sum-exp and q/k/v gradients of one backend against the SDPA oracle; returns the probe."""
    with visit_probe() as probe:
        x = [t.to(dtype).requires_grad_() for t in base]
        o, lse = getattr(mod, name)(*x, **scalars, backend=backend, return_lse=True, block_layout=layout)
        weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        got = torch.autograd.grad((o.to(F64) * weights).sum(), x)
    ref = [t.clone().requires_grad_() for t in base]
    o_ref, lse_ref = sdpa_oracle(*ref, visible)
    want = torch.autograd.grad((o_ref * weights).sum(), ref)
    what = f"{name} {backend} {str(dtype).removeprefix('torch.')}"
    assert o.dtype == dtype
    _close(o, o_ref, TOL[dtype], f"{what}: o")
    dead = lse_ref == NEG_INF
    assert (lse[dead] == NEG_INF).all() and (o[dead] == 0).all(), f"{what}: dead rows"
    _close(lse[~dead], lse_ref[~dead], TOL[dtype], f"{what}: lse")
    for n, g, w in zip("qkv", got, want, strict=True):
        assert g.isfinite().all()
        _close(g, w, GRAD_TOL[dtype], f"{what}: d{n}")
    return probe


# ---- against the oracle -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("triton", torch.float32), ("triton", torch.float16), ("reference", torch.float64)],
    ids=["triton-fp32", "triton-fp16", "reference-fp64"],
)
def test_causal_layout_matches_dense_mask_oracle(
    mods: dict[str, ModuleType], backend: str, dtype: torch.dtype
) -> None:
    """Per head a different random layout (q_block 32, kv_block 64) on top of the causal mask: listed future
    blocks are still masked, and the query block with nothing listed has dead rows."""
    B, H, M, N, qb, kb = 1, 2, 128, 128, 32, 64
    mod = mods["causal"]
    idx, cnt = random_lists(B, H, M // qb, N // kb, seed=5, empty_row=2)
    i, j = torch.arange(M).view(M, 1), torch.arange(N).view(1, N)
    visible = dense_layout(idx, cnt, M, N, qb, kb) & (j <= i)
    base = _qkv(B, H, H, M, N, dtype if dtype is not torch.float64 else torch.float32, seed=0)
    layout = mod.BlockLayout(idx, cnt, qb, kb)
    _check_against_oracle(mod, "causal", base, layout, visible, dtype, backend)


def test_gqa_shared_layout_with_window_mask(mods: dict[str, ModuleType]) -> None:
    """Grouped-query attention (H = 2 query heads on G = 1 key/value head) with a layout shared by every
    head ([1, 1, ...]), under the spec's sliding-window mask; q_block 64 and kv_block 32 make the kernels
    use 32-wide key tiles."""
    B, H, G, N, W, qb, kb = 1, 2, 1, 128, 48, 64, 32
    mod = mods["sliding_window"]
    idx, cnt = random_lists(1, 1, N // qb, N // kb, seed=11)
    cnt[0, 0, 1] = N // kb  # query block 1 lists every key block: the window alone decides there
    idx[0, 0, 1] = torch.arange(N // kb, dtype=torch.int32)
    i, j = torch.arange(N).view(N, 1), torch.arange(N).view(1, N)
    visible = dense_layout(idx, cnt, N, N, qb, kb).expand(B, H, N, N) & (j <= i) & (i - j < W)
    base = _qkv(B, H, G, N, N, torch.float32, seed=1)
    probe = _check_against_oracle(
        mod, "sliding_window", base, mod.BlockLayout(idx, cnt, qb, kb), visible, torch.float32, "triton", W=W
    )
    assert all(probe[f"{k}_config"].block_n <= kb for k in ("fwd", "dkdv", "dq"))  # type: ignore[attr-defined]


@pytest.mark.parametrize("tma", ["auto", "1"], ids=["pointers", "descriptors"])
def test_split_kv_decoding_with_a_layout(
    mods: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, tma: str
) -> None:
    """Top-k retrieval while decoding: 4 query rows attend key blocks {0, 3} (of 64 keys) and, bottom-right
    causal, nothing past their position. The split-KV path runs (one key tile per split) and the splits
    holding unlisted blocks visit nothing. With tiles through descriptors (ATTNC_TMA=1, which the interpreter
    runs) the split forward calls its key loop once per listed block, the mask chosen per tile."""
    B, H, G, M, N, qb, kb = 1, 2, 1, 4, 256, 16, 64
    monkeypatch.setenv("ATTNC_TMA", tma)
    mod = mods["decode"]
    monkeypatch.setattr(attnc.runtime.triton, "_SPLIT_MIN_TILES", 1)  # the runtime library decides splits
    idx = torch.tensor([3, 0, 2, 1], dtype=torch.int32).view(1, 1, 1, 4).expand(B, H, 1, 4)
    cnt = torch.full((B, H, 1), 2, dtype=torch.int32)
    i, j = torch.arange(M).view(M, 1), torch.arange(N).view(1, N)
    visible = dense_layout(idx, cnt, M, N, qb, kb) & (j <= i + N - M)
    base = _qkv(B, H, G, M, N, torch.float32, seed=2)
    probe = _check_against_oracle(
        mod, "decode", base, mod.BlockLayout(idx, cnt, qb, kb), visible, torch.float32, "triton"
    )
    cfg = probe["fwd_split_config"]
    assert cfg.num_splits == N // cfg.block_n  # type: ignore[attr-defined]
    per_tile = probe["fwd_split"].view(B * H, -1)  # type: ignore[attr-defined]
    listed = torch.tensor([n0 // kb in (0, 3) for n0 in range(0, N, cfg.block_n)], dtype=torch.int32)  # type: ignore[attr-defined]
    assert (per_tile == listed).all(), per_tile.tolist()


# ---- what the kernels visit -------------------------------------------------------------------------------------


def test_kernels_visit_only_listed_tiles(mods: dict[str, ModuleType]) -> None:
    """Forward and dQ visit, per query tile, exactly the key tiles that lie in a listed block and hold a causally
    visible pair; dK/dV, per key tile, the query tiles listed by the transpose with a visible pair. Blocks of
    16 queries and 32 keys make the kernels' tiles 16 and at most 32 wide."""
    B, H, M, N, qb, kb = 1, 2, 96, 96, 16, 32
    mod = mods["causal"]
    idx, cnt = random_lists(B, H, M // qb, N // kb, seed=3)
    i, j = torch.arange(M).view(M, 1), torch.arange(N).view(1, N)
    visible = dense_layout(idx, cnt, M, N, qb, kb) & (j <= i)
    base = _qkv(B, H, H, M, N, torch.float32, seed=4)
    probe = _check_against_oracle(
        mod, "causal", base, mod.BlockLayout(idx, cnt, qb, kb), visible, torch.float32, "triton"
    )
    for kernel, by in (("fwd", "query"), ("dq", "query"), ("dkdv", "key")):
        cfg = probe[f"{kernel}_config"]
        bm, bn = cfg.block_m, cfg.block_n  # type: ignore[attr-defined]
        assert qb % bm == 0 and kb % bn == 0 and bm == 16
        tiles = torch.stack(
            [
                torch.tensor(
                    [
                        [bool(visible[0, h, a : a + bm, c : c + bn].any()) for c in range(0, N, bn)]
                        for a in range(0, M, bm)
                    ]
                )
                for h in range(H)
            ]
        )
        needed = tiles.sum(2 if by == "query" else 1).to(torch.int32)
        assert (probe[kernel] == needed).all(), (kernel, probe[kernel].tolist(), needed.tolist())  # type: ignore[union-attr]


# ---- the transpose, and arguments -------------------------------------------------------------------------------


def test_transpose_built_on_device_matches_given(mods: dict[str, ModuleType]) -> None:
    mod = mods["causal"]
    idx, cnt = random_lists(2, 3, 5, 4, seed=9)
    q_idx, q_cnt = _layout_transpose(idx, cnt, 4)
    for b in range(2):
        for h in range(3):
            for c in range(4):
                want = [r for r in range(5) if c in idx[b, h, r, : int(cnt[b, h, r])].tolist()]
                assert int(q_cnt[b, h, c]) == len(want)
                assert q_idx[b, h, c, : len(want)].tolist() == want
    # Given explicitly, the transpose is used as is: same results as building it.
    B, H, M, N, qb, kb = 1, 2, 64, 64, 32, 32
    idx, cnt = random_lists(B, H, M // qb, N // kb, seed=10)
    q_idx, q_cnt = _layout_transpose(idx, cnt, N // kb)
    x = [t.float().requires_grad_() for t in _qkv(B, H, H, M, N, torch.float32, seed=6)]
    outs = []
    for layout in (mod.BlockLayout(idx, cnt, qb, kb), mod.BlockLayout(idx, cnt, qb, kb, q_idx, q_cnt)):
        o = mod.causal(*x, backend="triton", block_layout=layout)
        outs.append((o, *torch.autograd.grad(o.sum(), x)))
    for a, b_ in zip(*outs, strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


def test_bad_layouts_name_the_parameter(mods: dict[str, ModuleType]) -> None:
    mod = mods["causal"]
    q = torch.randn(1, 2, 64, 16)
    idx, cnt = random_lists(1, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"block_layout\.q_block: expected a positive multiple of 16"):
        mod.causal(q, q, q, backend="triton", block_layout=mod.BlockLayout(idx, cnt, 40, 32))
    with pytest.raises(ValueError, match=r"block_layout\.kv_indices: dimension 2 should be 4"):
        mod.causal(q, q, q, backend="reference", block_layout=mod.BlockLayout(idx, cnt, 16, 32))
    with pytest.raises(ValueError, match=r"block_layout\.kv_counts: expected an integer dtype"):
        mod.causal(q, q, q, backend="triton", block_layout=mod.BlockLayout(idx, cnt.float(), 32, 32))
    with pytest.raises(ValueError, match=r"block_layout\.q_counts|give both q_indices and q_counts"):
        mod.causal(q, q, q, backend="triton", block_layout=mod.BlockLayout(idx, cnt, 32, 32, idx))
    with pytest.raises(ValueError, match="block_layout: expected a BlockLayout, got tuple"):
        mod.causal(q, q, q, block_layout=(idx, cnt, 32, 32))


def test_layout_through_torch_compile(mods: dict[str, ModuleType]) -> None:
    """The layout travels through the custom op: torch.compile(fullgraph=True) traces a call with one."""
    mod = mods["causal"]
    idx, cnt = random_lists(1, 2, 2, 2, seed=1)
    layout = mod.BlockLayout(idx, cnt, 32, 32)
    q = torch.randn(1, 2, 64, 16, dtype=F64, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return mod.causal(x, x, x, block_layout=layout).sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    i, j = torch.arange(64).view(64, 1), torch.arange(64).view(1, 64)
    want = sdpa_oracle(q, q, q, dense_layout(idx, cnt, 64, 64, 32, 32) & (j <= i))[0].sum()
    _close(got, want, 1e-10, "compiled")
    (g,) = torch.autograd.grad(got, q)
    (w,) = torch.autograd.grad(want, q)
    _close(g, w, 1e-10, "compiled grad")


# ---- GPU-readiness: the layout form of every kernel compiles for sm_90 without spilling ------------------------


def test_layout_kernels_compile_for_sm90_without_spills(mods: dict[str, ModuleType]) -> None:
    """The `_LAYOUT` form of the forward, dK/dV, dQ and split-KV kernels (the plain form is what
    tests/test_aot_generated.py compiles for every spec), for sm_90 at head dim 64 in fp16 and 128 in bf16."""
    from attnc.codegen.triton.aot import KernelReport, compile_reports, format_table
    from attnc.codegen.triton.inspect import Target, jobs
    from attnc.dsl.lower import compile_to_ir

    from attnc.runtime.triton import _triton_kernels

    path = SPEC_DIR / "causal.attn"
    kernels = _triton_kernels(mods["causal"].__file__, interpret=False)
    (att,) = compile_to_ir(path.read_text(), path.name).attentions
    targets = [Target(90, "fp16", 64, layout=True), Target(90, "bf16", 128, layout=True)]
    reports = compile_reports([j for t in targets for j in jobs(att, kernels, t)], max_workers=2)
    print("\n" + format_table(reports))
    assert all(isinstance(r, KernelReport) for r in reports)
    assert len(reports) == 2 * len(targets[0].kernels)
    layout_forms = [r for r in reports if not r.name.endswith("_combine_kernel")]
    assert all(dict(r.constexprs)["_LAYOUT"] is True for r in layout_forms)
    assert not [f"{r.name} {r.config}: {r.spill_bytes} B" for r in reports if r.spill_bytes]
