"""Issue 16, the back end's part, one group per cause: silent wrong results (padded channels, NaN/Inf, decays,
bf16 on the interpreter, softcap), name clashes, call-time crashes, outside text reaching generated code, and
caches that heal. Each reproduction of the issue is a test here, with other inputs of its class beside it.

Oracles are independent of the generated code: formulas written here, SDPA with an explicit bias.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from attnc.codegen.module import compile_file, compile_source, generate_all
from attnc.dsl.errors import SpecError

from .conftest import REPO, SPECS

HEAD = "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]{params}) {{\n{body}\n}}\n"


def spec(*body: str, params: str = "") -> str:
    return HEAD.format(params=params, body="\n".join("    " + b for b in body))


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(B=1, H=2, N=16, D=16, E=None, dtype=torch.float32, grad=False):
    q, k = rand(B, H, N, D, dtype=dtype, seed=1), rand(B, H, N, D, dtype=dtype, seed=2)
    v = rand(B, H, N, E or D, dtype=dtype, seed=3)
    return [x.requires_grad_(grad) for x in (q, k, v)]


@pytest.fixture
def build(tmp_path: Path):
    """`build(source)`: the compiled module, in a cache private to the test."""

    def get(source: str, name: str = "r.attn"):
        return compile_source(source, name, cache_dir=tmp_path / "cache")

    return get


# ---- silent wrong results -----------------------------------------------------------------------------------


def _linear_elu_oracle(q, k, v, eps=1e-6):
    """Katharopoulos et al. eq. 4-7, causal, written out: phi = elu + 1, o_i = sum_j<=i phi(q_i).phi(k_j) v_j / Z_i."""
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    s = (fq @ fk.transpose(-1, -2)).tril()
    return (s @ v) / (s.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("D", [72, 80, 96, 24])
def test_feature_maps_ignore_padded_channels(compiled, D: int) -> None:
    """The quadratic kernels (short sequences), forward and backward, against the paper's formula."""
    mod = compiled("linear_elu")
    q, k, v = qkv(N=24, D=D, grad=True)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = _linear_elu_oracle(qd, kd, vd)
    got = mod.linear_elu(q, k, v, backend="triton")
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)
    w = rand(*got.shape, seed=9)
    (got * w).sum().backward()
    (want * w.double()).sum().backward()
    for x, xd in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("algorithm", ["chunk", "recurrent"])
def test_feature_maps_ignore_padded_channels_in_the_linear_forms(compiled, algorithm: str) -> None:
    """The linear forms map q and k in PyTorch before the core's kernels: padded channels stay 0 there too."""
    mod = compiled("linear_elu")
    q, k, v = qkv(N=40, D=72)
    want = _linear_elu_oracle(q.double(), k.double(), v.double())
    got = mod.linear_elu(q, k, v, backend="triton", algorithm=algorithm)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("D", [12, 16])
def test_a_feature_map_not_finite_at_zero_never_reaches_padded_channels(build, D: int) -> None:
    """Found by the fuzz run: `k * (0.5 / k)` is NaN on a zero-padded channel (D = 12 pads to 16), and zeroing
    only the q operand leaves 0 * NaN = NaN in q·k. Against the formula written here, forward and backward."""
    mod = build(spec("score = dot(q, k) * 0.5", "feature k = k * (0.5 / k)", "output = o + 0.5"))
    q, k, v = qkv(N=10, D=D, grad=True)
    want = (
        torch.softmax((q.double() @ torch.full_like(k.double(), 0.5).transpose(-1, -2)) * 0.5, -1)
        @ v.double()
    )
    got = mod.a(q, k, v, backend="triton")
    torch.testing.assert_close(got.double(), want + 0.5, rtol=1e-4, atol=1e-4)
    got.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, v))


@pytest.mark.parametrize(("D", "N"), [(12, 10), (16, 10), (16, 16)], ids=["D12-N10", "D16-N10", "D16-N16"])
def test_a_feature_map_that_overflows_at_zero_never_reaches_padded_lanes(build, D: int, N: int) -> None:
    """Found by the fuzz run: `exp(k + 1e6)` is finite-looking (exp, add) but inf at a zero-padded lane, so
    q·k met 0 * inf = NaN where the reference gives the formula's value. Every score of `-exp(k + 1e6)` with
    q > 0 is -inf: each row sees no key, o = 0 (the fully-masked convention), on both backends."""
    mod = build(spec("score = dot(q, k)", "feature k = 0.0 - exp(k + 1e6)"))
    q, k, v = qkv(N=N, D=D)
    for backend in ("reference", "triton"):
        torch.testing.assert_close(mod.a(q.abs(), k, v, backend=backend), torch.zeros_like(v))


