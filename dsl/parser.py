"""Text -> AST. The grammar lives in `grammar.lark`; this module turns lark's trees and errors into
our AST and `SpecError`s with positions and hints."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import sys
from pathlib import Path

import lark
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from attnc.settings import settings

from . import ast as A
from .errors import Span, SpecError

GRAMMAR_PATH = Path(__file__).with_name("grammar.lark")
# Names the parse-table cache file (lark checks its own hash inside the file as well).
_GRAMMAR_DIGEST = hashlib.sha256(
    GRAMMAR_PATH.read_bytes() + f"{lark.__version__} {sys.version_info[:2]}".encode()
).hexdigest()[:16]

# Limits that keep the compiler fast and recursion-free on hostile input.
MAX_SOURCE_BYTES = 1 << 20
MAX_EXPR_DEPTH = 200
MAX_INT = 2**63 - 1
# The LALR parser's stack grows with the nesting of the text being parsed (a right-associative `2 ** 2 ** ...`
# chain, `not not ...`, `((((...`). Each source nesting level the builder counts (MAX_EXPR_DEPTH) holds at most a
# few stack entries (five at most, measured), so stopping the parse here never rejects a spec the builder would accept, and a deep
# megabyte-long chain fails after a few thousand tokens instead of being parsed whole first.
MAX_PARSE_STACK = 10 * MAX_EXPR_DEPTH + 64

# Characters no spec may hold, even in a comment: NUL (Python source, which the spec is quoted into, cannot
# contain it) and lone surrogates (a str that is not UTF-8 text: it cannot be written to a file or hashed).
_FORBIDDEN = re.compile("[\x00\ud800-\udfff]")

_TOKEN_NAMES = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*', '/', '//', '%' or '@'",
    "POW": "'**'",
    "COMP_OP": "a comparison",
    "SCALAR_TYPE": "'int' or 'float'",
    "$END": "end of file",
}

_FIRST = ["'}'", "')'", "']'", "','"]
_STATEMENT_KEYWORDS = ("let", "score", "mask", "norm", "output", "feature", "state", "read")


@functools.cache
def _lark() -> Lark:
    """The LALR parser, its tables cached on disk: building them (lark parses its own meta-grammar, then
    analyses ours) is about 1 s, most of a cold compile (issue 15); loading the cache is about 50 ms. lark keys
    the file by a hash of the grammar and the options and rebuilds on a mismatch. The file is a pickle, so it
    lives in attnc's own cache directory (user-owned, beside the generated modules that are imported from it),
    not in lark's default of the shared temporary directory. An unwritable directory only costs the rebuild."""
    opts = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}
    cache_dir = settings().cache_dir
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache: str | bool = str(cache_dir / f"grammar-{_GRAMMAR_DIGEST}.lark-cache")
    except OSError:
        cache = False
    # lark catches a damaged or half-written file (concurrent first compiles) itself and rebuilds, but logs
    # the exception with a traceback; quiet its logger meanwhile, as the rebuild is the whole remedy.
    quiet = logging.getLogger("lark")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return Lark.open(str(GRAMMAR_PATH), cache=cache, **opts)
    finally:
        quiet.setLevel(level)


@functools.cache
def _display_names() -> dict[str, str]:
    names = dict(_TOKEN_NAMES)
    for term in _lark().terminals:
        if term.name not in names and term.pattern.type == "str":
            names[term.name] = repr(term.pattern.value)
    return names


def _describe(term: str) -> str:
    return _display_names().get(term, term)


def _span_of(node: Tree | Token) -> Span:
    if isinstance(node, Token):
        end_col = node.end_column if node.end_line == node.line else None
        return Span(node.line or 1, node.column or 1, node.end_line, end_col)
    meta = node.meta
    if getattr(meta, "empty", True):
        return Span(1, 1)
    end_col = meta.end_column if meta.end_line == meta.line else None
    return Span(meta.line, meta.column, meta.end_line, end_col)


def _end_span(text: str) -> Span:
    """Just after the last visible character (lines counted by newlines only, as lark counts them)."""
    lines = text.rstrip().split("\n")
    return Span(len(lines), len(lines[-1]) + 1)


