"""The chunk-parallel forward (attnc/runtime/delta_chunk.py, delta_chunk_kernels.py) against the papers'
token-by-token recurrences in float64 (the oracles of tests/test_delta_rule.py): outputs and final state of
DeltaNet, Gated DeltaNet, KDA and GLA (per-channel and scalar gate), and the intermediates the backward reads
(GC, AI, W, UT, HS, U) against a float64 evaluation of their definitions.

The kernels run under the Triton interpreter on CPU: small head dims, chunks of 16-64 with sub-blocks of 4-8
and D-blocks of 16 in the default run, so that every code path (several sub-blocks, D-blocks and E-blocks,
a ragged last chunk, T < C, T = 1, D/E not powers of two, shared heads) is exercised cheaply. The sm_90
ahead-of-time compile (0 spills, wgmma) runs at the default schedules, D = E = 64 and 128.
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from attnc.runtime import core_abi
from attnc.runtime import delta_chunk as dc
from attnc.runtime.signature import KernelSignature

from .test_delta_rule import oracle_delta, oracle_gla, oracle_kda

# (atol, rtol) per input dtype. fp32: the kernels accumulate in fp32 with ieee dots (≈ 1e-6 observed);
# fp16: q, k, v rounded to fp16 (the oracle sees the same rounded values), β and g stay float32, every
# product and accumulation in fp32 (tf32 on GPU): looser for the tf32 products a GPU run takes.
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3)}

VARIANTS = {  # name: (delta, gate: None | "scalar" | "channel")
    "deltanet": (True, None),
    "gated": (True, "scalar"),
    "kda": (True, "channel"),
    "gla": (False, "channel"),
    "gla1": (False, "scalar"),
}


@dataclass(frozen=True)
class Case:
    variant: str
    B: int = 1
    H: int = 1
    T: int = 37
    D: int = 16
    E: int = 16
    chunk: int = 16
    hqk: int | None = None  # heads of q and k when shared by several state heads (GQA-style)
    hv: int | None = None  # heads of v (and β, g) when shared
    dtype: torch.dtype = torch.float32
    s0: bool = True
    sub: int = 4

    @property
    def id(self) -> str:
        share = (f"-Hqk{self.hqk}" if self.hqk else "") + (f"-Hv{self.hv}" if self.hv else "")
        dt = {torch.float32: "fp32", torch.float16: "fp16"}[self.dtype]
        s0 = "" if self.s0 else "-nos0"
        return (
            f"{self.variant}-B{self.B}-H{self.H}{share}-T{self.T}-D{self.D}-E{self.E}-C{self.chunk}"
            f"-sub{self.sub}{s0}-{dt}"
        )


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 leaves as the models feed them (L2-normalised keys, β = sigmoid, log-gates = logsigmoid ≤ 0);
    q, k, v rounded through case.dtype, β and g not (they stay float32 in the kernels)."""
    gen = torch.Generator().manual_seed(seed)
    B, H, T, D, E = case.B, case.H, case.T, case.D, case.E
    hqk, hv = case.hqk or H, case.hv or H
    delta, gate = VARIANTS[case.variant]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x: dict[str, torch.Tensor | None] = {
        "q": (rnd(B, hqk, T, D) * 0.5).to(case.dtype).double(),
        "k": torch.nn.functional.normalize(rnd(B, hqk, T, D), dim=-1).to(case.dtype).double(),
        "v": rnd(B, hv, T, E).to(case.dtype).double(),
        "beta": torch.sigmoid(rnd(B, hv, T)).float().double() if delta else None,
        "g": None,
        "s0": (rnd(B, H, E, D) * 0.5).float().double() if case.s0 else None,
    }
    if gate == "scalar":
        x["g"] = torch.nn.functional.logsigmoid(rnd(B, hv, T) + 2.0).float().double()
    elif gate == "channel":
        x["g"] = torch.nn.functional.logsigmoid(rnd(B, hv, T, D) + 2.0).float().double()
    return x


