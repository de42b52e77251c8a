"""Property tests: whatever text it is given, the front end either compiles it or raises `SpecError`.

Three generators feed `compile_to_ir`:

(a) token soup: random sequences of the language's tokens, names and some junk characters;
(b) mutations of the valid example specs: characters or tokens deleted, duplicated, swapped, inserted;
(c) a grammar-aware expression generator whose output is plugged into `score = ...` (and friends).

Any exception other than `SpecError` fails, every example must finish well under a second (hypothesis
`deadline`), and an error's line/col must point inside the source. Examples run derandomized; raise their
number with the environment variable ATTNC_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import os
import re
import traceback
from datetime import timedelta

import pytest
from attnc.dsl.check import KEYWORDS as LANGUAGE_KEYWORDS
from attnc.dsl.errors import SpecError
from attnc.dsl.lower import compile_to_ir
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = int(os.environ.get("ATTNC_FUZZ_EXAMPLES", "300"))

FUZZ = settings(
    derandomize=True,
    max_examples=FUZZ_EXAMPLES,
    deadline=timedelta(milliseconds=2000),  # a hang guard on a shared CPU, not a timing test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The valid example specs (a copy of the examples file: the tests must not depend on files outside the repo).
VALID_SPECS: dict[str, str] = {
    "alibi": """\
# alibi.attn: ALiBi (Press et al.) on a causal mask
attention alibi(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D], slopes: [H]) {
    score = dot(q, k) * D ** -0.5 + slopes[h] * (j - i)
    mask  = j <= i
    norm  = softmax
}
""",
    "sliding_window": """\
attention sliding_window(q: [B, H, N, D], k: [B, G, N, D], v: [B, G, N, D], W: int = 256) {
    score = dot(q, k) / sqrt(D)
    mask  = j <= i and i - j < W          # k, v with G heads: grouped-query attention, h -> h // (H / G)
}
""",
    "softcap": """\
attention softcap(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D], cap: float = 50.0) {
    let s = dot(q, k) * D ** -0.5
    score = cap * tanh(s / cap)
}
""",
    "document": """\
attention document(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], doc: [B, N] int32) {
    score = dot(q, k) * D ** -0.5
    mask  = doc[b, i] == doc[b, j] and j <= i
}
""",
    "t5_bias": """\
attention t5_bias(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D], bias: [H, 2 * R + 1], R: int = 64) {
    score = dot(q, k) * D ** -0.5 + bias[h, clamp(j - i, -R, R) + R]
}
""",
    "sink": """\
attention sink(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], sinks: [H]) {
    score = dot(q, k) * D ** -0.5
    mask  = j <= i
    norm  = softmax(sink = sinks[h])      # an extra logit in every row's normaliser
}
""",
    "sigmoid_attn": """\
attention sigmoid_attn(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {
    score = dot(q, k) * D ** -0.5
    norm  = sigmoid(bias = -log(N))
}
""",
    "moh_gate": """\
attention moh_gate(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], gate: [B, H, N]) {
    score  = dot(q, k) * D ** -0.5
    mask   = j <= i
    output = o * gate[b, h, i]            # fused epilogue on each row's output
}
""",
    "lightning": """\
