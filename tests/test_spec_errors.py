"""Malformed specs: each must raise `SpecError` (nothing else) with the message, position and hint a user needs.

Every case is a spec with a `‸` marking where the error should point; the marker is removed before compiling
and its line and column (1-based) are the expected `err.line` / `err.col`. A case without a marker expects no
position. Cases where the compiler falls short of what a user should get are strict xfails with the reason.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from attnc.dsl.errors import SpecError
from attnc.dsl.lower import compile_to_ir

MARK = "‸"
FILENAME = "bad.attn"

HEAD = "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]"


def spec(*body: str, params: str = "") -> str:
    """A one-block spec: the header on line 1, then one body statement per line from line 2 (indented 4)."""
    lines = "\n".join("    " + b for b in body)
    return f"{HEAD}{params}) {{\n{lines}\n}}\n"


SCORE = "score = dot(q, k)"


def locate(marked: str) -> tuple[str, int | None, int | None]:
    """Remove the marker; return the source and the marker's 1-based (line, col), or (None, None)."""
    assert marked.count(MARK) <= 1, "at most one marker per case"
    pos = marked.find(MARK)
    source = marked.replace(MARK, "")
    if pos < 0:
        return source, None, None
    before = marked[:pos]
    return source, before.count("\n") + 1, pos - (before.rfind("\n") + 1) + 1


