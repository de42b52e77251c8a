"""AST transforms used by the transformers integration (attnc.dsl.transforms): printing round-trips, the
key-padding variant against an SDPA oracle with an explicit mask, and the dot(q, k) scale finder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attnc.dsl import transforms as T
from attnc.dsl.errors import SpecError
from attnc.dsl.parser import parse

import attnc

from .conftest import REPO, SPECS

ALL_SPECS = sorted([*SPECS.glob("*.attn"), *(REPO / "zoo" / "specs").glob("*.attn")])


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: f"{p.parent.parent.name}-{p.stem}")
def test_format_spec_round_trips(path: Path) -> None:
    spec = parse(path.read_text(), str(path))
    again = parse(T.format_spec(spec), "<printed>")
    assert again.attentions == spec.attentions  # spans are excluded from AST equality


def test_format_keeps_precedence_and_literals() -> None:
    text = "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], c: float = 1e-06) {" + (
        " score = -(dot(q, k) * 2 ** -1) - 3 / (1 - c) mask = not (i < j) == (j < i + 1) and 0 <= i - j < 4 }"
    )
    spec = parse(text)
    assert parse(T.format_spec(spec)).attentions == spec.attentions


def padded_oracle(q, k, v, valid, window=None):
    """SDPA with the explicit mask: bottom-right causal, optional window, keys where valid != 0."""
    M, N = q.shape[2], k.shape[2]
    i = torch.arange(M)[:, None] + N - M
    j = torch.arange(N)[None, :]
    allowed = (j <= i)[None, None] & (valid[:, None, None, :] != 0)
    if window is not None:
        allowed = allowed & (i - j < window)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return torch.where(allowed.any(-1, keepdim=True), o, torch.zeros_like(o))  # empty rows: 0 by the language


@pytest.mark.parametrize("M", [1, 7, 19], ids=lambda m: f"M{m}")
def test_key_padding_variant_matches_sdpa(M: int) -> None:
    spec = parse(SPECS.joinpath("decode.attn").read_text())
    att, param = T.add_key_padding(spec.attentions[0])
    assert param == "kv_valid"
    mod = attnc.compile_source(T.format_spec(att), "decode_padded.attn")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, M, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, 19, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 19, 16, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(3, 19, dtype=torch.int32)
    valid[1, :5] = 0  # left padding
    valid[2, 12:] = 0  # right padding: the last queries of row 2 still see keys 0..11
    valid[2, 3] = 0
    o = mod.decode(q, k, v, valid)
    want = padded_oracle(q, k, v, valid)
    torch.testing.assert_close(o, want, atol=1e-10, rtol=1e-10)
    assert torch.isfinite(o).all()
    do = torch.randn_like(o)
    got_g = torch.autograd.grad(o, (q, k, v), do)
    want_g = torch.autograd.grad(want, (q, k, v), do)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_key_padding_adds_a_mask_and_a_fresh_name() -> None:
    text = (
        "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], kv_valid: [H]) { score = dot(q, k) }"
    )
    att, param = T.add_key_padding(parse(text).attentions[0])
    assert param == "kv_valid2"
    printed = T.format_spec(att)
    assert "kv_valid2: [B, N] int32" in printed and "mask = kv_valid2[b, j] != 0" in printed


def test_select_attention_names_the_blocks() -> None:
    spec = parse(
        "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) { score = dot(q, k) }\n"
        "attention b(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) { score = dot(q, k) }"
    )
    with pytest.raises(SpecError, match=r"2 attention blocks \(a, b\)"):
        T.select_attention(spec)
    assert T.select_attention(spec, "b").name == "b"
    with pytest.raises(SpecError, match="no attention block 'c'"):
        T.select_attention(spec, "c")


@pytest.mark.parametrize(
    ("score", "value"),
    [
        ("dot(q, k) * D ** -0.5", 0.25),
        ("dot(q, k) / sqrt(D) + slopes[h] * (j - i)", 0.25),
        ("2.0 * (dot(q, k) * s)", 1.0),
        ("cap * tanh(dot(q, k) * D ** -0.5 / cap)", 0.25 / 50),  # the cap's divisor counts: callers drop it
        ("dot(q, k)", 1.0),
    ],
)
def test_dot_coefficient(score: str, value: float) -> None:
    text = (
        "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], slopes: [H], s: float = 0.5, "
        f"cap: float = 50.0) {{ score = {score} }}"
    )
    att = parse(text).attentions[0]
    c = T.dot_coefficient(att, {"B", "H", "N", "D", "s", "cap"})
    assert c is not None
    values = {"D": 16, "s": 0.5, "cap": 50.0}
    got = 1.0
    for e in c.factors:
        got *= T.evaluate_constant(e, values)
    for e in c.divisors:
        got /= T.evaluate_constant(e, values)
    assert got == pytest.approx(value)


def test_dot_coefficient_is_none_without_a_single_dot() -> None:
    att = parse(
        "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) { score = dot(q, k) * dot(q, k) }"
    ).attentions[0]
    assert T.dot_coefficient(att, {"D"}) is None
