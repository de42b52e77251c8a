"""Context parallelism (attnc.distributed.context_parallel) on CPUs: gloo process groups of 2 and 4 spawned
processes, each holding its shard of the sequence, against the single-process operator over the whole
sequence (output, log-sum-exp and the gradients of q, k, v and of learned auxiliary tensors) and, for causal,
against PyTorch's scaled_dot_product_attention with an explicit mask.

Every case of one world size runs in one spawn (process start-up dominates on 2 cores); each case is then its
own test. Tolerances: float32 throughout, 2e-5 relative to the oracle's largest magnitude for the output and
log-sum-exp, 1e-4 for gradients (sums over ranks and pairs reassociate float32 additions).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from attnc.distributed import RankFailure, shard, sharding_for, spawn_ranks, unshard

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "examples" / "specs"
N = 64  # global sequence length: shards of 32 (2 ranks) or 16 (4 ranks); zigzag chunks of 16 or 8
B, H, D = 1, 2, 16


@dataclass(frozen=True)
class Case:
    spec: str
    scalars: tuple = ()  # extra positional scalars after the tensors
    label: str = ""

    @property
    def id(self) -> str:
        return self.label or self.spec


CASES = (
    Case("causal"),
    Case("sliding_window", (8,), "window-8"),  # W smaller than every shard: half of one at 4 ranks
    Case("sliding_window", (40,), "window-40"),  # W larger than a shard
    Case("document"),
    Case("alibi"),
    Case("prefix_lm", (20,), "prefix-20"),
    Case("sink"),
    Case("t5_bias", (8,), "t5-R8"),
)
STRATEGIES = ("ring", "allgather")
LAYOUTS = ("contiguous", "zigzag")
BACKENDS = ("reference", "triton")


def _module(spec: str, cache: str):  # type: ignore[no-untyped-def]
    import attnc

    return attnc.compile(str(SPECS / f"{spec}.attn"), cache_dir=Path(cache))


def _inputs(case: Case):  # type: ignore[no-untyped-def]
    """Full-sequence q, k, v and auxiliary tensors (learned ones float), the same on every process."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    aux: list = []
    if case.spec == "document":
        doc = torch.zeros(B, N, dtype=torch.int32)
        doc[:, 21:] = 1  # documents that straddle shard boundaries
        doc[:, 45:] = 2
        aux = [doc]
    elif case.spec in ("alibi",):
        aux = [torch.rand(H, generator=g)]
    elif case.spec == "sink":
        aux = [torch.randn(H, generator=g)]
    elif case.spec == "t5_bias":
        aux = [0.5 * torch.randn(H, 2 * case.scalars[0] + 1, generator=g)]
    return q, k, v, aux


def _loss(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 1.0, o.shape[-1])
    return (o * w).sum() + (o.square()).sum() * 0.1 + lse.sum() * 0.3


