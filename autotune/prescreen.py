"""CPU pre-screening: compile a pruned space ahead of time for a real GPU target, without a GPU.

Each candidate the resource model keeps is compiled by Triton's whole pipeline and `ptxas` for the target
(`codegen/triton/aot.py`), in parallel worker processes, and the reports say what the GPU would get: shared
memory, registers, spills. A config is *viable* when it compiles, fits the target's shared memory and does
not spill. Results are cached on disk (`<cache dir>/tune/aot.json`) by kernel hash, target, dtype, head dims
and config, so a second pre-screen, or the GPU run after it, compiles nothing twice.

This is also how the resource model is held to the truth: `tests/test_autotune_resource.py` compares its
verdicts with these compiles.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnc.settings import settings

from .resource import arch_for, verdict
from .space import Candidate, DType, KernelKind, KernelSpace

__all__ = ["AotResult", "compile_job", "prescreen"]

_AOT_KIND = {
    KernelKind.FWD: "fwd",
    KernelKind.DKDV: "bwd_dkdv",
    KernelKind.DQ: "bwd_dq",
    KernelKind.FWD_SPLIT: "fwd_split",
}


@dataclass(frozen=True)
class AotResult:
    """The compiler's word on one candidate for one target."""

    candidate: Candidate
    model_ok: bool
    model_reason: str
    compiled: bool
    shared_bytes: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    error: str = ""

    @property
    def viable(self) -> bool:
        return self.compiled and self.spill_bytes == 0


def compile_job(att: Any, kernels_module: Any, c: Candidate, cc: int, dtype: DType, head_dim: int) -> Any:
    """The `CompileJob` of `attnc inspect` for this kernel and target, with candidate `c`'s schedule."""
    from attnc.codegen.triton.inspect import Target, jobs

    if c.kind is KernelKind.LIN_CHUNK:  # the chunked linear forward's output kernel (the larger of the two)
        from attnc.codegen.triton import linear_aot

        from attnc.runtime.linear import _LinConfig

        cfg = _LinConfig(**{f: c[f] for f in _LinConfig._fields})
        return next(
            j
            for j in linear_aot.jobs(cc, dtype.short, head_dim, (linear_aot.variant_of(att),), cfg)
            if j.fn.__name__ == "_lin_fwd_out_kernel"
        )
    from attnc.runtime.triton import _KernelConfig
    from attnc.runtime.tuning import _config_from

    cfg = _config_from(_KernelConfig, c.as_dict())  # the schedule a tuned entry would launch with
    # Arbitrary strides (launch=False): the conservative compile the resource model (autotune/resource.py) is
    # calibrated against. A launch with the runtime's contiguous inputs specialises strides and needs fewer
    # registers (`attnc inspect` reports that compile); recalibrating the model to it is open (issue 17).
    target = Target(cc, dtype.short, head_dim, (_AOT_KIND[c.kind],), launch=False)
    (job,) = jobs(att, kernels_module, target, cfg)
    return job


def _cache_path() -> Path:
    return settings().tune_dir / "aot.json"


def _load_cache() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(entries: dict[str, dict[str, Any]]) -> None:
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**_load_cache(), **entries}  # another process may have added entries meanwhile
    fd, tmp = tempfile.mkstemp(prefix="aot.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(merged, f, sort_keys=True)
    os.replace(tmp, path)


def prescreen(
    att: Any,
    kernels_module: Any,
    kernels_hash: str,
    space: KernelSpace,
    cc: int,
    *,
    jobs: int = 2,
    include_rejected: bool = False,
    candidates: Sequence[Candidate] | None = None,
) -> list[AotResult]:
    """Compile the candidates the resource model keeps (all admissible ones with `include_rejected`, or the
    given `candidates`) for sm_`cc`; cached results are reused."""
    import triton
    from attnc.codegen.triton.aot import AOTCompileError, compile_reports

    arch = arch_for(cc)
    p = space.problem
    todo = list(candidates) if candidates is not None else space.candidates()
    verdicts = {c: verdict(c, p, arch) for c in todo}
    if not include_rejected and candidates is None:
        todo = [c for c in todo if verdicts[c].ok or c == space.default]
    cache = _load_cache()

    def cache_key(c: Candidate) -> str:
        return (
            f"{kernels_hash}|{att.name}|{c.kind.value}|sm_{cc}|{p.dtype.value}|D={p.head_dim}|E={p.v_dim}|"
            f"triton={triton.__version__}|{c}"
        )

    missing = [c for c in todo if cache_key(c) not in cache]
    fresh: dict[str, dict[str, Any]] = {}
    if missing:
        job_list = [compile_job(att, kernels_module, c, cc, p.dtype, p.head_dim) for c in missing]
        for c, rep in zip(
            missing, compile_reports(job_list, max_workers=jobs, raise_on_error=False), strict=True
        ):
            if isinstance(rep, AOTCompileError):
                fresh[cache_key(c)] = {"compiled": False, "error": rep.compiler_message.strip()[:400]}
            else:
                fresh[cache_key(c)] = {
                    "compiled": True,
                    "shared_bytes": rep.shared_bytes,
                    "registers": rep.registers,
                    "spill_bytes": rep.spill_bytes,
                }
        _save_cache(fresh)
        cache.update(fresh)
    out = []
    for c in todo:
        e = cache[cache_key(c)]
        v = verdicts[c]
        out.append(
            AotResult(
                candidate=c,
                model_ok=v.ok,
                model_reason=v.reason,
                compiled=bool(e["compiled"]),
                shared_bytes=e.get("shared_bytes"),
                registers=e.get("registers"),
                spill_bytes=e.get("spill_bytes"),
                error=str(e.get("error", "")),
            )
        )
    return out
