"""The delta-rule family (attnc/runtime/delta.py) against each paper's token-by-token recurrence in float64,
written here independently of the runtime: outputs, final state and the gradients of every input (q, k, v,
β, the gates/decays, a, b and the initial state).

The Triton kernels run under the interpreter on CPU, which is slow: sizes are small (T below two chunks,
head dims 16/32) but cover ragged T, D ≠ E, one and two E-blocks, and shared heads. The T = 2048 stress
cases of issue 12 are marked slow; the default run has a T = 256 version that already overflows the old
exp(±cumsum) encoding in float32 (cumulative log-decay ≈ −640).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from attnc.runtime import delta as dl

# One tolerance table per dtype (absolute, relative), for outputs/states and for gradients. fp32: the
# kernels accumulate in fp32 over ≤ 40 tokens; fp16: inputs rounded to fp16 (the oracle sees the same
# rounded values), kernels still accumulate in fp32, outputs rounded to fp16.
TOL = {
    torch.float32: {"out": (2e-5, 1e-4), "grad": (5e-5, 1e-4)},
    torch.float16: {"out": (4e-3, 4e-3), "grad": (1e-3, 1e-3)},
}
# Two E-blocks at E = 32, several chunks at T ≤ 40 (the chunk-parallel kernels' forward and backward).
SMALL = dl.DeltaConfig(chunk=16, ckpt=8, block_e=16)


# ---------------------------------------------------------------------------------------------- oracles
# Each written as its paper states it, in float64, state orientation as in the paper.


def _heads(x: torch.Tensor, H: int) -> torch.Tensor:
    return x.repeat_interleave(H // x.shape[1], dim=1)


def oracle_delta(q, k, v, beta, g, s0):
    """DeltaNet / Gated DeltaNet (Yang et al. 2024 eq. 1; Yang, Kautz, Hatamizadeh 2024 eq. 10), state
    [d_v, d_k]: S_t = α_t S_{t-1} + β_t (v_t − α_t S_{t-1} k_t) k_tᵀ, o_t = S_t q_t."""
    H = max(x.shape[1] for x in (q, k, v, beta) + ((g,) if g is not None else ()))
    q, k, v, beta = (_heads(x, H) for x in (q, k, v, beta))
    S = s0.clone()
    outs = []
    for t in range(q.shape[2]):
        if g is not None:
            S = _heads(g, H)[:, :, t, None, None].exp() * S
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t, None]
        err = vt - torch.einsum("bhed,bhd->bhe", S, kt)
        S = S + (bt * err)[..., None] * kt[:, :, None, :]
        outs.append(torch.einsum("bhed,bhd->bhe", S, q[:, :, t]))
    return torch.stack(outs, 2), S


def oracle_kda(q, k, v, beta, g, s0):
    """Kimi Delta Attention (Kimi Linear, eq. 1), state [d_k, d_v]:
    S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t. s0 and the state returned are
    [d_v, d_k] (transposed) to compare with the runtime."""
    S = s0.transpose(-1, -2).clone()
    D = q.shape[-1]
    eye = torch.eye(D, dtype=q.dtype)
    outs = []
    for t in range(q.shape[2]):
        kt, bt = k[:, :, t], beta[:, :, t]
        left = eye - bt[..., None, None] * kt[..., :, None] * kt[..., None, :]
        S = (
            left @ (g[:, :, t].exp()[..., :, None] * S)
            + bt[..., None, None] * kt[..., :, None] * v[:, :, t, None, :]
        )
        outs.append(torch.einsum("bhde,bhd->bhe", S, q[:, :, t]))
    return torch.stack(outs, 2), S.transpose(-1, -2)


def oracle_gla(q, k, v, g, s0):
    """Gated linear attention (Yang et al. 2023, eq. 3), state [d_k, d_v]: S_t = (α_tᵀ 1) ⊙ S_{t-1} + k_tᵀ v_t,
    o_t = q_t S_t."""
    S = s0.transpose(-1, -2).clone()
    outs = []
    for t in range(q.shape[2]):
        S = g[:, :, t].exp()[..., :, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, 2), S.transpose(-1, -2)


def oracle_rwkv7(r, k, v, a, b, g, s0):
    """RWKV-7's state update (Peng et al. 2025, eq. 16 with the paper's DPLR transition), state [d_v, d_k]:
    S_t = S_{t-1} (diag(w_t) + a_tᵀ b_t) + v_tᵀ k_t, o_t = S_t r_t, w_t = exp(g_t)."""
    S = s0.clone()
    D = r.shape[-1]
    eye = torch.eye(D, dtype=r.dtype)
    outs = []
    for t in range(r.shape[2]):
        trans = eye * g[:, :, t].exp()[..., None, :] + a[:, :, t, :, None] * b[:, :, t, None, :]
        S = S @ trans + v[:, :, t, :, None] * k[:, :, t, None, :]
        outs.append(torch.einsum("bhed,bhd->bhe", S, r[:, :, t]))
    return torch.stack(outs, 2), S


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    variant: str  # deltanet | gated | kda | gla | rwkv7
    algorithm: str
    B: int = 1
    H: int = 1
    T: int = 13
    D: int = 16
    E: int = 16
    hk: int | None = None  # heads of q and k when shared (GQA-style), else H
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        share = f"-Hqk{self.hk}" if self.hk else ""
        dt = {torch.float32: "fp32", torch.float16: "fp16"}[self.dtype]
        return (
            f"{self.variant}-{self.algorithm}-B{self.B}-H{self.H}{share}-T{self.T}-D{self.D}-E{self.E}-{dt}"
        )


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaves in float64 (rounded through case.dtype), as the models feed them: L2-normalised keys,
    β = sigmoid, log-gates = logsigmoid (≤ 0)."""
    gen = torch.Generator().manual_seed(seed)
    B, H, T, D, E = case.B, case.H, case.T, case.D, case.E
    hk = case.hk or H

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x: dict[str, torch.Tensor] = {
        "q": rnd(B, hk, T, D) * 0.5,
        "k": torch.nn.functional.normalize(rnd(B, hk, T, D), dim=-1),
        "v": rnd(B, H, T, E),
        "s0": rnd(B, H, E, D) * 0.5,
    }
    if case.variant in ("deltanet", "gated", "kda"):
        x["beta"] = torch.sigmoid(rnd(B, H, T))
    if case.variant == "gated":
        x["g"] = torch.nn.functional.logsigmoid(rnd(B, H, T) + 2.0)
    if case.variant in ("kda", "gla"):
        x["g"] = torch.nn.functional.logsigmoid(rnd(B, H, T, D) + 2.0)
    if case.variant == "rwkv7":
        kappa = torch.nn.functional.normalize(rnd(B, H, T, D), dim=-1)
        iclr = torch.sigmoid(rnd(B, H, T, D))
        x["a"], x["b"] = -kappa, kappa * iclr
        x["g"] = -0.6 * torch.sigmoid(rnd(B, H, T, D))  # w = exp(−0.6·σ(·)), as RWKV-7's decay
    return {n: t.to(case.dtype).double() for n, t in x.items()}


