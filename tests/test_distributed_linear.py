"""Context parallelism of the linear family (attnc.distributed.linear): chunked state passing across ranks.

Every spawned group (gloo, CPU; the Triton backend runs under the interpreter) checks many cases at once to
amortise the processes' start-up: for each spec, layout and backend, this rank's output shard and the
gradients of q, k, v and the learned decay against the single-process full-sequence `NAME_linear` (and,
on the reference backend, against the token-by-token recurrence written below), then a bad input. The
generated API it relies on (position_offset, initial_log_decay, return_log_decay) is checked without a
process group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnc
from attnc.distributed import shard, sharding_for, spawn_ranks
from attnc.distributed.linear import linear_context_parallel

SPECS = Path(__file__).resolve().parent.parent / "examples" / "specs"
# Normalised max error (max |a - b| / max(1, max |b|)) per dtype: float32 throughout these cases (the CPU
# Triton interpreter computes fp32 dots exactly as numpy). The chunked sums reassociate, nothing else.
TOL = {torch.float32: 1e-5}
B, H, D = 1, 2, 16
CAUSAL_SPECS = ("lightning", "retention")


def _compile(spec: str, cache: str):
    return attnc.compile(SPECS / f"{spec}.attn", cache_dir=Path(cache))


def _data(spec: str, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Full-sequence inputs (q, k, v, *aux) of `spec`, float32."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    if spec == "lightning":
        aux = [torch.rand(H, generator=g) * 0.2 + 0.05]  # decay > 0
    elif spec == "retention":
        aux = [torch.rand(H, generator=g) * 0.2 + 0.75]  # gamma in (0, 1)
    elif spec == "gated_linear":  # the cumulative log-decay, per position: sharded with the sequence
        aux = [torch.cumsum(F.logsigmoid(torch.randn(B, H, n, generator=g) + 2.0), dim=-1)]
    else:
        aux = []
    return [q, k, v, *aux]


def _recurrence(spec: str, q, k, v, aux) -> torch.Tensor:
    """The oracle: the state S_t = λ_t S_{t-1} + φ(k_t)ᵀ v_t and o_t = φ(q_t) S_t, token by token."""
    if spec == "lightning":
        q, k = F.elu(q) + 1, F.elu(k) + 1
        step = torch.exp(-aux[0])[None, :].expand(q.shape[0], -1)
    else:  # retention
        q = q * D**-0.5
        step = aux[0][None, :].expand(q.shape[0], -1)
    state = q.new_zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[2]):
        state = step[..., None, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ state)[:, :, 0])
    return torch.stack(outs, dim=2)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def _case(
    rank: int,
    world: int,
    cache: str,
    spec: str,
    layout: str,
    backend: str,
    shard_len: int,
    algorithm: str = "chunk",
) -> dict:
    """One configuration on this rank: normalised errors of o and of every input's gradient."""
    fn = getattr(_compile(spec, cache), f"{spec}_linear")
    sh = sharding_for(layout, world, shard_len)
    full = [t.requires_grad_() for t in _data(spec, shard_len * world)]
    ref = fn(*full, backend=backend)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    (ref * w).sum().backward()

    def local(n: int, t: torch.Tensor) -> torch.Tensor:
        return shard(t, 2, sh, rank) if n < 3 or t.dim() == 3 else t  # aux [B, H, N]: sequence axis 2

    mine = [local(n, t).detach().requires_grad_() for n, t in enumerate(full)]
    o = linear_context_parallel(fn, mine, group=None, sharding=sh, backend=backend, algorithm=algorithm)
    (o * shard(w, 2, sh, rank)).sum().backward()
    errs = {"o": _err(o, shard(ref, 2, sh, rank))}
    for n, (m, f) in enumerate(zip(mine, full, strict=True)):
        errs[("dq", "dk", "dv", "daux")[n]] = _err(m.grad, local(n, f.grad))
    if backend == "reference" and spec in CAUSAL_SPECS:
        with torch.no_grad():
            oracle = _recurrence(spec, *(t.detach() for t in full[:3]), [t.detach() for t in full[3:]])
        errs["o_vs_recurrence"] = _err(o.detach(), shard(oracle, 2, sh, rank))
    return {"case": (world, spec, layout, backend, algorithm), "errs": errs}


def _bad_inputs(rank: int, world: int, cache: str) -> list[str]:
    """Inputs that must raise the same ValueError on every rank (none hangs in a collective)."""
    fn = _compile("lightning", cache).lightning_linear
    msgs = []
    n = 16 + 8 * rank  # rank 1 holds more positions than rank 0
    args = _data("lightning", n)
    for call in (
        lambda: linear_context_parallel(
            fn, args, group=None, sharding=sharding_for("contiguous", world, 16), backend="reference"
        ),
        lambda: linear_context_parallel(  # the same on every rank, but not what the sharding says
            fn,
            _data("lightning", 8),
            group=None,
            sharding=sharding_for("zigzag", world, 16),
            backend="reference",
        ),
    ):
        try:
            call()
            msgs.append("no error")
        except ValueError as err:
            msgs.append(str(err))
    return msgs


def _worker(rank: int, world: int, cache: str, cases: list[tuple], bad: bool) -> dict:
    torch.manual_seed(0)
    out = {"cases": [_case(rank, world, cache, *c) for c in cases]}
    if bad:
        out["bad"] = _bad_inputs(rank, world, cache)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cp-linear")
    for spec in (*CAUSAL_SPECS, "gated_linear", "linear_bidir"):
        _compile(spec, str(path))  # once here: the ranks load the cached modules
    return str(path)


