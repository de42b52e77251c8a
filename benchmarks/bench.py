#!/usr/bin/env python3
"""Benchmark attnc's fused Triton kernels against FlexAttention (torch.compile) and SDPA (flash, cuDNN).

    python benchmarks/bench.py [--quick] [--out benchmarks/results] [--variants causal,alibi,...]
                               [--dims 64,128] [--seqs 1024,4096,16384]
    python benchmarks/bench.py --plot-only benchmarks/results/<date>-<device>.json

For each variant (an example spec) and head dimension D, at B*N = 16k tokens and H*D = 2048 (H = 2048 / D),
bf16, it times the forward and the forward+backward of

- `attnc`: the generated op with backend="triton";
- `flex`: `flex_attention` under `torch.compile(dynamic=False)` with the equivalent score_mod / mask_mod and a
  BlockMask built once, outside the timed region;
- `sdpa_flash`, `sdpa_cudnn`: `scaled_dot_product_attention` pinned to one backend, where the variant is
  expressible there (causal and full attention; "n/a" elsewhere).

Before any timing a correctness preflight checks, at small shapes, attnc's Triton kernels (forward, log-sum-exp,
gradients of q, k, v) against the spec's PyTorch reference, and the reference against the peers (so that the
peers really compute the same variant). Without a CUDA GPU only the preflight (kernels under the Triton
interpreter, float32) and the codegen timing run; GPU timings need a GPU.

Results go, after every measurement, to `<out>/<date>-<device>.json` (written atomically: a run cut off at any
point leaves valid JSON), with a PNG of TFLOP/s against N beside it. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
SPEC_DIR = REPO / "examples" / "specs"
SCHEMA = 1
TOKENS = 16384  # B * N for every shape
HIDDEN = 2048  # H * D for every shape
DTYPE = torch.bfloat16
CPU_MESSAGE = (
    "No CUDA GPU found: GPU timings need a GPU. This run did the correctness preflight (attnc's Triton kernels "
    "under the Triton interpreter, float32) and the codegen timing only."
)
FLOP_CONVENTION = (
    "forward FLOPs = 4*B*H*M*N*D (two matmuls, 2 FLOPs per multiply-add; 2*B*H*M*N*(D+E) when v has width E), "
    "halved for masks that keep only j <= i (causal, alibi, sliding_window, prefix_lm, document) whatever "
    "fraction of the keys the mask actually leaves; forward+backward = 3.5x forward (backward = 2.5x). "
    "The same count is used for every implementation, so TFLOP/s ratios are time ratios. Each record also "
    "gives visible_fraction, the exact fraction of (query, key) pairs the mask keeps."
)
IMPLS = ("attnc", "flex", "sdpa_flash", "sdpa_cudnn")
PASSES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------------------------------------
# FLOP convention


def attention_flops(
    B: int, H: int, M: int, N: int, D: int, *, causal: bool, backward: bool, E: int | None = None
) -> float:
    """FLOPs of one attention call (see FLOP_CONVENTION): q [B, H, M, D], k [B, H, N, D], v [B, H, N, E]."""
    E = D if E is None else E
    flops = 2.0 * B * H * M * N * (D + E)
    if causal:
        flops *= 0.5
    return flops * 3.5 if backward else flops


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------------------
# Variants: the example spec, our op's extra arguments, the equivalent FlexAttention mods, SDPA's flag


@dataclass(frozen=True)
class Variant:
    name: str
    spec: str  # examples/specs/<spec>.attn
    attention: str  # the attention block in it
    causal: bool  # FLOPs halved (the mask keeps only j <= i)
    sdpa_causal: bool | None  # SDPA's is_causal where SDPA expresses the variant, else None
    settings: str  # how the scalars are chosen, for the JSON


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("causal", "causal", "causal", True, True, "mask j <= i"),
        Variant("full", "cross", "cross", False, False, "no mask (cross.attn with M = N)"),
        Variant("alibi", "alibi", "alibi", True, None, "slopes[h] = 2^(-8(h+1)/H), causal"),
        Variant(
            "sliding_window",
            "sliding_window",
            "sliding_window",
            True,
            None,
            "W = 1024 (preflight: W = N/4), G = H",
        ),
        Variant("softcap", "softcap", "softcap", False, None, "cap = 50, no mask"),
        Variant("prefix_lm", "prefix_lm", "prefix_lm", True, None, "P = N/4"),
        Variant("document", "document", "document", True, None, "4 equal documents per sequence, causal"),
    )
}
BENCH_WINDOW = 1024
SOFTCAP = 50.0
DOCUMENTS = 4

ScoreMod = Callable[..., torch.Tensor]
MaskMod = Callable[..., torch.Tensor]


@dataclass
class Problem:
    """One variant at one shape: what our op takes after q, k, v, and the FlexAttention equivalent."""

    extras: tuple[Any, ...]  # auxiliary tensors and scalars, in the spec's signature order
    scalars: dict[str, float | int]
    score_mod: ScoreMod | None
    mask_mod: MaskMod | None
    mask_per_batch: bool  # the BlockMask depends on b (document ids)
    row_visible: torch.Tensor  # [N]: keys visible to each query row (batch 0)


def make_problem(variant: str, B: int, H: int, N: int, device: torch.device | str, *, small: bool) -> Problem:
    """`small`: the preflight's shapes, where the sliding window is N/4 so that the mask is not all causal."""
    rows = torch.arange(N)

    def causal(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return q_idx >= kv_idx

    if variant == "causal":
        return Problem((), {}, None, causal, False, rows + 1)
    if variant == "full":
        return Problem((), {}, None, None, False, torch.full((N,), N))
    if variant == "alibi":
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H).to(device)

        def alibi(
            score: torch.Tensor, b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return score + slopes[h] * (kv_idx - q_idx)

        return Problem((slopes,), {}, alibi, causal, False, rows + 1)
    if variant == "sliding_window":
        W = max(1, N // 4) if small else BENCH_WINDOW

        def window(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

        return Problem((W,), {"W": W}, None, window, False, torch.clamp(rows + 1, max=W))
    if variant == "softcap":
        cap = SOFTCAP

        def softcap(
            score: torch.Tensor, b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return cap * torch.tanh(score / cap)

        return Problem((cap,), {"cap": cap}, softcap, None, False, torch.full((N,), N))
    if variant == "prefix_lm":
        P = max(1, N // 4)

        def prefix(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return (kv_idx <= q_idx) | (kv_idx < P)

        return Problem((P,), {"P": P}, None, prefix, False, torch.clamp(rows + 1, min=P))
    if variant == "document":
        length = max(1, N // DOCUMENTS)
        ids = (rows // length).to(torch.int32)
        doc = ids.view(1, N).expand(B, N).contiguous().to(device)

        def document(b: torch.Tensor, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return (doc[b, q_idx] == doc[b, kv_idx]) & (kv_idx <= q_idx)

        return Problem((doc,), {"documents": DOCUMENTS}, None, document, True, rows % length + 1)
    raise ValueError(f"unknown variant {variant!r}")


def visible_fraction(problem: Problem, N: int) -> float:
    return float(problem.row_visible.sum()) / float(N * N) if N else 0.0


# ----------------------------------------------------------------------------------------------------------
# The results file: rewritten atomically after every measurement


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no inf/nan
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Results:
    """The results file. Every record carries `run`, the index in data["runs"] of the run that wrote it."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.run = max(0, len(data.get("runs", [])) - 1)
        self.save()

    def add(self, section: str, record: dict[str, Any]) -> dict[str, Any]:
        record.setdefault("run", self.run)
        self.data.setdefault(section, []).append(record)
        self.save()
        return record

    def save(self) -> None:
        text = json.dumps(_jsonable(self.data), indent=1, allow_nan=False) + "\n"
        _atomic_write_bytes(self.path, text.encode())


# ----------------------------------------------------------------------------------------------------------
# Environment


def _import_codegen() -> ModuleType:
    """The checkout's compiler (not another installed copy)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from attnc import codegen

    return codegen


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def device_info(gpu: bool) -> dict[str, Any]:
    if not gpu:
        name = platform.processor() or platform.machine() or "cpu"
        return {"name": f"CPU ({name})", "slug": "cpu", "cuda": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": torch.cuda.get_device_name(0),
        "slug": _slug(torch.cuda.get_device_name(0)),
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@contextlib.contextmanager
def fresh_caches(keep: bool) -> Iterator[Path]:
    """A temporary directory for attnc's module cache and, unless `keep`, Triton's and Inductor's caches too,
    so that first-call times are cold-cache compile times."""
    with tempfile.TemporaryDirectory(prefix="attnc-bench-") as tmp:
        root = Path(tmp)
        saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
        if not keep:
            os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
        try:
            yield root
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], gpu: bool) -> tuple[Any, float]:
    _sync(gpu)
    t0 = time.perf_counter()
    out = fn()
    _sync(gpu)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# Correctness preflight


# Tolerances: max |actual - expected| / max(1, max |expected|), the expected being the reference in float32
# on the same (rounded) inputs. bf16 rounds P before the second product, as FlashAttention does.
FWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 2e-4, torch.bfloat16: 5e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().double()
    e = expected.detach().double()
    if a.shape != e.shape:
        return math.inf
    both_inf = (a == e) & e.isinf()  # fully masked rows: LSE -inf on both sides
    diff = torch.where(both_inf, 0.0, (a - e).abs())
    finite = e[e.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    err = float(diff.max()) if diff.numel() else 0.0
    return err / scale if math.isfinite(err) else math.inf


def _flex_eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: Problem
) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, _, M, _ = q.shape
    N = k.shape[2]
    block_mask = None
    if problem.mask_mod is not None:
        block_mask = create_block_mask(
            problem.mask_mod, B if problem.mask_per_batch else None, None, M, N, device=str(q.device)
        )
    with warnings.catch_warnings():
        # Eager on purpose (small shapes; the compiled one is timed and compared at the benchmark shapes).
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        try:
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:  # older torch
            return flex_attention(
                q, k, v, score_mod=problem.score_mod, block_mask=block_mask, return_lse=True
            )
        o, aux = flex_attention(
            q, k, v, score_mod=problem.score_mod, block_mask=block_mask, return_aux=AuxRequest(lse=True)
        )
        return o, aux.lse


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def _sdpa_context(impl: str) -> contextlib.AbstractContextManager[Any]:
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_sdpa_backends()[impl]])


def preflight(
    res: Results,
    variant: Variant,
    op: Callable[..., Any],
    *,
    gpu: bool,
    B: int,
    H: int,
    N: int,
    D: int,
) -> bool:
    """attnc (Triton) vs the reference: output, LSE and gradients of q, k, v; the reference vs FlexAttention
    (eager) and vs SDPA where it expresses the variant. Returns whether attnc's kernels passed."""
    device = torch.device("cuda" if gpu else "cpu")
    dtype = DTYPE if gpu else torch.float32
    g = torch.Generator().manual_seed(zlib.crc32(f"{variant.name}-{B}-{H}-{N}-{D}".encode()))
    q0, k0, v0, do0 = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(4))
    problem = make_problem(variant.name, B, H, N, device, small=True)
    base = {
        "variant": variant.name,
        "B": B,
        "H": H,
        "N": N,
        "D": D,
        "dtype": str(dtype).replace("torch.", ""),
    }
    base["scalars"] = problem.scalars

    # The reference in float32 on the rounded inputs: the expected values for everything below.
    ref_leaves = [t.detach().float().clone().requires_grad_() for t in (q0, k0, v0)]
    o_ref, lse_ref = op(*ref_leaves, *problem.extras, return_lse=True, backend="reference")
    o_ref.backward(do0.float())
    ref_grads = [t.grad for t in ref_leaves]

    ok = True
    record: dict[str, Any] = {**base, "impl": "attnc", "vs": "reference"}
    try:
        leaves = [t.detach().clone().requires_grad_() for t in (q0, k0, v0)]
        (o, lse), first_fwd = _timed(
            lambda: op(*leaves, *problem.extras, return_lse=True, backend="triton"), gpu
        )
        _, first_bwd = _timed(lambda: o.backward(do0), gpu)
        errs = {"o": rel_err(o, o_ref), "lse": rel_err(lse, lse_ref)}
        errs.update({f"d{n}": rel_err(t.grad, r) for n, t, r in zip("qkv", leaves, ref_grads, strict=True)})
        passed = all(e <= FWD_TOL[dtype] for n, e in errs.items() if n in ("o", "lse")) and all(
            e <= GRAD_TOL[dtype] for n, e in errs.items() if n.startswith("d")
        )
        record.update(
            status="pass" if passed else "fail",
            passed=passed,
            max_rel_err=errs,
            tol={"fwd": FWD_TOL[dtype], "grad": GRAD_TOL[dtype]},
            # On a GPU the first launch compiles the kernels (cold Triton cache); on CPU it is interpreter time.
            first_fwd_s=first_fwd,
            first_bwd_s=first_bwd,
        )
    except Exception as err:
        record.update(status="error", passed=False, error=f"{type(err).__name__}: {err}")
    ok = bool(record["passed"])
    _print_preflight(res.add("preflight", record))

    # The peers against the reference: forward only (they are trusted for their own gradients).
    peers: list[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]]] = [
        ("flex", lambda: _flex_eager(q0, k0, v0, problem))
    ]
    if variant.sdpa_causal is not None:
        causal = variant.sdpa_causal
        if gpu:
            for impl in ("sdpa_flash", "sdpa_cudnn"):

                def run(impl: str = impl) -> tuple[torch.Tensor, None]:
                    with _sdpa_context(impl):
                        return F.scaled_dot_product_attention(q0, k0, v0, is_causal=causal), None

                peers.append((impl, run))
        else:
            peers.append(
                ("sdpa", lambda: (F.scaled_dot_product_attention(q0, k0, v0, is_causal=causal), None))
            )
    for impl, run in peers:
        rec: dict[str, Any] = {**base, "impl": impl, "vs": "reference"}
        try:
            with torch.no_grad():
                o_p, lse_p = run()
            errs = {"o": rel_err(o_p, o_ref)}
            if lse_p is not None:
                errs["lse"] = rel_err(lse_p, lse_ref)
            passed = all(e <= FWD_TOL[dtype] for e in errs.values())
            rec.update(status="pass" if passed else "fail", passed=passed, max_rel_err=errs)
        except Exception as err:
            if impl.startswith("sdpa_") and (
                "No available kernel" in str(err) or "No viable backend" in str(err)
            ):
                rec.update(status="unavailable", passed=None, error=f"{type(err).__name__}: {err}")
            else:
                rec.update(status="error", passed=False, error=f"{type(err).__name__}: {err}")
        _print_preflight(res.add("preflight", rec))
    return ok


def _print_preflight(r: dict[str, Any]) -> None:
    errs = " ".join(f"{k}={v:.1e}" for k, v in r.get("max_rel_err", {}).items())
    extra = errs or r.get("error", "")
    print(
        f"  preflight {r['variant']:<15} D={r['D']:<4} {r['impl']:<11} {r['status']:<11} {extra}",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------
# Timing (GPU only)


@dataclass(frozen=True)
class BenchOptions:
    warmup_ms: int
    rep_ms: int
    impls: tuple[str, ...]
    passes: tuple[str, ...]


def _do_bench(fn: Callable[[], Any], opts: BenchOptions, grad_to_none: list[torch.Tensor] | None) -> float:
    from triton.testing import do_bench  # lazily: triton is optional on CPU machines

    return float(
        do_bench(fn, warmup=opts.warmup_ms, rep=opts.rep_ms, grad_to_none=grad_to_none, return_mode="median")
    )


def bench_shape(
    res: Results,
    variant: Variant,
    op: Callable[..., Any],
    flex_compiled: Callable[..., Any] | None,
    opts: BenchOptions,
    *,
    B: int,
    H: int,
    N: int,
    D: int,
    device: torch.device | str = "cuda",
) -> None:
    """Time every implementation at one shape, forward then forward+backward; one record per measurement."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(zlib.crc32(f"{variant.name}-{N}-{D}".encode()))
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g, device=device, dtype=DTYPE) for _ in range(4))
    problem = make_problem(variant.name, B, H, N, device, small=False)
    base: dict[str, Any] = {
        "variant": variant.name,
        "B": B,
        "H": H,
        "M": N,
        "N": N,
        "D": D,
        "dtype": "bfloat16",
    }
    base.update(scalars=problem.scalars, visible_fraction=visible_fraction(problem, N))

    impls: dict[str, tuple[Callable[..., torch.Tensor], Callable[[], contextlib.AbstractContextManager[Any]]]]
    impls = {}
    na: dict[str, str] = {}
    if "attnc" in opts.impls:
        impls["attnc"] = (
            lambda q, k, v: op(q, k, v, *problem.extras, backend="triton"),
            contextlib.nullcontext,
        )
    if "flex" in opts.impls and flex_compiled is not None:
        block_mask = None
        if problem.mask_mod is not None:
            from torch.nn.attention.flex_attention import create_block_mask

            block_mask, base["block_mask_s"] = _timed(
                lambda: create_block_mask(
                    problem.mask_mod, B if problem.mask_per_batch else None, None, N, N, device=str(device)
                ),
                True,
            )
        score_mod = problem.score_mod
        impls["flex"] = (
            lambda q, k, v: flex_compiled(q, k, v, score_mod=score_mod, block_mask=block_mask),
            contextlib.nullcontext,
        )
    for impl in ("sdpa_flash", "sdpa_cudnn"):
        if impl not in opts.impls:
            continue
        if variant.sdpa_causal is None:
            na[impl] = (
                "not expressible in SDPA without an explicit mask/bias (which disables flash and cuDNN)"
            )
            continue
        causal = variant.sdpa_causal
        impls[impl] = (
            lambda q, k, v, causal=causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            lambda impl=impl: _sdpa_context(impl),
        )

    for pass_ in opts.passes:
        backward = pass_ == "fwd+bwd"
        flops = attention_flops(B, H, N, N, D, causal=variant.causal, backward=backward)
        ms: dict[str, float] = {}
        ours: dict[str, Any] | None = None
        for impl, (fn_impl, ctx) in impls.items():
            rec = {**base, "impl": impl, "pass": pass_, "flops": flops}
            try:
                with ctx():
                    rec.update(_measure(fn_impl, q, k, v, dout, backward, opts))
                rec["tflops"] = tflops(flops, rec["ms"])
                ms[impl] = rec["ms"]
            except Exception as err:
                rec.update(status="error", error=f"{type(err).__name__}: {str(err)[:500]}")
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
            if impl == "attnc":
                ours = rec
            _print_record(res.add("records", rec))
        for impl, why in na.items():
            res.add(
                "records",
                {**base, "impl": impl, "pass": pass_, "flops": flops, "status": "n/a", "error": why},
            )
        if ours is not None and "ms" in ours:
            # speedup > 1: attnc is faster than that peer.
            ours["speedup"] = {
                p: (ms[p] / ours["ms"] if p in ms else "n/a")
                for p in IMPLS
                if p != "attnc" and p in opts.impls
            }
            if pass_ == "fwd" and "flex" in impls:
                # Grad mode stays on (the inputs need no grad): no_grad would make dynamo recompile flex.
                o_ours = impls["attnc"][0](q, k, v)
                o_flex = impls["flex"][0](q, k, v)
                ours["max_rel_diff_vs_flex"] = rel_err(o_ours, o_flex)
                if ours["max_rel_diff_vs_flex"] > FWD_TOL[DTYPE]:
                    print(
                        f"  WARNING: attnc and flex differ by {ours['max_rel_diff_vs_flex']:.2e}", flush=True
                    )
            res.save()


def _measure(
    fn_impl: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    backward: bool,
    opts: BenchOptions,
) -> dict[str, Any]:
    if backward:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def fn() -> None:
            fn_impl(*leaves).backward(dout)

    else:
        leaves = []

        def fn() -> None:
            fn_impl(q, k, v)

    _, first_call = _timed(fn, True)  # compiles (cold caches) on the first call of a shape/variant
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = _do_bench(fn, opts, leaves or None)
    return {
        "status": "ok",
        "ms": ms,
        "first_call_s": first_call,
        "peak_mib": peak / 2**20,  # inputs included
        "peak_extra_mib": (peak - before) / 2**20,  # above what was allocated before the call
    }


def _print_record(r: dict[str, Any]) -> None:
    head = f"  {r['variant']:<15} D={r['D']:<4} N={r['N']:<6} {r['pass']:<8} {r['impl']:<11}"
    if r.get("status") != "ok":
        print(f"{head} {r.get('status')}: {r.get('error', '')}", flush=True)
        return
    print(
        f"{head} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s  peak {r['peak_mib']:8.1f} MiB"
        f"  first call {r['first_call_s']:6.2f} s",
        flush=True,
    )


def _flex_compiled() -> Callable[..., Any] | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False)


def _raise_recompile_limits() -> None:
    """Every (variant, shape) is a new static-shape graph of flex_attention: without this, dynamo would fall back
    to eager flex (slow, and materialising the scores) after 8 recompilations."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 4096)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 1 << 16)


def summarize(data: dict[str, Any]) -> list[str]:
    """Speedups of attnc over each peer (peer ms / attnc ms) and first-call compile times, as text lines."""
    lines = []
    for r in data.get("records", []):
        if r.get("impl") != "attnc" or "speedup" not in r:
            continue
        parts = [f"{p} {s:.2f}x" for p, s in r["speedup"].items() if isinstance(s, float)]
        lines.append(
            f"  {r['variant']:<15} D={r['D']:<4} N={r['N']:<6} {r['pass']:<8} {r['tflops']:7.1f} TFLOP/s  "
            + "  ".join(parts)
        )
    compile_lines = []
    latest = {
        (c["variant"], c["D"], c["impl"]): c for c in data.get("compile", [])
    }  # the last run's, if resumed
    for c in latest.values():
        if c["impl"] == "attnc":
            total = c["codegen_s"] + c["first_fwd_s"] + c["first_bwd_s"]
            what = f"codegen {c['codegen_s']:.2f} s + first fwd {c['first_fwd_s']:.2f} s + first bwd {c['first_bwd_s']:.2f} s"
        else:
            fwd, fb = c.get("first_fwd_s"), c.get("first_fwd_bwd_s")
            total = (fwd or 0.0) + (fb or 0.0)
            what = f"first fwd {fwd or 0.0:.2f} s + first fwd+bwd {fb or 0.0:.2f} s"
        compile_lines.append(f"  {c['variant']:<15} D={c['D']:<4} {c['impl']:<6} {total:7.2f} s  ({what})")
    if compile_lines:
        lines += ["first-call compile times (cold caches):", *compile_lines]
    return lines


# ----------------------------------------------------------------------------------------------------------
# Plot


def write_plot(data: dict[str, Any], png: Path) -> str | None:
    """TFLOP/s against N: a row per head dim, a column per variant, a line per implementation and pass.
    Returns why no plot was written, or None."""
    records = [r for r in data.get("records", []) if r.get("status") == "ok"]
    if not records:
        return "no timings to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return "matplotlib is not installed (rerun with --plot-only JSON where it is)"
    config = data.get("config", {})
    variants = [v for v in config.get("variants", []) if any(r["variant"] == v for r in records)]
    dims = [d for d in config.get("dims", []) if any(r["D"] == d for r in records)]
    seqs = sorted({r["N"] for r in records})
    colors = {"attnc": "tab:red", "flex": "tab:blue", "sdpa_flash": "tab:green", "sdpa_cudnn": "tab:purple"}
    styles = {"fwd": "-", "fwd+bwd": "--"}
    fig, axes = plt.subplots(
        len(dims), len(variants), figsize=(3.3 * len(variants), 2.9 * len(dims) + 0.9), squeeze=False
    )
    for row, D in enumerate(dims):
        for col, variant in enumerate(variants):
            ax = axes[row][col]
            for impl, color in colors.items():
                for pass_, style in styles.items():
                    pts = sorted(
                        (r["N"], r["tflops"])
                        for r in records
                        if r["variant"] == variant
                        and r["D"] == D
                        and r["impl"] == impl
                        and r["pass"] == pass_
                    )
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        ax.plot(xs, ys, style, color=color, marker="o", markersize=3)
            ax.set_xscale("log", base=2)
            ax.set_xlim(min(seqs) / 1.3, max(seqs) * 1.3)
            ax.set_xticks(seqs, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in seqs])
            ax.minorticks_off()
            ax.set_title(f"{variant}, D={D}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
            if col == 0:
                ax.set_ylabel("TFLOP/s", fontsize=8)
            if row == len(dims) - 1:
                ax.set_xlabel("N (B*N = 16k)", fontsize=8)
    handles = [Line2D([], [], color=c, label=i) for i, c in colors.items()]
    handles += [Line2D([], [], color="black", linestyle=s, label=p) for p, s in styles.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    device = data.get("device", {}).get("name", "?")
    fig.suptitle(
        f"attnc vs FlexAttention / SDPA on {device}, {data.get('date', '?')}\n"
        f"bf16, B*N = {TOKENS}, H*D = {HIDDEN}; FLOPs 4BHMND, halved for causal masks, x3.5 for fwd+bwd",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.93))
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return None


# ----------------------------------------------------------------------------------------------------------
# Main


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(x <= 0 for x in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


# ----------------------------------------------------------------------------------------------------------
# Learned-input training cases (issue 11): forward+backward with the auxiliary tensor a parameter


@dataclass(frozen=True)
class LearnedCase:
    name: str
    spec: str  # examples/specs/<spec>.attn
    aux: str  # the learned tensor's parameter name
    causal: bool
    settings: str


LEARNED: dict[str, LearnedCase] = {
    c.name: c
    for c in (
        LearnedCase("alibi_slopes", "alibi", "slopes", True, "slopes [H] learned, causal"),
        LearnedCase("t5_table", "t5_bias", "bias", False, "bias [H, 2R+1] learned, R = 64, no mask"),
        LearnedCase("sinks", "sink", "sinks", True, "sinks [H] learned (gpt-oss), causal"),
        LearnedCase("moh_gate", "moh_gate", "gate", True, "gate [B, H, N] learned epilogue, causal"),
    )
}
T5_R = 64


def learned_aux(case: LearnedCase, B: int, H: int, N: int, device: Any) -> dict[str, Any]:
    """The case's learned tensor (fresh, requiring grad) and scalars, by parameter name."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.name}-{B}-{H}-{N}".encode()))
    if case.name == "alibi_slopes":
        t = torch.exp2(-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H)
        return {"slopes": t.to(device).requires_grad_()}
    if case.name == "t5_table":
        t = 0.5 * torch.randn(H, 2 * T5_R + 1, generator=g)
        return {"bias": t.to(device).requires_grad_(), "R": T5_R}
    if case.name == "sinks":
        return {"sinks": torch.randn(H, generator=g).to(device).requires_grad_()}
    if case.name == "moh_gate":
        return {"gate": torch.rand(B, H, N, generator=g).to(device).requires_grad_()}
    raise ValueError(case.name)


def learned_flex(
    case: LearnedCase, aux: dict[str, Any], flex: Callable[..., Any], B: int, N: int, device: Any
):  # type: ignore[no-untyped-def]
    """FlexAttention with the learned tensor as a captured buffer requiring grad (FlexAttention reduces its
    gradient with atomics): a function (q, k, v) -> o. The BlockMask is built here, outside timed regions."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, N, N, device=str(device)) if case.causal else None
    t = aux[case.aux]
    if case.name == "alibi_slopes":

        def alibi(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
            return score + t[h] * (kv_idx - q_idx)

        return lambda q, k, v: flex(q, k, v, score_mod=alibi, block_mask=mask)
    if case.name == "t5_table":

        def t5(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
            return score + t[h, torch.clamp(kv_idx - q_idx, -T5_R, T5_R) + T5_R]

        return lambda q, k, v: flex(q, k, v, score_mod=t5, block_mask=mask)
    if case.name == "sinks":
        from torch.nn.attention.flex_attention import AuxRequest

        def with_sink(q, k, v):  # type: ignore[no-untyped-def]
            # The sink as one more logit of each row's normaliser: o · sigmoid(lse - sink).
            o, extra = flex(q, k, v, block_mask=mask, return_aux=AuxRequest(lse=True))
            w = torch.sigmoid(extra.lse - t.view(1, -1, 1))
            return o * w.unsqueeze(-1).to(o.dtype)

        return with_sink
    if case.name == "moh_gate":
        return lambda q, k, v: flex(q, k, v, block_mask=mask) * t.unsqueeze(-1).to(q.dtype)
    raise ValueError(case.name)


def learned_preflight(res: Results, case: LearnedCase, op: Callable[..., Any], gpu: bool) -> bool:
    """attnc's Triton path against the reference at a small shape: o and the gradients of q, k, v and the
    learned tensor; and two backward passes bitwise identical (determinism)."""
    device = torch.device("cuda" if gpu else "cpu")
    dtype = DTYPE if gpu else torch.float32
    B, H, N, D = (2, 4, 256, 64) if gpu else (1, 2, 64, 16)
    g = torch.Generator().manual_seed(zlib.crc32(f"learned-{case.name}".encode()))
    q0, k0, v0, do0 = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(4))
    rec: dict[str, Any] = {"variant": f"learned:{case.name}", "B": B, "H": H, "N": N, "D": D, "impl": "attnc"}
    rec.update(vs="reference", dtype=str(dtype).replace("torch.", ""))

    def step(backend: str, cast: torch.dtype | None) -> list[torch.Tensor]:
        aux = learned_aux(case, B, H, N, device)
        leaves = [(t.float() if cast else t).detach().clone().requires_grad_() for t in (q0, k0, v0)]
        o = op(*leaves, **aux, backend=backend)
        o.backward(do0.to(o.dtype))
        return [o.detach(), *(t.grad for t in leaves), aux[case.aux].grad]

    want = step("reference", torch.float32)
    try:
        got = step("triton", None)
        again = step("triton", None)
        names = ("o", "dq", "dk", "dv", f"d{case.aux}")
        errs = {n: rel_err(a, b) for n, a, b in zip(names, got, want, strict=True)}
        deterministic = all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
        passed = errs["o"] <= FWD_TOL[dtype] and all(errs[n] <= GRAD_TOL[dtype] for n in names[1:])
        rec.update(status="pass" if passed and deterministic else "fail", passed=passed and deterministic)
        rec.update(max_rel_err=errs, deterministic=deterministic)
    except Exception as err:
        rec.update(status="error", passed=False, error=f"{type(err).__name__}: {err}")
    _print_preflight(res.add("preflight", rec))
    ok = bool(rec["passed"])

    # FlexAttention (eager, captured buffer) against the same reference: it computes the same case.
    peer: dict[str, Any] = {**rec, "impl": "flex"}
    for key in ("max_rel_err", "deterministic", "error"):
        peer.pop(key, None)
    try:
        from torch.nn.attention.flex_attention import flex_attention

        aux = learned_aux(case, B, H, N, device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            with torch.no_grad():
                o_flex = learned_flex(case, aux, flex_attention, B, N, device)(q0, k0, v0)
        errs = {"o": rel_err(o_flex, want[0])}
        passed = errs["o"] <= FWD_TOL[dtype]
        peer.update(status="pass" if passed else "fail", passed=passed, max_rel_err=errs)
    except Exception as err:
        peer.update(status="error", passed=False, error=f"{type(err).__name__}: {err}")
    _print_preflight(res.add("preflight", peer))
    return ok


def learned_timings(
    res: Results, case: LearnedCase, op: Callable[..., Any], opts: BenchOptions, seqs: list[int], D: int = 64
) -> None:
    """GPU: forward+backward of attnc and of compiled FlexAttention with the learned tensor requiring grad,
    ms and peak memory, at each N (B·N = 16k tokens, H·D = 2048); and whether repeated backward passes give
    bitwise-identical gradients of the learned tensor."""
    torch._dynamo.reset()
    flex = _flex_compiled()
    H = HIDDEN // D
    for N in seqs:
        B = max(1, TOKENS // N)
        g = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{case.name}-{N}".encode()))
        q, k, v, dout = (torch.randn(B, H, N, D, generator=g, device="cuda", dtype=DTYPE) for _ in range(4))
        flops = attention_flops(B, H, N, N, D, causal=case.causal, backward=True)
        base = {
            "variant": f"learned:{case.name}",
            "B": B,
            "H": H,
            "M": N,
            "N": N,
            "D": D,
            "dtype": "bfloat16",
        }
        ms: dict[str, float] = {}
        for impl in ("attnc", "flex"):
            if impl not in opts.impls or (impl == "flex" and flex is None):
                continue
            rec = {**base, "impl": impl, "pass": "fwd+bwd", "flops": flops, "settings": case.settings}
            try:
                aux = learned_aux(case, B, H, N, "cuda")
                param = aux[case.aux]
                if impl == "attnc":
                    fn_impl = lambda q, k, v, aux=aux: op(q, k, v, **aux, backend="triton")  # noqa: E731
                else:
                    fn_impl = learned_flex(case, aux, flex, B, N, "cuda")
                rec.update(_measure(fn_impl, q, k, v, dout, True, opts))
                rec["tflops"] = tflops(flops, rec["ms"])
                grads = []
                for _ in range(2):
                    param.grad = None
                    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                    fn_impl(*leaves).backward(dout)
                    grads.append(param.grad.clone())
                rec["deterministic"] = bool(torch.equal(grads[0], grads[1]))
                ms[impl] = rec["ms"]
            except Exception as err:
                rec.update(status="error", error=f"{type(err).__name__}: {str(err)[:500]}")
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
            _print_record(res.add("records", rec))
        if "attnc" in ms and "flex" in ms:
            print(f"  learned:{case.name} N={N}: speedup vs flex {ms['flex'] / ms['attnc']:.2f}x", flush=True)
        res.save()


def run_learned(
    res: Results, names: list[str], cache: Path, gpu: bool, opts: BenchOptions, seqs: list[int]
) -> int:
    """The learned-input cases: codegen, preflight (CPU: the interpreter), and on a GPU the timings.
    Returns how many preflight checks failed."""
    if not names:
        return 0
    codegen = _import_codegen()
    print("learned-input training cases (gradient of the learned tensor fused in the backward):", flush=True)
    failed = 0
    for name in names:
        case = LEARNED[name]
        mod = codegen.compile_file(SPEC_DIR / f"{case.spec}.attn", cache_dir=cache / "attnc")
        op = getattr(mod, case.spec)
        ok = learned_preflight(res, case, op, gpu)
        failed += not ok
        if gpu and ok:
            learned_timings(res, case, op, opts, seqs)
    return failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark attnc against FlexAttention and SDPA (see benchmarks/README.md)."
    )
    p.add_argument("--quick", action="store_true", help="D=64, N in {1k, 4k}, shorter timing (a smoke run)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    p.add_argument("--variants", type=_name_list(tuple(VARIANTS)), help=f"default: {','.join(VARIANTS)}")
    p.add_argument("--dims", type=_int_list, help="head dims (default 64,128; --quick: 64)")
    p.add_argument(
        "--seqs", type=_int_list, help="sequence lengths N (default 1024,4096,16384; --quick: 1024,4096)"
    )
    p.add_argument("--impls", type=_name_list(IMPLS), default=list(IMPLS), help=f"default: {','.join(IMPLS)}")
    p.add_argument("--passes", type=_name_list(PASSES), default=list(PASSES), help="default: fwd,fwd+bwd")
    p.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="stop starting new shapes after this many seconds (default 540)",
    )
    p.add_argument(
        "--keep-caches",
        action="store_true",
        help="use the existing Triton/Inductor caches (warm first calls)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the results file of the same date and device: measure only what it lacks",
    )
    p.add_argument(
        "--learned",
        type=lambda text: [] if text == "none" else _name_list(tuple(LEARNED))(text),
        help=f"learned-input training cases (default: {','.join(LEARNED)}; 'none' for none)",
    )
    p.add_argument(
        "--plot-only", type=Path, metavar="JSON", help="redraw the PNG of an existing results file"
    )
    args = p.parse_args(argv)
    args.variants = args.variants or list(VARIANTS)
    args.learned = list(LEARNED) if args.learned is None else args.learned
    args.dims = args.dims or ([64] if args.quick else [64, 128])
    args.seqs = args.seqs or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    for D in args.dims:
        if HIDDEN % D:
            p.error(f"--dims: {D} does not divide H*D = {HIDDEN}")
    return args


def _union(a: list[Any], b: list[Any]) -> list[Any]:
    return [*a, *(x for x in b if x not in a)]


def resume_from(
    old: dict[str, Any], new: dict[str, Any], opts: BenchOptions
) -> tuple[dict[str, Any], set[Any]]:
    """Continue an earlier (cut-off) run's results file: keep its complete (variant, D, N) groups, which are
    not measured again, and drop its skipped and incomplete ones. Returns the merged data and the done groups."""
    for key in ("torch", "triton"):
        if old.get(key) != new.get(key):
            raise SystemExit(
                f"--resume: {key} {new.get(key)} != {old.get(key)} in the results file; use another --out"
            )
    if old.get("device", {}).get("name") != new["device"]["name"]:
        raise SystemExit("--resume: the results file was written on another device; use another --out")
    if old.get("git_commit") != new.get("git_commit"):
        print(
            f"warning: --resume: the results file was written at commit {old.get('git_commit')}", flush=True
        )
    wanted = {(i, p) for i in opts.impls for p in opts.passes}
    groups: dict[tuple[str, int, int], set[tuple[str, str]]] = {}
    for r in old.get("records", []):
        if r.get("status") != "skipped":
            groups.setdefault((r["variant"], r["D"], r["N"]), set()).add((r.get("impl"), r.get("pass")))
    done = {g for g, got in groups.items() if wanted <= got}
    data = {
        **old,
        **{k: v for k, v in new.items() if k not in ("codegen", "preflight", "compile", "records")},
    }
    data["runs"] = [*old.get("runs", []), *new["runs"]]
    config = dict(new["config"])
    for key in ("variants", "dims", "seqs"):
        config[key] = _union(old.get("config", {}).get(key, []), new["config"][key])
    config["variant_settings"] = {
        **old.get("config", {}).get("variant_settings", {}),
        **config["variant_settings"],
    }
    data["config"] = config
    data["records"] = [
        r
        for r in old.get("records", [])
        if (r["variant"], r["D"], r["N"]) in done and r.get("status") != "skipped"
    ]
    for key in ("codegen", "preflight", "compile"):
        data[key] = list(old.get(key, []))
    return data, done


def run_codegen(
    res: Results, variants: list[str], cache: Path
) -> tuple[dict[str, Callable[..., Any]], dict[str, float]]:
    """Spec -> imported module with an empty attnc cache (parse, check, IR, analysis, emit, import), timed."""
    codegen = _import_codegen()
    ops: dict[str, Callable[..., Any]] = {}
    seconds: dict[str, float] = {}
    print("codegen (spec -> imported module, empty cache):", flush=True)
    for name in variants:
        v = VARIANTS[name]
        t0 = time.perf_counter()
        mod = codegen.compile_file(SPEC_DIR / f"{v.spec}.attn", cache_dir=cache / "attnc")
        seconds[name] = time.perf_counter() - t0
        ops[name] = getattr(mod, v.attention)
        res.add(
            "codegen", {"variant": name, "spec": f"examples/specs/{v.spec}.attn", "codegen_s": seconds[name]}
        )
        print(f"  {name:<15} {seconds[name] * 1e3:8.1f} ms", flush=True)
    return ops, seconds


def run_preflight(
    res: Results,
    variants: list[str],
    dims: list[int],
    ops: dict[str, Callable[..., Any]],
    codegen_s: dict[str, float],
    gpu: bool,
    cold: bool = True,
) -> dict[tuple[str, int], bool]:
    """Small shapes: on a GPU bf16 at each head dim (the first launches compile the kernels: recorded as
    attnc's first-call compile time); on CPU the Triton interpreter in float32. Returns (variant, D) -> passed."""
    print("preflight (max |err| / max(1, max |expected|), expected = the reference in float32):", flush=True)
    shapes = [(2, 4, 256, D) for D in dims] if gpu else [(1, 2, 128, 64)]
    passed: dict[tuple[str, int], bool] = {}
    for name in variants:
        for B, H, N, D in shapes:
            passed[(name, D)] = preflight(res, VARIANTS[name], ops[name], gpu=gpu, B=B, H=H, N=N, D=D)
            mine = next(r for r in reversed(res.data["preflight"]) if r["impl"] == "attnc")
            if gpu and "first_fwd_s" in mine:
                res.add(
                    "compile",
                    {
                        "variant": name,
                        "D": D,
                        "impl": "attnc",
                        "codegen_s": codegen_s[name],
                        "first_fwd_s": mine["first_fwd_s"],
                        "first_bwd_s": mine["first_bwd_s"],
                        "where": f"preflight shape B={B} H={H} N={N} bf16, {'cold' if cold else 'warm'} Triton cache",
                    },
                )
    if not gpu:  # under the interpreter every head dim behaves alike: one preflight stands for all
        passed.update({(name, D): passed[(name, 64)] for name in variants for D in dims})
    return passed


def run_timings(
    res: Results,
    args: argparse.Namespace,
    ops: dict[str, Callable[..., Any]],
    passed: dict[tuple[str, int], bool],
    opts: BenchOptions,
    start: float,
    png: Path,
    done: set[Any],
) -> None:
    """Every (head dim, variant, N) in that order, so that a run cut off by the budget has whole variants.
    Groups in `done` (measured by the run that --resume continues) are not measured again."""
    _raise_recompile_limits()
    print("timings (bf16, ms = do_bench median):", flush=True)
    for D in args.dims:
        H = HIDDEN // D
        for name in args.variants:
            torch._dynamo.reset()  # a cold start for FlexAttention's compile times, and memory back
            flex = _flex_compiled() if "flex" in opts.impls else None
            for N in args.seqs:
                B = max(1, TOKENS // N)
                where = {"variant": name, "D": D, "N": N, "B": B, "H": H}
                if (name, D, N) in done:
                    print(f"  {name:<15} D={D:<4} N={N:<6} measured by an earlier run (--resume)", flush=True)
                    continue
                skip = None
                if not passed[(name, D)]:
                    skip = "attnc failed the preflight"
                elif time.perf_counter() - start > args.budget_s:
                    skip = f"time budget ({args.budget_s:.0f} s) spent"
                if skip:
                    res.add("records", {**where, "status": "skipped", "error": skip})
                    print(f"  {name:<15} D={D:<4} N={N:<6} skipped: {skip}", flush=True)
                    continue
                try:
                    bench_shape(res, VARIANTS[name], ops[name], flex, opts, B=B, H=H, N=N, D=D)
                except Exception as err:  # set-up failures (inputs, block mask): record them and go on
                    res.add("records", {**where, "status": "error", "error": f"{type(err).__name__}: {err}"})
                    print(f"  {name:<15} D={D:<4} N={N:<6} error: {err}", flush=True)
                torch.cuda.empty_cache()
            first = [
                r
                for r in res.data["records"]
                if r.get("impl") == "flex"
                and r["run"] == res.run
                and r["variant"] == name
                and r["D"] == D
                and "first_call_s" in r
            ]
            if first:
                N0 = min(r["N"] for r in first)
                res.add(
                    "compile",
                    {
                        "variant": name,
                        "D": D,
                        "impl": "flex",
                        **{
                            ("first_fwd_s" if r["pass"] == "fwd" else "first_fwd_bwd_s"): r["first_call_s"]
                            for r in first
                            if r["N"] == N0
                        },
                        "where": f"first benchmark shape N={N0}, {'cold' if not args.keep_caches else 'warm'} Inductor cache",
                    },
                )
            why = write_plot(res.data, png)
            if why and res.data["records"]:
                print(f"  (no plot: {why})", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only is not None:
        data = json.loads(args.plot_only.read_text())
        png = args.plot_only.with_suffix(".png")
        why = write_plot(data, png)
        print(f"plot: {why}" if why else f"plot: {png}")
        return 0 if why is None else 1

    start = time.perf_counter()
    gpu = cuda_available()
    device = device_info(gpu)
    now = dt.datetime.now(dt.timezone.utc)
    path = args.out / f"{now:%Y-%m-%d}-{device['slug']}.json"
    png = path.with_suffix(".png")
    opts = BenchOptions(
        warmup_ms=10 if args.quick else 25,
        rep_ms=40 if args.quick else 100,
        impls=tuple(args.impls),
        passes=tuple(args.passes),
    )
    codegen = _import_codegen()
    config = {
        "quick": args.quick,
        "variants": args.variants,
        "variant_settings": {n: VARIANTS[n].settings for n in args.variants},
        "learned": {n: LEARNED[n].settings for n in args.learned},
        "dims": args.dims,
        "seqs": args.seqs,
        "tokens_B_times_N": TOKENS,
        "hidden_H_times_D": HIDDEN,
        "dtype": "bfloat16" if gpu else "float32 (preflight only)",
        "impls": args.impls,
        "passes": args.passes,
        "timing": f"triton.testing.do_bench median, warmup {opts.warmup_ms} ms, rep {opts.rep_ms} ms",
        "budget_s": args.budget_s,
        "cold_caches": not args.keep_caches,
        "flop_convention": FLOP_CONVENTION,
        "speedup": "peer ms / attnc ms (> 1: attnc is faster)",
    }
    commit = _git("rev-parse", "HEAD")
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "gpu": gpu,
        "message": None if gpu else CPU_MESSAGE,
        "device": device,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "attnc": codegen.ATTNC_VERSION,
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": now.date().isoformat(),
        "started_at": now.isoformat(timespec="seconds"),
        "finished": False,
        "runs": [
            {"started_at": now.isoformat(timespec="seconds"), "argv": sys.argv[1:] if argv is None else argv}
        ],
        "config": config,
        "codegen": [],
        "preflight": [],
        "compile": [],
        "records": [],
    }
    data["runs"][0]["git_commit"] = commit
    done: set[Any] = set()
    if args.resume and path.exists():
        data, done = resume_from(json.loads(path.read_text()), data, opts)
        print(f"resuming {path}: {len(done)} (variant, D, N) groups already measured", flush=True)
    res = Results(path, data)
    print(f"attnc benchmark on {device['name']}: torch {torch.__version__}, triton {_triton_version()}")
    print(f"results: {path}", flush=True)
    if not gpu:
        print(CPU_MESSAGE, flush=True)

    with fresh_caches(args.keep_caches) as cache:
        ops, codegen_s = run_codegen(res, args.variants, cache)
        passed = run_preflight(res, args.variants, args.dims, ops, codegen_s, gpu, not args.keep_caches)
        if gpu:
            run_timings(res, args, ops, passed, opts, start, png, done)
        run_learned(res, args.learned, cache, gpu, opts, args.seqs)

    res.data["finished"] = True
    res.data["elapsed_s"] = res.data["runs"][-1]["elapsed_s"] = time.perf_counter() - start
    res.save()
    pre = [r for r in res.data["preflight"] if r["run"] == res.run]
    failed = sum(r.get("passed") is False for r in pre)
    if gpu:
        lines = summarize(res.data)
        if lines:
            print(
                "summary (speedup = peer ms / attnc ms; targets: >= 1.0x flex, causal fwd >= 0.8x sdpa_cudnn):"
            )
            print("\n".join(lines))
        why = write_plot(res.data, png)
        print(f"plot: {png}" if why is None else f"plot: not written ({why})")
    else:
        print(CPU_MESSAGE)
    print(
        f"preflight: {sum(r.get('passed') is True for r in pre)} passed, {failed} failed, {len(pre)} checks"
    )
    print(f"results: {path} ({res.data['elapsed_s']:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