def run_library(case: Case, x: dict[str, torch.Tensor], dtype: torch.dtype, config=SMALL):
    s0 = x["s0"].to(torch.float64 if dtype == torch.float64 else torch.float32)
    kw = {"initial_state": s0, "return_state": True, "algorithm": case.algorithm, "config": config}
    c = {n: t.to(dtype) for n, t in x.items() if n != "s0"}
    if case.variant in ("deltanet", "gated", "kda"):
        return dl.delta_rule(c["q"], c["k"], c["v"], c["beta"], g=c.get("g"), **kw)
    if case.variant == "gla":
        return dl.gla(c["q"], c["k"], c["v"], c["g"], **kw)
    return dl.dplr(c["q"], c["k"], c["v"], c["a"], c["b"], g=c["g"], **kw)


def run_oracle(case: Case, x: dict[str, torch.Tensor]):
    if case.variant in ("deltanet", "gated"):
        return oracle_delta(x["q"], x["k"], x["v"], x["beta"], x.get("g"), x["s0"])
    if case.variant == "kda":
        return oracle_kda(x["q"], x["k"], x["v"], x["beta"], x["g"], x["s0"])
    if case.variant == "gla":
        return oracle_gla(x["q"], x["k"], x["v"], x["g"], x["s0"])
    return oracle_rwkv7(x["q"], x["k"], x["v"], x["a"], x["b"], x["g"], x["s0"])