@pytest.mark.parametrize("D", [12, 16])
def test_a_feature_map_reading_an_aux_tensor_is_zeroed_outside_the_tile(build, D: int) -> None:
    """`k * 0.25 + t[j] * 0.5` is finite at 0 for every finite t only up to overflow: the kernels zero it
    outside the loaded tile (N = 10 pads the key rows, D = 12 the channels). Against the formula, forward and
    backward."""
    mod = build(spec("score = dot(q, k) * 0.5", "feature k = k * 0.25 + t[j] * 0.5", params=", t: [N]"))
    q, k, v = qkv(N=10, D=D, grad=True)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    t = rand(10, seed=5)
    fk = kd * 0.25 + t.double()[:, None] * 0.5
    want = torch.softmax((qd @ fk.transpose(-1, -2)) * 0.5, -1) @ vd
    got = mod.a(q, k, v, t, backend="triton")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    w = rand(*got.shape, seed=9)
    (got * w).sum().backward()
    (want * w.double()).sum().backward()
    for x, xd in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("spec_name", ["lightning", "linear_bidir"])
def test_feature_maps_ignore_padded_channels_in_other_linear_specs(compiled, spec_name: str) -> None:
    """The other linear-family specs the issue names: the Triton kernels agree with the reference at D = 72."""
    mod = compiled(spec_name)
    fn = getattr(mod, spec_name)
    q, k, v = qkv(N=24, D=72)
    extra = [rand(2, seed=4).sigmoid()] if spec_name == "lightning" else []  # lightning's decay per head
    ref = fn(q, k, v, *extra, backend="reference")
    torch.testing.assert_close(fn(q, k, v, *extra, backend="triton"), ref, rtol=2e-4, atol=2e-4)


LINEAR = "attention {n}(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {{\n    feature q = elu(q) + 1\n" \
         "    feature k = elu(k) + 1\n    score = dot(q, k)\n    mask = j <= i\n    norm = sum(eps = 1e-6)\n}}\n"  # fmt: skip
SOFTMAX = (
    "attention {n}(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {{\n    score = dot(q, k) * {c}\n}}\n"
)


