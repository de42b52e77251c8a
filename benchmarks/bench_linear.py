#!/usr/bin/env python3
"""Benchmark attnc's linear-attention family against flash-linear-attention (`fla-core`) and against attnc's
own softmax causal kernel, on one GPU in one run (issue 4).

    python benchmarks/bench_linear.py [--quick] [--out benchmarks/results] [--variants lightning,...]
                                      [--series b1,tokens] [--seqs 512,1024,...] [--budget-s 540] [--resume]
    python benchmarks/bench_linear.py --plot-only benchmarks/results/linear-<device>-<date>.json

Variants (examples/specs/): `lightning`, `retention`, `gated_linear`, `linear_elu` (attnc's chunked Triton
kernels, algorithm="chunk") and `causal` (attnc's softmax causal kernel, the quadratic baseline). Each linear
variant is also run through its fla counterpart (`chunk_simple_gla`, `chunk_retention`, `chunk_linear_attn`)
with the same semantics: fla's own layout [B, T, H, K], feature maps applied in PyTorch inside the timed
region. Shapes: N = 512 ... 32k at B = 1, H = 16, D = E = 128, and the same N at B*N = 32k; bf16; forward
and forward+backward (gradients of q, k, v).

The delta-rule family (zoo/specs/, issue 12): `deltanet`, `gated_deltanet`, `kda` and `gla` (per-channel
gates), through the generated entry points with algorithm="chunk" where the API accepts it and "auto"
elsewhere (recorded per record), against fla's `chunk_delta_rule`, `chunk_gated_delta_rule`, `chunk_kda` and
`chunk_gla` where the installed fla has them: q, k L2-normalised for the delta rules (in PyTorch, outside the
timed region, for both), g = logsigmoid(x) / 16, beta = sigmoid(x), scale D^-0.5 on both sides. Their
preflight oracle is a float64 token-by-token recurrence written here (`recurrence64`).

Before any timing a correctness preflight checks attnc's chunked and recurrent forms against the spec's
PyTorch reference, or the delta family's against `recurrence64` (and fla against them, on a GPU); at every
benchmark shape fla's output is compared with ours before fla is timed there. Without a CUDA GPU only the preflight (Triton interpreter, float32), the
codegen timing and a check that `fla` imports run; GPU timings need a GPU.

Results go, after every measurement, to `<out>/linear-<device>-<date>.json` (written atomically), with a PNG
of time against N beside it. Helpers (results file, timing, environment) come from benchmarks/bench.py.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import inspect
import json
import math
import platform
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def _load_bench() -> ModuleType:
    """benchmarks/bench.py (the softmax-family benchmark), whose helpers this script reuses."""
    name = "attnc_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()

SCHEMA = 1
SPEC_DIR = bench.SPEC_DIR
DTYPE = torch.bfloat16
H_BENCH = 16
D_BENCH = 128  # D = E
TOKENS = 32768  # B * N of the "tokens" series
SEQS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
QUICK_SEQS = (1024, 4096, 32768)
DELTA_CPU_SHAPE = (1, 1, 72, 16)  # (B, H, N, D = E): the delta family's CPU preflight (see preflight_shape)
SERIES = ("b1", "tokens")
SERIES_TEXT = {"b1": "B = 1", "tokens": f"B*N = {TOKENS // 1024}k"}
IMPLS = ("attnc", "fla")
PASSES = bench.PASSES
RATIO_SEQS = (4096, 32768)  # time(32k) / time(4k) at B = 1
TARGET_SPEEDUP = 1.0  # fla ms / attnc ms, at every shape, on each shared variant
TARGET_RATIO = 9.0  # time(32k) / time(4k) at B = 1, attnc's linear variants
TARGETS = {
    "speedup_vs_fla_min": TARGET_SPEEDUP,
    "ratio_32k_4k_max": TARGET_RATIO,
    "text": (
        "on an H100: attnc >= 1.0x fla (fla ms / attnc ms) on each shared variant, forward and forward+backward, "
        "at every measured shape (min over shapes; the geometric mean is reported too); at B = 1, "
        "time(32k) / time(4k) <= 9 for attnc's linear variants (linear scaling: about 8; softmax: about 64)"
    ),
}
CPU_MESSAGE = (
    "No CUDA GPU found: GPU timings need a GPU. This run did the correctness preflight (attnc's chunked and "
    "recurrent Triton kernels under the Triton interpreter, float32, against the PyTorch reference; the delta "
    "family against a float64 token-by-token recurrence), the codegen timing and a check that fla imports."
)
FWD_TOL: dict[torch.dtype, float] = bench.FWD_TOL
GRAD_TOL: dict[torch.dtype, float] = bench.GRAD_TOL
GATE_TOL = FWD_TOL[DTYPE]  # attnc vs fla outputs at each benchmark shape, before fla is timed there


# ----------------------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class LinearVariant:
    name: str
    spec: str  # <spec_dir>/<spec>.attn, attention block <spec>
    linear: bool  # False: the softmax baseline
    settings: str  # auxiliary inputs, for the JSON
    fla: str | None  # the fla call with the same semantics (None: no counterpart)
    fla_op: str | None = None  # the fla function it calls (an attribute of `Fla`)
    spec_dir: str = "examples/specs"
    # A state recurrence (`state S = ...`, the delta-rule family): attnc's algorithm is "chunk" where the API
    # accepts it, else "auto"; the preflight's oracle is `recurrence64`, not the spec's reference.
    delta: bool = False
    l2norm_qk: bool = False  # q, k L2-normalised per token (PyTorch, outside the timed region, both sides)

    @property
    def path(self) -> Path:
        return bench.REPO / self.spec_dir / f"{self.spec}.attn"


VARIANTS: dict[str, LinearVariant] = {
    v.name: v
    for v in (
        LinearVariant(
            "lightning",
            "lightning",
            True,
            "elu+1 features, decay[h] = 2^(-8(h+1)/H) (ALiBi slopes, as in TransNormerLLM), causal, norm none",
            "chunk_simple_gla(elu(q)+1, elu(k)+1, v, g_gamma=-decay, scale=1.0)",
            "chunk_simple_gla",
        ),
        LinearVariant(
            "retention",
            "retention",
            True,
            "gamma[h] = 1 - 2^(-5-h) (RetNet's and fla's), scale D^-0.5",
            "chunk_retention(q, k, v) (its fixed gamma[h] = 1 - 2^(-5-h), scale K^-0.5)",
            "chunk_retention",
        ),
        LinearVariant(
            "gated_linear",
            "gated_linear",
            True,
            "g = cumsum(logsigmoid(x) / 16), x ~ N(0, 1) per (b, h, i), scale D^-0.5",
            "chunk_simple_gla(q, k, v, g=first difference of our cumulative g, scale K^-0.5)",
            "chunk_simple_gla",
        ),
        LinearVariant(
            "linear_elu",
            "linear_elu",
            True,
            "elu+1 features, norm = sum(eps = 1e-6), causal",
            "chunk_linear_attn(elu(q)+1, elu(k)+1, v, scale=1.0, normalize=True) (its eps: 1e-10)",
            "chunk_linear_attn",
        ),
        # The delta-rule family (zoo/specs/, issue 12): q, k L2-normalised for the delta rules (as the models and
        # fla's tests do), log-gates g = logsigmoid(x) / 16 (fla's tests' gate_logit_normalizer), beta = sigmoid(x),
        # x ~ N(0, 1); scale D^-0.5 on both sides (fla's default K^-0.5, passed explicitly).
        LinearVariant(
            "deltanet",
            "deltanet",
            True,
            "S = S (I - beta k k^T) + beta v k^T, o = S q D^-0.5; q, k L2-normalised, beta = sigmoid(x)",
            "chunk_delta_rule(q, k, v, beta, scale=K^-0.5) (q, k normalised by us: use_qk_l2norm_in_kernel=False)",
            "chunk_delta_rule",
            "zoo/specs",
            delta=True,
            l2norm_qk=True,
        ),
        LinearVariant(
            "gated_deltanet",
            "gated_deltanet",
            True,
            "S = S exp(g) (I - beta k k^T) + beta v k^T, g = logsigmoid(x)/16 per (b, h, i), beta = sigmoid(x); "
            "q, k L2-normalised, scale D^-0.5",
            "chunk_gated_delta_rule(q, k, v, g, beta, scale=K^-0.5) (g: log-space [B, T, H])",
            "chunk_gated_delta_rule",
            "zoo/specs",
            delta=True,
            l2norm_qk=True,
        ),
        LinearVariant(
            "kda",
            "kda",
            True,
            "S = S Diag(exp(g)) (I - beta k k^T) + beta v k^T, g = logsigmoid(x)/16 per (b, h, i, d) float32, "
            "beta = sigmoid(x); q, k L2-normalised, scale D^-0.5",
            "chunk_kda(q, k, v, g, beta, scale=K^-0.5) (g: log-space [B, T, H, K], use_gate_in_kernel=False)",
            "chunk_kda",
            "zoo/specs",
            delta=True,
            l2norm_qk=True,
        ),
        LinearVariant(
            "gla",
            "gla",
            True,
            "per-channel GLA: S = S Diag(exp(g)) + v k^T, g = logsigmoid(x)/16 per (b, h, i, d) float32, "
            "scale D^-0.5; q, k as drawn (no normalisation)",
            "chunk_gla(q, k, v, g, scale=K^-0.5) (g: log-space [B, T, H, K])",
            "chunk_gla",
            "zoo/specs",
            delta=True,
        ),
        LinearVariant(
            "causal", "causal", False, "softmax, j <= i, scale D^-0.5 (the quadratic baseline)", None
        ),
    )
}
LINEAR = tuple(n for n, v in VARIANTS.items() if v.linear)
DELTA = tuple(n for n, v in VARIANTS.items() if v.delta)
# The delta family's auxiliary inputs, in the spec's parameter order (after q, k, v).
DELTA_AUX: dict[str, tuple[str, ...]] = {
    "deltanet": ("beta",),
    "gated_deltanet": ("beta", "g"),
    "kda": ("beta", "g"),
    "gla": ("g",),
}
GATE_DIVISOR = 16.0  # g = logsigmoid(x) / 16, as fla's tests (gate_logit_normalizer)


@dataclass
class Aux:
    """One variant's auxiliary inputs at one shape: attnc's (after q, k, v) and fla's keyword arguments, both
    prepared outside the timed region."""

    extras: tuple[torch.Tensor, ...] = ()
    fla_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)


def make_aux(
    name: str,
    B: int,
    H: int,
    N: int,
    device: torch.device | str,
    *,
    seed: int = 0,
    D: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Aux:
    """D: the key width of per-channel gates (default D_BENCH); dtype: beta's (q's dtype: both sides get the
    same rounded values). Log-gates are float32 on both sides."""
    heads = torch.arange(H, dtype=torch.float32)
    if name in DELTA_AUX:
        gen = torch.Generator().manual_seed(seed)
        D = D_BENCH if D is None else D
        extras, fla_kwargs = [], {}
        for arg in DELTA_AUX[name]:
            if arg == "beta":
                t = torch.sigmoid(torch.randn(B, H, N, generator=gen)).to(dtype)
            else:
                shape = (B, H, N, D) if name in ("kda", "gla") else (B, H, N)
                t = F.logsigmoid(torch.randn(*shape, generator=gen)) / GATE_DIVISOR
            extras.append(t.to(device))
            fla_kwargs[arg] = t.transpose(1, 2).contiguous().to(device)  # fla's [B, T, H] / [B, T, H, K]
        return Aux(tuple(extras), fla_kwargs)
    if name == "lightning":
        decay = torch.exp2(-8.0 * (heads + 1) / H).to(device)
        return Aux((decay,), {"g_gamma": -decay})
    if name == "retention":
        return Aux(((1 - torch.exp2(-5.0 - heads)).to(device),))
    if name == "gated_linear":
        gen = torch.Generator().manual_seed(seed)
        step = F.logsigmoid(torch.randn(B, H, N, generator=gen, dtype=torch.float64)) / 16
        g = torch.cumsum(step, dim=-1).float()  # our input: the cumulative log-decay [B, H, N]
        # fla takes per-step log decays [B, T, H] and accumulates them itself: the first difference of ours.
        first_diff = torch.diff(g, dim=-1, prepend=torch.zeros(B, H, 1))
        return Aux((g.to(device),), {"g": first_diff.transpose(1, 2).contiguous().to(device)})
    if name in ("linear_elu", "causal"):
        return Aux()
    raise ValueError(f"unknown variant {name!r}")


# ----------------------------------------------------------------------------------------------------------
# fla


@dataclass
class Fla:
    """flash-linear-attention's ops, or why they are not there."""

    version: str | None = None
    chunk_simple_gla: Callable[..., Any] | None = None
    chunk_retention: Callable[..., Any] | None = None
    chunk_linear_attn: Callable[..., Any] | None = None
    chunk_delta_rule: Callable[..., Any] | None = None
    chunk_gated_delta_rule: Callable[..., Any] | None = None
    chunk_kda: Callable[..., Any] | None = None
    chunk_gla: Callable[..., Any] | None = None
    error: str | None = None
    missing: dict[str, str] = field(default_factory=dict)  # the ops this fla lacks, and why

    @property
    def available(self) -> bool:
        return self.error is None and self.chunk_simple_gla is not None

    def has(self, name: str) -> bool:
        """fla has variant `name`'s counterpart."""
        op = VARIANTS[name].fla_op
        return self.available and op is not None and getattr(self, op, None) is not None

    def info(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "version": self.version,
            "error": self.error,
            "missing": self.missing,
        }


