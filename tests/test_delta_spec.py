"""State blocks (`state S = ...`, docs/linear.md "State recurrences"): the zoo's delta-rule specs compiled
and run against each paper's token-by-token recurrence in float64, written here; the structure analysis
(dsl/analysis/recurrence.py) and its errors; call-time errors.

Sizes are small (T <= 40, D, E <= 16): the Triton kernels run under the interpreter on CPU.
"""

from __future__ import annotations

import ast
import textwrap

import pytest
import torch
import torch.nn.functional as F
from attnc.dsl.analysis.recurrence import GateShape, PlanKind, analyse
from attnc.dsl.errors import SpecError
from attnc.dsl.lower import compile_to_ir
from attnc.zoo.ops import spec_path

import attnc

F64 = torch.float64
# (atol, rtol) by dtype of the inputs: fp64 exact up to rounding; fp32 accumulates over <= 40 tokens.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (3e-5, 1e-4), torch.float16: (4e-3, 4e-3)}
GRAD_TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3)}


# ---------------------------------------------------------------------------------------------- oracles
# Each paper's recurrence in float64, in the paper's own state orientation.


def oracle_gated_delta(q, k, v, beta, g, s0):
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, eq. 10; g = 0 is DeltaNet, Yang et al. 2024 eq. 1),
    state [d_v, d_k]: S_t = α_t S_{t-1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t / sqrt(D)."""
    D = q.shape[-1]
    S, outs = s0, []
    for t in range(q.shape[2]):
        a = g[:, :, t, None, None].exp()
        kt, bt = k[:, :, t], beta[:, :, t, None, None]
        S = (
            a * (S - bt * (S @ kt[..., :, None]) @ kt[..., None, :])
            + bt * v[:, :, t, :, None] * kt[..., None, :]
        )
        outs.append((S @ q[:, :, t, :, None])[..., 0] * D**-0.5)
    return torch.stack(outs, 2), S


def oracle_kda(q, k, v, beta, g, s0):
    """KDA (Kimi Linear 2025, eq. 1), state [d_k, d_v]: S_t = (I − β k kᵀ) Diag(α_t) S_{t-1} + β k vᵀ,
    o_t = S_tᵀ q_t / sqrt(D); returns the state transposed ([d_v, d_k])."""
    D = q.shape[-1]
    S, outs = s0.transpose(-1, -2), []
    eye = torch.eye(D, dtype=q.dtype)
    for t in range(q.shape[2]):
        kt, bt = k[:, :, t], beta[:, :, t, None, None]
        S = (eye - bt * kt[..., :, None] * kt[..., None, :]) @ (g[:, :, t, :, None].exp() * S)
        S = S + bt * kt[..., :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhde,bhd->bhe", S, q[:, :, t]) * D**-0.5)
    return torch.stack(outs, 2), S.transpose(-1, -2)


def oracle_gla(q, k, v, g, s0):
    """GLA (Yang et al. 2023, eq. 3), state [d_k, d_v]: S_t = (α_tᵀ 1) ⊙ S_{t-1} + k_tᵀ v_t, o_t = q_t S_t / sqrt(D)."""
    D = q.shape[-1]
    S, outs = s0.transpose(-1, -2), []
    for t in range(q.shape[2]):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S) * D**-0.5)
    return torch.stack(outs, 2), S.transpose(-1, -2)


def oracle_rwkv7(r, k, v, wl, kappa, iclr, s0):
    """RWKV-7 (Peng et al. 2025, eq. 16), state [d_v, d_k]:
    S_t = S_{t-1} (diag(w_t) − κ̂_tᵀ (a_t ⊙ κ̂_t)) + v_tᵀ k_t, o_t = S_t r_t, w_t = exp(−exp(wl_t))."""
    S, outs = s0, []
    for t in range(r.shape[2]):
        w = torch.exp(-torch.exp(wl[:, :, t]))
        kap = kappa[:, :, t]
        trans = torch.diag_embed(w) - kap[..., :, None] * (iclr[:, :, t] * kap)[..., None, :]
        S = S @ trans + v[:, :, t, :, None] * k[:, :, t, None, :]
        outs.append((S @ r[:, :, t, :, None])[..., 0])
    return torch.stack(outs, 2), S


# ---------------------------------------------------------------------------------------------- inputs

B, H, D, E = 1, 2, 16, 8


def inputs(variant: str, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    x = {"q": rnd(B, H, T, D), "k": F.normalize(rnd(B, H, T, D), dim=-1), "v": rnd(B, H, T, E)}
    if variant in ("deltanet", "gated_deltanet", "kda"):
        x["beta"] = torch.sigmoid(rnd(B, H, T))
    if variant == "gated_deltanet":
        x["g"] = F.logsigmoid(rnd(B, H, T) + 2)
    if variant in ("kda", "gla"):
        x["g"] = F.logsigmoid(rnd(B, H, T, D) + 2)
    if variant == "rwkv7":
        x["wl"] = rnd(B, H, T, D) * 0.5 - 0.6
        x["kappa"] = F.normalize(rnd(B, H, T, D), dim=-1)
        x["iclr"] = torch.sigmoid(rnd(B, H, T, D))
    return x


def oracle(variant: str, x: dict[str, torch.Tensor], s0: torch.Tensor):
    if variant == "deltanet":
        return oracle_gated_delta(x["q"], x["k"], x["v"], x["beta"], torch.zeros_like(x["beta"]), s0)
    if variant == "gated_deltanet":
        return oracle_gated_delta(x["q"], x["k"], x["v"], x["beta"], x["g"], s0)
    if variant == "kda":
        return oracle_kda(x["q"], x["k"], x["v"], x["beta"], x["g"], s0)
    if variant == "gla":
        return oracle_gla(x["q"], x["k"], x["v"], x["g"], s0)
    return oracle_rwkv7(x["q"], x["k"], x["v"], x["wl"], x["kappa"], x["iclr"], s0)


VARIANTS = ["deltanet", "gated_deltanet", "kda", "gla", "rwkv7"]


@pytest.fixture(scope="module")
def mods():
    return {name: attnc.compile(str(spec_path(name))) for name in VARIANTS}


def _run(mods, variant, x, s0, dtype, **kw):
    """The module under test on inputs rounded to `dtype` (float32 gates declared float32 stay float32),
    against the oracle in float64 on the same rounded values; returns both and the leaves."""
    fn = getattr(mods[variant], variant)
    leaves = {}
    for name, t in x.items():
        keep32 = variant in ("kda", "gla") and name == "g"  # declared float32 in their specs
        t = t.to(torch.float32 if keep32 else dtype)
        leaves[name] = t.clone().requires_grad_(True)
    s = s0.to(F64 if dtype is F64 else torch.float32).clone().requires_grad_(True)
    o, sn = fn(*leaves.values(), initial_state=s, return_state=True, **kw)
    xr = {n: t.detach().to(F64).requires_grad_(True) for n, t in leaves.items()}
    sr = s.detach().to(F64).requires_grad_(True)
    o_ref, sn_ref = oracle(variant, xr, sr)
    return (o, sn, leaves, s), (o_ref, sn_ref, xr, sr)


def _check(got, want, dtype, grads=True):
    (o, sn, leaves, s), (o_ref, sn_ref, xr, sr) = got, want
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(o.to(F64), o_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(sn.to(F64), sn_ref, atol=max(atol, 3e-5), rtol=rtol)
    if not grads:
        return
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=F64)
    dsn = torch.randn(sn_ref.shape, generator=gen, dtype=F64)
    names = list(leaves)
    got_g = torch.autograd.grad((o.to(F64) * do).sum() + (sn.to(F64) * dsn).sum(), [*leaves.values(), s])
    want_g = torch.autograd.grad((o_ref * do).sum() + (sn_ref * dsn).sum(), [*xr.values(), sr])
    for name, a, b in zip([*names, "initial_state"], got_g, want_g, strict=True):
        # a float32 leaf (a gate declared float32) in a float64 run gets its gradient rounded to float32
        atol, rtol = (1e-6, 1e-6) if dtype is F64 and a.dtype is torch.float32 else GRAD_TOL[dtype]
        torch.testing.assert_close(a.to(F64), b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


# ---------------------------------------------------------------------------------------------- the plans


def test_plans_map_each_paper_onto_the_runtime():
    want = {
        "deltanet": (PlanKind.DELTA, GateShape.NONE),
        "gated_deltanet": (PlanKind.DELTA, GateShape.SCALAR),
        "kda": (PlanKind.DELTA, GateShape.CHANNEL),
        "gla": (PlanKind.DPLR, GateShape.CHANNEL),
        "rwkv7": (PlanKind.DPLR, GateShape.CHANNEL),
    }
    for name, (kind, gate) in want.items():
        (rec,) = compile_to_ir(spec_path(name).read_text(), f"{name}.attn").recurrences
        plan = analyse(rec)
        assert (plan.kind, plan.gate) == (kind, gate), name
        assert (plan.a is not None) == (name == "rwkv7"), name


def test_equivalent_spellings_give_the_same_plan():
    """The analysis is algebraic: the delta rule written with the write folded differently, the gate
    distributed over the sum, or the rank-1 term split in two, all map to the same delta_rule call."""
    head = "attention x(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, E], beta: [B, H, N], g: [B, H, N]) {"
    forms = [
        "state S = S @ (exp(g[b, h, i]) * (I - beta[b, h, i] * outer(k, k))) + outer(beta[b, h, i] * v, k)",
        "state S = exp(g[b, h, i]) * S @ I - S @ outer(exp(g[b, h, i]) * beta[b, h, i] * k, k) + outer(v, beta[b, h, i] * k)",
        "let a = exp(g[b, h, i]) state S = S @ (a * I - a * beta[b, h, i] / 2 * outer(k, k) - outer(k, a * beta[b, h, i] * k) / 2) + beta[b, h, i] * outer(v, k)",
    ]
    for body in forms:
        (rec,) = compile_to_ir(f"{head} {body} read = S @ q }}", "x.attn").recurrences
        plan = analyse(rec)
        assert (plan.kind, plan.gate) == (PlanKind.DELTA, GateShape.SCALAR), body


# ---------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_backend_matches_the_paper(mods, variant, dtype):
    x = inputs(variant, T=23)
    s0 = torch.randn(B, H, E, D, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.5
    s0 = s0 if dtype is F64 else s0.float().double()
    got, want = _run(mods, variant, x, s0, dtype, backend="reference")
    _check(got, want, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_interpreter_matches_the_paper(mods, variant):
    x = inputs(variant, T=19)
    s0 = (torch.randn(B, H, E, D, generator=torch.Generator().manual_seed(4)) * 0.5).double()
    got, want = _run(mods, variant, x, s0, torch.float32, backend="triton", algorithm="recurrent")
    _check(got, want, torch.float32)


def test_triton_float16(mods):
    x = inputs("gated_deltanet", T=19)
    s0 = torch.zeros(B, H, E, D, dtype=F64)
    got, want = _run(mods, "gated_deltanet", x, s0, torch.float16, backend="triton", algorithm="recurrent")
    _check(got, want, torch.float16, grads=False)


@pytest.mark.parametrize("variant", ["deltanet", "gated_deltanet"])
def test_chunked_and_recurrent_agree_and_match_the_paper(mods, variant):
    x = inputs(variant, T=40)
    s0 = (torch.randn(B, H, E, D, generator=torch.Generator().manual_seed(5)) * 0.5).double()
    got, want = _run(mods, variant, x, s0, torch.float32, backend="triton", algorithm="chunk")
    _check(got, want, torch.float32)


def test_prefill_then_decode_continues_one_pass(mods):
    """Chunked prefill of 32 tokens, then token-by-token recurrent decoding from the carried state, lands
    where one chunked pass over all 40 tokens lands (outputs and state)."""
    fn = mods["gated_deltanet"].gated_deltanet
    x = {n: t.float() for n, t in inputs("gated_deltanet", T=40).items()}
    o_all, s_all = fn(*x.values(), backend="triton", algorithm="chunk", return_state=True)
    part = {n: t[:, :, :32] for n, t in x.items()}
    o_pre, state = fn(*part.values(), backend="triton", algorithm="chunk", return_state=True)
    outs = [o_pre]
    for t in range(32, 40):
        step = {n: u[:, :, t : t + 1] for n, u in x.items()}
        o_t, state = fn(
            *step.values(), backend="triton", algorithm="recurrent", initial_state=state, return_state=True
        )
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, 2), o_all, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(state, s_all, atol=3e-5, rtol=1e-4)


def test_float32_gate_is_not_rounded_to_q_dtype(mods):
    """GLA's gate is declared float32: with float16 q/k/v the module computes with the float32 gate, so the
    final state (float32) equals the float64 oracle on the fp16-rounded q/k/v and the unrounded gate to 1e-5.
    The same oracle with the gate rounded to float16 is off by far more, so the test can fail."""
    x = inputs("gla", T=40)
    s0 = torch.zeros(B, H, E, D, dtype=F64)
    (_, sn, leaves, _), (_, sn_ref, xr, sr) = _run(mods, "gla", x, s0, torch.float16, backend="reference")
    assert leaves["g"].dtype is torch.float32 and sn.dtype is torch.float32
    torch.testing.assert_close(sn.double(), sn_ref.detach(), atol=1e-5, rtol=1e-5)
    rounded = {**{n: t.detach() for n, t in xr.items()}, "g": xr["g"].detach().half().double()}
    _, sn_rounded = oracle("gla", rounded, sr.detach())
    assert (sn_rounded - sn_ref.detach()).abs().max() > 5e-5  # 5x the tolerance above


# ---------------------------------------------------------------------------------------------- errors

HEAD = "attention x(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, E], beta: [B, H, N], w: [B, H, N, D]) {\n"


def _error(body: str) -> str:
    with pytest.raises(SpecError) as info:
        compile_to_ir(HEAD + body + "\n    read = S @ q\n}\n", "x.attn")
    return str(info.value)


def test_non_dplr_transition_is_an_error():
    msg = _error(
        "    state S = S @ (I - outer(k, k) - outer(w[b, h, i, d], w[b, h, i, d] * w[b, h, i, d])) + outer(v, k)"
    )
    assert "x.attn:2:15: error: the transition is not diagonal plus rank 1" in msg
    assert "^^^" in msg and "state S = S @ (I" in msg
    assert "hint: supported: state S = S @ T + outer(v', k')" in msg


def test_state_dependent_gate_is_an_error():
    msg = _error("    state S = S @ diag(sigmoid(S @ k)) + outer(v, k)")
    assert "x.attn:2:24: error: the state is used inside the argument of diag()" in msg
    assert (
        "state-dependent gate is not supported" in msg and "hint: gates must not depend on the state" in msg
    )
    msg = _error("    let gate = exp(-S)\n    state S = S @ (gate * I) + outer(v, k)")
    assert "state-dependent gate" in msg


def test_transition_reading_q_is_an_error():
    msg = _error("    state S = S @ (I - beta[b, h, i] * outer(q, k)) + outer(v, k)")
    assert "x.attn:2:40: error: the transition reads q" in msg  # at the factor that reads it: outer(q, k)
    assert "\n" + " " * 43 + "^" * len("outer(q, k)") + "\n" in msg
    assert "hint: q enters only through the read" in msg


def test_other_structure_errors():
    assert "a product of two rank-1 factors" in _error(
        "    state S = S @ outer(k, k) @ outer(k, k) + outer(v, k)"
    )
    assert "the write is not rank 1" in _error("    state S = S + outer(v, k) + outer(v * v, w[b, h, i, d])")
    assert "multiplies two matrices" in _error("    state S = S @ k + outer(v, k)")
    assert "cannot add a matrix and a scalar" in _error("    state S = S @ (1 + outer(k, k)) + outer(v, k)")
    assert "a state block cannot have a 'score'" in _error(
        "    score = dot(q, k)\n    state S = S + outer(v, k)"
    )
    with pytest.raises(SpecError, match="only valid in 'state' and 'read'"):
        compile_to_ir(
            "attention y(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) { score = q @ k }", "y.attn"
        )


def test_call_time_errors_name_the_parameter(mods):
    fn = mods["gated_deltanet"].gated_deltanet
    x = {n: t.float() for n, t in inputs("gated_deltanet", T=8).items()}
    with pytest.raises(ValueError, match=r"beta: expected shape \[B, H, N\] = \[1, 2, 8\], got \[1, 2, 7\]"):
        fn(x["q"], x["k"], x["v"], x["beta"][:, :, :7], x["g"])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        fn(*x.values(), initial_state=torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="algorithm='fast'"):
        fn(*x.values(), algorithm="fast")


# ---------------------------------------------------------------------------------------------- layers, model


@pytest.mark.parametrize("name", VARIANTS)
def test_layer_triton_prefill_and_decode_match_the_reference(name):
    """Each zoo layer on the Triton backend (interpreter, float32): prefill from an empty DeltaCache, then
    token-by-token decoding (short-convolution inputs and state carried), equals one reference pass."""
    from attnc import zoo

    torch.manual_seed(1)
    layer = zoo.get(name)(32, 2)
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        full = layer(x, backend="reference")
        cache = layer.new_cache()
        outs = [layer(x[:, :17], cache=cache, backend="triton")]
        outs += [layer(x[:, t : t + 1], cache=cache, backend="triton") for t in range(17, 20)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 20 and cache.state is not None and cache.state.shape == (1, 2, 16, 16)


def test_transnormer_with_gated_deltanet_trains_and_generates_from_its_state():
    """A TransNormerLM-style LM whose attention is Gated DeltaNet: the loss falls over a few AdamW steps
    (gradients reach every gate parameter), and greedy generation from the recurrent states equals
    re-running the whole sequence at every step."""
    from attnc.zoo.linear_models import TransNormerLM

    torch.manual_seed(0)
    model = TransNormerLM(32, variant="gated_deltanet", dim=32, depth=2, heads=2)
    tokens = torch.randint(0, 32, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.loss(tokens)
        opt.zero_grad()
        loss.backward()
        attn = model.blocks[0].attn
        for p in (attn.A_log, attn.dt_bias, attn.b_proj.weight, attn.convs["k"].weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1
    model.eval()
    prompt = tokens[:1, :10]
    out = model.generate(prompt, 6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_shared_kv_heads_lets_and_scalars_in_a_state_block(tmp_path):
    """k, v and beta with G < H heads (read at hk), a `let`, and a float scalar with a size default: the
    block equals the delta rule on the heads repeated, and a wrong head count is an error naming k, v."""
    spec = tmp_path / "gqa_delta.attn"
    spec.write_text(
        "attention gqa_delta(q: [B, H, N, D], k: [B, G, N, D], v: [B, G, N, E], beta: [B, G, N],\n"
        "                    scale: float = D ** -0.5) {\n"
        "    let bt = beta[b, hk, i]\n"
        "    state S = S @ (I - bt * outer(k, k)) + outer(bt * v, k)\n"
        "    read  = scale * (S @ q)\n"
        "}\n"
    )
    mod = attnc.compile(str(spec))
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 12, 8, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(1, 2, 12, 8, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(1, 2, 12, 4, generator=gen, dtype=F64)
    beta = torch.rand(1, 2, 12, generator=gen, dtype=F64)
    rep = [x.repeat_interleave(2, 1) for x in (k, v, beta)]
    want, _ = oracle_gated_delta(
        q, *rep[:2], rep[2], torch.zeros_like(rep[2]), torch.zeros(1, 4, 4, 8, dtype=F64)
    )
    torch.testing.assert_close(mod.gqa_delta(q, k, v, beta), want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        mod.gqa_delta(q, k, v, beta, scale=2.0), want * 2 * 8**0.5, atol=1e-12, rtol=1e-12
    )
    with pytest.raises(
        ValueError, match=r"k, v: the key/value head count \(2\) must divide the query head count \(3\)"
    ):
        mod.gqa_delta(q[:, :3], k, v, beta)


def test_float32_per_channel_decays_stay_finite_at_long_length(mods):
    """GLA's log-decays uniform in [-5, 0] per step over T = 512 (cumulative about -1300: the old exp(±G)
    encoding overflows float32): float32 inputs give float64's result to 1e-4, no NaN."""
    gen = torch.Generator().manual_seed(8)
    T = 512
    x = {
        "q": torch.randn(1, 1, T, D, generator=gen, dtype=F64),
        "k": torch.randn(1, 1, T, D, generator=gen, dtype=F64),
        "v": torch.randn(1, 1, T, E, generator=gen, dtype=F64),
        "g": -5 * torch.rand(1, 1, T, D, generator=gen, dtype=F64),
    }
    fn = mods["gla"].gla
    o32 = fn(*(t.float() for t in x.values()), backend="reference")
    o64 = fn(x["q"], x["k"], x["v"], x["g"].float(), backend="reference")
    assert torch.isfinite(o32).all()
    assert (o32.double() - o64).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["gated_deltanet", "rwkv7"])