def _softmax_oracle(q, k, v, c):
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) * c, -1) @ v.double()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("a", "a_triton"),  # refused: the generator registers its per-block names (codegen/names.py)
        # Fixed by the runtime library: runtime names live behind `_rt.`, not in the module's namespace.
        ("a", "a_backward"),
        ("lin", "x"),
        ("triton_cdiv", "x"),
    ],
)
def test_block_names_never_replace_generated_names(build, first: str, second: str) -> None:
    # The second block attends anti-causally: running it in place of the first gives a different result.
    source = LINEAR.format(n=first) + LINEAR.format(n=second).replace("j <= i", "j >= i")
    try:
        mod = build(source)
    except SpecError as err:  # refusing the name at the block is right too
        assert err.line is not None and "attention" in err.message
        return
    q, k, v = qkv(N=12, D=16, grad=True)
    got = getattr(mod, first)(q, k, v, backend="triton")
    torch.testing.assert_close(
        got.double(), _linear_elu_oracle(q.double(), k.double(), v.double()), rtol=1e-4, atol=1e-4
    )
    got.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "name",
    [
        "BlockLayout",
        "ATTNC_VERSION",
        "LANGUAGE_VERSION",
        "Optional",
        "custom",  # fixed by the runtime library (the module no longer imports `custom` itself)
    ],
)
def test_attention_named_like_a_module_constant(build, name: str) -> None:
    try:
        mod = build(SOFTMAX.format(n=name, c="0.25") + SOFTMAX.format(n="other", c="0.5"))
    except SpecError as err:
        assert (err.line, err.col) == (1, 11)
        return
    assert isinstance(mod.ATTNC_VERSION, str) and isinstance(mod.LANGUAGE_VERSION, str)
    assert isinstance(mod.BlockLayout, type)
    q, k, v = qkv()
    torch.testing.assert_close(
        mod.other(q, k, v).double(), _softmax_oracle(q, k, v, 0.5), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("where", ["q-nan", "k-inf", "q-neg-inf", "scale-nan"])
def test_nan_and_inf_inputs_propagate_alike(build, where: str) -> None:
    mod = build(spec("score = dot(q, k) * scale", params=", scale: float = 0.25"))
    q, k, v = qkv()
    scale = 0.25
    if where == "q-nan":
        q[0, 0, 3, 2] = float("nan")
    elif where == "k-inf":
        k[0, 1, 5, 0] = float("inf")
    elif where == "q-neg-inf":
        q[0, 0, 0, 0] = float("-inf")
    else:
        scale = float("nan")
    outs = []
    for backend in ("reference", "triton"):
        try:
            outs.append(mod.a(q, k, v, scale, backend=backend, return_lse=True))
        except ValueError:
            outs.append(None)
    ref, tri = outs
    assert (ref is None) == (tri is None), "one backend raises, the other does not"
    if ref is not None:
        for r, t in zip(ref, tri, strict=True):
            assert torch.equal(torch.isnan(r), torch.isnan(t)), "NaN in different places"
            assert bool(torch.isnan(r).any() or torch.isinf(r).any()), (
                "invalid input became a plausible output"
            )


@pytest.mark.parametrize("norm", ["sum(eps = 1e-6)", "sigmoid", "none"])
@pytest.mark.parametrize("where", ["q-nan", "v-nan", "k-inf"])
def test_nan_and_inf_inputs_agree_for_the_other_norms(build, norm: str, where: str) -> None:
    mod = build(spec("score = dot(q, k) * 0.25", "mask = j <= i", f"norm = {norm}"))
    q, k, v = qkv()
    if where == "q-nan":
        q[0, 0, 3, 2] = float("nan")
    elif where == "v-nan":
        v[0, 1, 2, 5] = float("nan")
    else:
        k[0, 1, 5, 0] = float("inf")
    ref, tri = (mod.a(q, k, v, backend=b) for b in ("reference", "triton"))
    if where != "k-inf":  # an infinite key saturates a sigmoid and gives ±inf weights without a norm
        assert torch.isnan(ref).any(), "the oracle case: the reference propagates NaN"
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("base", [-2.0, -0.5, 0.0, 1.0, 0.5])
@pytest.mark.parametrize("exponent", ["i - j", "(i - j) * 0.5", "0 - (i - j)"])
def test_powers_of_a_loaded_base_agree(build, base: float, exponent: str) -> None:
    """torch's pow for a base read from a tensor (a decay): negative bases with whole and fractional exponents,
    a zero base (0 ** 0 = 1, 0 ** -n = inf), and 1 ** b."""
    mod = build(spec(f"score = dot(q, k) * 0.25 + w[hk] ** ({exponent})", "mask = j <= i", "norm = none",
                     params=", w: [H]"))  # fmt: skip
    q, k, v = qkv(N=8)
    w = torch.tensor([base, 0.9])
    ref, tri = (mod.a(q, k, v, w, backend=b) for b in ("reference", "triton"))
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("gamma", [0.0, -0.5], ids=["zero", "negative"])
def test_invalid_decay_is_refused_or_agrees(compiled, gamma: float) -> None:
    mod = compiled("retention")
    q, k, v = qkv(N=12)
    g = torch.full((2,), gamma)
    try:
        ref = mod.retention(q, k, v, g, backend="reference")
    except ValueError:
        with pytest.raises(ValueError):
            mod.retention(q, k, v, g, backend="triton")
        return
    tri = mod.retention(q, k, v, g, backend="triton")
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_bf16_on_the_cpu_triton_path_is_refused_or_right(compiled) -> None:
    mod = compiled("causal")
    q, k, v = qkv(N=32, D=32, dtype=torch.bfloat16)
    try:
        got = mod.causal(q, k, v, backend="triton")
    except (ValueError, TypeError) as err:  # refused (what attnc does): naming the dtype and the reason
        assert "bfloat16" in str(err) and "interpreter" in str(err)
        return
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True
    )
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", ["triton"])
def test_softcap_is_accurate_for_a_large_cap(compiled, backend: str) -> None:
    mod = compiled("softcap")
    q, k, v = qkv(N=16, D=16)
    cap = 1e6
    s = q.double() @ k.double().transpose(-1, -2) * 16**-0.5
    want = torch.softmax(cap * torch.tanh(s / cap), -1) @ v.double()  # = softmax(s) to 1e-12
    got = mod.softcap(q, k, v, cap, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# ---- call-time crashes: a result or a clean ValueError ------------------------------------------------------


def _result_or_value_error(fn) -> None:
    try:
        out = fn()
    except ValueError:
        return
    o = out[0] if isinstance(out, tuple) else out
    assert isinstance(o, torch.Tensor)


def test_score_without_dot_backward(build) -> None:
    mod = build(spec("score = 1.0"))
    q, k, v = qkv(grad=True)
    o = mod.a(q, k, v, backend="reference")
    o.sum().backward()
    torch.testing.assert_close(q.grad, torch.zeros_like(q))
    torch.testing.assert_close(v.grad.sum(), torch.tensor(float(q.shape[2] * q.shape[3]) * q.shape[1]))


@pytest.mark.parametrize("empty", ["N", "M"])
def test_score_without_dot_on_empty_dimensions(build, empty: str) -> None:
    mod = build("attention a(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = 1.0\n}\n")
    q = rand(1, 2, 0 if empty == "M" else 4, 8).requires_grad_()
    k = rand(1, 2, 0 if empty == "N" else 4, 8).requires_grad_()
    v = rand(1, 2, k.shape[2], 8).requires_grad_()
    o = mod.a(q, k, v, backend="reference")
    assert o.shape == (1, 2, q.shape[2], 8)
    o.sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and x.grad.shape == x.shape and bool((x.grad == 0).all())


def test_floor_divided_score_backward(build) -> None:
    try:
        mod = build(spec("score = dot(q, k) // 2.0"))
    except SpecError:
        return
    q, k, v = qkv(grad=True)
    mod.a(q, k, v, backend="reference").sum().backward()
    assert torch.isfinite(q.grad).all()


def test_clamp_with_a_huge_bound(build) -> None:
    mod = build(spec("score = dot(q, k) + clamp(b, -1e39, 1.0)"))
    q, k, v = qkv()
    _result_or_value_error(lambda: mod.a(q, k, v, backend="reference"))


def test_elu_of_mixed_where(build) -> None:
    mod = build(spec("score = dot(q, k) + elu(where(N > 0, 1.0, t[j]))", params=", t: [N]"))
    q, k, v = qkv()
    _result_or_value_error(lambda: mod.a(q, k, v, rand(16), backend="reference"))


def test_output_with_an_index_variable_triton_backward(build) -> None:
    mod = build(spec("score = dot(q, k)", "output = o + hk"))
    q, k, v = qkv(grad=True)
    mod.a(q, k, v, backend="triton").sum().backward()
    assert torch.isfinite(q.grad).all()


def test_output_without_o_triton_backward(build) -> None:
    mod = build(spec("score = dot(q, k)", "output = offset[h, e]", params=", offset: [H, D]"))
    q, k, v = qkv(grad=True)
    offset = rand(2, 16).requires_grad_()
    mod.a(q, k, v, offset, backend="triton").sum().backward()
    assert offset.grad is not None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_heads(compiled, backend: str) -> None:
    mod = compiled("causal")
    q, k, v = (rand(1, 0, 8, 16).requires_grad_() for _ in range(3))
    o = mod.causal(q, k, v, backend=backend)
    assert o.shape == (1, 0, 8, 16)
    o.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_int_scalar_out_of_int64(compiled, value: int) -> None:
    mod = compiled("sliding_window")
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"W: .* outside the 64-bit integer range"):
        mod.sliding_window(q, k, v, W=value)