def compile_error(source: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_to_ir(source, FILENAME)
    err = info.value
    assert err.filename == FILENAME
    assert err.source == source
    return err


def case(
    id: str, marked: str, message: str, hint: str | None = None, *, xfail: str | None = None
) -> pytest.ParameterSet:
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(marked, message, hint, id=id, marks=marks)


# ---- the table ----------------------------------------------------------------------------------------------

SYNTAX = [
    case(
        "syntax-missing-closing-brace",
        f"{HEAD}) {{\n    {SCORE}{MARK}\n",
        "unexpected end of file",
        "is a closing '}' missing?",
    ),
    case(
        "syntax-missing-closing-brace-no-newline",
        f"{HEAD}) {{\n    {SCORE}{MARK}",
        "unexpected end of file",
        "is a closing '}' missing?",
    ),
    case(
        "syntax-missing-opening-brace",
        f"{HEAD})\n    {MARK}{SCORE}\n}}\n",
        "unexpected 'score'; expected '{'",
    ),
    case("syntax-missing-close-paren", f"{HEAD}) {{\n    score = dot(q, k\n{MARK}}}\n", "unexpected '}'"),
    case(
        "syntax-missing-comma-between-params",
        "attention a(q: [B, H, N, D] k‸: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "unexpected ':'",
    ),
    case("syntax-stray-equals", spec("score = ‸= dot(q, k)"), "unexpected '='"),
    case(
        "syntax-assign-instead-of-compare",
        spec(SCORE, "mask = j ‸= i"),
        "unexpected '='",
        "use '==' to compare",
    ),
    case("syntax-unexpected-character", spec("score = dot(q, k) ‸$ 2"), "unexpected character '$'"),
    case("syntax-bang-for-not", spec(SCORE, "mask = ‸!(j > i)"), "unexpected character '!'", "use 'not'"),
    case(
        "syntax-double-ampersand",
        spec(SCORE, "mask = j <= i ‸&& i < N"),
        "unexpected character '&'",
        "use 'and' / 'or'",
    ),
    case(
        "syntax-double-quoted-string",
        spec('score = ‸"dot(q, k)"'),
        "unexpected character '\"'",
        "the language has no strings",
    ),
    case(
        "syntax-single-quoted-string",
        spec("score = dot(q, k) * ‸'2'"),
        'unexpected character "\'"',
        "the language has no strings",
    ),
    case(
        "syntax-unknown-statement-keyword",
        spec("‸scroe = dot(q, k)"),
        "unexpected 'scroe'",
        "statements start with let, score, mask, norm, output, feature",
    ),
    case(
        "syntax-return-statement",
        spec(SCORE, "‸return 1"),
        "unexpected 'return'",
        "statements start with let",
    ),
    case("syntax-double-semicolon", spec("score = dot(q, k);‸;"), "unexpected ';'"),
    case(
        "syntax-statement-outside-block",
        spec(SCORE) + "‸score = 1\n",
        "unexpected 'score'; expected 'attention'",
    ),
    case("syntax-extra-closing-brace", spec(SCORE) + "‸}\n", "unexpected '}'"),
    case("syntax-non-ascii-name", spec(SCORE, params=", ‸é: int"), "unexpected character 'é'"),
    case("syntax-backslash-continuation", spec("score = dot(q, ‸\\\nk)"), "unexpected character '\\\\'"),
    case("syntax-nul-byte", spec(f"{SCORE}‸\x00"), "unexpected character '\\x00'"),
]

NAMES = [
    case(
        "unknown-name-typo",
        spec("score = dot(q, k) + ‸slope * (j - i)", params=", slopes: [H]"),
        "unknown name 'slope'",
        "did you mean 'slopes'?",
    ),
    case(
        "unknown-tensor-typo",
        spec("score = dot(q, k) + ‸slope[h] * (j - i)", params=", slopes: [H]"),
        "'slope'",
        "did you mean 'slopes'?",
    ),
    case(
        "unknown-scalar-typo",
        spec("score = dot(q, k) * ‸scle", params=", scale: float = 1.0"),
        "unknown name 'scle'",
        "did you mean 'scale'?",
    ),
    case(
        "unknown-size-symbol",
        spec("score = dot(q, k) * ‸K"),
        "unknown name 'K'",
        "size symbols must appear in a parameter's shape",
    ),
    case(
        "unknown-size-symbol-typo", spec("score = dot(q, k) * ‸DD"), "unknown name 'DD'", "did you mean 'D'?"
    ),
    case(
        "unknown-function-typo",
        spec("score = ‸tanhh(dot(q, k))"),
        "unknown function 'tanhh'",
        "did you mean 'tanh'?",
    ),
    case(
        "unknown-function-sqrt-typo",
        spec("score = dot(q, k) / ‸sqrtt(D)"),
        "unknown function 'sqrtt'",
        "did you mean 'sqrt'?",
    ),
    case(
        "unknown-function-no-close-match", spec("score = ‸softplus(dot(q, k))"), "unknown function 'softplus'"
    ),
    case(
        "tensor-called-like-function",
        spec("score = dot(q, k) + ‸slopes(h)", params=", slopes: [H]"),
        "unknown function 'slopes'",
        "index it with [ ]",
    ),
    case("function-used-as-name", spec("score = dot(q, k) + ‸exp"), "'exp' is a function"),
    case(
        "scalar-indexed",
        spec("score = dot(q, k) + ‸W[0]", params=", W: int = 2"),
        "'W' is not a tensor and cannot be indexed",
    ),
    case(
        "unknown-dtype-typo",
        spec(SCORE, params=", t: [H] ‸flaot32"),
        "unknown tensor element type 'flaot32'",
        "did you mean 'float32'?",
    ),
    case(
        "let-self-reference", spec("let s = ‸s + 1", "score = dot(q, k) + s"), "'s' is used before its 'let'"
    ),
    case(
        "let-mutual-reference",
        spec("let a1 = ‸b1", "let b1 = a1", "score = dot(q, k) + a1"),
        "'b1' is used before its 'let'",
    ),
    case(
        "let-used-before-definition",
        spec("score = dot(q, k) + ‸s", "let s = 1.0"),
        "'s' is used before its 'let'",
    ),
]

TYPES = [
    case(
        "type-bool-in-arithmetic",
        spec("score = ‸dot(q, k) + (j < i)"),
        "'+' needs a number, got a bool",
        "where(cond, a, b)",
    ),
    case("type-true-in-arithmetic", spec("score = ‸dot(q, k) * true"), "'*' needs a number, got a bool"),
    case("type-negated-bool", spec("score = dot(q, k) - ‸-(j < i)"), "unary '-' needs a number"),
    case(
        "type-score-is-bool",
        spec("score = ‸j <= i"),
        "the score must be a number, got a bool",
        "use where(cond, a, b)",
    ),
    case(
        "type-mask-not-bool",
        spec(SCORE, "mask = ‸i - j"),
        "the mask must be a bool",
        "compare positions, e.g. 'mask = j <= i'",
    ),
    case("type-mask-not-bool-wording", spec(SCORE, "mask = ‸i - j"), "the mask must be a bool, got an int"),
    case("type-mask-float", spec(SCORE, "mask = ‸1.5"), "the mask must be a bool, got a float"),
    case(
        "type-index-not-int",
        spec("score = dot(q, k) + slopes[‸h / 2]", params=", slopes: [H]"),
        "index 0 of 'slopes' must be an int, got a float",
        "use floor(x)",
    ),
    case(
        "type-index-float-literal",
        spec("score = dot(q, k) + t[h, ‸0.5]", params=", t: [H, N]"),
        "index 1 of 't' must be an int",
    ),
    case(
        "type-float-default-for-int",
        spec(SCORE, params=", W: int = ‸2.5"),
        "int parameter 'W' has a float default",
    ),
    case("type-bool-default", spec(SCORE, params=", W: int = ‸true"), "a default must be a number"),
    case(
        "type-default-uses-parameter",
        spec(SCORE, params=", V: int = 2, W: int = ‸V"),
        "a parameter default may only use size symbols and constants",
    ),
    case("type-not-on-number", spec(SCORE, "mask = ‸not i"), "'not' needs a bool"),
    case(
        "type-and-on-numbers",
        spec(SCORE, "mask = ‸i and j"),
        "'and' needs bools on both sides",
        "compare numbers first",
    ),
    case("type-or-on-numbers", spec(SCORE, "mask = ‸(j < i) or 1"), "'or' needs bools on both sides"),
    case(
        "type-compare-bool-with-number",
        spec(SCORE, "mask = (‸j < i) < 1"),
        "cannot compare a bool with a number",
    ),
    case("type-where-number-condition", spec("score = ‸where(1, dot(q, k), 0)"), "needs a bool condition"),
    case(
        "type-where-mixed-branches",
        spec("score = ‸where(j < i, dot(q, k), j < i)"),
        "branches must both be bools or both be numbers",
    ),
]

ARITY = [
    case("arity-tanh-two-args", spec("score = ‸tanh(dot(q, k), 1)"), "tanh() takes 1 argument(s), got 2"),
    case("arity-exp-no-args", spec("score = dot(q, k) + ‸exp()"), "exp() takes 1 argument(s), got 0"),
    case(
        "arity-where-two-args", spec("score = ‸where(j < i, dot(q, k))"), "where() takes 3 argument(s), got 2"
    ),
    case("arity-min-one-arg", spec("score = ‸min(dot(q, k))"), "min() takes at least 2 argument(s), got 1"),
    case("arity-dot-one-arg", spec("score = ‸dot(q)"), "dot() takes 2 argument(s), got 1"),
    case("arity-clamp-two-args", spec("score = ‸clamp(dot(q, k), 1)"), "clamp() takes 3 argument(s), got 2"),
]

SHAPES = [
    case(
        "shape-q-k-channel-mismatch",
        "attention a(q: [B, H, N, D], k: [B, H, N, ‸E], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "q and k must share the channel dimension",
        "found D and E",
    ),
    case(
        "shape-k-v-length-mismatch",
        "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, ‸M, D]) {\n    score = dot(q, k)\n}\n",
        "k and v must share the length dimension",
        "found N and M",
    ),
    case(
        "shape-q-k-batch-mismatch",
        "attention a(q: [B, H, N, D], k: [‸C, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "q and k must share the batch dimension",
    ),
    case(
        "shape-q-three-dims",
        "attention a(‸q: [B, N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "'q' must have four dimensions",
        None,
    ),
    case(
        "shape-q-expression-dim",
        "attention a(q: [B, H, ‸N + 1, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "dimensions of 'q' must be size symbols or integers",
    ),
    case(
        "shape-q-int-dtype",
        "attention a(q: [B, H, N, D] ‸int32, k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "'q' must be a floating-point tensor",
    ),
    case(
        "shape-q-scalar",
        "attention a(‸q: float, k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "'q' must be a tensor",
    ),
    case(
        "shape-unknown-lowercase-name",
        spec(SCORE, params=", t: [H, ‸n]"),
        "unknown name 'n' in a shape",
        "size symbols are capitalised",
    ),
    case(
        "shape-lowercase-typo",
        spec(SCORE, params=", t: [‸wd], w: int = 4"),
        "unknown name 'wd' in a shape",
        "did you mean 'w'?",
    ),
    case("shape-dimension-zero", spec(SCORE, params=", t: [‸0]"), "a dimension must be at least 1"),
    case(
        "shape-q-dimension-zero",
        "attention a(q: [B, H, ‸0, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "a dimension must be at least 1",
    ),
    case("shape-dimension-negative", spec(SCORE, params=", t: [‸1 - 2]"), "a dimension must be at least 1"),
    case(
        "shape-float-dimension", spec(SCORE, params=", t: [‸H / 2]"), "a dimension must be an int expression"
    ),
    case(
        "shape-float-parameter",
        spec(SCORE, params=", t: [‸c], c: float"),
        "float parameter 'c' cannot be used in a shape",
    ),
    case(
        "shape-tensor-read", spec(SCORE, params=", t: [H], u: [‸t[0]]"), "tensors cannot be read in a shape"
    ),
    case(
        "shape-no-dimensions",
        spec(SCORE, params=", ‸t: []"),
        "tensor parameter 't' needs at least one dimension",
    ),
    case(
        "shape-symbol-is-also-tensor",
        spec(SCORE, params=", T: [H], t: [‸T]"),
        "'T' is both a size symbol and a tensor parameter",
    ),
]

DUPLICATES = [
    case("duplicate-tensor-parameter", spec(SCORE, params=", t: [H], ‸t: [N]"), "duplicate parameter 't'"),
    case("duplicate-scalar-parameter", spec(SCORE, params=", W: int, ‸W: float"), "duplicate parameter 'W'"),
    case(
        "duplicate-let",
        spec("let s = dot(q, k)", "let ‸s = 1.0", "score = s"),
        "'s' is already defined by an earlier 'let'",
    ),
    case("duplicate-score", spec(SCORE, f"‸{SCORE}"), "'score' is defined twice (first on line 2)"),
    case(
        "duplicate-mask",
        spec(SCORE, "mask = j <= i", "‸mask = j < i"),
        "'mask' is defined twice (first on line 3)",
    ),
    case("duplicate-norm", spec(SCORE, "norm = softmax", "‸norm = none"), "'norm' is defined twice"),
    case("duplicate-output", spec(SCORE, "output = o", "‸output = o * 2"), "'output' is defined twice"),
    case(
        "duplicate-feature",
        spec(SCORE, "feature q = q", "‸feature q = q * 2"),
        "'feature q' is defined twice",
    ),
    case(
        "duplicate-attention-name",
        spec(SCORE) + "attention ‸a(q: [B, H, N, D], k: [B, H, N, D], "
        "v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "attention 'a' clashes with an earlier attention",
    ),
    case(
        "attention-clashes-with-reference",
        spec(SCORE) + "attention ‸a_reference(q: [B, H, N, D], "
        "k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "clashes with an earlier attention",
    ),
    case(
        "duplicate-norm-argument",
        spec(SCORE, "norm = sum(eps = 1.0, ‸eps = 2.0)"),
        "argument 'eps' given twice",
    ),
]

MISSING = [
    case(
        "missing-score",
        "attention ‸a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    mask = j <= i\n}\n",
        "attention 'a' has no 'score' statement",
        "score = dot(q, k)",
    ),
    case(
        "missing-q",
        "attention ‸a(k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "attention 'a' has no 'q' parameter",
        "q, k and v are required",
    ),
    case(
        "missing-v",
        "attention ‸a(q: [B, H, N, D], k: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "attention 'a' has no 'v' parameter",
    ),
    case("empty-file", "‸", "no 'attention' block in the file"),
    case("only-comments", "‸# nothing here\n", "no 'attention' block in the file"),
    case(
        "default-before-required",
        spec(SCORE, params=", W: int = 3, ‸t: [H]"),
        "parameter 't' has no default but follows a parameter with one",
        "put parameters with defaults last",
    ),
]

MISUSE = [
    case(
        "dot-in-mask",
        spec(SCORE, "mask = ‸dot(q, k) > 0"),
        "dot(q, k) cannot be used in mask",
        "only the score",
    ),
    case("dot-k-q", spec("score = ‸dot(k, q)"), "dot() takes exactly (q, k)"),
    case("dot-in-output", spec(SCORE, "output = o * ‸dot(q, k)"), "dot(q, k) cannot be used in output"),
    case(
        "j-in-softmax-sink",
        spec(SCORE, "norm = softmax(sink = sinks[‸j])", params=", sinks: [N]"),
        "index variable 'j' cannot be used in softmax sink",
    ),
    case("o-outside-output", spec("score = dot(q, k) * ‸o"), "'o' can only be used in output"),
    case("e-in-score", spec("score = dot(q, k) + ‸e"), "index variable 'e' cannot be used in score"),
    case("d-in-score", spec("score = dot(q, k) + ‸d"), "index variable 'd' cannot be used in score"),
    case("q-used-directly", spec("score = ‸q"), "'q' cannot be used directly in score", "use dot(q, k)"),
    case("v-used-directly", spec("score = dot(q, k) + ‸v"), "'v' cannot be used directly in score"),
    case("q-indexed", spec("score = ‸q[b, h, i, 0]"), "'q' cannot be indexed", "use dot(q, k)"),
    case(
        "k-in-feature-q",
        spec(SCORE, "feature q = ‸k"),
        "'k' cannot be used directly in feature q",
        "a feature map of q may use only q",
    ),
    case("feature-on-v", spec(SCORE, "feature ‸v = v"), "'feature' applies to q or k, not 'v'"),
    case(
        "unindexed-tensor",
        spec("score = dot(q, k) + ‸slopes", params=", slopes: [H]"),
        "tensor 'slopes' must be indexed",
        "e.g. slopes[h]",
    ),
    case(
        "wrong-index-count",
        spec("score = dot(q, k) + ‸slopes[h, i]", params=", slopes: [H]"),
        "'slopes' has 1 dimension(s) but is indexed with 2",
    ),
    case(
        "index-always-out-of-range",
        spec("score = dot(q, k) + slopes[‸h + H]", params=", slopes: [H]"),
        "index 0 of 'slopes' is always out of range",
    ),
    case(
        "index-negative-constant",
        spec("score = dot(q, k) + slopes[‸-1]", params=", slopes: [H]"),
        "always out of range",
    ),
    case(
        "index-constant-past-end",
        spec("score = dot(q, k) + t[h, ‸4]", params=", t: [H, 4]"),
        "index 1 of 't' is always out of range (dimension 1 has size 4)",
    ),
    case("let-shadows-size-symbol", spec("let ‸D = 1", SCORE), "'let D' shadows a parameter or size symbol"),
    case("let-shadows-index-variable", spec("let ‸i = 1", SCORE), "'let i' shadows a built-in name"),
    case("let-reserved-word", spec("let ‸score = 1", SCORE), "'score' is a reserved word"),
]

NORMS = [
    case(
        "norm-unknown-typo",
        spec(SCORE, "norm = ‸softmx"),
        "unknown normalisation 'softmx'",
        "did you mean 'softmax'?",
    ),
    case(
        "norm-unknown-no-match",
        spec(SCORE, "norm = ‸layernorm"),
        "unknown normalisation 'layernorm'",
        "one of softmax, sigmoid, none, sum",
    ),
    case(
        "norm-unknown-kwarg",
        spec(SCORE, "norm = softmax(‸bias = 1.0)"),
        "softmax() has no argument 'bias'",
        "softmax() accepts only sink",
    ),
    case(
        "norm-none-takes-no-kwargs",
        spec(SCORE, "norm = none(‸eps = 1.0)"),
        "none() has no argument 'eps'",
        "none() takes no arguments",
    ),
    case("norm-kwarg-is-bool", spec(SCORE, "norm = sigmoid(bias = ‸j < i)"), "must be a number, got a bool"),
]

INJECTION = [
    case(
        "inject-dunder-import-param",
        spec(SCORE, params=", ‸__import__: int"),
        "invalid parameter name '__import__'",
        "a leading '_' is reserved",
    ),
    case("inject-eval-param", spec(SCORE, params=", ‸eval: int"), "'eval' would shadow a Python built-in"),
    case(
        "inject-exec-let",
        spec("let ‸exec = dot(q, k)", "score = exec"),
        "'exec' would shadow a Python built-in",
    ),
    case("inject-import-keyword-param", spec(SCORE, params=", ‸import: int"), "'import' is a reserved word"),
    case("inject-lambda-param", spec(SCORE, params=", ‸lambda: int"), "'lambda' is a reserved word"),
    case("inject-none-size-symbol", spec(SCORE, params=", t: [‸None]"), "'None' is a reserved word"),
    case(
        "inject-underscore-param",
        spec(SCORE, params=", ‸_x: int"),
        "invalid parameter name '_x'",
        "a leading '_' is reserved",
    ),
    case("inject-underscore-tensor", spec(SCORE, params=", ‸_t: [H]"), "invalid parameter name '_t'"),
    case("inject-underscore-let", spec("let ‸_s = dot(q, k)", "score = _s"), "invalid let name '_s'"),
    case(
        "inject-dunder-attention-name",
        "attention ‸__init__(q: [B, H, N, D], k: [B, H, N, D], "
        "v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "invalid attention name '__init__'",
    ),
    case(
        "inject-keyword-attention-name",
        "attention ‸class(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "'class' is a reserved word",
    ),
    case(
        "inject-keyword-attention-name-wording",
        "attention ‸class(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n",
        "cannot be an attention name",
    ),
    case("inject-generated-name-param", spec(SCORE, params=", ‸torch: int"), "'torch' is a built-in name"),
    case(
        "inject-string-with-quotes",
        spec("score = dot(q, k) + ‸\"'; import os; '\""),
        "unexpected character '\"'",
        "the language has no strings",
    ),
    case("inject-dunder-import-call", spec("score = ‸__import__(1)"), "unknown function '__import__'"),
    case("inject-dunder-import-call-string", spec('score = __import__(‸"os")'), "unexpected character '\"'"),
    case("inject-os-system-attribute", spec("score = os‸.system(1)"), "unexpected character '.'"),
    case("inject-attribute-on-call", spec("score = dot(q, k)‸.real"), "unexpected character '.'"),
    case(
        "inject-import-statement", "‸import os\n" + spec(SCORE), "unexpected 'import'; expected 'attention'"
    ),
    case("inject-import-in-body", spec("‸import os", SCORE), "unexpected 'import'", "statements start with"),
    case(
        "inject-norm-kwarg-dunder",
        spec(SCORE, "norm = softmax(‸__import__ = 1.0)"),
        "softmax() has no argument '__import__'",
    ),
]

CONSTANTS = [
    case("const-division-by-zero", spec("score = dot(q, k) + ‸1 // 0"), "division by zero"),
    case("const-modulo-by-zero", spec("score = dot(q, k) + ‸1 % 0"), "division by zero"),
    case("const-float-division-by-zero", spec("score = dot(q, k) + ‸1.0 / 0.0"), "division by zero"),
    case("const-division-by-zero-expression", spec("score = ‸dot(q, k) / (1 - 1)"), "division by zero"),
    case("const-variable-divided-by-zero", spec("score = dot(q, k) + ‸i // 0"), "division by zero"),
    case("const-division-by-zero-in-default", spec(SCORE, params=", W: int = ‸1 // 0"), "division by zero"),
    case("const-division-by-zero-in-shape", spec(SCORE, params=", t: [‸H // 0]"), "division by zero"),
    case("const-power-tower", spec("score = dot(q, k) * ‸9 ** 9 ** 9"), "overflows"),
    case("const-int-overflow", spec("score = dot(q, k) + ‸9223372036854775807 * 2"), "overflows int64"),
    case(
        "const-huge-int-literal",
        spec("score = dot(q, k) + ‸99999999999999999999"),
        "integer literal out of range",
    ),
    case("const-huge-float-literal", spec("score = dot(q, k) + ‸1e999"), "float literal overflows"),
    case("const-log-zero", spec("score = dot(q, k) + ‸log(0)"), "log(0.0) is undefined"),
    case("const-sqrt-negative", spec("score = dot(q, k) + ‸sqrt(-1)"), "is undefined"),
    case("const-exp-overflow", spec("score = dot(q, k) + ‸exp(1000)"), "overflows"),
    case(
        "const-negative-base-fractional-power", spec("score = dot(q, k) + ‸(-8) ** 0.5"), "not a real number"
    ),
]

SYNTAX_DIAGNOSTICS = [
    # Lark's LALR tables merge lookaheads, so "expected" lists name tokens that cannot appear here.
    case(
        "syntax-missing-brace-expected-list",
        f"{HEAD}) {{\n    {SCORE}{MARK}\n",
        "expected one of",
    ),
    case(
        "syntax-missing-paren-expected-list",
        f"{HEAD}) {{\n    score = dot(q, k\n{MARK}}}\n",
        "expected one of ')', ','",
    ),
]

ALL_CASES = (
    SYNTAX + NAMES + TYPES + ARITY + SHAPES + DUPLICATES + MISSING + MISUSE + NORMS + INJECTION + CONSTANTS
)


@pytest.mark.parametrize(("marked", "message", "hint"), ALL_CASES)
def test_spec_error(marked: str, message: str, hint: str | None) -> None:
    source, line, col = locate(marked)
    err = compile_error(source)
    assert message in err.message
    assert (err.line, err.col) == (line, col), f"position {err.line}:{err.col}, want {line}:{col}\n{err}"
    if hint is not None:
        assert err.hint is not None and hint in err.hint, f"hint {err.hint!r}, want {hint!r}"


def test_case_ids_are_distinct() -> None:
    ids = [p.id for p in ALL_CASES]
    assert len(ids) == len(set(ids)) >= 40
    assert len({p.values[0] for p in ALL_CASES}) >= 40


@pytest.mark.parametrize(("marked", "message", "hint"), SYNTAX_DIAGNOSTICS)
def test_expected_token_lists_are_accurate(marked: str, message: str, hint: str | None) -> None:
    source, line, col = locate(marked)
    err = compile_error(source)
    assert (err.line, err.col) == (line, col)
    assert "']'" not in err.message and message in err.message, err.message
    if "missing '}'" in (err.hint or ""):
        assert "'}'" in err.message, err.message


def test_where_message_names_the_function_once() -> None:
    err = compile_error(spec("score = where(1, dot(q, k), 0)"))
    assert "bool condition" in err.message
    assert err.message.count("where()") == 1, err.message


def test_missing_comma_in_shape_has_no_statement_hint() -> None:
    source, line, col = locate(
        "attention a(q: [B, H ‸N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = dot(q, k)\n}\n"
    )
    err = compile_error(source)
    assert "unexpected 'N'" in err.message
    assert (err.line, err.col) == (line, col)
    assert "statements" not in (err.hint or "")


# ---- rendering ----------------------------------------------------------------------------------------------


def test_render_unknown_name() -> None:
    source = spec("score = dot(q, k) + slope * (j - i)", params=", slopes: [H]")
    err = compile_error(source)
    assert str(err) == (
        "bad.attn:2:25: error: unknown name 'slope'\n"
        "        score = dot(q, k) + slope * (j - i)\n"
        "                            ^^^^^\n"
        "hint: did you mean 'slopes'?"
    )


def _caret_column(rendered: str) -> int:
    """1-based column of the first caret on the caret line (under the 4-space indent)."""
    caret_line = rendered.split("\n")[2]
    assert caret_line.startswith("    ")
    return caret_line.index("^") - 4 + 1


@pytest.mark.parametrize(
    "marked",
    [
        pytest.param(spec("score = dot(q, k) ‸$ 2"), id="unexpected-character"),
        pytest.param(spec(SCORE, "mask = j ‸= i"), id="assign-for-compare"),
        pytest.param(spec(SCORE, params=", t: [H, ‸n]"), id="shape-header-line"),
        pytest.param(spec("let s = dot(q, k)", "let ‸s = 1.0", "score = s"), id="duplicate-let"),
        pytest.param(f"{HEAD}) {{\n    {SCORE}{MARK}\n", id="end-of-file"),
        pytest.param(f"{HEAD}) {{\n    {SCORE}{MARK}", id="end-of-file-no-newline"),
    ],
)
def test_render_points_at_the_column(marked: str) -> None:
    source, line, col = locate(marked)
    err = compile_error(source)
    assert (err.line, err.col) == (line, col)
    rendered = str(err)
    assert rendered.startswith(f"bad.attn:{line}:{col}: error: {err.message}\n")
    assert line is not None
    src_line = source.split("\n")[line - 1]
    assert rendered.split("\n")[1] == "    " + src_line
    assert _caret_column(rendered) == col
    if err.hint:
        assert rendered.endswith(f"\nhint: {err.hint}")


def test_render_keeps_tabs_under_the_caret() -> None:
    source = f"{HEAD}) {{\n\tscore =\tslope\n}}\n"
    err = compile_error(source)
    assert (err.line, err.col) == (2, 10)
    assert str(err).split("\n")[1:3] == ["    \tscore =\tslope", "    \t       \t^^^^^"]


def test_render_long_line_shows_a_window() -> None:
    source = spec("score = dot(q, k)" + " + 1" * 60 + " + slope")
    err = compile_error(source)
    assert (err.line, err.col) == (2, 265)
    shown, caret = str(err).split("\n")[1:3]
    assert shown.startswith("    ...") and shown.endswith("+ slope")
    assert len(shown) <= 4 + 3 + 100
    assert caret.index("^") == shown.index("slope") and caret.strip() == "^^^^^"


def test_render_without_position() -> None:
    err = compile_error("# " + "x" * (1 << 20) + "\n")
    assert (err.line, err.col) == (None, None)
    assert str(err) == "bad.attn: error: spec is larger than 1048576 bytes"


def test_render_with_form_feed_shows_the_right_line() -> None:
    source = "attention a(\x0c q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n    score = slope\n}\n"
    err = compile_error(source)
    assert (err.line, err.col) == (2, 13)
    assert str(err).split("\n")[1] == "        score = slope"


# A form feed or a lone '\r' is whitespace to the parser, not a line break: positions must agree with that
# (str.splitlines would count them as line breaks). End-of-file errors point just after the last character.
@pytest.mark.parametrize(
    "marked",
    [
        pytest.param("attention a(‸\x0c ", id="form-feed"),
        pytest.param(f"{HEAD}) {{\r    {SCORE}‸\r", id="carriage-returns"),
        pytest.param(f"{HEAD}) {{\r\n    {SCORE}‸\r\n", id="crlf"),
        pytest.param(f"{HEAD}) {{\n    {SCORE}\n# a comment‸\n\n", id="after-comment"),
    ],
)
def test_end_of_file_position(marked: str) -> None:
    source, line, col = locate(marked)
    err = compile_error(source)
    assert "unexpected end of file" in err.message
    assert (err.line, err.col) == (line, col)


# ---- resource abuse: fast SpecError (or a fast compile) -----------------------------------------------------


class Overtime(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the compiler can swallow it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the body after `seconds` (so that a hang fails the test instead of stalling the suite)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Overtime(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


needs_alarm = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")

FAST = 10.0  # seconds: a hang guard, not a timing test (the quadratic or exponential cases take minutes)


def timed_compile(source: str) -> tuple[SpecError | None, float]:
    """Compile under a time limit; return (the SpecError or None, seconds taken)."""
    start = time.perf_counter()
    err = None
    try:
        with time_limit(2 * FAST):
            try:
                compile_to_ir(source, FILENAME)
            except SpecError as e:
                err = e
    except Overtime:
        return None, float("inf")
    return err, time.perf_counter() - start


def _doubling_lets(prefix: str, levels: int, first: str) -> list[str]:
    lets = [f"let {prefix}1 = {first}"]
    lets += [f"let {prefix}{n} = {prefix}{n - 1} + {prefix}{n - 1}" for n in range(2, levels + 1)]
    return lets


# Each builder returns a marked source; `message` None means the spec may compile (it must just be fast).
RESOURCE_CASES: list[tuple[str, Callable[[], str], str | None]] = [
    ("power-tower", lambda: spec("score = dot(q, k) * ‸9 ** 9 ** 9"), "overflows"),
    ("huge-int-literal", lambda: spec("score = dot(q, k) + ‸" + "9" * 5000), "integer literal out of range"),
    (
        "huge-float-literal",
        lambda: spec("score = dot(q, k) + ‸" + "9" * 400 + ".0"),
        "float literal overflows",
    ),
    ("nested-parens-5000", lambda: spec("score = dot(q, k) + " + "(" * 5000 + "1" + ")" * 5000), None),
    (
        "nested-parens-around-sums-5000",
        lambda: spec("score = dot(q, k) + " + "(" * 5000 + "i" + " + 1)" * 5000),
        "nested too deeply",
    ),
    ("not-repeated-3000", lambda: spec(SCORE, "mask = " + "not " * 3000 + "true"), "nested too deeply"),
    ("plus-chain-3000", lambda: spec("score = ‸dot(q, k)" + " + 1" * 3000), "nested too deeply"),
    ("plus-chain-of-variables-3000", lambda: spec("score = ‸dot(q, k)" + " + i" * 3000), "nested too deeply"),
    ("and-chain-3000", lambda: spec(SCORE, "mask = ‸j <= i" + " and j <= i" * 3000), "nested too deeply"),
    ("comparison-chain-3000", lambda: spec(SCORE, "mask = ‸i" + " < i" * 3000), "nested too deeply"),
    ("unary-minus-3000", lambda: spec("score = dot(q, k) + " + "-" * 3000 + "1"), "nested too deeply"),
    (
        "power-chain-3000",
        lambda: spec("score = dot(q, k) + " + " ** ".join(["i"] * 3000)),
        "nested too deeply",
    ),
    ("spec-2mb", lambda: spec(SCORE) + ("# " + "x" * 98 + "\n") * 21000, "spec is larger than"),
    ("spec-2mb-whitespace", lambda: spec(SCORE + " " * 2_000_000), "spec is larger than"),
    (
        "let-chain-doubling-60",
        lambda: spec(*_doubling_lets("a", 60, "i + i"), "score = dot(q, k) + a60"),
        None,
    ),
    (
        "let-chain-doubling-60-float",
        lambda: spec(*_doubling_lets("a", 60, "dot(q, k) + dot(q, k)"), "score = a60"),
        None,
    ),
    ("let-chain-doubling-60-unused", lambda: spec(*_doubling_lets("a", 60, "i + i"), SCORE), None),
    (
        "let-chain-doubling-60-in-score-and-mask",
        lambda: spec(*_doubling_lets("a", 60, "i + i"), "score = dot(q, k) + a60", "mask = a60 >= 0"),
        None,
    ),
    (
        "let-chain-doubling-60-as-index",
        lambda: spec(*_doubling_lets("a", 60, "h"), "score = dot(q, k) + t[a60 % H]", params=", t: [H]"),
        None,
    ),
    (
        "many-attention-blocks-300",
        lambda: "".join(spec(SCORE).replace("attention a(", f"attention a{n}(") for n in range(300)),
        None,
    ),
    ("many-parameters-3000", lambda: spec(SCORE, params="".join(f", p{n}: int" for n in range(3000))), None),
    ("many-dimensions-3000", lambda: spec(SCORE, params=", t: [" + ", ".join(["H"] * 3000) + "]"), None),
    ("many-lets-3000", lambda: spec(*(f"let x{n} = i + {n}" for n in range(3000)), SCORE), None),
    (
        "max-of-3000-args",
        lambda: spec("score = dot(q, k) + ‸max(" + ", ".join(["i"] * 3000) + ")"),
        "too deep",
    ),
]


@needs_alarm
@pytest.mark.parametrize(("build", "message"), [pytest.param(b, m, id=i) for i, b, m in RESOURCE_CASES])
def test_resource_abuse_is_fast(build: Callable[[], str], message: str | None) -> None:
    source, line, col = locate(build())
    err, seconds = timed_compile(source)
    assert seconds < FAST, f"took {seconds:.2f} s"
    if message is None:
        if err is not None:  # allowed, but it must be a proper diagnostic
            assert err.line is None or 1 <= err.line <= source.count("\n") + 1
        return
    assert err is not None, "expected a SpecError"
    assert message in err.message
    if line is not None:
        assert (err.line, err.col) == (line, col)
    elif err.line is not None:
        # Too-deep errors point somewhere inside the offending statement (line 2 or 3).
        assert err.line in (2, 3) and 1 <= err.col <= len(source.split("\n")[err.line - 1])


@needs_alarm
def test_max_of_many_args_message() -> None:
    err, _ = timed_compile(spec("score = dot(q, k) + max(" + ", ".join(["i"] * 3000) + ")"))
    assert err is not None and "'let'" not in err.message


@needs_alarm
@pytest.mark.parametrize("combine", ["a60 + b60", "a60 - b60", "where(j < i, a60, b60)"])
def test_two_equal_doubling_let_chains_are_fast(combine: str) -> None:
    # Two separately built but equal DAGs of 2**60 paths: comparing them must not walk every path.
    lets = _doubling_lets("a", 60, "i + i") + _doubling_lets("b", 60, "i + i")
    _, seconds = timed_compile(spec(*lets, f"score = dot(q, k) + {combine}"))
    assert seconds < FAST


@needs_alarm
def test_squaring_let_chain_as_index_is_fast() -> None:
    lets = ["let a1 = h"] + [f"let a{n} = a{n - 1} * a{n - 1}" for n in range(2, 9)]
    _, seconds = timed_compile(spec(*lets, "score = dot(q, k) + t[a8]", params=", t: [H]"))
    assert seconds < FAST


# ---- specs that must compile (or fail with a SpecError), found by tests/test_spec_fuzz.py --------------------


@pytest.mark.parametrize(
    ("body", "params"),
    [
        pytest.param("score = dot(q, k) + t[h - h]", ", t: [H]", id="1d"),
        pytest.param("score = dot(q, k) + t[0, b - b]", ", t: [H, N]", id="2d"),
        pytest.param("score = dot(q, k) + t[(i - i) + 0]", ", t: [H]", id="1d-plus-zero"),
        pytest.param(f"{SCORE}\n    mask = t[h - h] > 0", ", t: [H]", id="in-mask"),
    ],
)
def test_index_that_simplifies_to_a_constant(body: str, params: str) -> None:
    program = compile_to_ir(spec(body, params=params), FILENAME)
    assert program.attentions[0].name == "a"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param("score = dot(q, k) + ‸1 // (h - h)", "division by zero", id="floordiv-by-zero"),
        pytest.param("score = dot(q, k) + ‸(h - h) ** -1", "division by zero", id="zero-to-negative-power"),
        pytest.param("score = dot(q, k) + ‸log(h - h)", "log(0.0) is undefined", id="log-zero"),
        pytest.param("score = dot(q, k) + ‸sqrt(h - h - 1)", "sqrt(-1.0) is undefined", id="sqrt-negative"),
        pytest.param("score = dot(q, k) + ‸exp(1000 + (h - h))", "overflows", id="exp-overflow"),
        pytest.param(
            "score = dot(q, k) + (‸i - i + 9223372036854775807) * 2", "overflows int64", id="int-overflow"
        ),
        pytest.param(
            "let z = h - h\n    let r = ‸1 // z\n    score = dot(q, k) + t[r, 0]",
            "division by zero",
            id="through-lets",
        ),
    ],
)
def test_refolding_after_simplification_raises_spec_error(body: str, message: str) -> None:
    source, line, col = locate(spec(body, params=", t: [H, N]"))
    err = compile_error(source)
    assert message in err.message
    assert (err.line, err.col) == (line, col)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param("let z = ‸nope + 1\n    score = dot(q, k)", "unknown name 'nope'", id="unknown-name"),
        pytest.param("let z = ‸true + 1\n    score = dot(q, k)", "bool", id="bool-arithmetic"),
        pytest.param(
            "let z = dot(q, k) * ‸o\n    score = dot(q, k)",
            "can only be used in output",
            id="no-valid-context",
        ),
    ],
)
def test_unused_let_is_still_checked(body: str, message: str) -> None:
    source, line, col = locate(spec(body))
    err = compile_error(source)
    assert message in err.message
    assert (err.line, err.col) == (line, col)


def test_unused_let_valid_in_some_context_compiles() -> None:
    # `o` is only meaningful in `output`: an unused let that is valid there is fine.
    compile_to_ir(spec("let g = o * 2.0", SCORE.strip()), FILENAME)
