"""benchmarks/bench_linear.py: the shapes, the fla call mapping (against a naive fla written from fla's
documented semantics), the timing loop's gate and records (on CPU, a stand-in timer), the analysis (speedups,
crossover, scaling ratio), resume, the plot, the delta family's CPU preflight (its kernels under the Triton
interpreter against the benchmark's float64 recurrence), and the whole script on CPU (correctness preflight
under the Triton interpreter + codegen timing + whether fla imports, no GPU timings)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_linear.py"
CPU_RUN_LIMIT_S = 60


@pytest.fixture(scope="module")
def bl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("attnc_bench_linear", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------------
# A naive fla: the three calls the benchmark makes, written from fla's docstrings and source (layout
# [B, T, H, K]; simple GLA: o_t = scale * sum_{s <= t} exp(G_t - G_s) (q_t . k_s) v_s with G the running sum of
# the per-step log decays g, or g_gamma * (t + 1); retention: g_gamma = log(1 - 2^(-5-h)); linear attention
# normalize=True: divided by scale * q_t . sum_{s <= t} k_s + 1e-10). Default scale K^-0.5.


def _naive_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, None]:
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    if g is not None:
        G = torch.cumsum(g.double(), dim=1)  # [B, T, H]
    elif g_gamma is not None:
        G = (
            g_gamma.double().view(1, 1, H) * torch.arange(1, T + 1, dtype=torch.float64).view(1, T, 1)
        ).expand(B, T, H)
    else:
        G = torch.zeros(B, T, H, dtype=torch.float64)
    s = torch.einsum("bthk,bshk->bhts", q.double(), k.double()) * scale
    Gh = G.permute(0, 2, 1)  # [B, H, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    w = torch.where(causal, torch.exp(Gh[..., :, None] - Gh[..., None, :]), 0.0)
    o = torch.einsum("bhts,bshv->bthv", s * w, v.double())
    return o.to(q.dtype), None


def _naive_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, None]:
    H = q.shape[2]
    g_gamma = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))
    return _naive_simple_gla(q, k, v, g_gamma=g_gamma)


def _naive_linear_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, normalize: bool = True
) -> tuple[torch.Tensor, None]:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, _ = _naive_simple_gla(q, k, v, scale=scale)
    if normalize:
        den = (q.double() * scale * torch.cumsum(k.double(), dim=1)).sum(-1, keepdim=True) + 1e-10
        o = (o.double() / den).to(q.dtype)
    return o, None


def _naive_state_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor, None]:
    """fla's naive recurrences (fla/ops/kda/naive.py naive_recurrent_kda, fla/ops/gla/naive.py
    naive_recurrent_gla) in their own orientation: layout [B, T, H, K], state [B, H, K, V];
    S <- S * exp(g) (per key channel, or one scalar), then S += beta k (v - k^T S)^T (or k v^T without beta),
    o = (scale q)^T S. Default scale K^-0.5."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    qh, kh, vh = (x.double().transpose(1, 2) for x in (q, k, v))  # [B, H, T, .]
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    o = torch.zeros_like(vh)
    for i in range(T):
        if g is not None:
            gi = g[:, i].double().exp()  # [B, H] or [B, H, K]
            S = S * (gi[..., None, None] if gi.dim() == 2 else gi[..., None])
        ki, vi = kh[:, :, i], vh[:, :, i]
        if beta is None:
            S = S + ki[..., None] * vi[..., None, :]
        else:
            bi = beta[:, i].double()[..., None]
            S = S + torch.einsum("bhk,bhv->bhkv", bi * ki, vi - (ki[..., None] * S).sum(-2))
        o[:, :, i] = torch.einsum("bhk,bhkv->bhv", qh[:, :, i] * scale, S)
    return o.transpose(1, 2).to(q.dtype), None


def _naive_delta_rule(q: Any, k: Any, v: Any, beta: Any, scale: float | None = None) -> Any:
    return _naive_state_recurrence(q, k, v, beta, None, scale)


def _naive_gated_delta_rule(q: Any, k: Any, v: Any, g: Any, beta: Any, scale: float | None = None) -> Any:
    assert g.shape == beta.shape  # one log-gate per token: [B, T, H]
    return _naive_state_recurrence(q, k, v, beta, g, scale)