def test_bf16_on_the_cpu_triton_path_of_a_linear_block_is_refused(compiled) -> None:
    mod = compiled("linear_elu")
    q, k, v = qkv(N=16, D=16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 on CPU tensors"):
        mod.linear_elu(q, k, v, backend="triton")


def test_mask_with_a_float_load_compare_triton(build) -> None:
    mod = build(spec("score = dot(q, k)", "mask = j <= i and 0.5 < w[hk]", params=", w: [H]"))
    q, k, v = qkv()
    w = torch.tensor([0.0, 1.0])
    got = mod.a(q, k, v, w, backend="triton")
    torch.testing.assert_close(got, mod.a(q, k, v, w, backend="reference"), rtol=1e-5, atol=1e-5)


def test_tiny_constant_score_triton(build) -> None:
    mod = build(spec("score = 1e-40", "norm = none"))
    q, k, v = qkv()
    got = mod.a(q, k, v, backend="triton")
    torch.testing.assert_close(got, mod.a(q, k, v, backend="reference"), rtol=1e-5, atol=1e-30)


_SAME_CLASS = [
    ("score = dot(q, k) // 2.0", ""),  # floor division: gradient 0 through it
    ("score = dot(q, k) - dot(q, k) % 0.5", ""),
    # Found by the 20,000-example fuzz run: a number modulo a tensor (torch.remainder has no derivative).
    ("score = dot(q, k) + 0.5 % dot(q, k)", ""),
    # ... and a uniform exponent of a tile base (the interpreter's Python float has no `.to`).
    ("score = dot(q, k)\n    feature k = where(0 <= hk < D, 1.0, k ** H)", ""),
    ("score = dot(q, k) * 0.1\n    output = 2.0 * where(0 <= h < D, 1.0, o ** H)", ""),
    ("score = dot(q, k) + clamp(b, -1e39, 1.0)", ""),
    ("score = min(dot(q, k), 1e39) + max(dot(q, k), -1e39) * 0.0", ""),
    ("score = dot(q, k) + exp(where(N > 0, 0.5, t[j]))", ", t: [N]"),
    ("score = dot(q, k) + sqrt(where(N < 0, t[j] * t[j], 2.0))", ", t: [N]"),
    ("score = dot(q, k) + 1e-40", ""),
    # Found by the fuzz run: a where of two uniform ints is an int tile (it was made a float one).
    ("score = dot(q, k) + min(where(b < h, 0, 1) // 1, 0.5)", ""),
    ("score = dot(q, k) * 1e-39", ""),
    ("score = dot(q, k)\n    mask = j <= i or 0.5 < w[hk]", ", w: [H]"),
    ("score = dot(q, k)\n    mask = not (j > i and w[hk] > 0.5)", ", w: [H]"),
]


@pytest.mark.parametrize(("body", "params"), _SAME_CLASS, ids=[b.split("\n")[0][8:] for b, _ in _SAME_CLASS])
def test_call_time_crash_classes_run_and_agree(build, body: str, params: str) -> None:
    """Other inputs of the call-time crash classes: both backends run forward and backward, and agree."""
    mod = build(spec(body, params=params))
    extra = []
    if "t: [N]" in params:
        extra.append(rand(16, seed=5).abs())
    if "w: [H]" in params:
        extra.append(torch.tensor([0.0, 1.0]))
    outs, grads = [], []
    for backend in ("reference", "triton"):
        q, k, v = qkv(grad=True)
        o = mod.a(q, k, v, *extra, backend=backend)
        o.sum().backward()
        outs.append(o.detach())
        grads.append([x.grad for x in (q, k, v)])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for g_tri, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "body",
    ["score = dot(q, k) * 0.1 + clamp(log(dot(q, k)), 0.5, 0.5)", "score = dot(q, k) * 0.1 + relu(log(dot(q, k)))",
     "score = dot(q, k) * 0.1 + max(log(dot(q, k)), 0.0) - min(0.0, sqrt(dot(q, k)))"],
)  # fmt: skip
def test_nan_through_min_max_clamp_propagates_alike(build, body: str) -> None:
    """Found by the fuzz run: Triton's minimum/maximum drop a NaN operand by default; torch keeps it. The
    log/sqrt of a negative dot product is NaN in some entries: those rows are NaN on both backends."""
    mod = build(spec(body))
    q, k, v = qkv()
    ref, ref_lse = mod.a(q, k, v, backend="reference", return_lse=True)
    tri, tri_lse = mod.a(q, k, v, backend="triton", return_lse=True)
    assert torch.isnan(ref_lse).any()  # the case is live
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(tri_lse, ref_lse, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_floor_of_a_non_finite_value_is_a_clean_error_on_the_reference(build) -> None:
    """Found by the fuzz run: floor(log(b)) at b = 0 has no integer; the reference says so (the kernels do not
    check: outside the contract, as an integer division by zero)."""
    mod = build(spec("score = dot(q, k) * 0.1 + floor(log(b))"))
    q, k, v = qkv()
    with pytest.raises(ValueError, match="floor or ceil of inf or NaN"):
        mod.a(q, k, v, backend="reference")


def test_a_huge_score_offset_is_rounded_alike(build) -> None:
    """Found by the fuzz run: `dot(q, k) * 0.5 + 1e6` is known to float32 only to ~0.06 (eps·1e6) on either
    backend (the kernels round in the exp2 domain, one binade coarser). Softmax ignores the offset in exact
    arithmetic: both backends stay within that rounding (times the value range) of the float64 result."""
    mod = build(spec("score = dot(q, k) * 0.5 + 1e6"))
    q, k, v = qkv()
    want = _softmax_oracle(q, k, v, 0.5)
    bound = 4 * 2.0**-23 * 1e6 * float(v.abs().max())
    for backend in ("reference", "triton"):
        err = float((mod.a(q, k, v, backend=backend).double() - want).abs().max())
        assert err <= bound, (backend, err, bound)


# ---- outside text reaches generated code --------------------------------------------------------------------

_IMPORT_ALL = """
import importlib.util, pathlib, sys, traceback
failed = 0
for n, path in enumerate(sorted(pathlib.Path(sys.argv[1]).rglob("*.py"))):  # each file on its own
    try:
        spec = importlib.util.spec_from_file_location(f"generated{n}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except BaseException:
        failed += 1
        traceback.print_exc()
sys.exit(1 if failed else 0)
"""


def _hostile_names() -> list[str]:
    payload = "open('MARKER', 'w').write('pwned')"  # relative: a file name cannot hold '/'; run in tmp_path
    return [
        f"y\n{payload}\n#.attn",
        f'y"""\n{payload}\n""".attn',
        f"y\r{payload}\r#.attn",
        f"y\\\n{payload}\n#.attn",
        f"y\r\n{payload}\r\n#.attn",
        f"y'''\n{payload}\n'''.attn",
        f"y\x0c\x85\u2028\n{payload}\n#\udcff.attn",  # other line breaks, a non-UTF-8 byte (surrogate-escaped)
    ]


_CODEGEN_EACH = """
import sys
from attnc.cli import main
# argv: output root, then spec paths; spec n goes to <root>/out<n> (sanitised stems of these names collide)
sys.exit(max(main(["codegen", p, "-o", f"{sys.argv[1]}/out{n}"]) for n, p in enumerate(sys.argv[2:])))
"""


def test_file_names_never_reach_generated_code_as_code(tmp_path: Path) -> None:
    """`attnc codegen` on hostile file names (one process for all, as the CLI's `main`), then every generated
    file imported in a new process: the payload in the names never runs, and every file imports."""
    marker = tmp_path / "MARKER"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    paths = []
    for n, name in enumerate(_hostile_names()):
        src_dir = tmp_path / f"src{n}"
        src_dir.mkdir()
        paths.append(src_dir / name)
        paths[-1].write_text((SPECS / "causal.attn").read_text())
    run = subprocess.run(
        [sys.executable, "-c", _CODEGEN_EACH, str(tmp_path / "gen"), *map(str, paths)],
        capture_output=True, text=True, errors="replace", cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, f"codegen failed: {run.stderr[-800:]}"
    assert len(list((tmp_path / "gen").rglob("*.py"))) == 2 * len(paths)
    imp = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, str(tmp_path / "gen")],
        capture_output=True, text=True, errors="replace", cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert not marker.exists(), "importing generated code ran code from a file name"
    assert imp.returncode == 0, f"the generated files do not import: {imp.stderr[-800:]}"


def test_spec_text_never_reaches_generated_code_as_code(tmp_path: Path) -> None:
    """The spec is quoted in the module's docstring: comments that try to end it, in every quoting, with a
    trailing backslash and odd line breaks, stay text. The generated files import in a new process and the
    payload never runs."""
    payload = "open('MARKER', 'w').write('pwned')"
    comments = [f'# """\n# {payload}\n# """', f"# '''\n# {payload}\n# '''", "# ends in a backslash \\",
                f'# \\"""{payload}#', "# \x0c form feed, \u2028 line separator, \x85 next line"]  # fmt: skip
    source = (SPECS / "causal.attn").read_text()
    head, brace, rest = source.partition("{\n")
    for n, comment in enumerate(comments):
        main, kernels = generate_all(head + brace + comment + "\n" + rest, f"c{n}.attn")
        (tmp_path / f"c{n}.py").write_text(main, encoding="utf-8")
        (tmp_path / f"c{n}_triton.py").write_text(kernels or "", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    imp = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=300,
    )  # fmt: skip
    assert not (tmp_path / "MARKER").exists(), "importing generated code ran code from a spec comment"
    assert imp.returncode == 0, imp.stderr[-800:]


@pytest.mark.parametrize(
    "name",
    ['a"""b.attn', "a\nb.attn", "a\rb.attn", "a\x00b.attn", "a\\b.attn", "a'''\\.attn", "a\udcffb.attn"],
)
def test_odd_file_names_compile_and_import(tmp_path: Path, name: str) -> None:
    mod = compile_source((SPECS / "causal.attn").read_text(), name, cache_dir=tmp_path)
    q, k, v = qkv()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(mod.causal(q, k, v), want, rtol=1e-5, atol=1e-5)


# ---- caches that heal ---------------------------------------------------------------------------------------


def _cached(tmp_path: Path) -> tuple[Path, Path]:
    """Compile causal.attn into the test's cache; its main and kernels files."""
    cache = tmp_path / "cache"
    compile_file(SPECS / "causal.attn", cache_dir=cache)
    (main,) = [p for p in cache.glob("causal_*.py") if not p.name.endswith("_triton.py")]
    return main, main.with_name(main.stem + "_triton.py")


def _runs_in_a_new_process(tmp_path: Path, backend: str, damage: str = "") -> None:
    """In a new process: compile through the cache, run `damage` (Python; `kernels` is the kernels file's path)
    after the module is loaded and before its first call, then call it and check the result."""
    head = textwrap.dedent(f"""
        import pathlib, torch, warnings
        from attnc.codegen.module import compile_file
        warnings.simplefilter("ignore")
        cache = pathlib.Path({str(tmp_path / "cache")!r})
        mod = compile_file({str(SPECS / "causal.attn")!r}, cache_dir=cache)
        (kernels,) = cache.glob("causal_*_triton.py")
    """)
    tail = textwrap.dedent(f"""
        q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = mod.causal(q, k, v, backend={backend!r})
        assert torch.allclose(got, want, atol=1e-4), "wrong result"
        print("OK")
    """)
    code = head + damage + "\n" + tail
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-800:]