def grads(fn, x: dict[str, torch.Tensor], do: torch.Tensor, ds: torch.Tensor):
    """Forward and the gradients of every input of L = Σ o·do + Σ S_T·ds."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    o, s = fn(leaves)
    loss = (o.double() * do).sum() + (s.double() * ds).sum()
    gs = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach().double(), s.detach().double(), dict(zip(leaves, gs, strict=True))


def check_case(case: Case, config=SMALL) -> None:
    x = make_inputs(case)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(case.B, case.H, case.T, case.E, generator=gen, dtype=torch.float64)
    ds = torch.randn(case.B, case.H, case.E, case.D, generator=gen, dtype=torch.float64)
    o_ref, s_ref, g_ref = grads(lambda z: run_oracle(case, z), x, do, ds)
    o, s, g = grads(lambda z: run_library(case, z, case.dtype, config), x, do, ds)
    tol = TOL[case.dtype]
    torch.testing.assert_close(o, o_ref, atol=tol["out"][0], rtol=tol["out"][1], msg=lambda m: f"o: {m}")
    torch.testing.assert_close(s, s_ref, atol=tol["out"][0], rtol=tol["out"][1], msg=lambda m: f"state: {m}")
    for name in g_ref:
        scale = max(1.0, g_ref[name].abs().max().item())  # gradients of β and g sum over D·E terms
        torch.testing.assert_close(
            g[name] / scale,
            g_ref[name] / scale,
            atol=tol["grad"][0],
            rtol=tol["grad"][1],
            msg=lambda m, name=name: f"d{name}: {m}",
        )


CASES = [
    Case("deltanet", "recurrent"),
    Case("deltanet", "chunk", T=21, E=32),  # two chunks, the last ragged; two E-blocks
    Case("gated", "recurrent", T=1),  # one decoding step
    Case("gated", "chunk", H=2, T=18, D=16, E=16, hk=1),  # q/k shared by two state heads (GVA-style)
    Case("kda", "recurrent", T=11, E=32),
    Case("kda", "chunk", T=37, E=32),  # per-channel gates by chunks: three chunks, the last ragged
    Case("gla", "recurrent", T=12, D=32, E=16),
    Case("gla", "chunk", T=20, D=32, E=16),
    Case("rwkv7", "recurrent", T=12, H=2),
    Case("gated", "chunk", T=20, dtype=torch.float16),
    Case("kda", "recurrent", T=9, dtype=torch.float16),
    Case("kda", "chunk", T=20, dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_the_papers_recurrence(case: Case) -> None:
    check_case(case)


def test_reference_backend_float64_and_float32() -> None:
    """dplr_reference (algorithm="reference") in float64 is exact and in float32 within fp32 rounding."""
    for variant in ("gated", "rwkv7"):
        case = Case(variant, "reference", T=20, H=2)
        x = make_inputs(case)
        o_ref, s_ref = run_oracle(case, x)
        o64, s64 = run_library(case, x, torch.float64)
        torch.testing.assert_close(o64, o_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(s64.double(), s_ref, atol=1e-12, rtol=1e-12)
        o32, _ = run_library(case, x, torch.float32)
        torch.testing.assert_close(o32.double(), o_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["deltanet", "gated", "kda", "gla"])
def test_chunked_and_recurrent_agree(variant: str) -> None:
    """The chunk-parallel algorithm (forward and backward) against the recurrent one, on the same inputs:
    outputs, final state and every gradient."""
    x = make_inputs(Case(variant, "chunk", T=35), seed=3)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(1, 1, 35, 16, generator=gen, dtype=torch.float64)
    ds = torch.randn(1, 1, 16, 16, generator=gen, dtype=torch.float64)
    out = {
        alg: grads(lambda z, c=Case(variant, alg, T=35): run_library(c, z, torch.float32), x, do, ds)
        for alg in ("recurrent", "chunk")
    }
    (o_r, s_r, g_r), (o, s, g) = out["recurrent"], out["chunk"]
    torch.testing.assert_close(o, o_r, atol=1e-5, rtol=1e-5, msg=lambda m: f"o: {m}")
    torch.testing.assert_close(s, s_r, atol=1e-5, rtol=1e-5, msg=lambda m: f"state: {m}")
    for n in g:
        scale = max(1.0, g_r[n].abs().max().item())
        torch.testing.assert_close(
            g[n] / scale, g_r[n] / scale, atol=2e-5, rtol=1e-5, msg=lambda m, n=n: f"d{n}: {m}"
        )


def test_chunked_prefill_then_recurrent_decoding_continues_exactly() -> None:
    """Prefill 16 tokens by chunks, decode 5 more one by one from the returned state: the same outputs and
    final state as one chunked pass over all 21."""
    case = Case("gated", "chunk", T=21, E=32)
    x = {n: t.float() for n, t in make_inputs(case, seed=5).items()}
    q, k, v, beta, g, s0 = (x[n] for n in ("q", "k", "v", "beta", "g", "s0"))
    full, s_full = dl.delta_rule(
        q, k, v, beta, g=g, initial_state=s0, return_state=True, algorithm="chunk", config=SMALL
    )
    P = 16
    outs = []
    o, s = dl.delta_rule(
        q[:, :, :P], k[:, :, :P], v[:, :, :P], beta[:, :, :P], g=g[:, :, :P], initial_state=s0,
        return_state=True, algorithm="chunk", config=SMALL,
    )  # fmt: skip
    outs.append(o)
    for t in range(P, case.T):
        step = slice(t, t + 1)
        o, s = dl.delta_rule(
            q[:, :, step], k[:, :, step], v[:, :, step], beta[:, :, step], g=g[:, :, step],
            initial_state=s, return_state=True, algorithm="recurrent", config=SMALL,
        )  # fmt: skip
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(s, s_full, atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- decay stress


def _stress(T: int) -> None:
    """Per-channel (GLA) and per-token (Gated DeltaNet, chunked) log-decays uniform in [−5, 0] per step:
    float32 stays finite and within 1e-4 of float64 (issue 12). The cumulative log-decay reaches ≈ −2.5·T,
    where exp(−G) overflows float32 from T ≈ 36 on."""
    gen = torch.Generator().manual_seed(7)
    B, H, D, E = 1, 1, 16, 16
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, E, generator=gen, dtype=torch.float64)
    g_ch = -5 * torch.rand(B, H, T, D, generator=gen, dtype=torch.float64)
    s0 = torch.zeros(B, H, E, D, dtype=torch.float64)
    o64, _ = oracle_gla(q, k, v, g_ch, s0)
    o32 = dl.gla(q.float(), k.float(), v.float(), g_ch.float(), algorithm="recurrent")
    assert torch.isfinite(o32).all()
    assert (o32.double() - o64).abs().max().item() < 1e-4
    beta = torch.sigmoid(torch.randn(B, H, T, generator=gen, dtype=torch.float64))
    g = -5 * torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    o64, _ = oracle_delta(q, k, v, beta, g, s0)
    cfg = dl.DeltaConfig(chunk=64)
    o32 = dl.delta_rule(
        q.float(), k.float(), v.float(), beta.float(), g=g.float(), algorithm="chunk", config=cfg
    )
    assert torch.isfinite(o32).all()
    assert (o32.double() - o64).abs().max().item() < 1e-4


def test_float32_decay_stress_T256() -> None:
    _stress(256)


@pytest.mark.slow
def test_float32_decay_stress_T2048() -> None:
    _stress(2048)


# ---------------------------------------------------------------------------------------------- bad input


def _ok(T: int = 4, D: int = 16, E: int = 16, H: int = 2):
    return (
        torch.randn(1, H, T, D),
        torch.randn(1, H, T, D),
        torch.randn(1, H, T, E),
        torch.rand(1, H, T),
    )


@pytest.mark.parametrize(
    ("label", "call", "match"),
    [
        ("k-dim", lambda q, k, v, b: dl.delta_rule(q, k[..., :8], v, b), r"k must have shape \[B, Hk, T, D\] = \[1, \*, 4, 16\]"),
        ("v-rank", lambda q, k, v, b: dl.delta_rule(q, k, v[0], b), r"v must have shape \[B, Hv, T, E\]"),
        ("beta-shape", lambda q, k, v, b: dl.delta_rule(q, k, v, b[..., None]), r"beta must have shape \[B, Hb, T\]"),
        ("g-shape", lambda q, k, v, b: dl.delta_rule(q, k, v, b, g=b[..., :3]), r"g must have shape"),
        ("heads", lambda q, k, v, b: dl.delta_rule(q, k, torch.randn(1, 3, 4, 16), b), r"has 2 heads, which does not divide the largest head count 3"),
        ("state", lambda q, k, v, b: dl.delta_rule(q, k, v, b, initial_state=torch.zeros(1, 2, 16, 8)), r"initial_state must have shape \[B, H, E, D\] = \[1, 2, 16, 16\]"),
        ("a-without-b", lambda q, k, v, b: dl.dplr(q, k, v, a=k), r"a and b come together"),
        ("chunk-rank1", lambda q, k, v, b: dl.dplr(q, k, v, a=k, b=-k, algorithm="chunk"), r"a general a bᵀ part runs with algorithm='recurrent'"),
        ("algorithm", lambda q, k, v, b: dl.delta_rule(q, k, v, b, algorithm="fast"), r"algorithm must be one of"),
        ("int-dtype", lambda q, k, v, b: dl.gla(q, k.long(), v, -k.abs()), r"k must be a floating-point tensor"),
        ("empty-T", lambda q, k, v, b: dl.gla(q[:, :, :0], k[:, :, :0], v[:, :, :0], -k[:, :, :0]), r"at least one token"),
        ("big-D", lambda q, k, v, b: dl.gla(*(torch.randn(1, 1, 2, 300) for _ in range(3)), torch.zeros(1, 1, 2, 300)), r"D must be in 1..256"),
    ],
    ids=lambda p: p if isinstance(p, str) else "",
)  # fmt: skip
def test_bad_inputs_raise_clear_value_errors(label: str, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(*_ok())


def test_config_rejects_bad_schedules() -> None:
    with pytest.raises(ValueError, match="chunk must be at least 16"):
        dl.DeltaConfig(chunk=8)
    with pytest.raises(ValueError, match="block_e must be a power of two"):
        dl.DeltaConfig(block_e=24)


# ---------------------------------------------------------------------------------------------- AOT


def aot_jobs(head_dim: int, dtype: str, every_variant: bool = False) -> list:
    """sm_90 jobs of each kernel at the runtime's default schedule (codegen/triton/delta_aot.py): by default
    the widest variant of each kernel; every_variant adds each (gate mode, rank-1) combination the API selects."""
    from attnc.codegen.triton import delta_aot

    return delta_aot.jobs(90, dtype, head_dim, every_variant=every_variant)


def _compile_and_check(jobs: list) -> None:
    """Every job compiles; every kernel the default configuration runs is free of spills."""
    from attnc.codegen.triton.aot import KernelReport, compile_reports, format_table

    reports = compile_reports(jobs, max_workers=2, raise_on_error=False)
    failed = [str(r) for r in reports if not isinstance(r, KernelReport)]
    assert not failed, "\n".join(failed)
    print(format_table(reports))  # registers and spills, shown with -s
    spills = [f"{r.name} {r.config}: {r.spill_bytes} B" for r in reports if r.spill_bytes]
    assert not spills, "\n".join(spills)


@pytest.mark.slow  # ~25 s of sm_90 compiles: kept out of the 15-minute CI budget, run with -m slow
def test_kernels_compile_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    _compile_and_check(aot_jobs(64, "fp16") + aot_jobs(128, "bf16"))


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    _compile_and_check(aot_jobs(64, "fp16", every_variant=True) + aot_jobs(128, "bf16", every_variant=True))