def _naive_kda(q: Any, k: Any, v: Any, g: Any, beta: Any, scale: float | None = None, **kwargs: Any) -> Any:
    assert g.shape == q.shape and not kwargs.get("use_gate_in_kernel", False)  # log-space [B, T, H, K]
    return _naive_state_recurrence(q, k, v, beta, g, scale)


def _naive_gla(q: Any, k: Any, v: Any, g: Any, scale: float | None = None, head_first: bool = True) -> Any:
    """With an old fla's head_first=True default: [B, H, T, K] unless told otherwise."""
    if head_first:
        q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))
    o, _ = _naive_state_recurrence(q, k, v, None, g, scale)
    return (o.transpose(1, 2) if head_first else o), None


def _naive_fla(bl: ModuleType, **kw: Any) -> Any:
    ops = {
        "chunk_delta_rule": _naive_delta_rule,
        "chunk_gated_delta_rule": _naive_gated_delta_rule,
        "chunk_kda": _naive_kda,
        "chunk_gla": _naive_gla,
        **kw,
    }
    return bl.Fla(
        version="naive",
        chunk_simple_gla=_naive_simple_gla,
        chunk_retention=_naive_retention,
        chunk_linear_attn=_naive_linear_attn,
        **ops,
    )


DELTA = ["deltanet", "gated_deltanet", "kda", "gla"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`zoo("kda")`: the module generated from zoo/specs/kda.attn, once per module."""
    import functools

    from attnc import codegen

    cache = tmp_path_factory.mktemp("attnc-zoo")
    return functools.cache(
        lambda spec: codegen.compile_file(REPO / "zoo" / "specs" / f"{spec}.attn", cache_dir=cache)
    )


@pytest.mark.parametrize("variant", ["lightning", "retention", "gated_linear", "linear_elu"])
def test_fla_calls_compute_our_variants(bl: ModuleType, compiled: Any, variant: str) -> None:
    """The benchmark's fla calls (layout, feature maps, decays, the first difference of our cumulative g,
    scale, normalisation) compute what our spec computes, given fla's semantics."""
    B, H, N, D = 2, 3, 37, 8
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    aux = bl.make_aux(variant, B, H, N, "cpu", seed=3)
    op = getattr(compiled(variant), variant)
    expected = op(q, k, v, *aux.extras, backend="reference")
    got = bl.fla_forward(_naive_fla(bl), variant, *(bl.to_fla(t) for t in (q, k, v)), aux).transpose(1, 2)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", DELTA)
def test_fla_delta_calls_and_the_oracle_compute_our_variants(bl: ModuleType, zoo: Any, variant: str) -> None:
    """The delta family: the benchmark's fla calls (keywords, fla's [B, T, H] / [B, T, H, K] gates and beta,
    the explicit scale, head_first=False where the op has it) and its float64 oracle `recurrence64` compute
    what the zoo spec's reference computes."""
    B, H, N, D = 2, 3, 21, 8
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = bl.prepare_qk(variant, q, k)
    assert bl.VARIANTS[variant].l2norm_qk == (variant != "gla")
    aux = bl.make_aux(variant, B, H, N, "cpu", seed=5, D=D)
    op = getattr(zoo(variant), variant)
    expected, state = op(q, k, v, *aux.extras, backend="reference", return_state=True)
    got = bl.fla_forward(_naive_fla(bl), variant, *(bl.to_fla(t) for t in (q, k, v)), aux).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    o64, s64 = bl.recurrence64(q, k, v, **bl.delta_kwargs(variant, aux.extras))
    torch.testing.assert_close(o64, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s64, state.double(), rtol=1e-5, atol=1e-5)  # the state is float32


def test_load_fla_reports_instead_of_raising(bl: ModuleType) -> None:
    fla = bl.load_fla()
    if importlib.util.find_spec("fla") is None:
        assert not fla.available and "No module named 'fla'" in str(fla.error)
        assert not any(fla.has(n) for n in bl.VARIANTS)
    info = fla.info()
    assert {"available", "version", "error", "missing"} <= info.keys()
    partial = _naive_fla(bl, chunk_kda=None)
    assert partial.has("deltanet") and partial.has("gla") and not partial.has("kda")
    assert not partial.has("causal")