# The delta family's fla ops: (module, function). Each is imported on its own, so that an fla without one
# (chunk_kda is recent) still benchmarks the others.
FLA_DELTA_OPS = (
    ("fla.ops.delta_rule", "chunk_delta_rule"),
    ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    ("fla.ops.kda", "chunk_kda"),
    ("fla.ops.gla", "chunk_gla"),
)


def load_fla() -> Fla:
    """Imports fla (pip package fla-core). Any failure (not installed, a torch/triton it does not support)
    is reported, not raised: fla's records then say `unavailable`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Triton is not supported on current platform" on CPU
            import fla
            from fla.ops.linear_attn import chunk_linear_attn
            from fla.ops.retention import chunk_retention
            from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:
        return Fla(error=f"{type(err).__name__}: {err}")
    ops: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for module, fn in FLA_DELTA_OPS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ops[fn] = getattr(importlib.import_module(module), fn)
        except Exception as err:
            missing[fn] = f"{type(err).__name__}: {err}"
    return Fla(
        version=getattr(fla, "__version__", None),
        chunk_simple_gla=chunk_simple_gla,
        chunk_retention=chunk_retention,
        chunk_linear_attn=chunk_linear_attn,
        missing=missing,
        **ops,
    )


def _seq_first(fn: Callable[..., Any]) -> dict[str, Any]:
    """head_first=False where the op still has that argument (fla < 0.3 defaulted some ops to head-first
    [B, H, T, K]); later versions take [B, T, H, K] only and have no such argument."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {"head_first": False} if "head_first" in params else {}


def elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def fla_forward(
    fla: Fla, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, aux: Aux
) -> torch.Tensor:
    """fla's counterpart of variant `name` on fla's layout: q, k [B, T, H, D], v [B, T, H, E] -> o [B, T, H, E]."""
    assert fla.chunk_simple_gla is not None and fla.chunk_retention is not None
    assert fla.chunk_linear_attn is not None
    if name == "lightning":
        return fla.chunk_simple_gla(q=elu1(q), k=elu1(k), v=v, g_gamma=aux.fla_kwargs["g_gamma"], scale=1.0)[
            0
        ]
    if name == "retention":
        return fla.chunk_retention(q, k, v)[0]
    if name == "gated_linear":
        return fla.chunk_simple_gla(q=q, k=k, v=v, g=aux.fla_kwargs["g"])[0]
    if name == "linear_elu":
        return fla.chunk_linear_attn(elu1(q), elu1(k), v, scale=1.0, normalize=True)[0]
    if name in DELTA_AUX:
        # Keywords only (argument orders differ between versions: chunk_kda(q, k, v, g, beta)); the scale
        # explicitly (fla's default K^-0.5 is ours too); q and k arrive normalised (use_qk_l2norm_in_kernel
        # stays at its default, False); the log-gates as they are (kda: use_gate_in_kernel=False, the default).
        op = getattr(fla, str(VARIANTS[name].fla_op))
        assert op is not None, f"this fla has no {VARIANTS[name].fla_op}"
        kw = {a: aux.fla_kwargs[a] for a in DELTA_AUX[name]}
        return op(q=q, k=k, v=v, **kw, scale=q.shape[-1] ** -0.5, **_seq_first(op))[0]
    raise ValueError(f"{name!r} has no fla counterpart")