def _heads(x: torch.Tensor | None, H: int) -> torch.Tensor | None:
    return None if x is None else x.repeat_interleave(H // x.shape[1], dim=1)


def run_oracle(case: Case, x: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's recurrence in float64 at H state heads."""
    H = case.H
    q, k, v, beta, g = (_heads(x[n], H) for n in ("q", "k", "v", "beta", "g"))
    assert q is not None and k is not None and v is not None
    s0 = x["s0"] if x["s0"] is not None else torch.zeros(case.B, H, case.E, case.D, dtype=torch.float64)
    if case.variant in ("deltanet", "gated"):
        return oracle_delta(q, k, v, beta, g, s0)
    if case.variant == "kda":
        return oracle_kda(q, k, v, beta, g, s0)
    assert g is not None
    if g.dim() == 3:  # a scalar gate: GLA with the same decay on every key channel
        g = g[..., None].expand(*g.shape, case.D)
    return oracle_gla(q, k, v, g, s0)


def run_kernels(case: Case, x: dict[str, torch.Tensor | None], store: bool = True) -> dc.ChunkForward:
    delta, _ = VARIANTS[case.variant]

    def f32(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float().contiguous()

    q, k, v = (x[n].to(case.dtype).contiguous() for n in ("q", "k", "v"))  # type: ignore[union-attr]
    # Small sub-blocks, D-blocks and E-blocks: D, E = 16..32 already take several of each.
    cfg = dc.ChunkConfig(sub=case.sub, block_dk=16, block_e_state=16, block_e_out=16)
    return dc.chunk_forward(
        q,
        k,
        v,
        f32(x["beta"]),
        f32(x["g"]),
        f32(x["s0"]),
        delta=delta,
        chunk=case.chunk,
        store=store,
        config=cfg,
    )


CASES = [
    Case("deltanet", B=2, H=4, T=37, D=32, E=16, hqk=2),  # shared q/k, 3 chunks (last ragged), 2 D-blocks
    Case("deltanet", T=1),  # one decoding step
    Case("deltanet", H=2, T=100, D=16, E=32, chunk=32, sub=8),  # 2 E-blocks
    Case("gated", B=2, H=2, T=37, D=32, E=16),
    Case("gated", T=100, chunk=64, sub=16, s0=False),
    Case("gated", T=13, D=24, E=20, chunk=32),  # T < C; D, E not powers of two
    Case("kda", B=2, H=4, T=37, D=32, E=16, hqk=2),
    Case("kda", T=100, D=16, E=32, chunk=32, sub=8),
    Case("kda", T=1),
    Case("kda", H=2, T=21, D=24, E=20, hv=1),  # shared v, β, g; D, E not powers of two
    Case("gla", B=2, H=2, T=37, D=32, E=16),
    Case("gla", T=100, chunk=32, sub=8, s0=False),
    Case("gla", T=1, D=24, E=20),
    Case("gla1", H=2, T=37, D=16, E=32, hqk=1),
    Case("deltanet", T=37, dtype=torch.float16),
    Case("gated", T=37, D=32, dtype=torch.float16),
    Case("kda", T=37, D=32, dtype=torch.float16),
    Case("gla", T=37, dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_the_papers_recurrence(case: Case) -> None:
    x = make_inputs(case)
    o_ref, s_ref = run_oracle(case, x)
    r = run_kernels(case, x)
    atol, rtol = TOL[case.dtype]
    torch.testing.assert_close(r.o.double(), o_ref, atol=atol, rtol=rtol, msg=lambda m: f"o: {m}")
    torch.testing.assert_close(r.sn.double(), s_ref, atol=atol, rtol=rtol, msg=lambda m: f"state: {m}")


# ---------------------------------------------------------------------------------------------- intermediates


def intermediates64(case: Case, x: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The contract's intermediates by their definitions, in float64, at H state heads, [B, H, ...]:
    GC (Γ per chunk), AI (Tinv rows), W, UT (Ũ), HS (state entering each chunk, from the token recurrence)
    and U (u_t = β_t (v_t − S_{t−1} Diag(α_t) k_t), from the same recurrence)."""
    H, C, T, E, D = case.H, case.chunk, case.T, case.E, case.D
    delta = VARIANTS[case.variant][0]
    k, v, beta, g = (_heads(x[n], H) for n in ("k", "v", "beta", "g"))
    assert k is not None and v is not None
    B = case.B
    S = x["s0"].clone() if x["s0"] is not None else torch.zeros(B, H, E, D, dtype=torch.float64)
    gk = None
    if g is not None:
        gk = g[..., None].expand(B, H, T, D) if g.dim() == 3 else g
    hs, us = [], []
    for t in range(T):
        if t % C == 0:
            hs.append(S.clone())
        Sd = S if gk is None else S * gk[:, :, t, None, :].exp()  # S_{t−1} Diag(α_t)
        if delta:
            assert beta is not None
            u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhed,bhd->bhe", Sd, k[:, :, t]))
        else:
            u = v[:, :, t]
        us.append(u)
        S = Sd + u[..., None] * k[:, :, t, None, :]
    out: dict[str, torch.Tensor | None] = {
        "hs": torch.stack(hs, 2),
        "u": torch.stack(us, 2) if delta else None,
    }
    gc = None
    if g is not None:
        pad = (-T) % C
        gp = torch.nn.functional.pad(g, (0, 0, 0, pad) if g.dim() == 4 else (0, pad))
        shape = (B, H, -1, C, D) if g.dim() == 4 else (B, H, -1, C)
        gc = gp.reshape(shape).cumsum(3).reshape(B, H, T + pad, *gp.shape[3:])[:, :, :T]
    out["gc"] = gc
    if delta:
        assert beta is not None
        ai, w, ut = [], [], []
        for c0 in range(0, T, C):
            n = min(C, T - c0)
            kc, vc, bc = k[:, :, c0 : c0 + n], v[:, :, c0 : c0 + n], beta[:, :, c0 : c0 + n]
            if gc is None:
                gam = torch.zeros(B, H, n, D, dtype=torch.float64)
            else:
                gam = gc[:, :, c0 : c0 + n]
                gam = gam[..., None].expand(B, H, n, D) if gam.dim() == 3 else gam
            # ⟨k_i, k_j⟩_Γ = Σ_d k_i k_j e^{Γ_i − Γ_j}, j < i (float64: e^{−Γ} is harmless at these sizes)
            dec = (gam[:, :, :, None, :] - gam[:, :, None, :, :]).exp()
            A = bc[..., None] * torch.einsum("bhid,bhjd,bhijd->bhij", kc, kc, dec).tril(-1)
            Tinv = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + A)
            ai.append(torch.nn.functional.pad(Tinv, (0, C - n)))
            w.append(Tinv @ (bc[..., None] * kc * gam.exp()))
            ut.append(Tinv @ (bc[..., None] * vc))
        out |= {"ai": torch.cat(ai, 2), "w": torch.cat(w, 2), "ut": torch.cat(ut, 2)}
    return out


INTERMEDIATE_CASES = [
    Case("kda", B=2, H=2, T=37, D=32, E=16, hqk=1),
    Case("gated", T=37, D=16, E=32, chunk=32, sub=8),
    Case("deltanet", T=21, D=24, E=20),
    Case("gla", T=37, D=16, E=16),
]


@pytest.mark.parametrize("case", INTERMEDIATE_CASES, ids=lambda c: c.id)
def test_intermediates_match_their_definitions(case: Case) -> None:
    """What the backward reads (the design's contract): shapes, float32, and values."""
    x = make_inputs(case)
    r = run_kernels(case, x)
    ref = intermediates64(case, x)
    B, H, T, D, E, C = case.B, case.H, case.T, case.D, case.E, case.chunk
    NT = -(-T // C)
    delta, gate = VARIANTS[case.variant]
    want = {
        "hs": (B, H, NT, E, D),
        "gc": None if gate is None else (B, H, T, D) if gate == "channel" else (B, H, T),
        "ai": (B, H, T, C) if delta else None,
        "w": (B, H, T, D) if delta else None,
        "ut": (B, H, T, E) if delta else None,
        "u": (B, H, T, E) if delta else None,
    }
    for name, shape in want.items():
        got = getattr(r, name)
        if shape is None:
            assert got is None, name
            continue
        assert got is not None and tuple(got.shape) == shape and got.dtype == torch.float32, name
        expect = ref[name]
        assert expect is not None
        torch.testing.assert_close(
            got.double(), expect, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert r.o.shape == (B, H, T, E) and r.sn.shape == (B, H, E, D)


def test_store_false_skips_tinv_only() -> None:
    case = Case("gated", T=20)
    x = make_inputs(case)
    full, lean = run_kernels(case, x), run_kernels(case, x, store=False)
    assert lean.ai is None and full.ai is not None
    torch.testing.assert_close(lean.o, full.o, atol=0, rtol=0)
    torch.testing.assert_close(lean.sn, full.sn, atol=0, rtol=0)


def test_default_schedule_matches_the_oracle() -> None:
    """chunk_forward without a config (`default_chunk_config`) at its default chunk of 64."""
    for variant in ("kda", "gated", "gla"):
        case = Case(variant, H=2, T=70, D=16, E=24, hqk=1, chunk=64, sub=16)
        x = make_inputs(case)
        o_ref, s_ref = run_oracle(case, x)
        q, k, v = (x[n].float() for n in ("q", "k", "v"))  # type: ignore[union-attr]
        beta, g, s0 = (None if x[n] is None else x[n].float() for n in ("beta", "g", "s0"))  # type: ignore[union-attr]
        r = dc.chunk_forward(q, k, v, beta, g, s0, delta=VARIANTS[variant][0])
        torch.testing.assert_close(r.o.double(), o_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(r.sn.double(), s_ref, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- stress


def _stress(T: int) -> None:
    """Per-channel log-decays down to −5 per step (Γ reaches −320 in one chunk of 64): no e^{−Γ} is formed, so
    float32 stays finite and within 1e-4 of float64, for KDA and GLA at the default chunk and sub-block."""
    gen = torch.Generator().manual_seed(3)
    B, H, D, E = 1, 1, 16, 16
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, E, generator=gen, dtype=torch.float64)
    g = (-5 * torch.rand(B, H, T, D, generator=gen, dtype=torch.float64)).float().double()
    beta = torch.sigmoid(torch.randn(B, H, T, generator=gen, dtype=torch.float64)).float().double()
    s0 = torch.zeros(B, H, E, D, dtype=torch.float64)
    cfg = dc.ChunkConfig(sub=16, block_dk=16, block_e_state=16, block_e_out=16)
    for delta in (True, False):
        o64, s64 = oracle_kda(q, k, v, beta, g, s0) if delta else oracle_gla(q, k, v, g, s0)
        r = dc.chunk_forward(
            q.float(), k.float(), v.float(), beta.float() if delta else None, g.float(), None,
            delta=delta, chunk=64, config=cfg,
        )  # fmt: skip
        assert torch.isfinite(r.o).all() and torch.isfinite(r.sn).all()
        assert (r.o.double() - o64).abs().max().item() < 1e-4
        assert (r.sn.double() - s64).abs().max().item() < 1e-4


def test_float32_channel_decay_stress_T2048() -> None:
    """≈ 13 s under the interpreter (32 chunks of 64, both variants): in the default run."""
    _stress(2048)


# ---------------------------------------------------------------------------------------------- signatures


def assert_defs_match(kernels_file: str, sigs: tuple[KernelSignature, ...]) -> None:
    """Every `*_kernel` def of the runtime's `kernels_file` is one of `sigs` exactly (names, order,
    constexpr annotations), and every signature has its def."""
    src = (Path(core_abi.__file__).parent / kernels_file).read_text()
    fns = {
        n.name: n
        for n in ast.parse(src).body
        if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")
    }
    assert set(fns) == {s.name for s in sigs}
    for sig in sigs:
        args = fns[sig.name].args.args
        assert tuple(a.arg for a in args) == sig.names, sig.name
        assert {a.arg for a in args if a.annotation is not None} == set(sig.constexprs), sig.name


def test_kernel_defs_match_their_signatures() -> None:
    """Each `def` of delta_chunk_kernels.py is its core_abi signature (names, order, constexprs): launches bind
    by those names and the AOT compile types from them (as test_kernel_structure does for delta_kernels.py)."""
    assert_defs_match("delta_chunk_kernels.py", core_abi.DELTA_CHUNK_PARALLEL)


# ---------------------------------------------------------------------------------------------- AOT

ALL_VARIANTS = [(gm, delta) for delta in (True, False) for gm in (2, 1, 0)]  # (G_MODE, DELTA)
# The default run: the widest variant of each kernel family (per-channel and scalar delta rule, GLA).
WIDEST = [(2, True), (1, True), (2, False)]


def aot_jobs(head_dim: int, dtype: str, variants: list[tuple[int, bool]]) -> list:
    """sm_90 jobs of every chunk-parallel forward kernel of each (G_MODE, DELTA) variant at the default schedule
    and C = 64 (codegen/triton/delta_aot.py, which `attnc inspect` uses too)."""
    from attnc.codegen.triton import delta_aot

    return delta_aot.chunk_forward_jobs(90, dtype, head_dim, variants)


def _compile_and_check(cases: list[tuple[int, str]], variants: list[tuple[int, bool]]) -> None:
    """Every job compiles, none spills, and at D = 128 every kernel with a tl.dot (all but GLA's prepare
    kernel, a cumsum) runs it on wgmma."""
    from attnc.codegen.triton.aot import KernelReport, compile_reports

    jobs, keys = [], []
    for hd, dtype in cases:
        js = aot_jobs(hd, dtype, variants)
        jobs += js
        keys += [(hd, dtype, j.constexprs["G_MODE"], j.constexprs["DELTA"]) for j in js]
    t0 = time.perf_counter()
    reports = compile_reports(jobs, max_workers=2, raise_on_error=False)
    failed = [str(r) for r in reports if not isinstance(r, KernelReport)]
    assert not failed, "\n".join(failed)
    print(f"\n{len(jobs)} sm_90 compiles in {time.perf_counter() - t0:.0f} s")
    print(
        f"{'kernel':22} {'D':>4} {'dtype':5} {'G_MODE':>6} {'DELTA':>5} {'warps':>5} {'regs':>4} {'spill':>5} wgmma"
    )
    for (hd, dtype, gm, delta), r in zip(keys, reports, strict=True):
        print(
            f"{r.name:22} {hd:4} {dtype:5} {gm:6} {delta!s:>5} {r.num_warps:5} {r.registers:4} {r.spill_bytes:5} "
            f"{'yes' if r.uses_wgmma else 'no'}"
        )
    spills = [f"{r.name} {r.config}: {r.spill_bytes} B" for r in reports if r.spill_bytes]
    assert not spills, "\n".join(spills)
    no_wgmma = [
        f"{r.name} {r.config}"
        for (hd, _, gm, delta), r in zip(keys, reports, strict=True)
        if hd == 128 and not r.uses_wgmma and (delta or r.name != core_abi.DELTA_CHUNK_PREP.name)
    ]
    assert not no_wgmma, "no wgmma:\n" + "\n".join(no_wgmma)


def test_default_schedules_compile_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    _compile_and_check([(64, "fp16"), (128, "bf16")], WIDEST)


@pytest.mark.slow
def test_every_variant_compiles_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    _compile_and_check([(64, "fp16"), (64, "bf16"), (128, "fp16"), (128, "bf16")], ALL_VARIANTS)


# ---------------------------------------------------------------------------------------------- packed batches

PACKED_LENS = (37, 0, 16, 5, 1)  # ragged chunks, an empty sequence, an exact chunk, short ones (C = 16)


def test_chunk_table_lists_every_chunk_of_every_sequence() -> None:
    """Slots: each sequence's chunks in order (first row, the sequence's end), then padding (total, total)."""
    cu = torch.tensor([0, 37, 37, 53, 58, 59], dtype=torch.int32)
    t = dc.chunk_table(cu, 59, 16)
    rows = [(lo, hi) for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
    want = [(r, hi) for lo, hi in rows for r in range(lo, hi, 16)]
    assert t.slots == 59 // 16 + 5
    want += [(59, 59)] * (t.slots - len(want))
    assert list(zip(t.crow.tolist(), t.cend.tolist(), strict=True)) == want
    assert t.co.tolist() == [0, 3, 3, 4, 5] and t.crow.dtype == t.cend.dtype == t.co.dtype == torch.int32


@pytest.mark.parametrize("variant", list(VARIANTS), ids=lambda v: f"{v}-H2-Hqk1-lens37_0_16_5_1-C16-fp32")
def test_packed_batch_matches_the_recurrence_of_each_sequence(variant: str) -> None:
    """The chunk-table form (VARLEN) on a packed batch [1, heads, total, ...]: each sequence's outputs and
    final state against the float64 recurrence of that sequence alone, from its own initial state; an empty
    sequence returns its initial state."""
    delta, _ = VARIANTS[variant]
    nseq, total = len(PACKED_LENS), sum(PACKED_LENS)
    case = Case(variant, H=2, T=total, hqk=1)
    x = make_inputs(case)
    s0 = torch.randn(nseq, 2, case.E, case.D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(PACKED_LENS).cumsum(0).tolist()], dtype=torch.int32)
    f32 = {n: None if x[n] is None else x[n].float().contiguous() for n in ("q", "k", "v", "beta", "g")}  # type: ignore[union-attr]
    cfg = dc.ChunkConfig(sub=4, block_dk=16, block_e_state=16, block_e_out=16)
    r = dc.chunk_forward(
        f32["q"], f32["k"], f32["v"], f32["beta"], f32["g"], s0.float(),  # type: ignore[arg-type]
        delta=delta, chunk=16, config=cfg, table=dc.chunk_table(cu, total, 16),
    )  # fmt: skip
    assert r.o.shape == (1, 2, total, case.E) and r.sn.shape == (nseq, 2, case.E, case.D)
    atol, rtol = TOL[torch.float32]
    for s in range(nseq):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi == lo:
            torch.testing.assert_close(r.sn[s].double(), s0[s].float().double(), atol=0, rtol=0)
            continue
        one = Case(variant, H=2, T=hi - lo, hqk=1)
        xs = {n: None if t is None else t[:, :, lo:hi] for n, t in x.items() if n != "s0"}
        o_ref, s_ref = run_oracle(one, {**xs, "s0": s0[s : s + 1]})
        torch.testing.assert_close(r.o[:, :, lo:hi].double(), o_ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(r.sn[s : s + 1].double(), s_ref, atol=atol, rtol=rtol)