def _syntax_error(err: UnexpectedInput, text: str) -> SpecError:
    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if 0 <= err.pos_in_stream < len(text) else "?"
        hint = None
        if ch in "\"'":
            hint = "the language has no strings"
        elif ch == "!":
            hint = "use 'not' for negation and '!=' for inequality"
        elif ch in "&|":
            hint = "use 'and' / 'or'"
        return SpecError(f"unexpected character {ch!r}", Span(err.line, err.column), hint=hint)
    if isinstance(err, UnexpectedToken):
        tok = err.token
        # LALR tables merge look-aheads, so err.expected can list tokens that cannot occur here; asking the
        # parser state which terminals it really accepts gives the exact set.
        try:
            accepted = (
                err.interactive_parser.accepts() if err.interactive_parser is not None else err.expected
            )
        except Exception:  # pragma: no cover - fall back to lark's approximation
            accepted = err.expected
        names = {_describe(t) for t in (accepted or err.expected) if t != "$END" or len(accepted) == 1}
        # Closing brackets and separators first: they are what a user most often forgot.
        expected = sorted(names, key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n))
        if tok.type == "$END":
            span = _end_span(text)
            what = "end of file"
        else:
            span = _span_of(tok)
            what = repr(str(tok))
        msg = f"unexpected {what}"
        if expected:
            shown = expected if len(expected) <= 8 else [*expected[:8], "..."]
            msg += "; expected " + (shown[0] if len(shown) == 1 else "one of " + ", ".join(shown))
        hint = None
        if str(tok) == "=" and ("'=='" not in expected and "a comparison" in expected):
            hint = "use '==' to compare"
        elif tok.type in ("NAME", "INT") and "','" in expected and ("']'" in expected or "')'" in expected):
            hint = "is a ',' missing?"
        elif tok.type == "NAME" and "'}'" in expected and "'let'" in expected:
            hint = "statements start with " + ", ".join(_STATEMENT_KEYWORDS)
        elif tok.type == "$END" and "'}'" in expected:
            hint = "is a closing '}' missing?"
        return SpecError(msg, span, hint=hint)
    if isinstance(err, UnexpectedEOF):
        return SpecError("unexpected end of file", _end_span(text), hint="is a closing '}' missing?")
    return SpecError(str(err), None)  # pragma: no cover - lark has no other kinds


class _Builder:
    """Converts lark trees to AST nodes, bounding expression depth."""

    def __init__(self) -> None:
        self.depth: dict[int, int] = {}

    def _mk(self, node: A.Expr, *children: A.Expr) -> A.Expr:
        d = 1 + max((self.depth.get(id(c), 1) for c in children), default=0)
        if d > MAX_EXPR_DEPTH:
            raise SpecError(
                f"expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)",
                node.span,
                hint="split it with 'let' bindings",
            )
        self.depth[id(node)] = d
        return node

    def expr(self, t: Tree | Token) -> A.Expr:
        if isinstance(t, Token):  # pragma: no cover - the grammar wraps every terminal
            raise SpecError(f"unexpected {t!s}", _span_of(t))
        span = _span_of(t)
        kind = t.data
        ch = t.children
        if kind == "int_lit":
            text = str(ch[0])
            if len(text) > 19 or int(text) > MAX_INT:
                raise SpecError("integer literal out of range (int64)", span)
            return self._mk(A.IntLit(span, int(text)))
        if kind == "float_lit":
            value = float(str(ch[0]))
            if not math.isfinite(value):
                raise SpecError("float literal overflows", span)
            return self._mk(A.FloatLit(span, value))
        if kind == "true_lit":
            return self._mk(A.BoolLit(span, True))
        if kind == "false_lit":
            return self._mk(A.BoolLit(span, False))
        if kind == "name_ref":
            return self._mk(A.Name(_span_of(ch[0]), str(ch[0])))
        if kind == "call":
            args = tuple(self.expr(a) for a in ch[1:] if a is not None)
            return self._mk(A.Call(span, str(ch[0]), args), *args)
        if kind == "index":
            idx = tuple(self.expr(a) for a in ch[1:] if a is not None)
            return self._mk(A.Index(span, str(ch[0]), idx), *idx)
        if kind == "not_op":
            operand = self.expr(ch[0])
            return self._mk(A.Unary(span, "not", operand), operand)
        if kind == "unary_op":
            operand = self.expr(ch[1])
            return self._mk(A.Unary(span, str(ch[0]), operand), operand)
        if kind == "power":
            base, exp = self.expr(ch[0]), self.expr(ch[2])
            return self._mk(A.Binary(span, "**", base, exp), base, exp)
        if kind in ("arith", "term"):
            left = self.expr(ch[0])
            for k in range(1, len(ch), 2):
                right = self.expr(ch[k + 1])
                s = Span(left.span.line, left.span.col, right.span.end_line, right.span.end_col)
                left = self._mk(A.Binary(s, str(ch[k]), left, right), left, right)
            return left
        if kind == "comparison":
            # Python semantics: a < b <= c means (a < b) and (b <= c).
            operands = [self.expr(ch[k]) for k in range(0, len(ch), 2)]
            ops = [str(ch[k]) for k in range(1, len(ch), 2)]
            result: A.Expr | None = None
            for op, lhs, rhs in zip(ops, operands, operands[1:], strict=False):
                s = Span(lhs.span.line, lhs.span.col, rhs.span.end_line, rhs.span.end_col)
                cmp = self._mk(A.Binary(s, op, lhs, rhs), lhs, rhs)
                result = cmp if result is None else self._mk(A.Binary(span, "and", result, cmp), result, cmp)
            assert result is not None
            return result
        if kind in ("or_expr", "and_expr"):
            op = "or" if kind == "or_expr" else "and"
            left = self.expr(ch[0])
            for c in ch[1:]:
                right = self.expr(c)
                left = self._mk(A.Binary(span, op, left, right), left, right)
            return left
        raise SpecError(f"unsupported syntax ({kind})", span)  # pragma: no cover

    def param(self, t: Tree) -> A.Param:
        name_tok = t.children[0]
        if t.data == "tensor_param":
            *dims, dtype_tok = t.children[1:]
            shape = tuple(self.expr(d) for d in dims if d is not None)
            return A.TensorParam(
                str(name_tok),
                shape,
                None if dtype_tok is None else str(dtype_tok),
                _span_of(name_tok),
                None if dtype_tok is None else _span_of(dtype_tok),
            )
        type_tok, default = t.children[1], t.children[2]
        return A.ScalarParam(
            str(name_tok), str(type_tok), None if default is None else self.expr(default), _span_of(name_tok)
        )

    def stmt(self, t: Tree) -> A.Stmt:
        span = _span_of(t)
        ch = t.children
        if t.data == "let_stmt":
            return A.Let(_span_of(ch[0]), str(ch[0]), self.expr(ch[1]))
        if t.data == "score_stmt":
            return A.ScoreStmt(span, self.expr(ch[0]))
        if t.data == "mask_stmt":
            return A.MaskStmt(span, self.expr(ch[0]))
        if t.data == "output_stmt":
            return A.OutputStmt(span, self.expr(ch[0]))
        if t.data == "feature_stmt":
            return A.FeatureStmt(span, str(ch[0]), self.expr(ch[1]), _span_of(ch[0]))
        if t.data == "state_stmt":
            return A.StateStmt(span, str(ch[0]), self.expr(ch[1]), _span_of(ch[0]))
        if t.data == "read_stmt":
            return A.ReadStmt(span, self.expr(ch[0]))
        if t.data == "norm_stmt":
            kwargs = tuple(
                A.KwArg(str(kw.children[0]), self.expr(kw.children[1]), _span_of(kw.children[0]))
                for kw in ch[1:]
                if kw is not None
            )
            return A.NormStmt(span, str(ch[0]), kwargs, _span_of(ch[0]))
        raise SpecError(f"unsupported statement ({t.data})", span)  # pragma: no cover

    def attention(self, t: Tree) -> A.Attention:
        name_tok = t.children[0]
        params: list[A.Param] = []
        body: list[A.Stmt] = []
        for c in t.children[1:]:
            if c is None:
                continue
            if c.data in ("tensor_param", "scalar_param"):
                params.append(self.param(c))
            else:
                body.append(self.stmt(c))
        return A.Attention(str(name_tok), tuple(params), tuple(body), _span_of(t), _span_of(name_tok))


