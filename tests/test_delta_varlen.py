"""`NAME_varlen` of state blocks (docs/delta.md "Packed variable-length batches"): the zoo's delta-rule specs on
a packed batch (cu_seqlens) against per-sequence calls of the batched `NAME` and the float64 token-by-token
recurrences of tests/test_delta_spec.py; GQA and a per-sequence auxiliary in a spec of its own; bad inputs;
the sm_90 AOT of the varlen kernels.

Sizes are small (H = 2, D = 16, E = 8, 95 tokens): the Triton kernels run under the interpreter on CPU.
Tolerances (fp32 inputs): outputs and states 3e-5 absolute / 1e-4 relative against the float64 oracle;
gradients 1e-4 / 1e-4 against the per-sequence calls (the same kernels summing in another order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attnc.zoo.ops import spec_path

import attnc

from .test_delta_spec import F64, VARIANTS, inputs, oracle

F32 = torch.float32
LENS = (
    0,
    1,
    19,
    70,
    5,
)  # an empty sequence, a single token, two chunks of 64 (the second partial), short ones
FWD_TOL = {"atol": 3e-5, "rtol": 1e-4}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}
H, E, D = 2, 8, 16


@pytest.fixture(scope="module")
def mods():
    return {name: attnc.compile(str(spec_path(name))) for name in VARIANTS}


def _keep32(variant: str, name: str) -> bool:
    return variant in ("kda", "gla") and name == "g"  # declared float32 in their specs


def _sequences(variant: str, lens=LENS) -> list[dict[str, torch.Tensor]]:
    """Per-sequence batched inputs [1, H, n, ...] in float64 (seeded by the sequence number)."""
    return [inputs(variant, n, seed=10 + s) for s, n in enumerate(lens)]


def _pack(seqs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """[1, heads, n, ...] per sequence → [total, heads, ...]."""
    return {name: torch.cat([x[name][0].movedim(1, 0) for x in seqs]) for name in seqs[0]}


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _leaves(variant: str, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.to(F32).clone().requires_grad_(True) for n, t in x.items()}


def _loss_weights(total: int, nseq: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(total, H, E, generator=gen), torch.randn(nseq, H, E, D, generator=gen)


def _case_id(variant: str, alg: str, backend: str, lens=LENS) -> str:
    return f"{variant}-{alg}-{backend}-lens{'_'.join(map(str, lens))}-fp32"


CASES = [
    (variant, alg, backend)
    for variant in VARIANTS
    for backend in ("reference", "triton")
    for alg in (["recurrent"] if variant == "rwkv7" else ["recurrent", "chunk"])  # chunk: no general a bᵀ
    if not (backend == "reference" and alg == "chunk")  # the reference has one algorithm
]


@pytest.mark.parametrize(("variant", "alg", "backend"), CASES, ids=[_case_id(*c) for c in CASES])
def test_varlen_matches_per_sequence_calls_and_the_paper(mods, variant: str, alg: str, backend: str) -> None:
    """Outputs and per-sequence states against the float64 recurrence of each sequence; gradients of q, k, v,
    every auxiliary (beta, g, ...) and initial_state against per-sequence calls of the batched `NAME`."""
    mod = mods[variant]
    seqs = _sequences(variant)
    cu, nseq = _cu(LENS), len(LENS)
    packed = _pack(seqs)
    total = packed["q"].shape[0]
    s0 = torch.randn(nseq, H, E, D, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.5
    leaves = _leaves(variant, packed)
    s0_leaf = s0.to(F32).clone().requires_grad_(True)
    fn = getattr(mod, f"{variant}_varlen")
    o, sn = fn(
        *leaves.values(),
        cu_seqlens=cu,
        initial_state=s0_leaf,
        return_state=True,
        algorithm=alg,
        backend=backend,
    )
    assert o.shape == (total, H, E) and o.dtype == F32 and sn.shape == (nseq, H, E, D)

    # the papers' recurrences, per sequence, in float64 on the same fp32-rounded inputs
    for s, x in enumerate(seqs):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi == lo:
            torch.testing.assert_close(sn[s].double(), s0[s].to(F32).double(), **FWD_TOL)
            continue
        xr = {n: t.to(F32).double() for n, t in x.items()}
        o_ref, sn_ref = oracle(variant, xr, s0[s : s + 1].to(F32).double())
        torch.testing.assert_close(o[lo:hi].double(), o_ref[0].movedim(1, 0), **FWD_TOL)
        torch.testing.assert_close(sn[s].double(), sn_ref[0], **FWD_TOL)

    # gradients against the batched entry point called once per sequence (same backend and algorithm)
    do, dsn = _loss_weights(total, nseq)
    got = torch.autograd.grad((o * do).sum() + (sn * dsn).sum(), [*leaves.values(), s0_leaf])
    per = _leaves(variant, packed)
    s0_per = s0.to(F32).clone().requires_grad_(True)
    loss = torch.zeros((), dtype=F32)
    batched = getattr(mod, variant)
    for s in range(nseq):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi == lo:
            loss = loss + (s0_per[s] * dsn[s]).sum()  # an empty sequence returns its initial state
            continue
        one = [t[lo:hi].movedim(0, 1)[None] for t in per.values()]
        o1, s1 = batched(
            *one, initial_state=s0_per[s : s + 1], return_state=True, algorithm=alg, backend=backend
        )
        loss = loss + (o1[0].movedim(1, 0) * do[lo:hi]).sum() + (s1[0] * dsn[s]).sum()
    want = torch.autograd.grad(loss, [*per.values(), s0_per])
    for name, a, b in zip([*leaves, "initial_state"], got, want, strict=True):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_without_initial_state_and_with_max_seqlen(mods) -> None:
    """No initial_state: every sequence starts from zeros; o alone unless return_state; max_seqlen given
    (no host read of the offsets on CUDA) gives the same result."""
    mod = mods["gated_deltanet"]
    lens = (3, 0, 20)
    packed = {n: t.to(F32) for n, t in _pack(_sequences("gated_deltanet", lens)).items()}
    cu = _cu(lens)
    o = mod.gated_deltanet_varlen(*packed.values(), cu_seqlens=cu, backend="triton", algorithm="recurrent")
    o2, sn = mod.gated_deltanet_varlen(
        *packed.values(), cu_seqlens=cu, max_seqlen=20, return_state=True, backend="triton"
    )
    torch.testing.assert_close(o, o2, atol=0, rtol=0)
    assert torch.equal(sn[1], torch.zeros(H, E, D))
    for s, (lo, hi) in enumerate([(0, 3), (3, 3), (3, 23)]):
        if hi == lo:
            continue
        one = [t[lo:hi].movedim(0, 1)[None] for t in packed.values()]
        o1, s1 = mod.gated_deltanet(*one, return_state=True, backend="reference")
        torch.testing.assert_close(o[lo:hi], o1[0].movedim(1, 0), **FWD_TOL)
        torch.testing.assert_close(sn[s], s1[0], **FWD_TOL)


def test_every_sequence_empty(mods) -> None:
    mod = mods["deltanet"]
    x = {n: t[:0].to(F32) for n, t in _pack(_sequences("deltanet", (2,))).items()}
    s0 = torch.randn(2, H, E, D)
    o, sn = mod.deltanet_varlen(
        *x.values(), cu_seqlens=_cu((0, 0)), initial_state=s0, return_state=True, backend="triton"
    )
    assert o.shape == (0, H, E)
    assert torch.equal(sn, s0)


GQA_SPEC = """\
attention gqa_delta(q: [B, H, N, D], k: [B, G, N, D], v: [B, G, N, E], beta: [B, G, N], w: [B, H]) {
    let bt = beta[b, hk, i]
    state S = S @ (exp(-0.1 * w[b, h]) * (I - bt * outer(k, k))) + outer(bt * v, k)
    read  = S @ q
}
"""


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_shared_kv_heads_and_a_per_sequence_auxiliary(tmp_path, backend: str) -> None:
    """k, v, beta with G < H heads (GQA, read at hk) and w [B, H] (one row per sequence in the packed form:
    [nseq, H]): the varlen form equals per-sequence calls, gradients included."""
    spec = tmp_path / "gqa_delta.attn"
    spec.write_text(GQA_SPEC)
    mod = attnc.compile(str(spec))
    lens = (5, 0, 17, 1)
    cu, nseq, total = _cu(lens), len(lens), sum(lens)
    gen = torch.Generator().manual_seed(5)
    Hq, G = 4, 2
    x = {
        "q": torch.randn(total, Hq, D, generator=gen),
        "k": F.normalize(torch.randn(total, G, D, generator=gen), dim=-1),
        "v": torch.randn(total, G, E, generator=gen),
        "beta": torch.rand(total, G, generator=gen),
        "w": torch.rand(nseq, Hq, generator=gen),
    }
    s0 = torch.randn(nseq, Hq, E, D, generator=gen)
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    s0_leaf = s0.clone().requires_grad_(True)
    o, sn = mod.gqa_delta_varlen(
        *leaves.values(), cu_seqlens=cu, initial_state=s0_leaf, return_state=True, backend=backend
    )
    do = torch.randn(o.shape, generator=gen)
    got = torch.autograd.grad((o * do).sum() + sn.sum(), [*leaves.values(), s0_leaf])
    per = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    s0_per = s0.clone().requires_grad_(True)
    loss = torch.zeros(())
    for s in range(nseq):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi == lo:
            loss = loss + s0_per[s].sum()
            continue
        one = [per[n][lo:hi].movedim(0, 1)[None] for n in ("q", "k", "v", "beta")]
        o1, s1 = mod.gqa_delta(
            *one, per["w"][s : s + 1], initial_state=s0_per[s : s + 1], return_state=True, backend=backend
        )
        torch.testing.assert_close(o[lo:hi], o1[0].movedim(1, 0), **FWD_TOL)
        torch.testing.assert_close(sn[s], s1[0], **FWD_TOL)
        loss = loss + (o1[0].movedim(1, 0) * do[lo:hi]).sum() + s1.sum()
    want = torch.autograd.grad(loss, [*per.values(), s0_per])
    for name, a, b in zip([*x, "initial_state"], got, want, strict=True):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, n=name: f"d{n}: {m}")


def _bad_calls(mods):
    gd, rw = mods["gated_deltanet"], mods["rwkv7"]
    xg = {n: t.to(F32) for n, t in _pack(_sequences("gated_deltanet", (3, 4))).items()}
    xr = {n: t.to(F32) for n, t in _pack(_sequences("rwkv7", (3, 4))).items()}
    cu = _cu((3, 4))
    g_args = list(xg.values())

    def gdn(**kw):
        return lambda: gd.gated_deltanet_varlen(*g_args, **({"cu_seqlens": cu, "backend": "triton"} | kw))

    return [
        ("int64", gdn(cu_seqlens=cu.long()), r"cu_seqlens: expected an int32 tensor \[nseq \+ 1\]"),
        ("2d", gdn(cu_seqlens=cu[None]), r"cu_seqlens: expected an int32 tensor \[nseq \+ 1\] .* of shape \[1, 3\]"),
        ("list", gdn(cu_seqlens=[0, 3, 7]), r"cu_seqlens: expected an int32 tensor .* got list"),
        ("last", gdn(cu_seqlens=_cu((3, 3))), r"cu_seqlens: offsets must start at 0, never decrease and end at the packed length 7"),
        ("first", gdn(cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32)), r"start at 0, .*packed length 7"),
        ("decreasing", gdn(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), r"never decrease"),
        ("max_seqlen", gdn(max_seqlen=-1), r"max_seqlen for cu_seqlens: expected a non-negative int"),
        ("state", gdn(initial_state=torch.zeros(3, H, E, D)), r"initial_state must be a float tensor \[nseq, H, E, D\] = \[2, 2, 8, 16\]"),
        ("q rank", lambda: gd.gated_deltanet_varlen(xg["q"][None], *g_args[1:], cu_seqlens=cu), r"q: expected"),
        ("beta", lambda: gd.gated_deltanet_varlen(*g_args[:3], xg["beta"][:5], xg["g"], cu_seqlens=cu), r"beta"),
        ("rwkv7 chunk", lambda: rw.rwkv7_varlen(*xr.values(), cu_seqlens=cu, algorithm="chunk", backend="triton"),
         r"algorithm='chunk' covers the delta rule .* a general a bᵀ part runs with algorithm='recurrent'"),
        ("backend", gdn(backend="cuda"), r"backend='cuda': gated_deltanet_varlen has the backends"),
    ]  # fmt: skip


_BAD = ["int64", "2d", "list", "last", "first", "decreasing", "max_seqlen", "state", "q rank", "beta",
        "rwkv7 chunk", "backend"]  # fmt: skip


@pytest.mark.parametrize("label", _BAD)
def test_bad_inputs_raise_clear_value_errors(mods, label: str) -> None:
    call, match = next((c, m) for lab, c, m in _bad_calls(mods) if lab == label)
    with pytest.raises(ValueError, match=match):
        call()


def test_docs_example_runs_as_written(monkeypatch, capsys) -> None:
    """docs/delta.md "Packed variable-length batches": its example, run from the repository root."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "delta.md").read_text()
    section = text.split("## Packed variable-length batches", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(root)
    exec(compile(code, "docs/delta.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([44, 2, 16]) torch.Size([4, 2, 16, 16])"


@pytest.mark.slow  # as the delta kernels' AOT test of tests/test_delta_rule.py: ~sm_90 compiles, run with -m slow
def test_varlen_kernels_compile_for_sm90_without_spills() -> None:
    """The packed kernels a packed batch launches (delta_aot.jobs(varlen=True): the recurrent forward and
    backward, core_abi.DELTA_VARLEN, and the chunk-parallel forward and backward in their chunk-table form)
    compile for sm_90 at D = 64 and 128 without spills, every chunk kernel with a tl.dot on wgmma at 128."""
    pytest.importorskip("triton.backends.nvidia")
    from attnc.codegen.triton import delta_aot
    from attnc.codegen.triton.aot import KernelReport, compile_reports, format_table

    from attnc.runtime import core_abi

    jobs = delta_aot.jobs(90, "fp16", 64, varlen=True) + delta_aot.jobs(90, "bf16", 128, varlen=True)
    sigs = (*core_abi.DELTA_VARLEN, *core_abi.DELTA_CHUNK_PARALLEL, *core_abi.DELTA_CHUNK_BWD_KERNELS)
    reports = compile_reports(jobs, max_workers=2, raise_on_error=False)
    failed = [str(r) for r in reports if not isinstance(r, KernelReport)]
    assert not failed, "\n".join(failed)
    print(format_table(reports))  # registers and spills, shown with -s
    assert {r.name for r in reports} == {sig.name for sig in sigs}
    assert all(dict(j.constexprs).get("VARLEN", True) for j in jobs)  # only packed forms
    spills = [f"{r.name} {r.config}: {r.spill_bytes} B" for r in reports if r.spill_bytes]
    assert not spills, "\n".join(spills)
    chunk = {sig.name for sig in sigs[len(core_abi.DELTA_VARLEN) :]}
    no_dot = {core_abi.DELTA_CHUNK_PREP.name, core_abi.DELTA_CBWD_WY.name}  # GLA's: a cumsum, no tl.dot
    no_wgmma = [
        f"{r.name} {r.config}"
        for j, r in zip(jobs, reports, strict=True)
        if r.name in chunk and j.constexprs["D"] == 128 and not r.uses_wgmma
        and (j.constexprs["DELTA"] or r.name not in no_dot)
    ]  # fmt: skip
    assert not no_wgmma, "no wgmma:\n" + "\n".join(no_wgmma)
