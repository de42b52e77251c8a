"""The oracle of the lean-tile and TMA tests: SDPA in float64 with the spec's mask as an explicit dense boolean
mask (`tiles.dense_mask`, the independent numpy evaluator of the mask IR), for specs whose score is
dot(q, k) / sqrt(D); and a check of a generated module's Triton path against it, forward and gradients."""

from __future__ import annotations

from types import ModuleType

import torch
from attnc.dsl.analysis.tiles import dense_mask
from attnc.dsl.ir import Attention, Op, walk
from attnc.dsl.lower import compile_to_ir

from .test_reference_oracles import SPEC_DIR, Tol, assert_close

F64 = torch.float64
# Measured worst cases are about a tenth of these (float16: p is rounded before the second product).
TOL = {torch.float32: Tol(5e-5, 5e-5), torch.float16: Tol(8e-3, 8e-3)}
GRAD_TOL = {torch.float32: Tol(1e-4, 1e-4), torch.float16: Tol(3e-2, 3e-2)}


def spec_sizes(att: Attention, **given: int) -> dict[str, int]:
    """The given sizes the spec's shapes name."""
    names = {str(n.attr) for p in att.tensors for d in p.shape for n in walk([d]) if n.op is Op.SIZE}
    return {s: v for s, v in given.items() if s in names}


def sdpa_with_mask(
    att: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scalars: dict
) -> torch.Tensor:
    B, H, M, D = q.shape
    G, N = k.shape[1], k.shape[2]
    sizes = spec_sizes(att, B=B, H=H, G=G, M=M, N=N, D=D, E=v.shape[3])
    mask = torch.from_numpy(dense_mask(att, sizes, scalars, None))
    rep = H // G
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=D**-0.5)


def check_against_sdpa(
    mod: ModuleType, spec: str, shapes: tuple, dtype: torch.dtype, scalars: dict, seed: int = 5
) -> Attention:
    """Run `mod.<spec>` (Triton backend) on random q, k, v of `shapes` in `dtype`, compare output and the
    gradients of q, k and v with `sdpa_with_mask` on the same (rounded) values in float64. Returns the IR."""
    att = compile_to_ir((SPEC_DIR / f"{spec}.attn").read_text(), f"{spec}.attn").attentions[0]
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(*s, generator=gen, dtype=F64).to(dtype).to(F64) for s in shapes]
    args = [t.to(dtype).requires_grad_() for t in base]
    ref = [t.clone().requires_grad_() for t in base]
    o = getattr(mod, spec)(*args, backend="triton", **scalars)
    want = sdpa_with_mask(att, *ref, scalars)
    assert_close(o, want, TOL[dtype], f"{spec} forward")
    w = torch.randn(o.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad((o.to(F64) * w).sum(), args)
    exp = torch.autograd.grad((want * w).sum(), ref)
    for n, g, e in zip("qkv", got, exp, strict=True):
        assert_close(g, e, GRAD_TOL[dtype], f"{spec} d{n}")
    return att