def _check(results: list[dict]) -> None:
    bad = []
    for rank, res in enumerate(results):
        for case in res["cases"]:
            for what, e in case["errs"].items():
                if not e <= TOL[torch.float32]:
                    bad.append(f"rank {rank} {case['case']} {what}: {e:.2e}")
    assert not bad, "\n".join(bad)


def _cases(world: int, shard_len: int, backends: tuple[str, ...]) -> list[tuple]:
    return [
        (spec, layout, backend, shard_len)
        for spec in CAUSAL_SPECS
        for layout in ("contiguous", "zigzag")
        for backend in backends
    ]


def test_two_ranks(cache: str) -> None:
    """2 ranks: both specs, layouts and backends; a per-position decay (sharded with the sequence), a
    bidirectional block (the other chunks' total state) and the recurrent form; mismatched shards raise on
    every rank."""
    cases = [
        *_cases(2, 16, ("reference", "triton")),
        ("gated_linear", "zigzag", "reference", 16),
        ("gated_linear", "contiguous", "triton", 16),
        ("linear_bidir", "zigzag", "reference", 16),
        ("lightning", "zigzag", "triton", 16, "recurrent"),
        ("retention", "contiguous", "reference", 16, "recurrent"),
    ]
    results = spawn_ranks(2, _worker, cache, cases, True, timeout_s=150)
    _check(results)
    for rank, res in enumerate(results):
        shapes, sharded = res["bad"]
        assert "the shard shapes" in shapes and "differ across ranks" in shapes and "rank 1: [" in shapes, (
            rank,
            shapes,
        )
        assert "holds 8 positions" in sharded and "gives every rank 16" in sharded, (rank, sharded)


def test_four_ranks(cache: str) -> None:
    """4 ranks (8 zigzag chunks): both specs, layouts and backends, shards of 16 and 32."""
    cases = [*_cases(4, 16, ("reference", "triton")), ("retention", "zigzag", "reference", 32)]
    _check(spawn_ranks(4, _worker, cache, cases, False, timeout_s=150))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_one_rank_without_a_group(cache: str, layout: str) -> None:
    """World size 1: no process group, no communication (zigzag still cuts the sequence in two chunks)."""
    for spec in CAUSAL_SPECS:
        res = _case(0, 1, cache, spec, layout, "reference", 24)
        assert all(e <= TOL[torch.float32] for e in res["errs"].values()), res


@pytest.mark.parametrize("spec", ["lightning", "gated_linear"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_position_offset_splits_a_call(cache: str, spec: str, backend: str) -> None:
    """NAME_linear over rows [P, N) with position_offset=P, the state and G of rows [0, P) equals the full
    call's rows: the generated API the state passing rests on (per-position tensors hold the shard's rows)."""
    fn = getattr(_compile(spec, cache), f"{spec}_linear")
    n, p = 24, 10
    full = _data(spec, n, seed=3)
    ref = fn(*full, backend=backend)
    head = [t[:, :, :p] if t.dim() >= 3 else t for t in full]
    tail = [t[:, :, p:] if t.dim() >= 3 else t for t in full]
    o0, s0, g0 = fn(*head, backend=backend, return_state=True, return_log_decay=True)
    o1, g1 = fn(
        *tail, backend=backend, position_offset=p, initial_state=s0, initial_log_decay=g0[..., 1],
        return_log_decay=True,
    )  # fmt: skip
    assert _err(torch.cat([o0, o1], dim=2), ref) <= TOL[torch.float32]
    assert g0.dtype is torch.float64 and g0.shape == (B, H, 2)
    if spec == "lightning":  # G_t = -decay * t, at the ends of each call
        dec = full[3].double()
        want = torch.stack([-dec * (p - 1), -dec * (n - 1)], dim=-1).expand(B, H, 2)
        assert torch.allclose(g1, want)
    else:  # G_t = g[t]; the tail's start is the head's last
        assert torch.equal(g1[..., 0], g0[..., 1]) and torch.equal(g1[..., 1], full[3][..., -1].double())


def test_shard_arguments_are_checked(cache: str) -> None:
    mod = _compile("lightning", cache)
    q, k, v, dec = _data("lightning", 8)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"position_offset=.*expected an int >= 0"):
            mod.lightning_linear(q, k, v, dec, backend="reference", position_offset=bad)
    with pytest.raises(ValueError, match="algorithm='parallel' takes no position_offset"):
        mod.lightning_linear(q, k, v, dec, backend="reference", algorithm="parallel", position_offset=4)
    with pytest.raises(ValueError, match=r"initial_log_decay: expected .* \[B, H\] = \[1, 2\]"):
        mod.lightning_linear(q, k, v, dec, backend="reference", initial_log_decay=torch.zeros(2))
    sh = sharding_for("contiguous", 1, 8)
    with pytest.raises(ValueError, match="algorithm='parallel'"):
        linear_context_parallel(
            mod.lightning_linear,
            (q, k, v, dec),
            group=None,
            sharding=sh,
            backend="reference",
            algorithm="parallel",
        )
    with pytest.raises(ValueError, match="not the NAME_linear of a generated module"):
        linear_context_parallel(mod.lightning, (q, k, v, dec), group=None, sharding=sh, backend="reference")


def test_recurrence_oracle_matches_the_full_call(cache: str) -> None:
    """The test's own oracle against the single-process call (so that the rank checks rest on two)."""
    for spec in CAUSAL_SPECS:
        full = _data(spec, 40, seed=1)
        o = getattr(_compile(spec, cache), f"{spec}_linear")(*full, backend="reference")
        assert _err(o, _recurrence(spec, full[:3][0], full[1], full[2], full[3:])) <= TOL[torch.float32]