def test_aux_inputs(bl: ModuleType) -> None:
    H = 16
    gamma = bl.make_aux("retention", 1, H, 8, "cpu").extras[0]
    assert torch.allclose(gamma.double(), 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))
    light = bl.make_aux("lightning", 1, H, 8, "cpu")
    assert torch.equal(light.fla_kwargs["g_gamma"], -light.extras[0])
    assert bool((light.extras[0] > 0).all())
    gated = bl.make_aux("gated_linear", 2, H, 50, "cpu", seed=1)
    (gcum,) = gated.extras
    assert gcum.shape == (2, H, 50) and bool((gcum.diff(dim=-1) <= 0).all())  # cumulative log-decays
    step = gated.fla_kwargs["g"]
    assert step.shape == (2, 50, H) and step.is_contiguous()  # fla's [B, T, H]
    torch.testing.assert_close(torch.cumsum(step.double(), dim=1).transpose(1, 2), gcum.double())
    assert bl.make_aux("linear_elu", 1, H, 8, "cpu").extras == ()
    for name, shapes in (
        ("deltanet", [(2, H, 50)]),
        ("gated_deltanet", [(2, H, 50), (2, H, 50)]),
        ("kda", [(2, H, 50), (2, H, 50, 32)]),
        ("gla", [(2, H, 50, 32)]),
    ):
        a = bl.make_aux(name, 2, H, 50, "cpu", seed=2, D=32, dtype=torch.bfloat16)
        assert [tuple(t.shape) for t in a.extras] == shapes
        for arg, t in bl.delta_kwargs(name, a.extras).items():
            f = a.fla_kwargs[arg]
            assert f.is_contiguous() and torch.equal(f, t.transpose(1, 2))  # fla's [B, T, H(, K)]
            if arg == "beta":
                assert t.dtype == torch.bfloat16 and bool(((t > 0) & (t < 1)).all())
            else:  # log-gates in float32, in (-inf, 0): per-step decays in (0, 1), mild (logsigmoid / 16)
                assert t.dtype == torch.float32 and bool((t < 0).all()) and float(t.min()) > -1.0


