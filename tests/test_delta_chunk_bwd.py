"""The chunk-parallel delta-rule backward (attnc/runtime/delta_chunk_bwd.py) against torch.autograd through a
float64 token-by-token oracle: the gradients of q, k, v, β, the gates (scalar and per channel) and the initial
state, for DeltaNet, Gated DeltaNet, KDA and GLA (per-channel and scalar gate). The forward's intermediates
come from `chunk_forward_reference` (float64 inside, stored float32 as the contract says).

The kernels run under the Triton interpreter on CPU: head dims 16/32, chunk 16, T up to 100. fp32 inputs
are held to 5e-5 (absolute and relative to the gradient's scale); fp16 inputs (the oracle sees the same rounded
values, the kernels' fp32 intermediates run through tf32 products) to 2e-3. The AOT test compiles every
kernel for sm_90 at the default schedule and asserts 0 spills and wgmma at D = 128.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from attnc.runtime import core_abi
from attnc.runtime import delta_chunk_bwd as cb

from .test_delta_chunk_fwd import assert_defs_match

TOL = {torch.float32: 5e-5, torch.float16: 2e-3}

# variant: (delta rule, gate mode)
VARIANTS = {
    "deltanet": (True, 0),
    "gated": (True, 1),
    "kda": (True, 2),
    "gla": (False, 2),
    "gla1": (False, 1),
}


def oracle(q, k, v, beta, g, s0, delta: bool):
    """S_t = S_{t−1} T_t + write_t, o_t = S_t q_t, token by token in float64 (delta_chunk_design.md's table):
    T_t = Diag(α_t)(I − β_t k_t k_tᵀ) (DELTA) or Diag(α_t), α_t = e^{g_t} (a scalar gate: α_t I), write_t =
    β_t v_t k_tᵀ (DELTA) or v_t k_tᵀ. Inputs at their own head counts (shared heads are repeated)."""
    H = max(x.shape[1] for x in (q, k, v, beta, g) if x is not None)

    def rep(x):
        return None if x is None else x.repeat_interleave(H // x.shape[1], dim=1)

    q, k, v, beta, g = (rep(x) for x in (q, k, v, beta, g))
    S = s0
    outs = []
    for t in range(q.shape[2]):
        kt, vt = k[:, :, t], v[:, :, t]
        if g is not None:
            a = g[:, :, t].exp()
            S = S * (a[..., None, None] if a.dim() == 2 else a[..., None, :])
        if delta:
            bt = beta[:, :, t, None]
            # S Diag(α)(I − β k kᵀ): the gate is already applied to S above
            Sk = torch.einsum("bhed,bhd->bhe", S, kt)
            S = S + (bt * (vt - Sk))[..., None] * kt[:, :, None, :]
        else:
            S = S + vt[..., None] * kt[:, :, None, :]
        outs.append(torch.einsum("bhed,bhd->bhe", S, q[:, :, t]))
    return torch.stack(outs, 2), S


@dataclass(frozen=True)
class Case:
    variant: str
    B: int = 1
    H: int = 2
    T: int = 37
    D: int = 16
    E: int = 16
    chunk: int = 16
    hk: int | None = None  # heads of q, k (and g) when shared
    dtype: torch.dtype = torch.float32
    dsn: bool = True
    s0: bool = True
    gmin: float = -1.0  # smallest log-gate per step (stress: −5)

    @property
    def id(self) -> str:
        share = f"-Hqk{self.hk}" if self.hk else ""
        dt = {torch.float32: "fp32", torch.float16: "fp16"}[self.dtype]
        extra = ("" if self.dsn else "-nodsn") + ("" if self.gmin == -1.0 else f"-gmin{self.gmin:g}")
        return f"{self.variant}-B{self.B}-H{self.H}{share}-T{self.T}-D{self.D}-E{self.E}-C{self.chunk}-{dt}{extra}"


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 leaves rounded through case.dtype (q, k, v) as models feed them: L2-normalised keys, β = sigmoid,
    log-gates = logsigmoid scaled into [gmin, 0]."""
    gen = torch.Generator().manual_seed(seed)
    delta, gm = VARIANTS[case.variant]
    B, H, T, D, E = case.B, case.H, case.T, case.D, case.E
    hk = case.hk or H

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rounded(x):
        return x.to(case.dtype).double()

    x: dict[str, torch.Tensor | None] = {
        "q": rounded(rnd(B, hk, T, D) * 0.5),
        "k": rounded(torch.nn.functional.normalize(rnd(B, hk, T, D), dim=-1)),
        "v": rounded(rnd(B, H, T, E)),
        "beta": torch.sigmoid(rnd(B, H, T)) if delta else None,
        "g": None,
        "s0": rnd(B, H, E, D) * 0.5 if case.s0 else None,
    }
    if gm:
        shape = (B, hk, T) if gm == 1 else (B, hk, T, D)
        ls = torch.nn.functional.logsigmoid(rnd(*shape) + 2.0)
        x["g"] = ls / ls.min().abs().clamp_min(1e-6) * abs(case.gmin)
    return x


def run_case(case: Case, seed: int = 0) -> None:
    delta, _ = VARIANTS[case.variant]
    x = make_inputs(case, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    H = case.H
    do = torch.randn(case.B, H, case.T, case.E, generator=gen, dtype=torch.float64)
    dsn = torch.randn(case.B, H, case.E, case.D, generator=gen, dtype=torch.float64) if case.dsn else None
    names = ("q", "k", "v", "beta", "g", "s0")
    leaves = {n: x[n].clone().requires_grad_(True) for n in names if x[n] is not None}
    s0 = leaves.get("s0", torch.zeros(case.B, H, case.E, case.D, dtype=torch.float64))
    o, sn = oracle(leaves["q"], leaves["k"], leaves["v"], leaves.get("beta"), leaves.get("g"), s0, delta)
    loss = (o * do).sum() + ((sn * dsn).sum() if dsn is not None else 0.0)
    ref = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    kin = {n: (x[n].to(case.dtype) if n in ("q", "k", "v") else x[n]) for n in ("q", "k", "v")}
    beta = None if x["beta"] is None else x["beta"].float()
    g = None if x["g"] is None else x["g"].float()
    s0k = None if x["s0"] is None else x["s0"].float()
    fw = cb.chunk_forward_reference(kin["q"], kin["k"], kin["v"], beta, g, s0k, delta=delta, chunk=case.chunk)
    dq, dk, dv, dbeta, dg, ds0 = cb.chunk_backward(
        kin["q"], kin["k"], kin["v"], beta, g, do.float(), None if dsn is None else dsn.float(),
        gc=fw.gc, ai=fw.ai, w=fw.w, ut=fw.ut, hs=fw.hs, u=fw.u, delta=delta, chunk=case.chunk,
    )  # fmt: skip
    got = {"q": dq, "k": dk, "v": dv, "beta": dbeta, "g": dg, "s0": ds0}
    tol = TOL[case.dtype]
    for n, want in ref.items():
        have = got[n]
        assert have is not None, n
        assert have.shape == want.shape, (n, have.shape, want.shape)
        assert torch.isfinite(have).all(), n
        err = (have.double() - want).abs().max().item()
        scale = max(1.0, want.abs().max().item())
        assert err <= tol * scale, f"d{n}: max error {err:.3g} (scale {scale:.3g}, tol {tol})"
    if not delta:
        assert dbeta is None
    if x["g"] is None:
        assert dg is None


CASES = [
    Case("deltanet", T=37),
    Case("gated", T=37),
    Case("kda", B=2, H=2, T=37, D=32, E=16, chunk=32),  # off-diagonal sub-blocks (chunk 32 = 2 × SUB)
    Case("gla", T=37, D=32, E=16),
    Case("gla1", T=37, D=16, E=32),
    Case("kda", T=1),
    Case("gated", T=100, chunk=32, D=16, E=32, dsn=False),
    Case("kda", H=2, hk=1, T=37, D=16, E=32, dsn=False),
    Case("deltanet", H=4, hk=2, T=16, s0=False),
    Case("gated", H=2, hk=1, T=20),  # a shared scalar gate
    Case("gla", T=100, chunk=32, D=16, E=16, s0=False),
    Case("kda", T=37, D=24, E=20),  # non-power-of-two head dims
    Case("deltanet", T=37, dtype=torch.float16),
    Case("kda", T=37, D=32, E=16, dtype=torch.float16),
    Case("gated", T=37, dtype=torch.float16),
    Case("gla", T=37, dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunk_backward_matches_autograd_of_the_oracle(case: Case) -> None:
    run_case(case)


def test_per_channel_stress_stays_finite() -> None:
    """Log-decays down to −5 per step at T = 256: Γ reaches −5·16 in a chunk, far past where e^{−Γ} overflows
    float32 (Γ reaches −5·32 within a chunk); the sub-block scheme keeps every exponent ≤ 0 (finite
    gradients within fp32 tolerance)."""
    run_case(Case("kda", H=1, T=256, D=16, E=16, chunk=32, gmin=-5.0))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        Case("kda", T=256, D=32, E=32, chunk=32, gmin=-5.0),
        Case("gla", T=256, D=32, E=32, chunk=32, gmin=-5.0),
    ],
    ids=lambda c: c.id,
)
def test_per_channel_stress_wider(case: Case) -> None:
    run_case(case)


# ---------------------------------------------------------------------------------------------- structure


def test_kernel_defs_match_their_signatures() -> None:
    """Launches bind by name and the AOT compile types from core_abi: every `*_kernel` def of
    delta_chunk_bwd_kernels.py is its signature exactly (names, order, constexpr annotations)."""
    assert_defs_match("delta_chunk_bwd_kernels.py", core_abi.DELTA_CHUNK_BWD_KERNELS)


# ---------------------------------------------------------------------------------------------- AOT


def aot_jobs(head_dim: int, dtype: str, variants: list[tuple[int, bool]]) -> list:
    """sm_90 jobs of every chunk-parallel backward kernel of each (G_MODE, DELTA) variant at the default schedule
    and C = 64 (codegen/triton/delta_aot.py, which `attnc inspect` uses too)."""
    from attnc.codegen.triton import delta_aot

    return delta_aot.chunk_backward_jobs(90, dtype, head_dim, variants)


ALL_VARIANTS = [(0, True), (1, True), (2, True), (2, False), (1, False)]


def _compile_and_check(jobs: list) -> None:
    from attnc.codegen.triton.aot import KernelReport, compile_reports, format_table

    t0 = time.time()
    reports = compile_reports(jobs, max_workers=2, raise_on_error=False)
    failed = [str(r) for r in reports if not isinstance(r, KernelReport)]
    assert not failed, "\n".join(failed)
    print(format_table(reports), f"\n{len(reports)} compiles in {time.time() - t0:.0f} s")
    spills = [f"{r.name} {r.config}: {r.spill_bytes} B" for r in reports if r.spill_bytes]
    assert not spills, "\n".join(spills)
    # every kernel with a tl.dot; the WY kernel without the delta rule is the gates' cumsum alone (no product)
    dots = [r for r in reports if dict(r.constexprs)["DELTA"] or r.name != core_abi.DELTA_CBWD_WY.name]
    no_mma = [f"{r.name} {r.config}" for r in dots if dict(r.constexprs)["D"] == 128 and not r.uses_wgmma]
    assert not no_mma, "no wgmma at D = 128:\n" + "\n".join(no_mma)


def test_backward_kernels_compile_for_sm90_without_spills() -> None:
    """The per-channel delta rule (the widest variant) at D = E = 64 (fp16) and 128 (bf16)."""
    pytest.importorskip("triton.backends.nvidia")
    _compile_and_check(aot_jobs(64, "fp16", [(2, True)]) + aot_jobs(128, "bf16", [(2, True)]))


@pytest.mark.slow
def test_every_backward_variant_compiles_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    jobs = []
    for hd in (64, 128):
        for dt in ("fp16", "bf16"):
            jobs += aot_jobs(hd, dt, ALL_VARIANTS)
    _compile_and_check(jobs)


# ---------------------------------------------------------------------------------------------- packed batches

PACKED_LENS = (37, 0, 16, 5, 1)  # ragged chunks, an empty sequence, an exact chunk, short ones (C = 16)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=lambda v: f"{v}-H2-Hqk1-lens37_0_16_5_1-C16-fp32")
def test_packed_backward_matches_autograd_of_each_sequence(variant: str) -> None:
    """The chunk-table form (delta_chunk.chunk_table, VARLEN) of the forward and backward kernels on a packed
    batch, [1, heads, total, ...]: every gradient (q, k, v, β, g of shared heads, one initial state per
    sequence) against torch.autograd through the float64 recurrence run on each sequence alone."""
    from attnc.runtime import delta_chunk as dc

    delta, _ = VARIANTS[variant]
    nseq, total = len(PACKED_LENS), sum(PACKED_LENS)
    case = Case(variant, H=2, hk=1, T=total, chunk=16)
    x = make_inputs(case)
    gen = torch.Generator().manual_seed(5)
    s0 = torch.randn(nseq, 2, case.E, case.D, generator=gen, dtype=torch.float64) * 0.5
    do = torch.randn(1, 2, total, case.E, generator=gen, dtype=torch.float64)
    dsn = torch.randn(nseq, 2, case.E, case.D, generator=gen, dtype=torch.float64)
    names = [n for n in ("q", "k", "v", "beta", "g") if x[n] is not None]
    leaves = {n: x[n].clone().requires_grad_(True) for n in names}  # type: ignore[union-attr]
    s0l = s0.clone().requires_grad_(True)
    cu = torch.tensor([0, *torch.tensor(PACKED_LENS).cumsum(0).tolist()], dtype=torch.int32)
    loss = torch.zeros((), dtype=torch.float64)
    for s in range(nseq):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi == lo:  # an empty sequence returns its initial state
            loss = loss + (s0l[s] * dsn[s]).sum()
            continue
        one = {n: t[:, :, lo:hi] for n, t in leaves.items()}
        o, sn = oracle(one["q"], one["k"], one["v"], one.get("beta"), one.get("g"), s0l[s : s + 1], delta)
        loss = loss + (o * do[:, :, lo:hi]).sum() + (sn * dsn[s : s + 1]).sum()
    ref = dict(zip([*names, "s0"], torch.autograd.grad(loss, [*leaves.values(), s0l]), strict=True))

    f32 = {n: x[n].float().contiguous() for n in names}  # type: ignore[union-attr]
    table = dc.chunk_table(cu, total, 16)
    assert table.slots == total // 16 + nseq
    cfg = dc.ChunkConfig(sub=4, block_dk=16, block_e_state=16, block_e_out=16)
    fw = dc.chunk_forward(
        f32["q"], f32["k"], f32["v"], f32.get("beta"), f32.get("g"), s0.float(),
        delta=delta, chunk=16, config=cfg, table=table,
    )  # fmt: skip
    assert fw.sn.shape == (nseq, 2, case.E, case.D) and fw.hs.shape[2] == table.slots
    grads = cb.chunk_backward(
        f32["q"], f32["k"], f32["v"], f32.get("beta"), f32.get("g"), do.float(), dsn.float(),
        gc=fw.gc, ai=fw.ai, w=fw.w, ut=fw.ut, hs=fw.hs, u=fw.u, delta=delta, chunk=16, table=table,
    )  # fmt: skip
    got = dict(zip(("q", "k", "v", "beta", "g", "s0"), grads, strict=True))
    for n, want in ref.items():
        have = got[n]
        assert have is not None and have.shape == want.shape, (n, None if have is None else have.shape)
        err = (have.double() - want).abs().max().item()
        scale = max(1.0, want.abs().max().item())
        assert err <= TOL[torch.float32] * scale, f"d{n}: max error {err:.3g} (scale {scale:.3g})"
