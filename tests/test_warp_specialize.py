"""Warp-specialised key loops (`_WS`, issue 17): a schedule choice of the forward's autotune space.

- sm_100: the ahead-of-time compile partitions the forward's key loops (the binary has more warps than the
  launch asks for: TMA producer warps beside the MMA and softmax warps) and does not spill;
- sm_90: Triton 3.9 does not partition them (two key loops in one kernel, the lean and the boundary one:
  an MLIR dominance assertion on 4 warps, no partition on 8), so the resource model prunes the choice there
  and the tuner searches as it would without the parameter;
- a launch takes `_WS` only with tensor descriptors and no block layout, and a warp-specialised schedule
  computes what SDPA does, forward and gradients, under the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from attnc.autotune.resource import ARCHS, verdict
from attnc.autotune.search import _fix_constant_params
from attnc.autotune.space import Candidate, DType, KernelKind, Problem, space_for
from attnc.codegen.triton.inspect import parse_config, parse_configs

from attnc.runtime import forced_configs
from attnc.runtime import triton as rt
from attnc.runtime.triton import _KernelConfig

from .dense_oracle import check_against_sdpa
from .test_reference_oracles import SPEC_DIR

pytest.importorskip("triton")

PROBLEM = Problem(64, 64, DType.FP16, 4096, 4096)


def _fwd(bm: int, bn: int, warps: int, stages: int, ws: int) -> Candidate:
    values = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages, "warp_specialize": ws}
    return Candidate.of(KernelKind.FWD, values)


def _compile_fwd(cc: int, ws: int):
    from attnc.codegen.triton.aot import compile_reports

    from attnc.cli import inspect_jobs

    cfg = parse_configs([f"fwd:BLOCK_M=128,BLOCK_N=128,warps=8,stages=2,ws={ws}"], 64)
    jobs = inspect_jobs(str(SPEC_DIR / "causal.attn"), None, cc, "fp16", 64, configs=cfg)
    (job,) = [j for j in jobs if j.fn.__name__ == "_causal_fwd_kernel"]
    return compile_reports([job], max_workers=1)[0]


def test_sm100_partitions_the_forward_key_loops() -> None:
    plain, ws = _compile_fwd(100, 0), _compile_fwd(100, 1)
    assert plain.num_warps == 8 and plain.uses_tma
    assert ws.num_warps > 8, f"not partitioned: {ws.num_warps} warps"
    assert ws.spill_bytes == 0 and ws.uses_tma
    assert dict(ws.constexprs)["_WS"] is True and dict(plain.constexprs)["_WS"] is False


def test_the_resource_model_keeps_ws_to_sm100() -> None:
    c = _fwd(64, 32, 4, 2, 1)
    v90 = verdict(c, PROBLEM, ARCHS[90])
    assert not v90.ok and "warp specialisation" in v90.reason
    assert verdict(c, PROBLEM, ARCHS[100]).ok
    assert verdict(_fwd(64, 32, 4, 2, 0), PROBLEM, ARCHS[90]).ok


def test_the_tuner_fixes_a_parameter_with_one_feasible_value() -> None:
    """On sm_90 no warp-specialised candidate is feasible: the sampler sees `warp_specialize` as fixed at 0
    (a study there searches the same tiles, warps and stages as before the parameter existed)."""
    space = space_for(KernelKind.FWD, PROBLEM)
    assert dict((p.name, p.choices) for p in space.params)["warp_specialize"] == (0, 1)
    assert space.default["warp_specialize"] == 0
    for cc, want in ((90, (0,)), (100, (0, 1))):
        feasible = [c for c in space.candidates() if verdict(c, PROBLEM, ARCHS[cc]).ok]
        fixed = _fix_constant_params(space, feasible)
        assert dict((p.name, p.choices) for p in fixed.params)["warp_specialize"] == want
    # A candidate tuned before the parameter existed reads as its default (0): still inside the space.
    old = Candidate.of(KernelKind.FWD, {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2})
    assert space.violation(old) is None


def test_inspect_config_takes_ws() -> None:
    assert parse_config("fwd:ws=1") == {"fwd": {"warp_specialize": 1}}
    with pytest.raises(ValueError, match="ws must be 0 or 1"):
        parse_config("fwd:ws=2")


@pytest.mark.parametrize("tma", ["1", "0"], ids=["descriptors", "pointers"])
def test_a_ws_schedule_matches_sdpa(
    tma: str, monkeypatch: pytest.MonkeyPatch, compiled: Callable[[str], ModuleType]
) -> None:
    """The forward forced to a warp-specialised schedule, with descriptors (it takes `_WS`) and with pointer
    loads (it does not: Triton cannot partition those loops), against SDPA with the explicit mask."""
    monkeypatch.setenv("ATTNC_TMA", tma)
    seen: list[bool] = []
    real = rt._ws_ok

    def spy(asked: object, tma: object, layout: bool) -> bool:
        seen.append(real(asked, tma, layout))
        return seen[-1]

    monkeypatch.setattr(rt, "_ws_ok", spy)
    mod = compiled("causal")
    shapes = ((1, 2, 77, 16), (1, 2, 77, 16), (1, 2, 77, 16))
    with forced_configs(mod, {"fwd": _KernelConfig(16, 32, 4, 1, warp_specialize=1)}):
        check_against_sdpa(mod, "causal", shapes, torch.float32, {})
    assert seen and seen[0] is (tma == "1"), seen  # the forward launch; the backward's schedules do not ask
    assert not any(seen[1:]), seen