OTHER_SPEC = (
    "attention other(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n"
)

# Ways to damage a file `f` (a Path, in the child process; `other` is the same file of another spec's entry).
DAMAGE = {
    "invalid-utf8": "f.write_bytes(f.read_bytes()[:200] + b'\\xff\\xfe\\xfa' + f.read_bytes()[200:])",
    "truncated": "f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])",
    "edited": "f.write_bytes(f.read_bytes().replace(b'+', b'-', 1))",  # same length, one operator flipped
    "empty": "f.write_bytes(b'')",
    "swapped": "f.write_bytes(other.read_bytes())",  # a valid file, of another spec
    "deleted": "f.unlink()",
}


def _other_entry(tmp_path: Path, kernels: bool) -> Path:
    compile_source(OTHER_SPEC, "other.attn", cache_dir=tmp_path / "cache")
    (other,) = (tmp_path / "cache").glob("other_*_triton.py" if kernels else "other_*[0-9a-f].py")
    return other


@pytest.mark.parametrize(
    ("damage", "backend"),
    [(d, "reference") for d in DAMAGE]
    # The main file's check does not depend on the backend: one kind on Triton in CI (each case is ~9 s of
    # subprocesses), every kind with -m slow.
    + [pytest.param(d, "triton", marks=() if d == "truncated" else pytest.mark.slow) for d in DAMAGE],
)
def test_cache_heals_a_damaged_main_file(tmp_path: Path, damage: str, backend: str) -> None:
    main, _ = _cached(tmp_path)
    other = _other_entry(tmp_path, kernels=False)
    f = f"f, other = pathlib.Path({str(main)!r}), pathlib.Path({str(other)!r})\n"
    # Damaged before the next process compiles: its cache lookup finds the damage and regenerates the entry.
    subprocess.run([sys.executable, "-c", "import pathlib\n" + f + DAMAGE[damage]], check=True)
    _runs_in_a_new_process(tmp_path, backend)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_cache_heals_a_damaged_kernels_file(tmp_path: Path, damage: str) -> None:
    _cached(tmp_path)
    other = _other_entry(tmp_path, kernels=True)
    # The main module is loaded and holds; the kernels file is damaged before the first Triton call, which
    # checks it and rebuilds it.
    act = f"f, other = kernels, pathlib.Path({str(other)!r})\n" + DAMAGE[damage]
    _runs_in_a_new_process(tmp_path, "triton", act)