def test_plan_shapes(bl: ModuleType) -> None:
    shapes = bl.plan_shapes(list(bl.SEQS), list(bl.SERIES))
    b1 = [(1, n) for n in bl.SEQS]
    tokens = [(bl.TOKENS // n, n) for n in bl.SEQS if n != bl.TOKENS]
    assert shapes == b1 + tokens  # B = 1 first; (1, 32k) belongs to both series and is measured once
    assert len(shapes) == 13 and all(B * N == bl.TOKENS for B, N in tokens)
    assert bl.plan_shapes([3000, 1024], ["tokens"]) == [(32, 1024)]  # 3000 does not divide B*N
    assert bl.in_series("b1", 1, 32768) and bl.in_series("tokens", 1, 32768)
    assert not bl.in_series("tokens", 1, 4096)


def test_parse_args(bl: ModuleType) -> None:
    quick = bl.parse_args(["--quick"])
    assert quick.series == ["b1"] and quick.seqs == [1024, 4096, 32768]
    assert set(bl.RATIO_SEQS) <= set(quick.seqs)  # a smoke run still gives the scaling ratio
    full = bl.parse_args([])
    assert full.series == ["b1", "tokens"] and full.seqs == list(bl.SEQS)
    assert full.variants == [
        "lightning",
        "retention",
        "gated_linear",
        "linear_elu",
        "deltanet",
        "gated_deltanet",
        "kda",
        "gla",
        "causal",
    ]
    with pytest.raises(SystemExit):
        bl.parse_args(["--impls", "fla"])
    with pytest.raises(SystemExit):
        bl.parse_args(["--variants", "alibi"])


# ----------------------------------------------------------------------------------------------------------
# The timing loop on CPU: attnc under the Triton interpreter (float32), the naive fla, a stand-in timer


def test_bench_shape_gates_fla_and_writes_records(
    bl: ModuleType, compiled: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bl, "H_BENCH", 2)
    monkeypatch.setattr(bl, "D_BENCH", 16)
    monkeypatch.setattr(bl, "DTYPE", torch.float32)  # the interpreter's bf16 is not the GPU's
    calls: list[tuple[int, ...]] = []

    def fake_measure(fn: Any, q: Any, k: Any, v: Any, dout: Any, backward: bool, opts: Any) -> dict[str, Any]:
        if backward:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            fn(*leaves).backward(dout)
            assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)
        else:
            assert fn(q, k, v).shape == dout.shape
        calls.append(tuple(q.shape))
        ms = 2.0 if q.shape[1] == 2 else 1.0  # attnc's [B, H, N, D] vs fla's [B, T, H, D]: fla is faster
        return {"status": "ok", "ms": ms, "first_call_s": 0.0, "peak_mib": 0.0, "peak_extra_mib": 0.0}

    monkeypatch.setattr(bl.bench, "_measure", fake_measure)
    good = _naive_fla(bl)

    def wrong_scale(*a: Any, **kw: Any) -> Any:
        return _naive_simple_gla(*a, **{**kw, "scale": 0.5})

    bad = bl.Fla("bad", wrong_scale, _naive_retention, _naive_linear_attn)
    res = bl.bench.Results(tmp_path / "r.json", {"runs": [{}], "records": []})
    names = ["lightning", "retention", "causal"]
    ops = {n: getattr(compiled(n), n) for n in names}
    opts = bl.bench.BenchOptions(warmup_ms=1, rep_ms=1, impls=("attnc", "fla"), passes=("fwd", "fwd+bwd"))
    ok = {n: True for n in names}
    for fla, variants in ((good, ["lightning", "causal"]), (bad, ["lightning", "retention"])):
        ctx = bl.Context(ops, fla, ok, ok, opts, variants, 1e9, time.perf_counter(), "cpu")
        assert bl.bench_shape(res, ctx, 1, 80)
    recs = json.loads((tmp_path / "r.json").read_text())["records"]
    status = [(r["variant"], r["impl"], r["pass"], r["status"]) for r in recs]
    per_pass = [("lightning", "attnc"), ("lightning", "fla"), ("causal", "attnc"), ("causal", "fla")]
    expected = [
        (v, i, p, "n/a" if v == "causal" and i == "fla" else "ok") for v, i in per_pass[:2] for p in bl.PASSES
    ]
    expected += [(v, i, p, "n/a" if i == "fla" else "ok") for v, i in per_pass[2:] for p in bl.PASSES]
    # The wrong fla (scale 0.5 in simple GLA) fails the gate for lightning; retention's call does not use it.
    expected += [("lightning", "attnc", p, "ok") for p in bl.PASSES]
    expected += [("lightning", "fla", p, "mismatch") for p in bl.PASSES]
    expected += [(v, i, p, "ok") for v in ["retention"] for i in ("attnc", "fla") for p in bl.PASSES]
    assert sorted(status) == sorted(expected)
    ours = [r for r in recs if r["impl"] == "attnc" and r["variant"] != "causal"]
    assert all(r["algorithm"] == "chunk" and r["B"] == 1 and r["N"] == 80 and r["D"] == 16 for r in ours)
    assert all(
        r["max_rel_diff_attnc_vs_fla"] < 1e-4 for r in ours if r["status"] == "ok" and "speedup_vs_fla" in r
    )
    assert {r["speedup_vs_fla"] for r in ours if "speedup_vs_fla" in r} == {0.5}
    mismatch = [r for r in recs if r["status"] == "mismatch"]
    assert all("max rel diff" in r["error"] for r in mismatch)
    assert (1, 2, 80, 16) in calls and (1, 80, 2, 16) in calls  # fla got its own layout [B, T, H, D]
    # Over budget: nothing is measured, the shape is reported incomplete.
    ctx = bl.Context(ops, good, ok, ok, opts, ["lightning"], 0.0, time.perf_counter() - 1.0, "cpu")
    n = len(calls)
    assert not bl.bench_shape(res, ctx, 1, 80)
    assert len(calls) == n and res.data["records"][-1]["status"] == "skipped"


def test_bench_shape_delta_family(bl: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delta family in the timing loop: both sides get the L2-normalised q, k (gla: as drawn), attnc the
    preflight's algorithm ("auto" when it did not choose), fla its layout, gated per shape; an fla without an
    op says `unavailable` for that variant only. attnc is stood in for by the oracle (no interpreter here)."""
    monkeypatch.setattr(bl, "H_BENCH", 2)
    monkeypatch.setattr(bl, "D_BENCH", 16)
    monkeypatch.setattr(bl, "DTYPE", torch.float32)
    seen: list[tuple[str, str]] = []

    def normalised(x: torch.Tensor) -> bool:
        return torch.allclose(x.double().norm(dim=-1), torch.ones((), dtype=torch.float64), atol=1e-5)

    def fake_op(name: str) -> Any:
        def op(q: Any, k: Any, v: Any, *extras: Any, backend: str, algorithm: str) -> torch.Tensor:
            assert backend == "triton" and q.shape[1] == 2  # attnc's [B, H, N, D]
            assert normalised(q) == normalised(k) == (name != "gla")
            seen.append((name, algorithm))
            return bl.recurrence64(q, k, v, **bl.delta_kwargs(name, extras))[0].to(q.dtype)

        return op

    def fake_measure(fn: Any, q: Any, k: Any, v: Any, dout: Any, backward: bool, opts: Any) -> dict[str, Any]:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = fn(*leaves)
        assert o.shape == dout.shape
        if backward:
            o.backward(dout)
            assert all(t.grad is not None for t in leaves)
        return {"status": "ok", "ms": 1.0, "first_call_s": 0.0, "peak_mib": 0.0, "peak_extra_mib": 0.0}

    monkeypatch.setattr(bl.bench, "_measure", fake_measure)
    fla = _naive_fla(bl, chunk_kda=None)
    fla.missing["chunk_kda"] = "ImportError: cannot import name 'chunk_kda'"
    names = ["deltanet", "kda", "gla"]
    ops = {n: fake_op(n) for n in names}
    opts = bl.bench.BenchOptions(warmup_ms=1, rep_ms=1, impls=("attnc", "fla"), passes=("fwd", "fwd+bwd"))
    ok = {n: True for n in names}
    res = bl.bench.Results(tmp_path / "r.json", {"runs": [{}], "records": []})
    ctx = bl.Context(
        ops, fla, ok, ok, opts, names, 1e9, time.perf_counter(), "cpu", algorithms={"deltanet": "chunk"}
    )
    assert bl.bench_shape(res, ctx, 1, 40)
    recs = json.loads((tmp_path / "r.json").read_text())["records"]
    status = {(r["variant"], r["impl"], r["pass"]): r["status"] for r in recs}
    assert status == {
        **{(n, "attnc", p): "ok" for n in names for p in bl.PASSES},
        **{(n, "fla", p): "ok" for n in ("deltanet", "gla") for p in bl.PASSES},
        **{("kda", "fla", p): "unavailable" for p in bl.PASSES},
    }
    assert all("chunk_kda" in r["error"] for r in recs if r["status"] == "unavailable")
    ours = {r["variant"]: r for r in recs if r["impl"] == "attnc"}
    assert {n: r["algorithm"] for n, r in ours.items()} == {"deltanet": "chunk", "kda": "auto", "gla": "auto"}
    assert {a for n, a in seen if n == "gla"} == {"auto"}
    for n in ("deltanet", "gla"):  # the gate compared fla's output with ours at this shape before timing fla
        assert ours[n]["max_rel_diff_attnc_vs_fla"] < 1e-5 and ours[n]["speedup_vs_fla"] == 1.0
    assert "max_rel_diff_attnc_vs_fla" not in ours["kda"]


def test_preflight_delta_family(bl: ModuleType, zoo: Any, tmp_path: Path) -> None:
    """The CPU preflight of the delta family, as the script runs it (Triton interpreter, float32, the CPU
    shape): attnc's kernels against the float64 recurrence, output, gradients of q, k, v and the final state;
    "chunk" where the API takes it, else the refusal is recorded and "auto" is checked (and timed)."""
    res = bl.bench.Results(tmp_path / "p.json", {"runs": [{}], "preflight": []})
    fla = bl.Fla(error="not used on CPU")
    for name in DELTA:
        B, H, N, D = bl.preflight_shape(name, False)
        assert (B, H, N, D) == bl.DELTA_CPU_SHAPE and N % 16 and N > 64  # ragged chunks, more than one
        ok, alg = bl.preflight_delta(res, name, getattr(zoo(name), name), fla, gpu=False, B=B, H=H, N=N, D=D)
        recs = [r for r in res.data["preflight"] if r["variant"] == name]
        checked = [r for r in recs if r["status"] != "unsupported"]
        assert ok and [r["impl"] for r in checked] == [f"attnc_{alg}"], recs
        (r,) = checked
        assert r["passed"] is True and r["vs"] == "recurrence64" and r["dtype"] == "float32"
        assert r["max_rel_err"].keys() == {"o", "dq", "dk", "dv", "state"}
        assert all(e <= 2e-4 for e in r["max_rel_err"].values()), r["max_rel_err"]
        if name in ("deltanet", "gated_deltanet"):  # scalar gates: the chunked form exists today
            assert alg == "chunk" and len(recs) == 1
        elif alg == "auto":  # per-channel gates before their chunked form: the refusal is on record
            assert [x["status"] for x in recs] == ["unsupported", "pass"] and "chunk" in recs[0]["error"]
            assert recs[0]["passed"] is None


# ----------------------------------------------------------------------------------------------------------
# Analysis of the records


def test_crossover(bl: ModuleType) -> None:
    c = bl.crossover
    assert c([(512, 2.0, 1.0), (1024, 1.5, 1.6), (2048, 1.0, 3.0)])["crossover_n"] == 1024
    assert c([(512, 0.5, 1.0), (1024, 0.5, 2.0)])["crossover_n"] == 512
    never = c([(512, 2.0, 1.0), (1024, 1.0, 1.1), (2048, 3.0, 2.0)])
    assert never["crossover_n"] is None and never["linear_faster_at"] == [1024]
    # Faster at the smallest N, slower in the middle: the crossover is where it stays faster.
    assert c([(2048, 1.0, 3.0), (512, 0.1, 0.2), (1024, 1.0, 0.5)])["crossover_n"] == 2048
    assert c([])["crossover_n"] is None


def _fake_records() -> list[dict[str, Any]]:
    """Linear O(N) for attnc (1 ms per 4k tokens), fla 10% slower except lightning at N = 512 (faster), softmax
    O(N^2) per sequence (1 ms at N = 4k, B = 1)."""
    recs = []
    for B, N in [(1, n) for n in (512, 4096, 32768)] + [(64, 512), (8, 4096)]:
        for p, f in (("fwd", 1.0), ("fwd+bwd", 3.0)):
            lin = f * B * N / 4096
            recs.append(
                {
                    "variant": "causal",
                    "impl": "attnc",
                    "pass": p,
                    "B": B,
                    "N": N,
                    "ms": f * B * (N / 4096) ** 2,
                }
            )
            for v in ("lightning", "retention"):
                recs.append({"variant": v, "impl": "attnc", "pass": p, "B": B, "N": N, "ms": lin})
                fla = lin * (0.8 if (v, N) == ("lightning", 512) else 1.1)
                recs.append({"variant": v, "impl": "fla", "pass": p, "B": B, "N": N, "ms": fla})
    for r in recs:
        r["status"] = "ok"
    recs.append({"variant": "retention", "impl": "fla", "pass": "fwd", "B": 1, "N": 512, "status": "skipped"})
    # A later (resumed) measurement replaces an earlier one.
    recs.append(
        {
            "variant": "retention",
            "impl": "attnc",
            "pass": "fwd",
            "B": 1,
            "N": 32768,
            "status": "ok",
            "ms": 4.0,
        }
    )
    return recs


def test_analyse(bl: ModuleType) -> None:
    s = bl.analyse(_fake_records())
    light = s["speedup_vs_fla"]["lightning"]["fwd"]
    assert light["min"] == pytest.approx(0.8) and light["below_target"] == ["B=1,N=512", "B=64,N=512"]
    assert light["target_met"] is False
    assert light["geomean"] == pytest.approx(math.exp((2 * math.log(0.8) + 3 * math.log(1.1)) / 5))
    ret = s["speedup_vs_fla"]["retention"]["fwd"]
    assert ret["target_met"] is True and ret["min"] == pytest.approx(1.1)
    assert ret["by_shape"]["B=1,N=32768"] == pytest.approx(8.8 / 4.0)  # the later record won
    assert "linear_elu" not in s["speedup_vs_fla"]

    ratio = s["ratio_32k_over_4k_b1"]
    assert ratio["lightning"]["attnc"]["fwd"]["ratio"] == pytest.approx(8.0)
    assert ratio["lightning"]["attnc"]["fwd"]["target_met"] is True
    assert ratio["retention"]["attnc"]["fwd"]["ratio"] == pytest.approx(4.0)
    assert ratio["causal"]["attnc"]["fwd+bwd"]["ratio"] == pytest.approx(64.0)
    assert "target_met" not in ratio["causal"]["attnc"]["fwd"]  # the target is for the linear variants
    assert "target_met" not in ratio["lightning"]["fla"]["fwd"]

    cross = s["crossover_vs_softmax"]
    # B = 1: linear N/4096 vs softmax (N/4096)^2: softmax faster at 512, equal at 4k, linear faster at 32k.
    assert cross["b1"]["lightning"]["attnc"]["fwd"]["crossover_n"] == 32768
    assert cross["b1"]["lightning"]["attnc"]["fwd"]["seqs"] == [512, 4096, 32768]
    # B*N = 32k: linear 8 ms everywhere, softmax 8 * N / 4096 ms: equal at 4k, linear faster at 32k only.
    assert cross["tokens"]["retention"]["fla"]["fwd+bwd"]["seqs"] == [512, 4096, 32768]
    assert cross["tokens"]["retention"]["fla"]["fwd+bwd"]["crossover_n"] == 32768
    assert cross["tokens"]["lightning"]["attnc"]["fwd"]["linear_faster_at"] == [32768]
    lines = "\n".join(bl.summary_lines(s))
    assert "lightning     fwd      vs fla min 0.80x" in lines and "NOT met" in lines
    assert "attnc 32k/4k 8.0 met" in lines and "crossover (B = 1) N=32768" in lines


def test_resume_keeps_complete_shapes_only(bl: ModuleType) -> None:
    wanted = {("lightning", "attnc", "fwd"), ("lightning", "fla", "fwd")}
    meta = {"torch": "t", "triton": "tr", "device": {"name": "GPU"}, "fla": {"version": "0.6.0"}}

    def rec(B: int, N: int, impl: str, status: str = "ok") -> dict[str, Any]:
        return {
            "variant": "lightning",
            "impl": impl,
            "pass": "fwd",
            "B": B,
            "N": N,
            "status": status,
            "run": 0,
        }

    old = {
        **meta,
        "runs": [{"argv": []}],
        "config": {"variants": ["lightning"], "series": ["b1"], "seqs": [512, 1024]},
        "records": [rec(1, 512, "attnc"), rec(1, 512, "fla"), rec(1, 1024, "attnc"), rec(1, 2048, "attnc")],
        "completed": [
            {"B": 1, "N": 512, "measured": sorted(wanted)},
            {"B": 1, "N": 2048, "measured": [["lightning", "attnc", "fwd"]]},  # fla was not importable then
        ],
        "preflight": [{"run": 0}],
        "codegen": [],
    }
    new = {
        **meta,
        "runs": [{"argv": ["--resume"]}],
        "config": {"variants": ["lightning"], "series": ["b1", "tokens"], "seqs": [512, 4096]},
        "records": [],
        "completed": [],
        "preflight": [],
        "codegen": [],
    }
    data, done = bl.resume_from(old, new, wanted)
    assert done == {(1, 512)}
    assert data["records"] == old["records"][:2] and len(data["completed"]) == 1
    assert len(data["runs"]) == 2 and data["preflight"] == [{"run": 0}]
    assert data["config"]["seqs"] == [512, 1024, 4096] and data["config"]["series"] == ["b1", "tokens"]
    for key, value in (("torch", "other"), ("fla", {"version": "0.7"})):
        with pytest.raises(SystemExit, match=key):
            bl.resume_from({**old, key: value}, new, wanted)


def test_plot_only_redraws_the_png(bl: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "linear-test-gpu-2000-01-01.json"
    path.write_text(
        json.dumps({"device": {"name": "Test GPU"}, "date": "2000-01-01", "records": _fake_records()})
    )
    assert bl.main(["--plot-only", str(path)]) == 0
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, png.name]
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"records": [{"status": "skipped"}]}))
    assert bl.main(["--plot-only", str(empty)]) == 1  # nothing to draw: says so, writes nothing
    assert not empty.with_suffix(".png").exists()


# ----------------------------------------------------------------------------------------------------------
# The whole script on CPU


@pytest.mark.slow  # the whole script (~20 s); its parts are tested above
def test_cpu_run(tmp_path: Path) -> None:
    """The script as a user runs it, on a machine without a GPU (hidden from it if there is one)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=CPU_RUN_LIMIT_S,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < CPU_RUN_LIMIT_S
    assert "GPU timings need a GPU" in proc.stdout

    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert files[0].name == f"linear-cpu-{data['date']}.json"
    for key in ("device", "torch", "triton", "date", "config", "message", "attnc"):
        assert data[key], key
    assert data["gpu"] is False and data["finished"] is True and data["records"] == []
    assert data["torch"] == torch.__version__
    assert "GPU timings need a GPU" in data["message"]
    assert data["config"]["targets"]["ratio_32k_4k_max"] == 9.0
    assert data["config"]["targets"]["speedup_vs_fla_min"] == 1.0
    # Whether fla imports, as this interpreter sees it (no fla record on CPU: its kernels need a GPU).
    if importlib.util.find_spec("fla") is None:
        assert data["fla"]["available"] is False and "No module named 'fla'" in data["fla"]["error"]
    else:  # installed: it imports, or why it does not is reported
        assert data["fla"]["available"] is True or data["fla"]["error"]
    assert ("fla: importable" if data["fla"]["available"] else "fla: not importable") in proc.stdout

    delta = {"deltanet", "gated_deltanet", "kda", "gla"}
    variants = {"lightning", "retention", "gated_linear", "linear_elu", "causal", *delta}
    assert {c["variant"] for c in data["codegen"]} == variants
    assert all(c["codegen_s"] > 0 for c in data["codegen"])
    pre = data["preflight"]
    # The delta family's "chunk" refused by the API (per-channel gates, today) is on record, not a failure.
    unsupported = [r for r in pre if r["status"] == "unsupported"]
    assert all(r["impl"] == "attnc_chunk" and r["passed"] is None for r in unsupported)
    pre = [r for r in pre if r["status"] != "unsupported"]
    assert pre and all(r["passed"] is True and r["status"] == "pass" for r in pre), [
        r for r in pre if not r.get("passed")
    ]
    algorithms = data["config"]["attnc_algorithms"]
    assert {algorithms[v] for v in delta} <= {"chunk", "auto"}
    assert {r["variant"] for r in unsupported} == {v for v in delta if algorithms[v] == "auto"}
    linear = variants - {"causal"} - delta
    checks = {(r["variant"], r["impl"], r["vs"]) for r in pre}
    assert checks == {
        *((v, f"attnc_{a}", "reference") for v in linear for a in ("chunk", "recurrent")),
        *((v, "attnc_chunk", "attnc_recurrent") for v in linear),
        ("causal", "attnc", "reference"),
        *((v, f"attnc_{algorithms[v]}", "recurrence64") for v in delta),
    }
    assert all({"o", "dq", "dk", "dv"} == r["max_rel_err"].keys() for r in pre if r["vs"] == "reference")
    assert all(r["max_rel_err"].keys() == {"state"} for r in pre if r["vs"] == "attnc_recurrent")
    assert all(
        r["max_rel_err"].keys() == {"o", "dq", "dk", "dv", "state"} for r in pre if r["vs"] == "recurrence64"
    )
    assert not list(tmp_path.glob("*.tmp"))
