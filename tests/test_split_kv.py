"""Split-KV decoding (FlashDecoding) under the Triton interpreter: for M <= 16 query rows the forward splits the
key range over a third grid axis, writes float32 partials and merges them in a combine kernel.

Each case runs the split path (forced with one key tile per split) and the one-pass forward on the same inputs
and compares both with an oracle written here in float64 (SDPA with an explicit mask, or the paper's formula:
softmax with a sink column, sigmoid(s + b), sum-normalised linear attention): outputs, log-sum-exp, dead rows
(o = 0, lse = -inf) and gradients of q, k, v (the backward is the usual one, fed by the combine's o and lse).
The visit probe shows that each split visits only its share of the planned tiles.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from attnc import codegen
from attnc.runtime import triton as rt_triton
from attnc.runtime import visit_probe

pytest.importorskip("triton")

F64 = torch.float64
NEG_INF = float("-inf")
SPEC_DIR = Path(__file__).resolve().parents[1] / "examples" / "specs"
# Tolerances relative to max |expected| (floor 1), as tests/test_triton_backend.py measured them.
TOL = {torch.float32: 5e-5, torch.float16: 8e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 3e-2}

# Decoding variants with M query rows at the end of N keys (bottom-right alignment).
SPECS = """
attention window_decode(q: [B, H, M, D], k: [B, G, N, D], v: [B, G, N, D], W: int = 40) {
    score = dot(q, k) * D ** -0.5
    mask  = j <= i + N - M and i + N - M - j < W
}
attention sink_decode(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D], sinks: [H], gate: [B, H, M]) {
    score  = dot(q, k) * D ** -0.5
    mask   = j <= i + N - M
    norm   = softmax(sink = sinks[h])
    output = o * gate[b, h, i]
}
attention sigmoid_decode(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D]) {
    score = dot(q, k) * D ** -0.5
    mask  = j <= i + N - M
    norm  = sigmoid(bias = -log(N))
}
attention linear_decode(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D]) {
    feature q = elu(q) + 1
    feature k = elu(k) + 1
    score = dot(q, k)
    mask  = j <= i + N - M
    norm  = sum(eps = 1e-6)
}
"""


@pytest.fixture(scope="module")
def mods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    cache = tmp_path_factory.mktemp("split-kv")
    return {
        "variants": codegen.compile_source(SPECS, "split_variants.attn", cache_dir=cache),
        "decode": codegen.compile_file(SPEC_DIR / "decode.attn", cache_dir=cache),
    }


# ---- oracles (float64, no generated code) ------------------------------------------------------------------------


def _visible(M: int, N: int, W: int | None = None) -> torch.Tensor:
    """[M, N] bool: bottom-right causal, optionally a window of W keys."""
    i, j = torch.arange(M).view(M, 1), torch.arange(N).view(1, N)
    ok = j <= i + N - M
    return ok if W is None else ok & (i + N - M - j < W)


def _expand(t: torch.Tensor, H: int) -> torch.Tensor:
    return t.repeat_interleave(H // t.shape[1], dim=1)


def oracle(
    name: str, a: dict[str, torch.Tensor], W: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    q, k, v = a["q"], a["k"], a["v"]
    H, M, D = q.shape[1], q.shape[2], q.shape[3]
    N = k.shape[2]
    k, v = _expand(k, H), _expand(v, H)
    mask = _visible(M, N, W)
    if name == "decode":
        # SDPA with an explicit mask (every row sees at least its own key here).
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5)
        s = torch.where(mask, q @ k.transpose(-1, -2) * D**-0.5, NEG_INF)
        return o, torch.logsumexp(s, -1)
    if name == "linear_decode":
        phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1  # Katharopoulos et al. (2020), eq. 6
        w = (phi_q @ phi_k.transpose(-1, -2)) * mask
        return (w @ v) / (w.sum(-1, keepdim=True) + 1e-6), None
    s = q @ k.transpose(-1, -2) * D**-0.5
    if name == "sigmoid_decode":
        return (torch.sigmoid(s - math.log(N)) * mask) @ v, None
    s = torch.where(mask, s, NEG_INF)
    if name == "sink_decode":
        # The sink is one more logit in every row's normaliser, with no value (attention sinks).
        s = torch.cat([s, a["sinks"].view(1, H, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
    alive = (s > NEG_INF).any(-1, keepdim=True)
    s = torch.where(alive, s, 0.0)
    o = torch.softmax(s, -1) * alive @ v
    lse = torch.where(alive, torch.logsumexp(s, -1, keepdim=True), NEG_INF).squeeze(-1)
    if name == "sink_decode":
        o = o * a["gate"][..., None]
    return o, lse


# ---- running both paths ------------------------------------------------------------------------------------------


def _call(
    mod: ModuleType, name: str, args: dict[str, object], split: bool, mp: pytest.MonkeyPatch
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, object]]:
    """Run the Triton backend with the split path forced (one key tile per split) or turned off."""
    with mp.context() as m, visit_probe() as probe:
        if split:
            m.setattr(rt_triton, "_SPLIT_MIN_TILES", 1)
        else:
            m.setattr(rt_triton, "_SPLIT_MAX_M", 0)
        fn = getattr(mod, name)
        if name in ("decode", "window_decode", "sink_decode"):
            o, lse = fn(*args.values(), backend="triton", return_lse=True)
        else:
            o, lse = fn(*args.values(), backend="triton"), None
    assert ("fwd_split" in probe) == split, sorted(probe)
    if split:
        assert probe["fwd_split_config"].num_splits > 1  # type: ignore[attr-defined]
    return o, lse, probe


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    want = want.detach().to(F64)
    finite = want[want.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(
        got.detach().to(F64), want, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}"
    )


def _inputs(
    name: str, M: int, N: int, H: int, G: int, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D = 16
    a = {
        "q": torch.randn(1, H, M, D, generator=g, dtype=F64),
        "k": torch.randn(1, G, N, D, generator=g, dtype=F64),
        "v": torch.randn(1, G, N, D, generator=g, dtype=F64),
    }
    if name == "sink_decode":
        a["sinks"] = torch.randn(H, generator=g, dtype=F64)
        a["gate"] = torch.rand(1, H, M, generator=g, dtype=F64) + 0.5
    # Rounded to the test dtype once: the oracle sees the same values in float64.
    return {n: t.to(dtype).to(F64) for n, t in a.items()}


CASES = [
    pytest.param("decode", 1, 200, 2, 1, None, torch.float32, id="decode-M1-N200-GQA-fp32"),
    pytest.param("decode", 16, 256, 2, 1, None, torch.float16, id="decode-M16-N256-GQA-fp16"),
    pytest.param("window_decode", 4, 256, 2, 1, 100, torch.float32, id="window-W100-M4-N256-GQA-fp32"),
    pytest.param("window_decode", 3, 130, 1, 1, 0, torch.float32, id="window-W0-dead-rows-fp32"),
    pytest.param("sink_decode", 5, 192, 2, 2, None, torch.float32, id="sink-gate-M5-N192-fp32"),
    pytest.param("sigmoid_decode", 2, 256, 2, 2, None, torch.float32, id="sigmoid-M2-N256-fp32"),
    pytest.param("linear_decode", 3, 160, 1, 1, None, torch.float32, id="sum-M3-N160-fp32"),
]


@pytest.mark.parametrize(("name", "M", "N", "H", "G", "W", "dtype"), CASES)
def test_split_matches_unsplit_and_oracle(
    name: str,
    M: int,
    N: int,
    H: int,
    G: int,
    W: int | None,
    dtype: torch.dtype,
    mods: dict[str, ModuleType],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = mods["decode" if name == "decode" else "variants"]
    base = _inputs(name, M, N, H, G, dtype, seed=M * 1000 + N)
    scalars = {} if W is None else {"W": W}
    want_o, want_lse = oracle(name, base, W)

    plain = {n: t.to(dtype) for n, t in base.items()} | scalars
    o1, lse1, _ = _call(mod, name, plain, split=False, mp=monkeypatch)
    leaves = {n: t.to(dtype).requires_grad_(n in ("q", "k", "v")) for n, t in base.items()}
    o2, lse2, _ = _call(mod, name, leaves | scalars, split=True, mp=monkeypatch)

    assert o2.dtype == dtype and o2.isfinite().all()
    # Split and unsplit: the same epilogue code on the same statistics, up to the order of float sums.
    _close(o2, o1, TOL[dtype] / 4, f"{name}: split vs unsplit")
    _close(o2, want_o, TOL[dtype], f"{name}: split vs oracle")
    _close(o1, want_o, TOL[dtype], f"{name}: unsplit vs oracle")
    if want_lse is not None:
        assert lse1 is not None and lse2 is not None
        dead = want_lse == NEG_INF
        assert (lse2[dead] == NEG_INF).all() and (lse1[dead] == NEG_INF).all()
        assert (o2[dead] == 0).all()
        if (~dead).any():
            _close(lse2[~dead], want_lse[~dead], TOL[dtype], f"{name}: split lse vs oracle")
            _close(lse2[~dead], lse1[~dead], TOL[dtype] / 4, f"{name}: split vs unsplit lse")

    # Gradients through the combine's o (and lse, for softmax) with the usual backward kernels.
    weights = torch.randn(o2.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    loss = (o2.to(F64) * weights).sum()
    if lse2 is not None:
        loss = loss + torch.where(lse2.isfinite(), lse2, 0.0).to(F64).sum()
    names = ["q", "k", "v"]
    got = torch.autograd.grad(loss, [leaves[n] for n in names])
    ref = {n: t.clone().requires_grad_(n in names) for n, t in base.items()}
    o_ref, lse_ref = oracle(name, ref, W)
    ref_loss = (o_ref * weights).sum()
    if lse_ref is not None:
        ref_loss = ref_loss + torch.where(lse_ref.isfinite(), lse_ref, 0.0).sum()
    if ref_loss.requires_grad:
        want = torch.autograd.grad(ref_loss, [ref[n] for n in names], allow_unused=True)
    else:  # every row dead: nothing depends on the inputs
        want = (None, None, None)
    for n, g, w in zip(names, got, want, strict=True):
        assert g.isfinite().all(), f"d{n}: non-finite"
        _close(g, torch.zeros_like(g) if w is None else w, GRAD_TOL[dtype], f"{name}: d{n} vs oracle")


def test_splits_visit_only_their_planned_tiles(
    mods: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """window W=100, M=4 against N=256: only key tiles 2 and 3 (of 64) hold visible pairs. With one tile per
    split, splits 0 and 1 visit nothing (their partial is lse -inf), splits 2 and 3 one tile each, and the
    total equals what the one-pass forward visits."""
    M, N, W = 4, 256, 100
    a = {n: t.float() for n, t in _inputs("window_decode", M, N, 2, 1, torch.float32, seed=3).items()}
    mod = mods["variants"]
    _, _, split = _call(mod, "window_decode", a | {"W": W}, split=True, mp=monkeypatch)
    _, _, plain = _call(mod, "window_decode", a | {"W": W}, split=False, mp=monkeypatch)
    cfg = split["fwd_split_config"]
    bm, bn, S = cfg.block_m, cfg.block_n, cfg.num_splits  # type: ignore[attr-defined]
    assert S == triton_cdiv(N, bn)  # one key tile per split
    visible = _visible(M, N, W)
    per_split = triton_cdiv(N, S * bn) * bn
    needed = torch.tensor(
        [
            [
                [
                    sum(
                        bool(visible[m0 : m0 + bm, n0 : n0 + bn].any())
                        for n0 in range(s * per_split, min((s + 1) * per_split, N), bn)
                    )
                    for m0 in range(0, M, bm)
                ]
                for s in range(S)
            ]
        ],
        dtype=torch.int32,
    ).expand(2, S, triton_cdiv(M, bm))
    visits = split["fwd_split"]
    assert visits.shape == needed.shape and (visits == needed).all(), (visits.tolist(), needed.tolist())
    assert (visits[:, :2] == 0).all() and (visits[:, 2:] == 1).all()
    # The same key tiles as the one-pass forward (same BLOCK_N, its one query tile holds all M rows).
    assert plain["fwd_config"].block_n == bn and plain["fwd"].shape == (2, 1)  # type: ignore[attr-defined]
    assert (visits.sum(1) == plain["fwd"]).all()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the schedule: host-known shapes only ----------------------------------------------------------------------


def test_num_splits_heuristic_and_tuned_override() -> None:
    spec = rt_triton._TritonSpec(None, None, None, "softmax", (), fwd_split=object(), combine=object())
    cpu = torch.device("cpu")
    bn = rt_triton._default_split_config(64, 64, False).block_n
    # Decoding shapes only; N / (_SPLIT_MIN_TILES · BLOCK_N) splits, capped, at least one tile each.
    assert rt_triton._split_config(spec, 1, 8, 17, 1 << 14, 64, 64, cpu) is None
    assert rt_triton._split_config(spec, 1, 8, 1, 2 * bn, 64, 64, cpu) is None  # one split: the plain forward
    cfg = rt_triton._split_config(spec, 1, 8, 1, 10 * rt_triton._SPLIT_MIN_TILES * bn, 64, 64, cpu)
    assert cfg.num_splits == 10 and cfg.block_m == 16
    assert rt_triton._split_config(spec, 1, 8, 16, 1 << 20, 64, 64, cpu).num_splits == rt_triton._SPLIT_MAX
    assert rt_triton._split_config(spec._replace(fwd_split=None), 1, 8, 1, 1 << 14, 64, 64, cpu) is None
    # The autotuner's entry wins, and no split is left empty: 5 tiles in 4 splits -> 2 tiles each, 3 splits.
    tuned = rt_triton._KernelConfig(16, 32, 4, 1, num_splits=4)
    got = rt_triton._split_config(spec._replace(configs={"fwd_split": tuned}), 1, 2, 4, 5 * 32, 64, 64, cpu)
    assert got == tuned._replace(num_splits=3)