def test_a_damaged_kernels_file_without_the_cache_is_refused_clearly(tmp_path: Path) -> None:
    """A module written by `attnc codegen` has no compiler behind it to rebuild its kernels: a damaged kernels
    file is refused with a ValueError that names it, and never imported."""
    from attnc.codegen.module import generate_all, load_module_file

    main, kernels = generate_all((SPECS / "causal.attn").read_text(), "causal.attn")
    (tmp_path / "cz.py").write_text(main)
    (tmp_path / "cz_triton.py").write_text((kernels or "")[: len(kernels or "") // 2])
    mod = load_module_file(tmp_path / "cz.py", "attnc_generated.cz_damaged")
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"cz_triton\.py is damaged"):
        mod.causal(q, k, v, backend="triton")


def test_unwritable_cache_still_runs_triton(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # a cache directory below a plain file cannot be created, even by root
    with pytest.warns(UserWarning, match="cache"):
        mod = compile_file(SPECS / "causal.attn", cache_dir=blocker / "cache")
    q, k, v = qkv()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(mod.causal(q, k, v, backend="triton"), want, rtol=1e-4, atol=1e-4)


# ---- found while fixing the front end's part ------------------------------------------------------------------


def test_negative_base_integer_power_triton(build) -> None:
    mod = build(spec("score = dot(q, k) + (0 - 2.0) ** (i - j)", "mask = j <= i"))
    q, k, v = qkv(N=6)
    idx = torch.arange(6, dtype=torch.float64)
    d = (idx[:, None] - idx[None, :]).clamp(min=0)
    bias = torch.where(idx[:, None] >= idx[None, :], (-2.0) ** d, float("-inf"))
    s = q.double() @ k.double().transpose(-1, -2) + bias
    want = torch.softmax(s, -1) @ v.double()
    torch.testing.assert_close(mod.a(q, k, v, backend="triton").double(), want, rtol=1e-4, atol=1e-4)


def test_per_head_decay_with_negative_and_zero_bases_triton(tmp_path: Path) -> None:
    """retention's gamma[h] ** (i - j) with a loaded per-head base (`_pow_int`, the base kept a scalar): torch's
    pow for negative bases (the sign alternates with i - j), a zero base (1 on the diagonal, 0 below) and 1, in
    the forward and the q, k, v gradients, against the formula in float64."""
    mod = compile_file(SPECS / "retention.attn", cache_dir=tmp_path)
    gen = torch.Generator().manual_seed(4)
    B, H, N, D = 1, 4, 40, 16
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([-0.9, 0.0, 1.0, 0.5], dtype=torch.float64)

    def formula(q, k, v):  # type: ignore[no-untyped-def]
        n = torch.arange(N, dtype=torch.float64)
        d = n[:, None] - n[None, :]
        decay = torch.where(d >= 0, gamma[:, None, None] ** d.clamp(min=0), 0.0)
        return (q @ k.transpose(-1, -2) * D**-0.5 * decay) @ v

    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    out = mod.retention(*leaves, gamma.float(), backend="triton", algorithm="parallel")
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    want = formula(*ref)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    w = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), leaves)
    exp = torch.autograd.grad((want * w).sum(), ref)
    for name, g, e in zip("qkv", got, exp, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=f"d{name}")