def test_golden_state_block(name):
    """The generated entry points of a delta-rule block (scalar-gated delta rule; DPLR), exactly."""
    from attnc.codegen.module import generate

    from .test_codegen_module import GOLDEN, _check_golden

    _check_golden(GOLDEN / f"{name}.py.expected", generate(spec_path(name).read_text(), f"{name}.attn"))


def test_state_and_attention_blocks_share_a_file(tmp_path):
    """A file may mix state blocks and attention blocks; `I` is the identity unless the block names it."""
    spec = tmp_path / "mixed.attn"
    spec.write_text(
        spec_path("deltanet").read_text()
        + "attention causal(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n"
        "    score = dot(q, k) * D ** -0.5\n    mask = j <= i\n}\n"
    )
    mod = attnc.compile(str(spec))
    assert mod.__all__ == ["causal", "causal_reference", "deltanet", "deltanet_reference"]
    x = inputs("deltanet", T=6)
    assert mod.deltanet(*x.values()).shape == (B, H, 6, E) and mod.causal(*(x["q"],) * 3).shape == (
        B,
        H,
        6,
        D,
    )
    shadow = "attention x(q: [B, I, N, D], k: [B, I, N, D], v: [B, I, N, E]) { state S = S @ I + outer(v, k) read = S @ q }"
    with pytest.raises(SpecError, match="'@' multiplies two matrices"):
        compile_to_ir(shadow, "x.attn")


