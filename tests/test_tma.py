"""Tile loads through tensor descriptors (`_TMA`: TMA, `cp.async.bulk.tensor`, on sm_90 and later).

- Under the Triton interpreter with ATTNC_TMA=1 the descriptor path runs on CPU tensors: forward and
  gradients against SDPA in float64 with the explicit dense mask, with ragged ends (the descriptor's bounds
  zero-fill what the masks zeroed), grouped-query heads, a varlen batch and a value width E != D.
- Inputs that do not qualify (rows that are not 16-byte multiples) take the pointer path, and still match.
- The ahead-of-time compile for sm_90 shows TMA in the PTX of the forward, dQ and dK/dV kernels of every
  spec form that qualifies, and none where the target does not (sm_80, any strides).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from attnc.dsl.lower import compile_to_ir

from attnc.runtime import triton as rt

from . import test_reference_oracles as ro
from .dense_oracle import check_against_sdpa
from .test_reference_oracles import SPEC_DIR

pytest.importorskip("triton")


@pytest.fixture
def tma_on(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """ATTNC_TMA=1, and a record of each launch's decision."""
    monkeypatch.setenv("ATTNC_TMA", "1")
    seen: list[bool] = []
    real = rt._tma_ok

    def spy(spec: object, tensors: list[torch.Tensor]) -> bool:
        seen.append(real(spec, tensors))
        return seen[-1]

    monkeypatch.setattr(rt, "_tma_ok", spy)
    return seen


CASES = [
    pytest.param("causal", ((2, 2, 150, 16), (2, 2, 150, 16), (2, 2, 150, 16)), {}, id="causal-N150-D16"),
    pytest.param(
        "sliding_window", ((1, 4, 200, 32), (1, 2, 200, 32), (1, 2, 200, 32)), {"W": 90}, id="window-GQA-D32"
    ),
    pytest.param("cross", ((1, 2, 77, 16), (1, 2, 130, 16), (1, 2, 130, 24)), {}, id="cross-M77-N130-E24"),
    pytest.param("decode", ((1, 4, 3, 16), (1, 2, 100, 16), (1, 2, 100, 16)), {}, id="decode-M3-N100"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("spec", "shapes", "scalars"), CASES)
def test_descriptor_path_matches_sdpa(
    spec: str,
    shapes: tuple,
    scalars: dict,
    dtype: torch.dtype,
    tma_on: list[bool],
    compiled: Callable[[str], ModuleType],
) -> None:
    check_against_sdpa(compiled(spec), spec, shapes, dtype, scalars)
    assert tma_on and all(tma_on), tma_on  # the forward, dQ and dK/dV launches all took descriptors


# Specs whose forward runs each interval's key tiles as one loop under TMA (`KernelWriter._one_call`: weights
# other than the softmax's, or a heavy score; their dQ too, all tiles masked, but relpos_table's), sigmoid's
# among them (its weights read the mask again), and head_offset, whose dQ kernel stores the epilogue's dO
# through a descriptor.
PER_TILE = ["retention", "linear_elu", "decay_abs", "sigmoid_attn", "relpos_table", "head_offset"]


@pytest.mark.parametrize("spec", PER_TILE)
def test_one_key_loop_per_interval_through_descriptors(
    spec: str, tma_on: list[bool], compiled: Callable[[str], ModuleType]
) -> None:
    """Interior and boundary key tiles in one loop, the mask chosen per tile (EDGE = PER_TILE): forward and
    gradients against the spec's oracles, over 150 rows (64-row tiles: interior, diagonal and ragged ones)."""
    from attnc.codegen.triton.kernels import KernelWriter

    (att,) = compile_to_ir((SPEC_DIR / f"{spec}.attn").read_text(), f"{spec}.attn").attentions
    w = KernelWriter(att)
    assert spec == "head_offset" or (w._one_call("fwd") and w.kv_lean), spec
    case = ro.Case(spec, 150, 150, dtype=torch.float32, B=1, H=2)
    args, names = ro.make_args(case), ro.grad_names(ro.make_args(case))
    got_args = ro.leaves(args, case.dtype)
    o = ro.run_generated(compiled(spec), spec, got_args, backend="triton")
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=ro.F64)
    got = ro.grads(o, weights, got_args, names)
    for name, oracle in ro.oracles(case.info, autograd_only=True).items():
        ref_args = ro.leaves(args, ro.F64)
        want = oracle(ref_args)
        ro.assert_close(o, want, ro.FWD_TOL[case.dtype], f"{case} vs {name}")
        for n, g, wg in zip(names, got, ro.grads(want, weights, ref_args, names), strict=True):
            ro.assert_close(g, wg, ro.GRAD_TOL[case.dtype], f"{case}: d/d{n} vs {name}")
    assert tma_on and all(tma_on), tma_on