def _run_cases(rank: int, world: int, cases: list, cache: str) -> dict:
    """Worker: every (case, strategy, layout, backend) on this rank's shards; the outputs and gradients."""
    from attnc.distributed import context_parallel
    from attnc.distributed.api import ring_probe

    torch.set_num_threads(1)
    out = {}
    for case, strategy, layout, backend in cases:
        op = getattr(_module(case.spec, cache), case.spec)
        q, k, v, aux = _inputs(case)
        sh = sharding_for(layout, world, N // world)
        ql, kl, vl = (shard(t, 2, sh, rank).requires_grad_() for t in (q, k, v))
        auxl = [shard(a, 1, sh, rank) if a.dtype == torch.int32 else a.clone().requires_grad_() for a in aux]
        with ring_probe() as probe:
            o, lse = context_parallel(
                op, ql, kl, vl, *auxl, *case.scalars, strategy=strategy, layout=layout, backend=backend,
                return_lse=True,
            )  # fmt: skip
            _loss(o, lse).backward()
        out[(case, strategy, layout, backend)] = {
            "o": o.detach(),
            "lse": lse.detach(),
            "dq": ql.grad,
            "dk": kl.grad,
            "dv": vl.grad,
            "daux": [a.grad for a in auxl if a.is_floating_point()],
            "probe": dict(probe),
        }
    return out


@functools.cache
def _results(world: int, cache: str) -> list:
    cases = [(c, s, lay, be) for c in CASES for s in STRATEGIES for lay in LAYOUTS for be in BACKENDS]
    return spawn_ranks(world, _run_cases, cases, cache, timeout_s=600)


@functools.cache
def _oracle(case: Case, backend: str, cache: str) -> dict:
    op = getattr(_module(case.spec, cache), case.spec)
    q, k, v, aux = _inputs(case)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    aux = [a.clone().requires_grad_() if a.is_floating_point() else a for a in aux]
    o, lse = op(q, k, v, *aux, *case.scalars, return_lse=True, backend=backend)
    _loss(o, lse).backward()
    return {
        "o": o.detach(),
        "lse": lse.detach(),
        "dq": q.grad,
        "dk": k.grad,
        "dv": v.grad,
        "daux": [a.grad for a in aux if a.is_floating_point()],
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cp-modules"))


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    scale = max(1.0, float(ref.abs().max()))
    err = float((got - ref).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} × {scale:.3g}"


PARAMS = [
    pytest.param(w, c, s, lay, be, id=f"W{w}-{s}-{lay}-{be}-{c.id}")
    for w in (2, 4)
    for c in CASES
    for s in STRATEGIES
    for lay in LAYOUTS
    for be in BACKENDS
]


@pytest.mark.parametrize(("world", "case", "strategy", "layout", "backend"), PARAMS)
def test_matches_single_process(world, case, strategy, layout, backend, cache) -> None:  # type: ignore[no-untyped-def]
    res = _results(world, cache)
    ref = _oracle(case, backend, cache)
    sh = sharding_for(layout, world, N // world)
    key = (case, strategy, layout, backend)
    for name, rel in (("o", 2e-5), ("lse", 2e-5), ("dq", 1e-4), ("dk", 1e-4), ("dv", 1e-4)):
        _close(unshard([r[key][name] for r in res], 2, sh), ref[name], rel, name)
    for n, g in enumerate(ref["daux"]):
        for rank, r in enumerate(res):  # replicated learned inputs: the summed gradient on every rank
            _close(r[key]["daux"][n], g, 1e-4, f"rank {rank} aux gradient {n}")


def test_causal_matches_sdpa(cache) -> None:  # type: ignore[no-untyped-def]
    """An oracle independent of attnc: SDPA with the explicit causal mask, over the unsharded sequence."""
    res = _results(4, cache)
    q, k, v, _ = _inputs(CASES[0])
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for layout in LAYOUTS:
        sh = sharding_for(layout, 4, N // 4)
        for backend in BACKENDS:
            got = unshard([r[(CASES[0], "ring", layout, backend)]["o"] for r in res], 2, sh)
            _close(got, want, 2e-5, f"{layout} {backend}")


def test_zigzag_balances_causal(cache) -> None:  # type: ignore[no-untyped-def]
    """Causal over 4 ranks: zigzag gives every rank the same work (within one block); contiguous does not."""
    res = _results(4, cache)
    key = (CASES[0], "ring", "zigzag", "triton")
    pairs = [r[key]["probe"]["pairs"] for r in res]
    assert max(pairs) - min(pairs) <= 1, pairs
    contiguous = [r[(CASES[0], "ring", "contiguous", "triton")]["probe"]["steps"] for r in res]
    assert contiguous == [1, 2, 3, 4]  # rank r sees the blocks of ranks 0..r only: nothing else is computed


def test_sliding_window_skips_steps(cache) -> None:  # type: ignore[no-untyped-def]
    """W = shard / 2 = 8 on 4 ranks: each rank computes at most 2 steps (its own block and its left
    neighbour's), receives at most one block and sends only the block its right neighbour needs."""
    res = _results(4, cache)
    for layout in ("contiguous",):
        probes = [r[(CASES[1], "ring", layout, "triton")]["probe"] for r in res]
        assert all(p["steps"] <= 2 for p in probes), probes
        assert [p["sent"] for p in probes] == [1, 1, 1, 0], probes
        assert [p["received"] for p in probes] == [0, 1, 1, 1], probes


def _aligned_documents(rank: int, world: int, cache: str) -> dict:
    """Document ids that change exactly at shard boundaries: the per-chunk summaries prove every other block
    invisible, so each rank computes its own block only and no block is sent."""
    from attnc.distributed import context_parallel
    from attnc.distributed.api import ring_probe

    op = _module("document", cache).document
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    doc = (torch.arange(N) // (N // world)).to(torch.int32).expand(B, N).contiguous()
    sh = sharding_for("contiguous", world, N // world)
    with ring_probe() as probe:
        o = context_parallel(op, *(shard(t, 2, sh, rank) for t in (q, k, v)), shard(doc, 1, sh, rank))
    want = shard(op(q, k, v, doc), 2, sh, rank)
    return {"probe": dict(probe), "err": float((o - want).abs().max())}


def test_document_summaries_skip_blocks(cache) -> None:  # type: ignore[no-untyped-def]
    res = spawn_ranks(4, _aligned_documents, cache, timeout_s=300)
    assert all(r["err"] <= 1e-5 for r in res), res
    assert [r["probe"]["steps"] for r in res] == [1, 1, 1, 1], res
    assert sum(r["probe"]["sent"] + r["probe"]["received"] for r in res) == 0, res


# ---- the linear family through the same entry point ---------------------------------------------------------


def _linear_public(rank: int, world: int, cache: str) -> dict:
    """lightning through context_parallel: strategy None (the linear form's state passing) and the ring over
    its quadratic kernels (norm = none: partials summed)."""
    from attnc.distributed import context_parallel

    op = _module("lightning", cache).lightning
    g = torch.Generator().manual_seed(3)
    q, k, v = (0.5 * torch.randn(B, H, N, D, generator=g) for _ in range(3))
    decay = torch.rand(H, generator=g)
    out = {}
    for strategy, layout, backend in (
        (None, "zigzag", "reference"),
        (None, "contiguous", "triton"),
        ("ring", "zigzag", "triton"),
        ("ring", "contiguous", "reference"),
    ):
        sh = sharding_for(layout, world, N // world)
        ql, kl, vl = (shard(t, 2, sh, rank).requires_grad_() for t in (q, k, v))
        dl = decay.clone().requires_grad_()
        o = context_parallel(op, ql, kl, vl, dl, strategy=strategy, layout=layout, backend=backend)
        o.square().sum().backward()
        out[(strategy, layout, backend)] = (o.detach(), ql.grad, kl.grad, vl.grad, dl.grad)
    return out


def test_linear_family_entry_point(cache) -> None:  # type: ignore[no-untyped-def]
    op = _module("lightning", cache).lightning
    g = torch.Generator().manual_seed(3)
    q, k, v = (0.5 * torch.randn(B, H, N, D, generator=g) for _ in range(3))
    decay = torch.rand(H, generator=g)
    q, k, v, decay = (t.clone().requires_grad_() for t in (q, k, v, decay))
    want = op(q, k, v, decay, backend="reference")
    want.square().sum().backward()
    res = spawn_ranks(2, _linear_public, cache, timeout_s=300)
    for (strategy, layout, backend), _ in res[0].items():
        sh = sharding_for(layout, 2, N // 2)
        for n, ref in enumerate((want.detach(), q.grad, k.grad, v.grad)):
            got = unshard([r[(strategy, layout, backend)][n] for r in res], 2, sh)
            _close(got, ref, 1e-4, f"{strategy} {layout} {backend} output {n}")
        for r in res:
            _close(
                r[(strategy, layout, backend)][4], decay.grad, 1e-4, f"{strategy} {layout} {backend} d decay"
            )


# ---- bad setups: clear errors on every rank, never a hang ---------------------------------------------------


def _bad_shards(rank: int, world: int, cache: str) -> None:
    from attnc.distributed import context_parallel

    op = _module("causal", cache).causal
    n = 16 if rank == 0 else 8  # rank 1 holds a shorter shard
    q = torch.randn(B, H, n, D)
    context_parallel(op, q, q, q, backend="reference")


def _whole_aux(rank: int, world: int, cache: str) -> None:
    from attnc.distributed import context_parallel

    op = _module("document", cache).document
    q = torch.randn(B, H, 16, D)
    doc = torch.zeros(B, 16 * world, dtype=torch.int32)  # the whole sequence's ids, not this rank's shard
    context_parallel(op, q, q, q, doc, backend="reference")


def _missing_aux(rank: int, world: int, cache: str) -> None:
    from attnc.distributed import context_parallel

    op = _module("document", cache).document
    q = torch.randn(B, H, 16, D)
    doc = torch.zeros(B, 16, dtype=torch.int32)
    context_parallel(op, q, q, q, *((doc,) if rank == 0 else ()), backend="reference")  # rank 1 forgets it


def _one_rank(rank: int, world: int, cache: str) -> float:
    from attnc.distributed import context_parallel

    op = _module("causal", cache).causal
    q, k, v, _ = _inputs(CASES[0])
    o = context_parallel(op, q, k, v, backend="triton", layout="zigzag")
    return float((o - op(q, k, v, backend="triton")).abs().max())


def test_mismatched_shards_fail_on_every_rank(cache) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RankFailure) as err:
        spawn_ranks(2, _bad_shards, cache, timeout_s=60)
    text = str(err.value)
    assert "rank 0: ValueError" in text and "rank 1: ValueError" in text
    assert "differ across ranks" in text


def test_whole_aux_instead_of_shard(cache) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RankFailure) as err:
        spawn_ranks(2, _whole_aux, cache, timeout_s=60)
    assert "pass this rank's shard" in str(err.value)
    assert "rank 0: ValueError" in str(err.value) and "rank 1: ValueError" in str(err.value)


def test_missing_aux_on_one_rank(cache) -> None:  # type: ignore[no-untyped-def]
    """The rank that forgot an argument says which; the other names that rank: nobody waits."""
    with pytest.raises(RankFailure) as err:
        spawn_ranks(2, _missing_aux, cache, timeout_s=60)
    text = str(err.value)
    assert "rank 1: TypeError: document: missing argument 'doc'" in text
    assert "rank 0: ValueError: context_parallel: rank 1 refused its arguments" in text


def test_group_of_one(cache) -> None:  # type: ignore[no-untyped-def]
    (err,) = spawn_ranks(1, _one_rank, cache, timeout_s=60)
    assert err <= 1e-5


def test_needs_a_process_group(cache) -> None:  # type: ignore[no-untyped-def]
    from attnc.distributed import context_parallel

    op = _module("causal", cache).causal
    q = torch.randn(B, H, 16, D)
    with pytest.raises(RuntimeError, match="process group"):
        context_parallel(op, q, q, q)


def test_rejects_other_callables() -> None:
    from attnc.distributed import context_parallel

    with pytest.raises(TypeError, match="generated by attnc"):
        context_parallel(torch.nn.functional.scaled_dot_product_attention, None, None, None)


# ---- the kernels context parallelism launches, through Triton's full pipeline ------------------------------


def test_shifted_kernels_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    """The `_SHIFT` form of every kernel of causal, document and decay_abs (whose dQ kernel spilled under
    the shift until the tiles were bounded in positions) for sm_90 at the default schedules: no spills.
    benchmarks/aot_forms.py --forms shift covers every example spec."""
    from attnc.codegen.triton.aot import AOTCompileError, KernelReport, compile_reports
    from attnc.codegen.triton.inspect import Target, jobs
    from attnc.dsl.lower import compile_to_ir

    from attnc.runtime.triton import _triton_kernels

    runs = []
    for spec, dtype, width in (("causal", "fp16", 64), ("document", "fp16", 64), ("decay_abs", "bf16", 128)):
        path = SPECS / f"{spec}.attn"
        mod = _module(spec, str(tmp_path))
        att = compile_to_ir(path.read_text(), path.name).attentions[0]
        runs += jobs(
            att, _triton_kernels(mod.__file__, interpret=False), Target(90, dtype, width, shift=True)
        )
    reports = compile_reports(runs, max_workers=2, raise_on_error=False)
    failures = [str(r) for r in reports if isinstance(r, AOTCompileError)]
    assert not failures, "\n\n".join(failures)
    spilling = [
        f"{r.name}: {r.spill_bytes} B" for r in reports if isinstance(r, KernelReport) and r.spill_bytes
    ]
    assert not spilling, spilling
    assert len(reports) == 15