def test_show_ir_prints_the_plan_and_check_lists_state_blocks(capsys):
    from attnc.cli import main

    assert main(["show-ir", str(spec_path("kda"))]) == 0
    out = capsys.readouterr().out
    assert "state block kda: S [E, D] per (b, h); runs attnc.runtime.delta.delta_rule (gate: channel)" in out
    assert "  g' = g[b, h, i, d]" in out and "  beta' = beta[b, h, i]" in out
    assert main(["check", str(spec_path("rwkv7"))]) == 0
    assert "ok (rwkv7)" in capsys.readouterr().out


def test_state_ir_verifier_rejects_malformed_matrices():
    """The verifier catches a compiler bug (a transition multiplied from the left), never a spec error."""
    import dataclasses

    from attnc.dsl.state_ir import Mat, MatKind, MatOp, StateVerifyError, verify

    (rec,) = compile_to_ir(spec_path("deltanet").read_text(), "deltanet.attn").recurrences
    verify(rec)
    bad = Mat(
        MatOp.MATMUL, MatKind.STATE, (Mat(MatOp.IDENTITY, MatKind.KEY), Mat(MatOp.STATE, MatKind.STATE))
    )
    with pytest.raises(StateVerifyError, match="malformed matmul"):
        verify(dataclasses.replace(rec, update=bad))


