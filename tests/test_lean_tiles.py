"""Interior tiles run lean (no bounds, no mask: `codegen/triton/kernels.py`, `_lean_split`) and must give
exactly what the masked path gives: under the Triton interpreter, forward and gradients against SDPA in
float64 with the explicit dense mask (`tiles.dense_mask`, the independent numpy evaluator of the mask).

The shapes are chosen so that every kind of call runs: whole query tiles (lean key tiles before the diagonal),
a ragged last query tile (no lean tiles: its rows are not all inside the matrix), ragged key ends, several
heads per key head, and masks whose lean interval does not start at 0 (a window, chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from attnc.dsl.analysis.tiles import dense_mask, lean_tiles, plan_tiles
from attnc.dsl.lower import compile_to_ir

from .test_reference_oracles import SPEC_DIR, Tol, assert_close

pytest.importorskip("triton")

F64 = torch.float64
TOL = {torch.float32: Tol(5e-5, 5e-5), torch.float16: Tol(8e-3, 8e-3)}
GRAD_TOL = {torch.float32: Tol(1e-4, 1e-4), torch.float16: Tol(3e-2, 3e-2)}

# (spec, M, N, heads, key heads, scalars)
CASES = [
    pytest.param("causal", 200, 200, 2, 2, {}, id="causal-M200-N200"),
    pytest.param("causal", 256, 256, 1, 1, {}, id="causal-M256-whole-tiles"),
    pytest.param("sliding_window", 330, 330, 4, 2, {"W": 200}, id="sliding_window-W200-N330-GQA"),
    pytest.param("prefix_lm", 190, 190, 2, 2, {"P": 90}, id="prefix_lm-P90-N190"),
    pytest.param("chunked_local", 300, 300, 2, 2, {"C": 192}, id="chunked_local-C192-N300"),
    pytest.param("decode", 150, 260, 4, 2, {}, id="decode-M150-N260-GQA"),
    pytest.param("cross", 140, 190, 2, 2, {}, id="cross-M140-N190"),
]


def _oracle(att: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scalars: dict) -> torch.Tensor:
    B, H, M, D = q.shape
    G, N = k.shape[1], k.shape[2]
    sizes = {"B": B, "H": H, "G": G, "M": M, "N": N, "D": D, "E": v.shape[3]}
    names = {str(n.attr) for p in att.tensors for d in p.shape for n in _walk(d)}  # type: ignore[attr-defined]
    mask = torch.from_numpy(dense_mask(att, {s: sizes[s] for s in names if s in sizes}, scalars, None))
    rep = H // G
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=D**-0.5)


def _walk(node: object) -> list:
    from attnc.dsl.ir import Op, walk

    return [n for n in walk([node]) if n.op is Op.SIZE]  # type: ignore[list-item]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("spec", "M", "N", "H", "G", "scalars"), CASES)
def test_lean_tiles_match_sdpa(
    spec: str,
    M: int,
    N: int,
    H: int,
    G: int,
    scalars: dict,
    dtype: torch.dtype,
    compiled: Callable[[str], ModuleType],
) -> None:
    att = compile_to_ir((SPEC_DIR / f"{spec}.attn").read_text(), f"{spec}.attn").attentions[0]
    gen = torch.Generator().manual_seed(3)
    D, E = 16, (24 if spec == "cross" else 16)
    base = [
        torch.randn(2, h, n, d, generator=gen, dtype=F64) for h, n, d in ((H, M, D), (G, N, D), (G, N, E))
    ]
    base = [t.to(dtype).to(F64) for t in base]  # the oracle sees exactly the rounded inputs
    args = [t.to(dtype).requires_grad_() for t in base]
    ref = [t.clone().requires_grad_() for t in base]
    mod = compiled(spec)
    o = getattr(mod, spec)(*args, backend="triton", **scalars)
    want = _oracle(att, *ref, scalars)
    assert_close(o, want, TOL[dtype], f"{spec} forward")
    w = torch.randn(o.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad((o.to(F64) * w).sum(), args)
    exp = torch.autograd.grad((want * w).sum(), ref)
    for n, g, e in zip("qkv", got, exp, strict=True):
        assert_close(g, e, GRAD_TOL[dtype], f"{spec} d{n}")
    # The case does run lean tiles: some whole query tile of the default schedule has lean key tiles.
    plan = plan_tiles(att)
    sizes = {"B": 2, "H": H, "G": G, "M": M, "N": N, "D": D, "E": E}
    names = {str(n.attr) for p in att.tensors for d in p.shape for n in _walk(d)}  # type: ignore[attr-defined]
    lean = lean_tiles(att, plan, {s: sizes[s] for s in names if s in sizes}, scalars, 64, 64)
    assert lean.any(), f"{spec}: no lean tile at 64 x 64"
