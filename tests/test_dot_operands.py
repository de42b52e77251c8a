"""The backward's dP = dO vᵀ takes 16-bit operands as they are (`_dot_as` in the kernels file): float16 dO and v
multiply without being widened to float32 first, also in kernels whose other products are float32 (weights other
than the softmax's). Under an output epilogue dO is the float32 gradient of the raw output, and the operands are
widened to the weights' dtype instead. Both paths against the spec's oracles in float64, on float16 inputs, through
the Triton interpreter."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from . import test_reference_oracles as ro

# Measured worst case 4.6e-4 (causal; error / (max|expected| + |expected|), forward and gradients): ~20x margin.
# A 5% error in either branch of `_dot_as` fails it.
FP16 = ro.Tol(1e-2, 1e-2)

# gated_linear, retention: float32 weights with float16 dO and v (the same-dtype product);
# head_offset: an output epilogue, float32 dO with float16 v (the widened product); causal: softmax.
SPECS = ["gated_linear", "retention", "head_offset", "causal"]


@pytest.mark.parametrize("spec", SPECS)
def test_float16_products_of_the_backward_against_the_oracles(
    spec: str, compiled: Callable[[str], ModuleType]
) -> None:
    case = ro.Case(spec, 80, 80, D=32, dtype=torch.float16, B=1, H=2)
    args, names = ro.make_args(case), ro.grad_names(ro.make_args(case))
    got_args = ro.leaves(args, case.dtype)
    o = ro.run_generated(compiled(spec), spec, got_args, backend="triton")
    assert o.dtype == torch.float16
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=ro.F64)
    got = ro.grads(o, weights, got_args, names)
    for name, oracle in ro.oracles(case.info, autograd_only=True).items():
        ref_args = ro.leaves(args, ro.F64)
        want = oracle(ref_args)
        ro.assert_close(o, want, FP16, f"{case} vs {name}")
        for n, g, wg in zip(names, got, ro.grads(want, weights, ref_args, names), strict=True):
            ro.assert_close(g, wg, FP16, f"{case}: d/d{n} vs {name}")