def _check_tree_depth(tree: Tree) -> None:
    """Reject absurdly deep parse trees before any recursive walk (e.g. `not not not ... x`)."""
    stack: list[tuple[Tree, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_EXPR_DEPTH + 8:
            raise SpecError(
                f"expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)",
                _span_of(node),
                hint="split it with 'let' bindings",
            )
        for c in node.children:
            if isinstance(c, Tree):
                stack.append((c, depth + 1))


def _check_characters(source: str) -> None:
    bad = _FORBIDDEN.search(source)
    if bad is None:
        return
    pos = bad.start()
    line = source.count("\n", 0, pos) + 1
    col = pos - (source.rfind("\n", 0, pos) + 1) + 1
    ch = bad.group()
    why = "NUL is not allowed anywhere in a spec" if ch == "\x00" else "a lone surrogate is not UTF-8 text"
    raise SpecError(f"unexpected character {ch!r} ({why}, comments included)", Span(line, col))


def _parse_tree(source: str) -> Tree:
    """lark's LALR loop, with the parser stack bounded (see MAX_PARSE_STACK)."""
    interactive = _lark().parse_interactive(source)
    state = interactive.parser_state
    token = None
    try:
        for token in state.lexer.lex(state):
            state.feed_token(token)
            if len(state.state_stack) > MAX_PARSE_STACK:
                raise SpecError(
                    f"expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)",
                    _span_of(token),
                    hint="split it with 'let' bindings",
                )
        end = Token.new_borrow_pos("$END", "", token) if token is not None else Token("$END", "", 0, 1, 1)
        return state.feed_token(end, True)
    except UnexpectedInput as err:
        err.interactive_parser = interactive  # as lark's own loop does: the error messages ask it what fits
        raise


def parse(source: str, filename: str = "<spec>") -> A.SpecFile:
    """Parse `.attn` text into an AST. Raises `SpecError` (with file and source attached)."""
    try:
        if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
            raise SpecError(f"spec is larger than {MAX_SOURCE_BYTES} bytes", None)
        _check_characters(source)
        try:
            tree = _parse_tree(source)
        except UnexpectedInput as err:
            raise _syntax_error(err, source) from None
        _check_tree_depth(tree)
        builder = _Builder()
        attentions = tuple(builder.attention(t) for t in tree.children)
        return A.SpecFile(filename, source, attentions)
    except SpecError as err:
        raise err.with_source(filename, source) from None