attention lightning(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], decay: [H]) {
    feature q = elu(q) + 1
    feature k = elu(k) + 1
    score = dot(q, k) * exp(-decay[h] * (i - j))
    mask  = j <= i
    norm  = none                          # linear attention (issue on the linear family)
}
""",
}
ALL_SPECS = "\n".join(VALID_SPECS.values())
SPEC_TEXTS = [ALL_SPECS, *VALID_SPECS.values()]

KEYWORDS = sorted(LANGUAGE_KEYWORDS)
TYPES = ["int", "float", "int32", "bool", "float16"]
PUNCT = ["(", ")", "[", "]", "{", "}", ",", ":", "=", ";", "+", "-", "*", "/", "//", "%", "**"]
COMPARISONS = ["<", "<=", ">", ">=", "==", "!="]
INDEX_VARS = ["b", "h", "hk", "i", "j", "d", "e", "o"]
SIZES = ["B", "H", "N", "M", "D", "G", "E", "R", "W"]
FUNCS = ["dot", "where", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "elu"]
FUNCS += ["abs", "floor", "ceil", "min", "max", "clamp"]
NORM_NAMES = ["softmax", "sigmoid", "none", "sum", "sink", "bias", "eps"]
OTHER_NAMES = ["q", "k", "v", "slopes", "slope", "table", "doc", "cap", "x", "s", "__import__", "eval", "_x"]
LITERALS = ["0", "1", "2", "64", "0.5", "1e3", ".5", "1e400", "9223372036854775808", "99999999999999999999"]
# Form feed and lone '\r' are whitespace to the parser but line breaks to `str.splitlines`: they check that
# positions and rendering count lines the parser's way.
JUNK = ["$", '"', "'", "#", "!", "&", "|", ".", "@", "\\", "\t", "\n", "\r\n", "\r", "\x0c", "\x0b"]
JUNK += ["\u2028", "é", "\x00"]
TOKENS = (
    KEYWORDS + TYPES + PUNCT + COMPARISONS + INDEX_VARS + SIZES + FUNCS + NORM_NAMES + OTHER_NAMES + LITERALS
)
SOUP_TOKENS = TOKENS + JUNK

# A lexer good enough to cut specs into tokens for token-level mutations (whitespace kept as tokens).
_TOKEN_RE = re.compile(r"\s+|#[^\n]*|\*\*|//|<=|>=|==|!=|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|\w+|.", re.S)


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def _known_bug(exc: BaseException) -> bool:
    """Crashes already pinned by strict xfails in test_spec_errors.py, skipped here so that the generators keep
    looking for new ones. Delete an entry once its bug is fixed."""
    # test_index_that_simplifies_to_a_constant and test_refolding_after_simplification_raises_spec_error:
    # once `h - h` is simplified to 0, passes._rebuild refolds constants and raises AssertionError (a LOAD
    # folded as an operator) or BuildError (`1 // 0`, `log(0)`, overflow) instead of SpecError.
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f.name == "_rebuild" and f.filename.endswith("passes.py") for f in frames)


def compile_or_spec_error(source: str) -> SpecError | None:
    """Run the front end; return the SpecError it raised (or None). Any other exception propagates."""
    try:
        compile_to_ir(source, "fuzz.attn")
    except SpecError as err:
        check_error(err, source)
        return err
    except Exception as exc:
        assume(not _known_bug(exc))
        raise
    return None


def check_error(err: SpecError, source: str) -> None:
    assert isinstance(err.message, str) and err.message, "a SpecError needs a message"
    assert (err.line is None) == (err.col is None)
    lines = source.split("\n")  # the parser counts lines by '\n'
    if err.line is not None:
        assert err.col is not None
        assert 1 <= err.line <= len(lines), f"line {err.line} outside a source of {len(lines)} lines: {err}"
        assert 1 <= err.col <= len(lines[err.line - 1]) + 1, (
            f"column {err.col} outside line {err.line}: {err}"
        )
    text = str(err)  # rendering must never fail
    head = f"fuzz.attn:{err.line}:{err.col}: error: " if err.line is not None else "fuzz.attn: error: "
    assert text.startswith(head), text


def setup_module() -> None:
    # Warm up (grammar compilation, sympy) so that no example pays a one-time cost against the deadline.
    for text in SPEC_TEXTS:
        compile_to_ir(text, "warmup.attn")


def test_valid_specs_compile() -> None:
    program = compile_to_ir(ALL_SPECS, "all.attn")
    assert [a.name for a in program.attentions] == list(VALID_SPECS)


# ---- (a) token soup ----------------------------------------------------------------------------------------

_SEPARATORS = st.sampled_from([" ", " ", " ", "", "\n", "\t"])


@st.composite
def token_soup(draw: st.DrawFn) -> str:
    toks = draw(st.lists(st.sampled_from(SOUP_TOKENS), max_size=60))
    return "".join(t + draw(_SEPARATORS) for t in toks)


@FUZZ
@given(token_soup())
def test_token_soup(source: str) -> None:
    compile_or_spec_error(source)


@FUZZ
@given(
    st.sampled_from(["attention a(", "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]"]),
    token_soup(),
)
def test_token_soup_after_header(prefix: str, soup: str) -> None:
    compile_or_spec_error(prefix + soup)


_BODY_FRAME = (
    "attention a(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D], slopes: [H], table: [H, N], "
    "doc: [B, N] int32, cap: float = 50.0, W: int = 4) {{\n    {body}\n}}\n"
)


@FUZZ
@given(token_soup())
def test_token_soup_in_body(soup: str) -> None:
    compile_or_spec_error(_BODY_FRAME.format(body=soup))


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=25))
def test_token_soup_as_score(toks: list[str]) -> None:
    compile_or_spec_error(_BODY_FRAME.format(body="score = " + " ".join(toks)))


# ---- (b) mutations of the valid specs ---------------------------------------------------------------------

_MUTATIONS = [
    "del-char",
    "dup-char",
    "swap-chars",
    "ins-char",
    "del-token",
    "dup-token",
    "swap-tokens",
    "ins-token",
    "replace-token",
]


@st.composite
def mutated_spec(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SPEC_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(_MUTATIONS))
        if kind.endswith("char"):
            if not text:
                continue
            p = draw(st.integers(0, len(text) - 1))
            if kind == "del-char":
                text = text[:p] + text[p + 1 :]
            elif kind == "dup-char":
                text = text[:p] + text[p] + text[p:]
            else:
                ch = draw(st.sampled_from([*JUNK, "(", ")", "[", "]", "{", "}", ",", "=", "*", "0", "x"]))
                text = text[:p] + ch + text[p:]
        elif kind == "swap-chars":
            if len(text) < 2:
                continue
            p = draw(st.integers(0, len(text) - 2))
            text = text[:p] + text[p + 1] + text[p] + text[p + 2 :]
        else:
            toks = _tokens(text)
            if not toks:
                continue
            p = draw(st.integers(0, len(toks) - 1))
            if kind == "del-token":
                del toks[p]
            elif kind == "dup-token":
                toks.insert(p, toks[p])
            elif kind == "swap-tokens":
                r = draw(st.integers(0, len(toks) - 1))
                toks[p], toks[r] = toks[r], toks[p]
            elif kind == "ins-token":
                toks.insert(p, " " + draw(st.sampled_from(SOUP_TOKENS)) + " ")
            else:
                toks[p] = draw(st.sampled_from(TOKENS))
            text = "".join(toks)
    return text


@FUZZ
@given(mutated_spec())
def test_mutated_specs(source: str) -> None:
    compile_or_spec_error(source)


# ---- (c) grammar-aware expressions --------------------------------------------------------------------------

_LEAF_NAMES = [
    *INDEX_VARS,
    "hk",
    *SIZES,
    "q",
    "k",
    "v",
    "slopes",
    "table",
    "doc",
    "cap",
    "W",
    "s",
    "m",
    "x",
    "slope",
    "dot",
    "softmax",
]
_leaf = st.one_of(
    st.integers(0, 2**70).map(str),
    st.sampled_from(["0", "1", "2", "0.5", "1e-3", "1e308", ".5", "3.", "1e400"]),
    st.floats(min_value=0, allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "false", "dot(q, k)", "dot(k, q)", "dot(q)"]),
    st.sampled_from(_LEAF_NAMES),
)


def _extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binop = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", *COMPARISONS, "and", "or"])
    unop = st.sampled_from(["-", "+", "not "])
    args = st.lists(children, min_size=0, max_size=4).map(", ".join)
    return st.one_of(
        st.tuples(children, binop, children).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        st.tuples(unop, children).map(lambda t: t[0] + t[1]),
        children.map(lambda c: f"({c})"),
        st.tuples(st.sampled_from([*FUNCS, "tanhh", "slopes"]), args).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(st.sampled_from(["slopes", "table", "doc", "slope", "q", "W"]), args).map(
            lambda t: f"{t[0]}[{t[1]}]"
        ),
    )


expressions = st.recursive(_leaf, _extend, max_leaves=25)

_EXPR_FRAME = (
    "attention a(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D], slopes: [H], table: [H, N],\n"
    "            doc: [B, N] int32, cap: float = 50.0, W: int = 4) {{\n"
    "    let s = dot(q, k) * D ** -0.5\n"
    "    let m = j <= i\n"
    "{stmts}\n"
    "}}\n"
)


@FUZZ
@given(expressions)
def test_random_score_expression(expr: str) -> None:
    compile_or_spec_error(_EXPR_FRAME.format(stmts=f"    score = {expr}"))


@st.composite
def random_block(draw: st.DrawFn) -> str:
    stmts = [f"    score = {draw(expressions)}"]
    if draw(st.booleans()):
        stmts.append(f"    mask = {draw(expressions)}")
    if draw(st.booleans()):
        stmts.append(f"    output = {draw(expressions)}")
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["softmax", "sigmoid", "sum", "none"]))
        kw = draw(st.sampled_from(["sink", "bias", "eps"]))
        stmts.append(f"    norm = {kind}({kw} = {draw(expressions)})")
    if draw(st.booleans()):
        stmts.append(f"    feature {draw(st.sampled_from(['q', 'k']))} = {draw(expressions)}")
    if draw(st.booleans()):
        stmts.insert(0, f"    let t = {draw(expressions)}")
    draw(st.randoms()).shuffle(stmts)
    return _EXPR_FRAME.format(stmts="\n".join(stmts))


@FUZZ
@given(random_block())
def test_random_statements(source: str) -> None:
    compile_or_spec_error(source)


@FUZZ
@given(expressions, st.sampled_from(["H", "N", "2 * W + 1", "W"]))
def test_random_shapes(expr: str, dim: str) -> None:
    # Expressions in a shape are checked by a different context (no index variables, no tensors).
    source = (
        f"attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], t: [{dim}, {expr}], W: int = 4) {{\n"
        "    score = dot(q, k)\n}\n"
    )
    compile_or_spec_error(source)


# ---- error positions ----------------------------------------------------------------------------------------


@FUZZ
@given(
    st.one_of(
        mutated_spec(), token_soup(), expressions.map(lambda e: _EXPR_FRAME.format(stmts=f"score = {e}"))
    )
)
def test_error_positions_point_into_the_source(source: str) -> None:
    err = compile_or_spec_error(source)
    if err is not None and err.line is not None:
        assert err.source == source and err.filename == "fuzz.attn"
        rendered = str(err).split("\n")
        # The rendered source line is the one the position names (when the line is short enough to show whole).
        line_text = source.split("\n")[err.line - 1]
        # Only '\n' breaks lines (a form feed or a lone '\r' is whitespace), in positions and rendering alike.
        if len(line_text) <= 100:
            # Control characters (but tab) and lone surrogates are shown as U+FFFD, one for one, so the
            # terminal shows the line as written and the caret stays under its column.
            shown = "".join(
                "\ufffd" if (ord(c) < 32 and c != "\t") or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF else c
                for c in line_text
            )
            assert rendered[1] == "    " + shown
            assert "^" in rendered[2]


@pytest.mark.parametrize("name", list(VALID_SPECS))
def test_each_valid_spec_compiles_alone(name: str) -> None:
    assert compile_or_spec_error(VALID_SPECS[name]) is None


# ---- (d) integer index expressions (the interval analysis behind "always out of range") -------------------

_int_leaf = st.one_of(
    st.sampled_from(["b", "h", "hk", "i", "j", "H", "N", "M", "D", "W", "0", "1", "2", "3"]),
    st.integers(-70, 70).map(lambda n: f"({n})"),
)


def _int_extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "//", "%"]), children).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        children.map(lambda c: f"-{c}"),
        st.tuples(st.sampled_from(["min", "max"]), children, children).map(
            lambda t: f"{t[0]}({t[1]}, {t[2]})"
        ),
        st.tuples(children, children, children).map(lambda t: f"clamp({t[0]}, {t[1]}, {t[2]})"),
        children.map(lambda c: f"abs({c})"),
        st.tuples(children, children, children, children).map(
            lambda t: f"where({t[0]} < {t[1]}, {t[2]}, {t[3]})"
        ),
    )


int_expressions = st.recursive(_int_leaf, _int_extend, max_leaves=16)


@FUZZ
@given(int_expressions, int_expressions)
def test_random_index_expressions(row: str, col: str) -> None:
    compile_or_spec_error(_EXPR_FRAME.format(stmts=f"    score = s + table[{row}, {col}]\n    mask = m"))
