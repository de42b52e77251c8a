"""The dK/dV kernel's keys-as-rows orientation (`codegen/triton/kernels.py`, `KEY_ROWS`): key tiles wider than
the query tiles (and at least 64) run the score as [BLOCK_N, BLOCK_M] and accumulate dK, dV as [BLOCK_N, D],
as FlashAttention-2's backward does. The CPU defaults never pick it (their dK/dV tiles are square or narrower
than 64), so these tests force such a schedule on the dK/dV kernel and check every example spec's gradients
under the Triton interpreter against the independent oracles of tests/test_reference_oracles.py (SDPA with
explicit masks and biases, the papers' formulas, in float64), and check that the orientation was taken.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from attnc.runtime import forced_configs, visit_probe
from attnc.runtime.triton import _KernelConfig

from .test_reference_oracles import (
    F64,
    SPECS,
    Case,
    _is_float,
    assert_close,
    grad_names,
    grads,
    leaves,
    make_args,
    oracles,
)
from .test_triton_backend import GRAD_TOL

pytest.importorskip("triton")

# BLOCK_N > BLOCK_M and BLOCK_N >= 64: the keys-as-rows form. 77 keys: a whole tile and a ragged one.
KEY_ROWS = _KernelConfig(16, 64, 4, 1)


def _cases() -> list[object]:
    out = [pytest.param(spec, torch.float32, id=f"{spec}-N77-fp32") for spec in SPECS]
    for spec in ("causal", "alibi", "linear_elu", "document", "t5_bias"):
        out.append(pytest.param(spec, torch.float16, id=f"{spec}-N77-fp16"))
    return out


@pytest.mark.parametrize(("spec", "dtype"), _cases())
def test_key_rows_gradients_match_oracles(
    spec: str, dtype: torch.dtype, compiled: Callable[[str], ModuleType]
) -> None:
    info = SPECS[spec]
    M = 1 if spec == "decode" else 77
    case = Case(spec, M, 77, dtype=F64)
    rounded = {n: a.to(dtype).to(F64) if _is_float(a) else a for n, a in make_args(case).items()}
    args = leaves(rounded, dtype)
    mod = compiled(spec)
    with visit_probe() as probe, forced_configs(mod, {"dkdv": KEY_ROWS}):
        o = getattr(mod, spec)(*args.values(), backend="triton")
        weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
        names = grad_names(args)
        got = grads(o, weights, args, names)
    assert probe["dkdv_config"] == KEY_ROWS  # the dK/dV launch ran the forced schedule
    for oname, oracle in oracles(info, autograd_only=True).items():
        ref_args = leaves(rounded, F64)
        want = grads(oracle(ref_args), weights, ref_args, names)
        for n, g, w in zip(names, got, want, strict=True):
            assert g.isfinite().all(), f"{spec}: d{n} not finite"
            assert_close(g, w, GRAD_TOL[dtype], f"{spec} d{n} vs {oname} (keys as rows)")
