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
from attnc.dsl.analysis.tiles import lean_tiles, plan_tiles

from .dense_oracle import check_against_sdpa, spec_sizes

pytest.importorskip("triton")

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
    E = 24 if spec == "cross" else 16
    shapes = ((2, H, M, 16), (2, G, N, 16), (2, G, N, E))
    att = check_against_sdpa(compiled(spec), spec, shapes, dtype, scalars, seed=3)
    # The case does run lean tiles: some whole query tile of the default schedule has lean key tiles.
    plan = plan_tiles(att)
    sizes = spec_sizes(att, B=2, H=H, G=G, M=M, N=N, D=16, E=E)
    lean = lean_tiles(att, plan, sizes, scalars, 64, 64)
    assert lean.any(), f"{spec}: no lean tile at 64 x 64"
