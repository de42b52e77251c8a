"""The Triton backend under the Triton interpreter (CPU), against the independent oracles of
tests/test_reference_oracles.py (SDPA with explicit masks/biases and the papers' formulas, in float64):
forward outputs, log-sum-exp and gradients of q, k, v and every float auxiliary tensor.

CI runs every kernel this way; the GPU compiler's stricter rules are checked by ahead-of-time compilation
(tests/test_aot.py) and on a GPU by the tests marked `gpu`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from attnc.runtime import visit_probe

from .test_reference_oracles import (
    F64,
    NEG_INF,
    SPEC_DIR,
    SPECS,
    Case,
    Tol,
    _is_float,
    assert_close,
    grad_names,
    grads,
    leaves,
    make_args,
    oracles,
)

pytest.importorskip("triton")

# Measured worst cases (relative to max |expected|): float32 ~2e-6; float16 ~1e-3 (p is rounded to fp16 before
# the second product, as in FlashAttention). Gradients in float16 accumulate more rounding.
FWD_TOL = {torch.float32: Tol(5e-5, 5e-5), torch.float16: Tol(8e-3, 8e-3)}
GRAD_TOL = {torch.float32: Tol(1e-4, 1e-4), torch.float16: Tol(3e-2, 3e-2)}
_NAME = {torch.float32: "fp32", torch.float16: "fp16"}


def _case(spec: str, dtype: torch.dtype, **kw: int) -> Case:
    M, N = SPECS[spec].shapes[0]
    return Case(spec, kw.pop("M", M), kw.pop("N", N), dtype=F64, **kw), dtype  # type: ignore[return-value]


def _cases() -> list[object]:
    out = []
    for spec in SPECS:
        out.append(pytest.param(spec, torch.float32, {}, id=f"{spec}-fp32"))
    for spec in ("causal", "alibi", "sliding_window", "sink", "softcap", "linear_elu", "document"):
        out.append(pytest.param(spec, torch.float16, {}, id=f"{spec}-fp16"))
    out.append(pytest.param("cross", torch.float32, {"D": 80}, id="cross-D80-E24-fp32"))
    out.append(pytest.param("decode", torch.float32, {"M": 1, "N": 129}, id="decode-M1-N129-GQA-fp32"))
    out.append(
        pytest.param("key_padding", torch.float32, {"M": 77, "N": 37}, id="key_padding-dead-rows-fp32")
    )
    return out


def _run(mod: ModuleType, spec: str, args: dict[str, object], **kw: object) -> object:
    return getattr(mod, spec)(*args.values(), backend="triton", **kw)


@pytest.mark.parametrize(("spec", "dtype", "shape"), _cases())
def test_triton_matches_oracles(
    spec: str, dtype: torch.dtype, shape: dict[str, int], compiled: Callable[[str], ModuleType]
) -> None:
    info = SPECS[spec]
    M, N = info.shapes[0]
    case = Case(spec, shape.get("M", M), shape.get("N", N), D=shape.get("D", 16), dtype=F64)
    base = make_args(case)
    # Inputs rounded to the test dtype once; the oracles see exactly those values in float64.
    rounded = {n: a.to(dtype).to(F64) if _is_float(a) else a for n, a in base.items()}
    args = leaves(rounded, dtype)
    ref_args = leaves(rounded, F64)
    mod = compiled(spec)
    if info.softmax:
        o, lse = _run(mod, spec, args, return_lse=True)  # type: ignore[misc]
    else:
        o, lse = _run(mod, spec, args), None
    assert o.dtype == dtype and o.isfinite().all()
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    names = grad_names(args)
    got = grads(o, weights, args, names)
    for oname, oracle in oracles(info, autograd_only=True).items():
        expected = oracle(ref_args)
        assert_close(o, expected, FWD_TOL[dtype], f"{spec}-{_NAME[dtype]} forward vs {oname}")
        want = grads(expected, weights, ref_args, names)
        for n, g, w in zip(names, got, want, strict=True):
            assert g.isfinite().all(), f"{n}: non-finite gradient"
            assert_close(g, w, GRAD_TOL[dtype], f"{spec}-{_NAME[dtype]} d{n} vs {oname}")
        for a in ref_args.values():
            if isinstance(a, torch.Tensor):
                a.grad = None
    if lse is not None:
        _, lse_ref = info.naive(leaves(rounded, F64))
        assert lse_ref is not None
        dead = lse_ref == NEG_INF
        assert (lse[dead] == NEG_INF).all()
        assert_close(lse[~dead], lse_ref[~dead].detach(), FWD_TOL[dtype], f"{spec} lse")


@pytest.mark.parametrize(("D", "E"), [(64, 24), (128, 24), (64, 32), (32, 32), (24, 64)])
def test_narrow_head_dims_keep_the_portable_tiles_on_sm90(D: int, E: int) -> None:
    """q/k or v at most 32 wide: the sm_90 defaults are the portable tiles (the 128-row, 8-warp ones computed
    wrong forwards on an H200 with v 24 or 32 wide), while 64-wide shapes keep the large ones."""
    from attnc.runtime import triton as rt

    for kernel in ("fwd", "dq", "dkdv"):
        assert rt._default_config(D, E, kernel, cc=90, nbytes=2) == rt._default_config(D, E, kernel), kernel
    assert rt._default_config(64, 64, "fwd", cc=90, nbytes=2).block_m == 128


def test_lse_gradient_flows(compiled: Callable[[str], ModuleType]) -> None:
    """A loss on the log-sum-exp itself (as in distillation) gets the same gradients as the oracle."""
    case = Case("alibi", 37, 77, dtype=F64)
    base = make_args(case)
    args = leaves({n: a.float() if _is_float(a) else a for n, a in base.items()}, torch.float32)
    ref = leaves(base, F64)
    o, lse = _run(compiled("alibi"), "alibi", args, return_lse=True)  # type: ignore[misc]
    _, lse_ref = SPECS["alibi"].naive(ref)
    names = ["q", "k", "slopes"]
    got = torch.autograd.grad(lse.sum() + o.sum(), [args[n] for n in names])
    o_ref = SPECS["alibi"].naive(ref)[0]
    want = torch.autograd.grad(lse_ref.sum() + o_ref.sum(), [ref[n] for n in names])
    for n, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, GRAD_TOL[torch.float32], f"d{n} through lse")


def test_float64_is_refused_with_a_clear_error(compiled: Callable[[str], ModuleType]) -> None:
    x = torch.randn(1, 2, 5, 16, dtype=F64)
    with pytest.raises(ValueError, match="q: the Triton backend takes float16, bfloat16 or float32"):
        compiled("causal").causal(x, x, x, backend="triton")


def test_non_contiguous_inputs(compiled: Callable[[str], ModuleType]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 4, 16, generator=g).transpose(1, 2)  # [B, H, N, D] view with non-unit strides
    mod = compiled("causal")
    o = mod.causal(x, x, x, backend="triton")
    torch.testing.assert_close(
        o, mod.causal(x.contiguous(), x.contiguous(), x.contiguous(), backend="triton")
    )
    assert_close(
        o,
        SPECS["causal"].naive({"q": x.double(), "k": x.double(), "v": x.double()})[0],
        FWD_TOL[torch.float32],
        "non-contiguous",
    )


# ---- block sparsity: what the kernels visit -------------------------------------------------------------------

_SKIP_CASES = [
    pytest.param("causal", 150, 150, {}, id="causal-N150"),
    pytest.param("sliding_window", 200, 200, {"W": 40}, id="sliding_window-W40-N200"),
    pytest.param("sliding_window", 200, 200, {"W": 1}, id="sliding_window-W1-N200"),
    pytest.param("chunked_local", 150, 150, {"C": 48}, id="chunked_local-C48-N150"),
    pytest.param("prefix_lm", 150, 150, {"P": 70}, id="prefix_lm-P70-N150"),
    pytest.param("decode", 20, 150, {}, id="decode-M20-N150"),
    pytest.param("document", 150, 150, {}, id="document-N150"),
]


@pytest.mark.parametrize(("spec", "M", "N", "scalars"), _SKIP_CASES)
def test_kernels_visit_exactly_the_planned_tiles(
    spec: str,
    M: int,
    N: int,
    scalars: dict[str, int],
    compiled: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forward and dQ kernels visit, per query tile, exactly the key tiles that hold a visible pair (for
    these masks the plan is exact); dK/dV visits, per key tile, the query tiles that hold one (per head of the
    group). Fully masked tiles are never visited: they are not even loaded."""
    from attnc.dsl.analysis.tiles import dense_mask
    from attnc.dsl.lower import compile_to_ir

    mod = compiled(spec)
    ir = compile_to_ir((SPEC_DIR / f"{spec}.attn").read_text(), f"{spec}.attn").attentions[0]
    g = torch.Generator().manual_seed(0)
    H, G = 2, (1 if spec in ("sliding_window", "decode") else 2)
    q = torch.randn(1, H, M, 16, generator=g)
    k = torch.randn(1, G, N, 16, generator=g, requires_grad=True)
    v = torch.randn(1, G, N, 16, generator=g)
    extra: list[object] = []
    aux = None
    if spec == "document":
        doc = (torch.arange(N) // 50).to(torch.int32)[None]  # three documents of 50 tokens
        extra.append(doc)
        aux = {"doc": doc.numpy()}
    with visit_probe() as probe:
        o = getattr(mod, spec)(q, k, v, *extra, backend="triton", **scalars)
        o.sum().backward()
    sizes = {"M": M, "N": N, "B": 1, "H": H, "G": G, "D": 16}
    visible = dense_mask(ir, {s: sizes[s] for s in ("M", "N") if s in _symbols(ir)} | {"N": N}, scalars, aux)
    rep = H // G
    for kernel, by in (("fwd", "query"), ("dq", "query"), ("dkdv", "key")):
        cfg = probe[f"{kernel}_config"]  # the schedule each kernel ran with
        bm, bn = cfg.block_m, cfg.block_n
        tiles = torch.tensor(
            [[bool(visible[a : a + bm, c : c + bn].any()) for c in range(0, N, bn)] for a in range(0, M, bm)]
        )
        needed = tiles.sum(1 if by == "query" else 0).to(torch.int32)
        # document: the static plan gives the causal bounds, and the device pre-pass of per-tile document-id
        # ranges skips the tiles where query and key documents cannot meet, so the count is exact too.
        if kernel == "dkdv":
            needed = needed * rep  # one pass per query head of the group
        assert (probe[kernel] == needed).all(), (
            f"{kernel}: visited {probe[kernel].tolist()}, needed {needed.tolist()}"
        )


def _symbols(att: object) -> set[str]:
    from attnc.dsl.ir import Op, walk

    return {str(n.attr) for p in att.tensors for d in p.shape for n in walk([d]) if n.op is Op.SIZE}  # type: ignore[attr-defined]