def test_attnc_inspect_compiles_a_state_blocks_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    """`attnc inspect` on a state block: the delta runtime's kernels in the variant its plan selects (scalar
    gate: G_MODE=1, with the chunk-parallel forward and backward), compiled for sm_90 with no spills."""
    pytest.importorskip("triton.backends.nvidia")
    from attnc.cli import main

    spec = str(spec_path("gated_deltanet"))
    assert main(["inspect", spec, "--cc", "90", "--dtype", "fp16", "--head-dim", "64"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[2:]]
    kernels = {r[0] for r in rows}
    assert {
        "_delta_recurrent_fwd_kernel",
        "_delta_recurrent_bwd_kernel",
        "_dchunk_prep_kernel",
        "_dchunk_state_kernel",
        "_dchunk_out_kernel",
        "_delta_cbwd_intra_kernel",
        "_delta_cbwd_dstate_kernel",
        "_delta_cbwd_dqkw_kernel",
        "_delta_cbwd_wy_kernel",
    } <= kernels
    assert all("G_MODE=1" in " ".join(r) for r in rows if "recurrent" in r[0])
    assert all(r[6] == "0" for r in rows), rows  # spill bytes


# ---------------------------------------------------------------------------------------------- --standalone
# Each zoo state block at T = 12 (the recurrent kernels), and gated_deltanet at T = 64 with the chunked ones.
_STANDALONE_CASES = [(v, 12, "recurrent") for v in VARIANTS] + [("gated_deltanet", 64, "chunk")]


def _standalone_call(mod, variant, x, s0, algorithm, weights):
    """One call of `variant` in `mod` on CPU (the Triton kernels under the interpreter): the output, the final
    state and the gradients of a weighted sum of both by q and by the last auxiliary input (a gate)."""
    import torch

    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    fn = getattr(mod, variant)
    o, sn = fn(**leaves, initial_state=s0, return_state=True, algorithm=algorithm, backend="triton")
    wo, ws = weights
    aux = list(leaves)[-1]
    dq, daux = torch.autograd.grad((o * wo).sum() + (sn * ws).sum(), [leaves["q"], leaves[aux]])
    return {"o": o.detach(), "state": sn.detach(), "dq": dq, "d" + aux: daux}


def _standalone_inputs():
    cases = {}
    for variant, T, algorithm in _STANDALONE_CASES:
        x = {n: t.float() for n, t in inputs(variant, T).items()}
        gen = torch.Generator().manual_seed(7)
        s0 = torch.randn(B, H, E, D, generator=gen) * 0.5
        weights = (torch.randn(B, H, T, E, generator=gen), torch.randn(B, H, E, D, generator=gen))
        cases[f"{variant}-{algorithm}"] = (variant, x, s0, algorithm, weights)
    return cases


def test_codegen_standalone_state_blocks_run_where_attnc_cannot_be_imported(tmp_path, mods) -> None:
    """`attnc codegen --standalone` on every zoo state block: the module (with its kernels file and the delta
    runtime's kernels beside it) imports nothing of attnc, and run in a process where attnc cannot be
    imported it gives the output, final state and gradients of the module compiled the usual way."""
    import inspect
    import subprocess
    import sys

    from attnc.codegen.vendor import delta_kernel_files

    from attnc.cli import main

    from .test_runtime import _BLOCK_ATTNC

    out = tmp_path / "out"
    for variant in VARIANTS:
        assert main(["codegen", str(spec_path(variant)), "-o", str(out), "--standalone"]) == 0
    # the module, its kernels file and one file per kernels file of the delta runtime (`_delta_kernels.py`, ...)
    suffixes = [".py", "_triton.py", *(sfx for sfx, _ in delta_kernel_files())]
    assert "_delta_kernels.py" in suffixes
    assert sorted(f.name for f in out.iterdir()) == sorted(f"{v}{sfx}" for v in VARIANTS for sfx in suffixes)
    for f in out.iterdir():  # (c) no import of attnc anywhere in what was written, at any depth
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "attnc" for a in node.names), (f.name, ast.unparse(node))
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and (node.module or "").split(".")[0] != "attnc", (
                    f.name,
                    ast.unparse(node),
                )

    cases = _standalone_inputs()
    torch.save(cases, tmp_path / "inputs.pt")
    child = _BLOCK_ATTNC + textwrap.dedent(
        f"""
        import importlib.util, torch
        {textwrap.indent(inspect.getsource(_standalone_call), "        ").strip()}
        mods = {{}}
        for variant in {VARIANTS!r}:
            spec = importlib.util.spec_from_file_location(variant, {str(out)!r} + f"/{{variant}}.py")
            mods[variant] = importlib.util.module_from_spec(spec)
            sys.modules[variant] = mods[variant]
            spec.loader.exec_module(mods[variant])
        cases = torch.load({str(tmp_path / "inputs.pt")!r})
        got = {{key: _standalone_call(mods[c[0]], *c) for key, c in cases.items()}}
        try:
            import attnc  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        attnc_modules = sorted(m for m in sys.modules if m.split(".")[0] == "attnc")
        torch.save({{"got": got, "blocked": blocked, "attnc": attnc_modules}}, {str(tmp_path / "got.pt")!r})
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert res.returncode == 0, res.stderr
    got = torch.load(tmp_path / "got.pt")
    assert got["blocked"] and got["attnc"] == []
    for key, (variant, *args) in cases.items():
        want = _standalone_call(mods[variant], variant, *args)
        assert got["got"][key].keys() == want.keys()
        for name, w in want.items():
            torch.testing.assert_close(
                got["got"][key][name], w, atol=1e-6, rtol=1e-6, msg=lambda m, k=key, n=name: f"{k} {n}: {m}"
            )


def test_vendoring_refuses_a_delta_runtime_file_missing_from_its_table(monkeypatch) -> None:
    """codegen/vendor.py's `_DELTA` lists the delta runtime: a kernels file the runtime names but the table
    leaves out, or a table kernels file that no vendored module names, fails the vendoring (never a module that
    looks for a file it was not given), as does a module importing one that is not vendored before it."""
    from attnc.codegen import vendor

    def vendored(table):
        monkeypatch.setattr(vendor, "_DELTA", table)
        vendor.runtime_module.cache_clear()
        vendor._delta_names.cache_clear()
        try:
            return vendor.runtime_module()
        finally:
            vendor.runtime_module.cache_clear()
            vendor._delta_names.cache_clear()

    before = vendor._DELTA[:-1]  # the delta modules delta.py imports from
    with pytest.raises(AssertionError, match=r"names the runtime kernels file delta_kernels\.py"):
        vendored((*before, ("delta.py", None)))
    with pytest.raises(AssertionError, match=r"names the kernels file.*linear_kernels\.py"):
        vendored((*before, ("delta.py", "delta_kernels.py"), ("delta.py", "linear_kernels.py")))
    monkeypatch.setattr(vendor, "_MODULES", tuple(p for p in vendor._MODULES if p.name != "varlen.py"))
    with pytest.raises(AssertionError, match="does not vendor before it"):
        vendored((("delta.py", "delta_kernels.py"),))