def to_fla(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> fla's [B, T, H, D], contiguous."""
    return x.transpose(1, 2).contiguous()


def prepare_qk(name: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The variant's q and k as both implementations receive them: L2-normalised per token (in float32, then
    rounded to their dtype) for the delta rules, else unchanged. Done once, outside the timed region."""
    if not VARIANTS[name].l2norm_qk:
        return q, k
    return tuple(F.normalize(t.float(), p=2, dim=-1).to(t.dtype) for t in (q, k))  # type: ignore[return-value]


def delta_kwargs(name: str, extras: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """attnc's auxiliary inputs of a delta-family variant by name (beta, g)."""
    return dict(zip(DELTA_AUX[name], extras, strict=True))


def recurrence64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The preflight's oracle for the delta family, token by token in float64, written from the papers' updates
    independently of attnc's runtime: per (batch, head) a state S [E, D] (value x key channels), zero at first;
    for each token t

        S <- S Diag(exp(g_t))            (g [B, H, N]: a scalar gate; [B, H, N, D]: per key channel; None: 1)
        S <- S + beta_t (v_t - S k_t) k_t^T   (the delta rule; beta None: S + v_t k_t^T, GLA)
        o_t = scale * S q_t

    which is DeltaNet (g None), Gated DeltaNet (scalar g), KDA (per-channel g: decay, then the delta correction
    of the decayed state) and GLA (beta None). q, k, v [B, H, N, D|E]; returns o [B, H, N, E] and the final
    S [B, H, E, D], float64 and differentiable."""
    q, k, v = (t.double() for t in (q, k, v))
    B, H, N, D = q.shape
    scale = D**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, v.shape[-1], D)
    outs = []
    for t in range(N):
        kt, vt = k[:, :, t], v[:, :, t]
        if g is not None:
            a = g[:, :, t].double().exp()
            S = S * (a[..., None, None] if a.dim() == 2 else a[..., None, :])
        u = vt
        if beta is not None:
            u = beta[:, :, t].double()[..., None] * (vt - torch.einsum("bhed,bhd->bhe", S, kt))
        S = S + u[..., :, None] * kt[..., None, :]
        outs.append(scale * torch.einsum("bhed,bhd->bhe", S, q[:, :, t]))
    return torch.stack(outs, dim=2), S


# ----------------------------------------------------------------------------------------------------------
# Shapes and the analysis of the records


def plan_shapes(seqs: list[int], series: list[str]) -> list[tuple[int, int]]:
    """(B, N) in measuring order: the B = 1 series first (the targets' shapes), then B*N = TOKENS; a shape
    in both series (N = TOKENS at B = 1) is measured once. N that do not divide TOKENS have no B*N shape."""
    shapes: list[tuple[int, int]] = []
    for s in SERIES:
        if s not in series:
            continue
        for N in sorted(seqs):
            if s == "b1":
                shape = (1, N)
            elif TOKENS % N == 0:
                shape = (TOKENS // N, N)
            else:
                continue
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def in_series(s: str, B: int, N: int) -> bool:
    return B == 1 if s == "b1" else B * N == TOKENS


def _ms_table(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, int, int], float]:
    """(variant, impl, pass, B, N) -> ms, the last ok record winning (a resumed run's)."""
    return {
        (r["variant"], r["impl"], r["pass"], r["B"], r["N"]): float(r["ms"])
        for r in records
        if r.get("status") == "ok" and isinstance(r.get("ms"), int | float)
    }


def crossover(points: list[tuple[int, float, float]]) -> dict[str, Any]:
    """points: (N, linear ms, softmax ms). The crossover is the smallest measured N from which the linear form
    is faster at that N and at every larger measured N; None when it is not faster at the largest N."""
    pts = sorted(points)
    if not pts:
        return {"crossover_n": None, "note": "no common measurements"}
    faster = [n for n, lin, soft in pts if lin < soft]
    cross = None
    for n, lin, soft in reversed(pts):
        if lin < soft:
            cross = n
        else:
            break
    if cross is None:
        note = f"softmax faster up to the largest N measured ({pts[-1][0]})"
    elif cross == pts[0][0]:
        note = f"linear faster at every N measured (from {cross})"
    else:
        note = f"linear faster from N = {cross}"
    return {
        "crossover_n": cross,
        "linear_faster_at": faster,
        "seqs": [n for n, _, _ in pts],
        "ratio_softmax_over_linear": {str(n): soft / lin for n, lin, soft in pts},
        "note": note,
    }


def analyse(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the issue asks for, from the records: attnc's speedup over fla per shared variant and pass, the
    crossover N where each linear implementation beats attnc's softmax causal (per series and pass), and the
    ratio time(32k) / time(4k) at B = 1, with the targets met or not."""
    ms = _ms_table(records)
    shapes = sorted({(k[3], k[4]) for k in ms})
    passes = [p for p in PASSES if any(k[2] == p for k in ms)]
    out: dict[str, Any] = {"speedup_vs_fla": {}, "crossover_vs_softmax": {}, "ratio_32k_over_4k_b1": {}}
    for name in LINEAR:
        for p in passes:
            pairs = [
                (B, N, ms[(name, "fla", p, B, N)] / ms[(name, "attnc", p, B, N)])
                for B, N in shapes
                if (name, "fla", p, B, N) in ms and (name, "attnc", p, B, N) in ms
            ]
            if not pairs:
                continue
            sp = [s for _, _, s in pairs]
            out["speedup_vs_fla"].setdefault(name, {})[p] = {
                "min": min(sp),
                "geomean": math.exp(sum(math.log(s) for s in sp) / len(sp)),
                "by_shape": {f"B={B},N={N}": s for B, N, s in pairs},
                "below_target": [f"B={B},N={N}" for B, N, s in pairs if s < TARGET_SPEEDUP],
                "target_met": min(sp) >= TARGET_SPEEDUP,
            }
    for s in SERIES:
        for name in LINEAR:
            for impl in IMPLS:
                for p in passes:
                    pts = [
                        (N, ms[(name, impl, p, B, N)], ms[("causal", "attnc", p, B, N)])
                        for B, N in shapes
                        if in_series(s, B, N)
                        and (name, impl, p, B, N) in ms
                        and ("causal", "attnc", p, B, N) in ms
                    ]
                    if pts:
                        c = out["crossover_vs_softmax"].setdefault(s, {}).setdefault(name, {})
                        c.setdefault(impl, {})[p] = crossover(pts)
    lo, hi = RATIO_SEQS
    for name in VARIANTS:
        for impl in IMPLS:
            for p in passes:
                a, b = ms.get((name, impl, p, 1, lo)), ms.get((name, impl, p, 1, hi))
                if a is None or b is None:
                    continue
                entry: dict[str, Any] = {"ratio": b / a, "ms_4k": a, "ms_32k": b}
                if VARIANTS[name].linear and impl == "attnc":
                    entry["target_met"] = b / a <= TARGET_RATIO
                out["ratio_32k_over_4k_b1"].setdefault(name, {}).setdefault(impl, {})[p] = entry
    return out


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The analysis as text, one line per (variant, pass)."""
    lines = []
    for name in VARIANTS:
        for p in PASSES:
            parts = []
            sp = summary.get("speedup_vs_fla", {}).get(name, {}).get(p)
            if sp:
                met = "met" if sp["target_met"] else "NOT met"
                parts.append(f"vs fla min {sp['min']:.2f}x geomean {sp['geomean']:.2f}x ({met})")
            for impl in IMPLS:
                r = summary.get("ratio_32k_over_4k_b1", {}).get(name, {}).get(impl, {}).get(p)
                if r:
                    met = "" if "target_met" not in r else (" met" if r["target_met"] else " NOT met")
                    parts.append(f"{impl} 32k/4k {r['ratio']:.1f}{met}")
            for s in SERIES:
                c = summary.get("crossover_vs_softmax", {}).get(s, {}).get(name, {}).get("attnc", {}).get(p)
                if c:
                    n = c["crossover_n"]
                    parts.append(f"crossover ({SERIES_TEXT[s]}) {'none' if n is None else f'N={n}'}")
            if parts:
                lines.append(f"  {name:<13} {p:<8} " + "; ".join(parts))
    return lines


# ----------------------------------------------------------------------------------------------------------
# Correctness preflight


def _errs(
    o: torch.Tensor, grads: list[torch.Tensor | None], o_ref: torch.Tensor, ref_grads: list[torch.Tensor]
) -> dict[str, float]:
    errs = {"o": bench.rel_err(o, o_ref)}
    for n, g, r in zip("qkv", grads, ref_grads, strict=True):
        errs[f"d{n}"] = bench.rel_err(g, r) if g is not None else math.inf
    return errs


def _passed(errs: dict[str, float], dtype: torch.dtype) -> bool:
    return all(e <= (GRAD_TOL[dtype] if n.startswith("d") else FWD_TOL[dtype]) for n, e in errs.items())


def preflight_variant(
    res: Any, name: str, op: Callable[..., Any], fla: Fla, *, gpu: bool, B: int, H: int, N: int, D: int
) -> bool:
    """attnc's chunked and recurrent forms (output, gradients of q, k, v; the final states against each other)
    and, on a GPU, fla's counterpart, against the spec's PyTorch reference (quadratic) in float32 on the same
    rounded inputs. The softmax baseline: its Triton kernels against the reference. Returns whether attnc
    passed (fla failing only keeps fla from being timed)."""
    variant = VARIANTS[name]
    device = torch.device("cuda" if gpu else "cpu")
    dtype = DTYPE if gpu else torch.float32
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{B}-{H}-{N}-{D}".encode()))
    q0, k0, v0, do0 = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(4))
    aux = make_aux(name, B, H, N, device, seed=1)
    base = {"variant": name, "B": B, "H": H, "N": N, "D": D, "dtype": str(dtype).replace("torch.", "")}
    tol = {"fwd": FWD_TOL[dtype], "grad": GRAD_TOL[dtype]}

    ref_leaves = [t.detach().float().clone().requires_grad_() for t in (q0, k0, v0)]
    o_ref = op(*ref_leaves, *aux.extras, backend="reference")
    o_ref.backward(do0.float())
    ref_grads = [t.grad for t in ref_leaves]

    algorithms: list[str | None] = ["chunk", "recurrent"] if variant.linear else [None]
    ok = True
    states: dict[str, torch.Tensor] = {}
    for alg in algorithms:
        impl = "attnc" if alg is None else f"attnc_{alg}"
        rec: dict[str, Any] = {**base, "impl": impl, "vs": "reference", "tol": tol}
        try:
            leaves = [t.detach().clone().requires_grad_() for t in (q0, k0, v0)]

            def fwd(leaves: list[torch.Tensor] = leaves, alg: str | None = alg) -> Any:
                if alg is None:
                    return op(*leaves, *aux.extras, backend="triton")
                return op(*leaves, *aux.extras, backend="triton", algorithm=alg, return_state=True)

            out, first_fwd = bench._timed(fwd, gpu)
            o = out if alg is None else out[0]
            if alg is not None:
                states[alg] = out[1]
            _, first_bwd = bench._timed(lambda o=o: o.backward(do0), gpu)
            errs = _errs(o, [t.grad for t in leaves], o_ref, ref_grads)
            passed = _passed(errs, dtype)
            # On a GPU the first launch compiles the kernels (cold Triton cache); on CPU: interpreter time.
            rec.update(
                status="pass" if passed else "fail",
                passed=passed,
                max_rel_err=errs,
                first_fwd_s=first_fwd,
                first_bwd_s=first_bwd,
            )
        except Exception as err:
            rec.update(status="error", passed=False, error=f"{type(err).__name__}: {str(err)[:500]}")
        ok = ok and bool(rec["passed"])
        _print_preflight(res.add("preflight", rec))
    if len(states) == 2:
        err = bench.rel_err(states["chunk"], states["recurrent"])
        passed = err <= FWD_TOL[dtype]
        rec = {**base, "impl": "attnc_chunk", "vs": "attnc_recurrent", "what": "final state", "tol": tol}
        rec.update(status="pass" if passed else "fail", passed=passed, max_rel_err={"state": err})
        ok = ok and passed
        _print_preflight(res.add("preflight", rec))

    if variant.linear and gpu:
        rec = {**base, "impl": "fla", "vs": "reference", "tol": tol, "call": variant.fla}
        _fla_check(rec, fla, name, variant, (q0, k0, v0), aux, do0, o_ref, ref_grads, dtype)
        _print_preflight(res.add("preflight", rec))
    return ok


def _fla_check(
    rec: dict[str, Any],
    fla: Fla,
    name: str,
    variant: LinearVariant,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    aux: Aux,
    do0: torch.Tensor,
    o_ref: torch.Tensor,
    ref_grads: list[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """fla's forward and backward on the preflight's inputs against the oracle's, recorded in `rec` (status
    unavailable when fla-core or the op is missing, error when it raises)."""
    if not fla.has(name):
        why = fla.error or fla.missing.get(str(variant.fla_op), f"no {variant.fla_op}")
        rec.update(status="unavailable", passed=None, error=why)
        return
    try:
        leaves = [t.detach().clone().requires_grad_() for t in qkv]
        o = fla_forward(fla, name, *(to_fla(t) for t in leaves), aux).transpose(1, 2)
        o.backward(do0)
        errs = _errs(o, [t.grad for t in leaves], o_ref, ref_grads)
        passed = _passed(errs, dtype)
        rec.update(status="pass" if passed else "fail", passed=passed, max_rel_err=errs)
    except Exception as err:
        rec.update(status="error", passed=False, error=f"{type(err).__name__}: {str(err)[:500]}")


def _chunk_refused(err: Exception) -> bool:
    """The delta runtime's refusal of algorithm="chunk" (per-channel gates, today) — a ValueError naming the
    algorithm — as opposed to a failure of the kernels."""
    return isinstance(err, ValueError) and "algorithm='chunk'" in str(err)


def preflight_delta(
    res: Any, name: str, op: Callable[..., Any], fla: Fla, *, gpu: bool, B: int, H: int, N: int, D: int
) -> tuple[bool, str]:
    """A delta-family variant against `recurrence64` (float64, on the same rounded inputs): attnc's output,
    gradients of q, k, v and final state with algorithm="chunk", or "auto" where the API refuses "chunk" (the
    refusal is recorded); on a GPU also "recurrent", and fla's output and gradients. Returns (attnc passed,
    the algorithm to time)."""
    variant = VARIANTS[name]
    device = torch.device("cuda" if gpu else "cpu")
    dtype = DTYPE if gpu else torch.float32
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{B}-{H}-{N}-{D}".encode()))
    q0, k0, v0, do0 = (torch.randn(B, H, N, D, generator=gen).to(device, dtype) for _ in range(4))
    q0, k0 = prepare_qk(name, q0, k0)
    aux = make_aux(name, B, H, N, device, seed=1, D=D, dtype=dtype)
    base = {"variant": name, "B": B, "H": H, "N": N, "D": D, "dtype": str(dtype).replace("torch.", "")}
    tol = {"fwd": FWD_TOL[dtype], "grad": GRAD_TOL[dtype]}

    ref_leaves = [t.detach().double().requires_grad_() for t in (q0, k0, v0)]
    o_ref, s_ref = recurrence64(*ref_leaves, **delta_kwargs(name, aux.extras))
    o_ref.backward(do0.double())
    ref_grads = [t.grad for t in ref_leaves]
    assert all(t is not None for t in ref_grads)

    ok = True
    chosen = "chunk"
    algorithms = ["chunk", "recurrent"] if gpu else ["chunk"]
    while algorithms:
        alg = algorithms.pop(0)
        rec: dict[str, Any] = {**base, "impl": f"attnc_{alg}", "vs": "recurrence64", "tol": tol}
        try:
            leaves = [t.detach().clone().requires_grad_() for t in (q0, k0, v0)]

            def fwd(leaves: list[torch.Tensor] = leaves, alg: str = alg) -> Any:
                return op(*leaves, *aux.extras, backend="triton", algorithm=alg, return_state=True)

            (o, state), first_fwd = bench._timed(fwd, gpu)
            _, first_bwd = bench._timed(lambda o=o: o.backward(do0), gpu)
            errs = _errs(o, [t.grad for t in leaves], o_ref, ref_grads)
            errs["state"] = bench.rel_err(state, s_ref)
            passed = _passed(errs, dtype)
            rec.update(
                status="pass" if passed else "fail",
                passed=passed,
                max_rel_err=errs,
                first_fwd_s=first_fwd,
                first_bwd_s=first_bwd,
            )
        except Exception as err:
            if alg == "chunk" and _chunk_refused(err):
                # Not a failure: this API has no chunked form for the variant yet; "auto" picks what it has.
                rec.update(status="unsupported", passed=None, error=f"{type(err).__name__}: {str(err)[:500]}")
                _print_preflight(res.add("preflight", rec))
                chosen = "auto"
                algorithms.insert(0, "auto")
                continue
            rec.update(status="error", passed=False, error=f"{type(err).__name__}: {str(err)[:500]}")
        ok = ok and bool(rec["passed"])
        _print_preflight(res.add("preflight", rec))

    if gpu:
        rec = {**base, "impl": "fla", "vs": "recurrence64", "tol": tol, "call": variant.fla}
        _fla_check(rec, fla, name, variant, (q0, k0, v0), aux, do0, o_ref, ref_grads, dtype)
        _print_preflight(res.add("preflight", rec))
    return ok, chosen


def _print_preflight(r: dict[str, Any]) -> None:
    errs = " ".join(f"{k}={v:.1e}" for k, v in r.get("max_rel_err", {}).items())
    vs = "" if r.get("vs") == "reference" else f"vs {r['vs']} "
    print(
        f"  preflight {r['variant']:<13} {r['impl']:<16} {r['status']:<11} {vs}{errs or r.get('error', '')}",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------
# Timing (GPU only)


@dataclass
class Context:
    """What the timing loop needs besides the shape."""

    ops: dict[str, Callable[..., Any]]
    fla: Fla
    fla_ok: dict[str, bool]  # variant -> fla passed the preflight
    attnc_ok: dict[str, bool]  # variant -> attnc passed the preflight
    opts: Any  # bench.BenchOptions
    variants: list[str]
    budget_s: float
    start: float
    device: str = "cuda"
    algorithms: dict[str, str] = field(default_factory=dict)  # delta family: the preflight's choice

    def algorithm(self, name: str) -> str:
        """attnc's algorithm for a linear variant: "chunk"; the delta family: "chunk" where the preflight found
        the API accepts it, else "auto" (also without a preflight)."""
        return self.algorithms.get(name, "auto") if VARIANTS[name].delta else "chunk"


def _base(name: str, B: int, N: int) -> dict[str, Any]:
    return {
        "variant": name,
        "B": B,
        "H": H_BENCH,
        "N": N,
        "D": D_BENCH,
        "E": D_BENCH,
        "dtype": str(DTYPE)[6:],
    }


def bench_shape(res: Any, ctx: Context, B: int, N: int) -> bool:
    """Every variant, implementation and pass at one shape; one record per measurement. Returns whether the
    shape is complete (not cut off by the budget)."""
    H, D = H_BENCH, D_BENCH
    device = torch.device(ctx.device)
    g = torch.Generator(device=device).manual_seed(zlib.crc32(f"linear-{B}-{N}".encode()))
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g, device=device, dtype=DTYPE) for _ in range(4))
    fq, fk, fv, fdout = (to_fla(t) for t in (q, k, v, dout))
    complete = True
    for name in ctx.variants:
        variant = VARIANTS[name]
        base = _base(name, B, N)
        if time.perf_counter() - ctx.start > ctx.budget_s:
            res.add(
                "records", {**base, "status": "skipped", "error": f"time budget ({ctx.budget_s:.0f} s) spent"}
            )
            print(f"  {name:<13} B={B:<3} N={N:<6} skipped: time budget spent", flush=True)
            complete = False
            continue
        if not ctx.attnc_ok.get(name, False):
            res.add("records", {**base, "status": "skipped", "error": "attnc failed the preflight"})
            print(f"  {name:<13} B={B:<3} N={N:<6} skipped: attnc failed the preflight", flush=True)
            continue
        aux = make_aux(name, B, H, N, device, seed=zlib.crc32(f"aux-{B}-{N}".encode()), D=D, dtype=DTYPE)
        op = ctx.ops[name]
        # The variant's q and k (normalised for the delta rules), made here, outside the timed region.
        vq, vk = prepare_qk(name, q, k)
        vfq, vfk = (fq, fk) if vq is q else (to_fla(vq), to_fla(vk))
        alg = ctx.algorithm(name) if variant.linear else None
        impls: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        if variant.linear:
            impls["attnc"] = (
                lambda q, k, v, op=op, aux=aux, alg=alg: op(
                    q, k, v, *aux.extras, backend="triton", algorithm=alg
                ),
                (vq, vk, v, dout),
            )
        else:
            impls["attnc"] = (lambda q, k, v, op=op: op(q, k, v, backend="triton"), (q, k, v, dout))
        na: dict[str, tuple[str, str]] = {}
        gate: float | None = None
        if "fla" in ctx.opts.impls:
            if not variant.linear:
                na["fla"] = ("n/a", "no fla counterpart: the softmax baseline")
            elif not ctx.fla.available:
                na["fla"] = ("unavailable", f"fla does not import: {ctx.fla.error}")
            elif not ctx.fla.has(name):
                why = ctx.fla.missing.get(str(variant.fla_op), "")
                na["fla"] = ("unavailable", f"this fla has no {variant.fla_op}: {why}")
            elif not ctx.fla_ok.get(name, False):
                na["fla"] = ("skipped", "fla failed the preflight")
            else:

                def fla_fn(
                    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str = name, aux: Aux = aux
                ) -> Any:
                    return fla_forward(ctx.fla, name, q, k, v, aux)

                # The gate: fla's output against ours at this very shape, before fla is timed here.
                ours_o: torch.Tensor | None = None
                try:
                    with torch.no_grad():
                        ours_o = impls["attnc"][0](vq, vk, v)
                        gate = bench.rel_err(fla_fn(vfq, vfk, fv).transpose(1, 2), ours_o)
                except Exception as err:
                    who = "fla" if ours_o is not None else "attnc (so fla is not compared)"
                    na["fla"] = ("error", f"{who}: {type(err).__name__}: {str(err)[:500]}")
                else:
                    if gate <= GATE_TOL:
                        impls["fla"] = (fla_fn, (vfq, vfk, fv, fdout))
                    else:
                        na["fla"] = ("mismatch", f"max rel diff vs attnc {gate:.2e} > {GATE_TOL:.0e}")
                        print(
                            f"  WARNING: {name} B={B} N={N}: fla and attnc differ by {gate:.2e}", flush=True
                        )
        for pass_ in ctx.opts.passes:
            backward = pass_ == "fwd+bwd"
            ms: dict[str, float] = {}
            ours: dict[str, Any] | None = None
            for impl, (fn, tensors) in impls.items():
                rec = {**base, "impl": impl, "pass": pass_}
                if impl == "attnc" and variant.linear:
                    rec["algorithm"] = alg
                if gate is not None:
                    rec["max_rel_diff_attnc_vs_fla"] = gate
                try:
                    rec.update(bench._measure(fn, *tensors, backward, ctx.opts))
                    ms[impl] = rec["ms"]
                except Exception as err:
                    rec.update(status="error", error=f"{type(err).__name__}: {str(err)[:500]}")
                    if isinstance(err, torch.cuda.OutOfMemoryError):
                        torch.cuda.empty_cache()
                if impl == "attnc":
                    ours = rec
                _print_record(res.add("records", rec))
            for impl, (status, why) in na.items():
                res.add("records", {**base, "impl": impl, "pass": pass_, "status": status, "error": why})
            if ours is not None and "ms" in ours and "fla" in ms:
                ours["speedup_vs_fla"] = ms["fla"] / ours["ms"]  # > 1: attnc is faster
                res.save()
    return complete


def _print_record(r: dict[str, Any]) -> None:
    head = f"  {r['variant']:<13} B={r['B']:<3} N={r['N']:<6} {r['pass']:<8} {r['impl']:<6}"
    if r.get("status") != "ok":
        print(f"{head} {r.get('status')}: {r.get('error', '')}", flush=True)
        return
    print(
        f"{head} {r['ms']:9.3f} ms  peak {r['peak_mib']:8.1f} MiB  first call {r['first_call_s']:6.2f} s",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------
# Plot


COLORS = {"attnc": "tab:red", "fla": "tab:blue"}
STYLES = {"attnc": "-", "fla": "--"}


def write_plot(data: dict[str, Any], png: Path) -> str | None:
    """Time against N (log-log): a column per linear variant, a row per (series, pass); attnc solid, fla
    dashed, attnc's softmax causal dotted grey. Returns why no plot was written, or None."""
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
    ms = _ms_table(records)
    variants = [n for n in LINEAR if any(k[0] == n for k in ms)]
    if not variants:
        return "no linear-variant timings to plot"
    rows = [
        (s, p)
        for s in SERIES
        for p in PASSES
        if any(k[2] == p and in_series(s, k[3], k[4]) and k[0] in variants for k in ms)
    ]
    seqs = sorted({k[4] for k in ms})
    fig, axes = plt.subplots(
        len(rows), len(variants), figsize=(3.4 * len(variants), 2.8 * len(rows) + 0.9), squeeze=False
    )

    def line(ax: Any, name: str, impl: str, p: str, s: str, **style: Any) -> None:
        pts = sorted(
            (N, t)
            for (n, i, pp, B, N), t in ms.items()
            if (n, i, pp) == (name, impl, p) and in_series(s, B, N)
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, **style)

    for r, (s, p) in enumerate(rows):
        for c, name in enumerate(variants):
            ax = axes[r][c]
            line(ax, "causal", "attnc", p, s, color="0.45", linestyle=":")
            for impl in IMPLS:
                line(ax, name, impl, p, s, color=COLORS[impl], linestyle=STYLES[impl])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlim(min(seqs) / 1.3, max(seqs) * 1.3)
            ax.set_xticks(seqs, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in seqs])
            ax.minorticks_off()
            ax.set_title(f"{name}, {SERIES_TEXT[s]}, {p}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.tick_params(labelsize=8)
            if c == 0:
                ax.set_ylabel("ms", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("N", fontsize=8)
    handles = [
        Line2D([], [], color=COLORS["attnc"], linestyle="-", label="attnc (chunk, or auto)"),
        Line2D([], [], color=COLORS["fla"], linestyle="--", label="fla (chunk)"),
        Line2D([], [], color="0.45", linestyle=":", label="attnc softmax causal"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    device = data.get("device", {}).get("name", "?")
    fig.suptitle(
        f"attnc linear family vs fla and softmax causal on {device}, {data.get('date', '?')}\n"
        f"bf16, H = {H_BENCH}, D = E = {D_BENCH}; time per call (do_bench median), log-log",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.93))
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return None


# ----------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark attnc's linear family against fla and softmax causal (see benchmarks/README.md)."
    )
    p.add_argument(
        "--quick", action="store_true", help="B = 1 only, N in {1k, 4k, 32k}, shorter timing (a smoke run)"
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument(
        "--variants", type=bench._name_list(tuple(VARIANTS)), help=f"default: {','.join(VARIANTS)}"
    )
    p.add_argument(
        "--series", type=bench._name_list(SERIES), help="b1 (B = 1), tokens (B*N = 32k); default both"
    )
    p.add_argument(
        "--seqs", type=bench._int_list, help=f"sequence lengths (default {','.join(map(str, SEQS))})"
    )
    p.add_argument("--impls", type=bench._name_list(IMPLS), default=list(IMPLS), help="default: attnc,fla")
    p.add_argument(
        "--passes", type=bench._name_list(PASSES), default=list(PASSES), help="default: fwd,fwd+bwd"
    )
    p.add_argument(
        "--budget-s", type=float, default=540.0, help="stop starting new measurements after this many seconds"
    )
    p.add_argument(
        "--keep-caches", action="store_true", help="use the existing Triton cache (warm first calls)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the results file of the same date and device"
    )
    p.add_argument(
        "--plot-only", type=Path, metavar="JSON", help="redraw the PNG of an existing results file"
    )
    args = p.parse_args(argv)
    args.variants = args.variants or list(VARIANTS)
    args.series = args.series or (["b1"] if args.quick else list(SERIES))
    args.seqs = args.seqs or list(QUICK_SEQS if args.quick else SEQS)
    if "attnc" not in args.impls:
        p.error("--impls: attnc is always measured (the others are compared with it)")
    return args


def resume_from(
    old: dict[str, Any], new: dict[str, Any], wanted: set[tuple[str, str, str]]
) -> tuple[dict[str, Any], set[tuple[int, int]]]:
    """Continue an earlier (cut-off) run's results file: keep its complete shapes (B, N) — those whose
    `completed` entry covers every wanted (variant, impl, pass) — which are not measured again, and drop the
    records of the others. Returns the merged data and the done shapes."""
    for key in ("torch", "triton"):
        if old.get(key) != new.get(key):
            raise SystemExit(
                f"--resume: {key} {new.get(key)} != {old.get(key)} in the results file; use another --out"
            )
    if old.get("device", {}).get("name") != new["device"]["name"]:
        raise SystemExit("--resume: the results file was written on another device; use another --out")
    if old.get("fla", {}).get("version") != new.get("fla", {}).get("version"):
        raise SystemExit("--resume: another fla version wrote the results file; use another --out")
    done = {
        (c["B"], c["N"])
        for c in old.get("completed", [])
        if wanted <= {tuple(x) for x in c.get("measured", [])}
    }
    data = {
        **old,
        **{k: v for k, v in new.items() if k not in ("codegen", "preflight", "records", "completed")},
    }
    data["runs"] = [*old.get("runs", []), *new["runs"]]
    config = dict(new["config"])
    for key in ("variants", "series", "seqs"):
        config[key] = [
            *old.get("config", {}).get(key, []),
            *(x for x in new["config"][key] if x not in old.get("config", {}).get(key, [])),
        ]
    data["config"] = config
    data["records"] = [
        r for r in old.get("records", []) if (r["B"], r["N"]) in done and r.get("status") != "skipped"
    ]
    data["completed"] = [c for c in old.get("completed", []) if (c["B"], c["N"]) in done]
    for key in ("codegen", "preflight"):
        data[key] = list(old.get(key, []))
    return data, done


def run_codegen(res: Any, variants: list[str], cache: Path) -> dict[str, Callable[..., Any]]:
    """Spec -> imported module with an empty attnc cache, timed."""
    codegen = bench._import_codegen()
    ops: dict[str, Callable[..., Any]] = {}
    print("codegen (spec -> imported module, empty cache):", flush=True)
    for name in variants:
        v = VARIANTS[name]
        t0 = time.perf_counter()
        mod = codegen.compile_file(v.path, cache_dir=cache / "attnc")
        seconds = time.perf_counter() - t0
        ops[name] = getattr(mod, v.spec)
        res.add("codegen", {"variant": name, "spec": f"{v.spec_dir}/{v.spec}.attn", "codegen_s": seconds})
        print(f"  {name:<13} {seconds * 1e3:8.1f} ms", flush=True)
    return ops


def preflight_shape(name: str, gpu: bool) -> tuple[int, int, int, int]:
    """(B, H, N, D = E) of a variant's preflight. On a GPU: B=2, H=4, N=1000 (ragged: not a multiple of the
    chunk), D=E=128, bf16. On CPU (float32, Triton interpreter): B=1, H=2, N=80, D=E=32; the delta family
    B=1, H=1, N=72 (ragged for chunks of 16, 32 and 64), D=E=16 (its backward is slow under the interpreter)."""
    if gpu:
        return 2, 4, 1000, D_BENCH
    return DELTA_CPU_SHAPE if VARIANTS[name].delta else (1, 2, 80, 32)


def run_preflight(
    res: Any, variants: list[str], ops: dict[str, Callable[..., Any]], fla: Fla, gpu: bool
) -> tuple[dict[str, bool], dict[str, bool], dict[str, str]]:
    """Every variant's preflight (`preflight_shape`). Returns (attnc passed, fla passed, attnc's algorithm for
    the delta family) per variant."""
    print(
        "preflight (max |err| / max(1, max |expected|), expected = the spec's reference in float32, or for the "
        "delta family the float64 recurrence):",
        flush=True,
    )
    attnc_ok: dict[str, bool] = {}
    algorithms: dict[str, str] = {}
    for name in variants:
        B, H, N, D = preflight_shape(name, gpu)
        if VARIANTS[name].delta:
            attnc_ok[name], algorithms[name] = preflight_delta(
                res, name, ops[name], fla, gpu=gpu, B=B, H=H, N=N, D=D
            )
        else:
            attnc_ok[name] = preflight_variant(res, name, ops[name], fla, gpu=gpu, B=B, H=H, N=N, D=D)
    fla_ok = {
        r["variant"]: bool(r.get("passed"))
        for r in res.data["preflight"]
        if r["run"] == res.run and r["impl"] == "fla"
    }
    return attnc_ok, fla_ok, algorithms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only is not None:
        data = json.loads(args.plot_only.read_text())
        png = args.plot_only.with_suffix(".png")
        why = write_plot(data, png)
        print(f"plot: {why}" if why else f"plot: {png}")
        return 0 if why is None else 1

    start = time.perf_counter()
    gpu = bench.cuda_available()
    device = bench.device_info(gpu)
    now = dt.datetime.now(dt.timezone.utc)
    path = args.out / f"linear-{device['slug']}-{now:%Y-%m-%d}.json"
    png = path.with_suffix(".png")
    opts = bench.BenchOptions(
        warmup_ms=10 if args.quick else 25,
        rep_ms=40 if args.quick else 100,
        impls=tuple(args.impls),
        passes=tuple(args.passes),
    )
    fla = load_fla()
    codegen = bench._import_codegen()
    commit = bench._git("rev-parse", "HEAD")
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "benchmark": "linear family (issue 4)",
        "gpu": gpu,
        "message": None if gpu else CPU_MESSAGE,
        "device": device,
        "torch": torch.__version__,
        "triton": bench._triton_version(),
        "fla": fla.info(),
        "python": platform.python_version(),
        "attnc": codegen.ATTNC_VERSION,
        "git_commit": commit,
        "git_dirty": bool(bench._git("status", "--porcelain", "--untracked-files=no")),
        "date": now.date().isoformat(),
        "started_at": now.isoformat(timespec="seconds"),
        "finished": False,
        "runs": [
            {
                "started_at": now.isoformat(timespec="seconds"),
                "argv": sys.argv[1:] if argv is None else argv,
                "git_commit": commit,
            }
        ],
        "config": {
            "quick": args.quick,
            "variants": args.variants,
            "variant_settings": {n: VARIANTS[n].settings for n in args.variants},
            "fla_calls": {n: VARIANTS[n].fla for n in args.variants if VARIANTS[n].fla},
            "series": args.series,
            "seqs": args.seqs,
            "shapes": [list(s) for s in plan_shapes(args.seqs, args.series)],
            "H": H_BENCH,
            "D": D_BENCH,
            "E": D_BENCH,
            "tokens_B_times_N": TOKENS,
            "dtype": "bfloat16" if gpu else "float32 (preflight only)",
            "impls": args.impls,
            "passes": args.passes,
            "attnc_algorithm": "chunk (softmax causal: its fused kernels); the delta family: chunk where the API "
            "accepts it, else auto (per variant in attnc_algorithms and in each record's `algorithm`)",
            "timing": f"triton.testing.do_bench median, warmup {opts.warmup_ms} ms, rep {opts.rep_ms} ms; "
            "fla's layout [B, T, H, K] prepared outside the timed region, feature maps inside it; the delta "
            "rules' L2-normalised q, k made outside it for both",
            "gate": f"fla timed at a shape only if max |o_fla - o_attnc| / max(1, max |o_attnc|) <= {GATE_TOL}",
            "budget_s": args.budget_s,
            "cold_caches": not args.keep_caches,
            "targets": TARGETS,
            "speedup": "fla ms / attnc ms (> 1: attnc is faster)",
        },
        "codegen": [],
        "preflight": [],
        "records": [],
        "completed": [],
        "summary": {},
    }
    wanted = {
        (n, i, p)
        for n in args.variants
        for i in args.impls
        for p in args.passes
        if i == "attnc" or (VARIANTS[n].linear and fla.has(n))
    }
    done: set[tuple[int, int]] = set()
    if args.resume and path.exists():
        data, done = resume_from(json.loads(path.read_text()), data, wanted)
        print(f"resuming {path}: {len(done)} shapes already measured", flush=True)
    res = bench.Results(path, data)
    print(
        f"attnc linear-family benchmark on {device['name']}: torch {torch.__version__}, triton {data['triton']}"
    )
    print(
        f"fla: {'importable, version ' + str(fla.version) if fla.available else 'not importable: ' + str(fla.error)}"
    )
    print(f"results: {path}", flush=True)
    if not gpu:
        print(CPU_MESSAGE, flush=True)

    with bench.fresh_caches(args.keep_caches) as cache:
        ops = run_codegen(res, args.variants, cache)
        attnc_ok, fla_ok, algorithms = run_preflight(res, args.variants, ops, fla, gpu)
        res.data["config"]["attnc_algorithms"] = {
            n: algorithms.get(n, "chunk") for n in args.variants if VARIANTS[n].linear
        }
        res.save()
        if gpu:
            ctx = Context(
                ops, fla, fla_ok, attnc_ok, opts, args.variants, args.budget_s, start, algorithms=algorithms
            )
            print("timings (bf16, ms = do_bench median):", flush=True)
            for B, N in plan_shapes(args.seqs, args.series):
                if (B, N) in done:
                    print(f"  B={B:<3} N={N:<6} measured by an earlier run (--resume)", flush=True)
                    continue
                if bench_shape(res, ctx, B, N):
                    res.add("completed", {"B": B, "N": N, "measured": sorted(wanted)})
                res.data["summary"] = analyse(res.data["records"])
                res.save()
                torch.cuda.empty_cache()
                write_plot(res.data, png)

    res.data["summary"] = analyse(res.data["records"])
    res.data["finished"] = True
    res.data["elapsed_s"] = res.data["runs"][-1]["elapsed_s"] = time.perf_counter() - start
    res.save()
    pre = [r for r in res.data["preflight"] if r["run"] == res.run]
    failed = sum(r.get("passed") is False for r in pre)
    mismatched = [r for r in res.data["records"] if r.get("run") == res.run and r.get("status") == "mismatch"]
    if gpu:
        lines = summary_lines(res.data["summary"])
        if lines:
            print(
                "summary (speedup = fla ms / attnc ms; targets on an H100: >= 1.0x fla at every shape, "
                "32k/4k <= 9 at B = 1; crossover: smallest N from which linear beats softmax causal):"
            )
            print("\n".join(lines))
        why = write_plot(res.data, png)
        print(f"plot: {png}" if why is None else f"plot: not written ({why})")
    else:
        print(CPU_MESSAGE)
        print(f"fla: {'importable' if fla.available else 'not importable'} (its kernels need a GPU)")
    print(
        f"preflight: {sum(r.get('passed') is True for r in pre)} passed, {failed} failed, {len(pre)} checks"
    )
    print(f"results: {path} ({res.data['elapsed_s']:.1f} s)", flush=True)
    return 1 if failed or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