def test_rows_that_are_not_16_byte_multiples_take_pointer_loads(
    tma_on: list[bool], compiled: Callable[[str], ModuleType]
) -> None:
    """D = 12 in float16: 24-byte rows, which a tensor descriptor cannot stride. The launches decide against
    TMA and run the pointer path, with the same results."""
    shapes = ((1, 2, 90, 12), (1, 2, 90, 12), (1, 2, 90, 12))
    check_against_sdpa(compiled("causal"), "causal", shapes, torch.float16, {})
    assert tma_on and not any(tma_on), tma_on


def test_qualification_rules() -> None:
    spec = rt._TritonSpec(None, None, None, "softmax", ())
    x = torch.zeros(2, 3, 40, 64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNC_TMA", "1")
        assert rt._tma_ok(spec, [x, x])
        assert not rt._tma_ok(spec, [x, x.transpose(2, 3)])  # channel stride 40, not 1
        assert not rt._tma_ok(spec, [x, x[..., 1:]])  # base 4 bytes past an aligned one
        assert not rt._tma_ok(spec, [torch.zeros(2, 3, 40, 6)])  # 24-byte rows
        mp.setenv("ATTNC_TMA", "0")
        assert not rt._tma_ok(spec, [x])
        mp.setenv("ATTNC_TMA", "auto")
        assert not rt._tma_ok(spec, [x])  # CPU tensors: no TMA unit
        mp.setenv("ATTNC_TMA", "sometimes")
        with pytest.raises(ValueError, match="ATTNC_TMA must be auto, 1 or 0"):
            rt._tma_ok(spec, [x])


@pytest.mark.parametrize("spec", ["causal", "sigmoid_attn"])
def test_varlen_batch_through_descriptors(
    spec: str, tma_on: list[bool], compiled: Callable[[str], ModuleType]
) -> None:
    """Packed sequences: each program's descriptor spans its own sequence's rows (the bounds zero-fill past
    its end, where the masks did), so the packed call matches the sequences run one by one. sigmoid_attn's
    forward runs one key loop per interval (`KernelWriter._one_call`), the mask chosen per tile."""
    mod = compiled(spec)
    gen = torch.Generator().manual_seed(2)
    lens = [70, 130, 1]
    q, k, v = (torch.randn(sum(lens), 2, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = getattr(mod, f"{spec}_varlen")(q, k, v, cu_seqlens_q=cu, max_seqlen_q=max(lens), backend="triton")
    for s in range(len(lens)):
        a, b = cu[s], cu[s + 1]
        one = getattr(mod, spec)(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), backend="triton")
        torch.testing.assert_close(out[a:b], one[0].transpose(0, 1), atol=2e-6, rtol=2e-6)
    assert tma_on and all(tma_on)


@pytest.fixture(scope="module")
def causal_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The causal spec's forward, dQ and dK/dV kernels for sm_90 (fp16, D = 64, default schedules) as a launch
    with qualifying inputs compiles them, and the forward with pointer loads and for sm_80."""
    from attnc.codegen.triton.aot import compile_reports
    from attnc.codegen.triton.inspect import Target, jobs

    from attnc import codegen

    path = SPEC_DIR / "causal.attn"
    mod = codegen.compile_file(path, cache_dir=tmp_path_factory.mktemp("tma-cache"))
    kernels = rt._triton_kernels(mod.__file__, interpret=False)
    (att,) = compile_to_ir(path.read_text(), path.name).attentions
    kinds = ("fwd", "bwd_dq", "bwd_dkdv")
    todo = [
        *jobs(att, kernels, Target(90, "fp16", 64, kinds)),
        *jobs(att, kernels, Target(90, "fp16", 64, ("fwd",), tma=False)),
        *jobs(att, kernels, Target(80, "fp16", 64, ("fwd",))),
    ]
    reps = compile_reports(todo, max_workers=2)
    return dict(zip([*kinds, "fwd-pointers", "fwd-sm80"], reps, strict=True))


def test_sm90_kernels_load_tiles_with_tma(causal_reports: dict[str, object]) -> None:
    for kind in ("fwd", "bwd_dq", "bwd_dkdv"):
        rep = causal_reports[kind]
        assert rep.uses_tma and "cp.async.bulk.tensor" in rep.ptx, kind  # type: ignore[attr-defined]
        assert rep.spill_bytes == 0, (kind, rep.spill_bytes)  # type: ignore[attr-defined]


def test_pointer_targets_have_no_tma(causal_reports: dict[str, object]) -> None:
    for kind in ("fwd-pointers", "fwd-sm80"):
        rep = causal_reports[kind]
        assert not rep.uses_tma and "cp.async.bulk.tensor" not in rep.ptx, kind  # type: ignore[attr-defined]


# A key feature map with products in the inputs' dtype (its one-call dQ loads k and v by pointer where the
# helper has a MASKED call) and a mask no tile is provably inside (document ids): the helpers have no EDGE.
FEATURE_DOC = """
attention fdoc(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], doc: [B, N] int32) {
    feature q = elu(q) + 1
    feature k = elu(k) + 1
    score = dot(q, k)
    mask  = doc[b, i] == doc[b, j]
    norm  = sum(eps = 1e-6)
}
"""


def test_a_key_feature_map_without_lean_tiles_through_descriptors(tma_on: list[bool], tmp_path) -> None:
    """Forward and q/k/v gradients against the formula (Katharopoulos et al. 2020, eq. 5 with the document
    mask), float64 oracle, 70 rows in three documents, under ATTNC_TMA=1."""
    from attnc.codegen.module import compile_source

    mod = compile_source(FEATURE_DOC, "fdoc.attn", cache_dir=tmp_path)
    gen = torch.Generator().manual_seed(7)
    base = [torch.randn(1, 2, 70, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    doc = torch.tensor([[0] * 20 + [1] * 33 + [2] * 17], dtype=torch.int32)
    args = [t.to(torch.float32).requires_grad_() for t in base]
    ref = [t.clone().requires_grad_() for t in base]
    o = mod.fdoc(*args, doc, backend="triton")

    def phi(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.elu(x) + 1

    q, k, v = ref
    same = (doc[0][:, None] == doc[0][None, :]).to(torch.float64)
    s = phi(q) @ phi(k).transpose(-1, -2) * same
    want = (s @ v) / (s.sum(-1, keepdim=True) + 1e-6)
    ro.assert_close(o, want, ro.FWD_TOL[torch.float32], "fdoc forward")
    w = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((o.to(torch.float64) * w).sum(), args)
    exp = torch.autograd.grad((want * w).sum(), ref)
    for n, g, e in zip("qkv", got, exp, strict=True):
        ro.assert_close(g, e, ro.GRAD_TOL[torch.float32], f"fdoc d{n}")
    assert tma_on and all(tma_on), tma_on
