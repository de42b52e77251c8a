"""Source-to-source transforms of `.attn` specs, on the AST: derive a variant of a user's attention without
asking the user to write it.

- `add_key_padding` adds a per-key validity tensor (`kv_valid: [B, N] int32`, nonzero = a real token) and the
  conjunct `kv_valid[b, j] != 0` to the mask: the padded batches that libraries like Hugging Face transformers
  build become the operator's own masking, without touching the rest of the spec.
- `format_spec` prints an AST back to spec text that parses to the same AST (expressions fully
  parenthesised), so a transformed spec goes through the ordinary, checked `attnc.compile_source` path.
- `dot_coefficient` finds the constant factor applied to `dot(q, k)` in a score (the softmax scale), so a
  caller can map an external `scaling` argument onto the spec.

Transforms never evaluate spec text; they rebuild frozen AST nodes and reuse the user's expressions as is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import ast as A
from .errors import Span, SpecError

_NOWHERE = Span(1, 1)

__all__ = [
    "DotCoefficient",
    "add_key_padding",
    "dot_coefficient",
    "evaluate_constant",
    "format_expr",
    "format_spec",
    "select_attention",
]


def select_attention(spec: A.SpecFile, attention: str | None = None) -> A.Attention:
    """The block named `attention`, or the only block of the file. Raises SpecError naming the choices."""
    names = [a.name for a in spec.attentions]
    if attention is None:
        if len(spec.attentions) != 1:
            raise SpecError(
                f"{spec.filename} defines {len(names)} attention blocks ({', '.join(names) or 'none'}); "
                "say which one with attention=NAME"
            )
        return spec.attentions[0]
    for att in spec.attentions:
        if att.name == attention:
            return att
    raise SpecError(f"{spec.filename} has no attention block {attention!r} (it defines {', '.join(names)})")


def _tensor(att: A.Attention, name: str) -> A.TensorParam:
    for p in att.params:
        if isinstance(p, A.TensorParam) and p.name == name:
            return p
    raise SpecError(f"attention {att.name} has no tensor parameter {name!r}", att.span)


def _fresh_name(att: A.Attention, base: str) -> str:
    taken = {p.name for p in att.params} | {s.name for s in att.body if isinstance(s, A.Let)}
    name, n = base, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    return name


def add_key_padding(att: A.Attention, param: str = "kv_valid") -> tuple[A.Attention, str]:
    """`att` with a key-validity tensor `param: [B, N] int32` (B and N as written in k's shape) inserted after
    its last tensor parameter, and `param[b, j] != 0` conjoined to its mask (the mask if it has none).

    Returns the new attention and the parameter's name (`param`, or `param2`, ... when `param` is taken).
    Keys where the tensor is 0 are excluded from every row; a row left with no key has output 0 (softmax:
    LSE -inf), never NaN (docs/language.md, section 5)."""
    k = _tensor(att, "k")
    if len(k.shape) != 4:
        raise SpecError("k must have four dimensions [B, G, N, D]", k.span)
    name = _fresh_name(att, param)
    valid = A.TensorParam(name, (k.shape[0], k.shape[2]), "int32", _NOWHERE)
    last_tensor = max(n for n, p in enumerate(att.params) if isinstance(p, A.TensorParam))
    params = (*att.params[: last_tensor + 1], valid, *att.params[last_tensor + 1 :])
    keep = A.Binary(
        _NOWHERE,
        "!=",
        A.Index(_NOWHERE, name, (A.Name(_NOWHERE, "b"), A.Name(_NOWHERE, "j"))),
        A.IntLit(_NOWHERE, 0),
    )
    body: list[A.Stmt] = []
    masked = False
    for st in att.body:
        if isinstance(st, A.MaskStmt):
            st = replace(st, value=A.Binary(_NOWHERE, "and", st.value, keep))
            masked = True
        body.append(st)
    if not masked:
        body.append(A.MaskStmt(_NOWHERE, keep))
    return replace(att, params=params, body=tuple(body)), name


# ---- printing ----------------------------------------------------------------------------------------------


def format_expr(e: A.Expr) -> str:
    """Spec text for an expression; every compound operand is parenthesised, so precedence and chained
    comparisons cannot change its meaning."""
    if isinstance(e, A.BoolLit):
        return "true" if e.value else "false"
    if isinstance(e, A.IntLit):
        return str(e.value)
    if isinstance(e, A.FloatLit):
        text = repr(e.value)  # shortest round-trip form: 0.5, 1e-06, 1e+16 all lex as FLOAT
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.Call):
        return f"{e.func}({', '.join(format_expr(a) for a in e.args)})"
    if isinstance(e, A.Index):
        return f"{e.tensor}[{', '.join(format_expr(a) for a in e.indices)}]"
    if isinstance(e, A.Unary):
        sep = " " if e.op == "not" else ""
        return f"{e.op}{sep}{_operand(e.operand)}"
    if isinstance(e, A.Binary):
        return f"{_operand(e.left)} {e.op} {_operand(e.right)}"
    raise TypeError(f"cannot print {type(e).__name__}")  # pragma: no cover - the AST has no other nodes


def _operand(e: A.Expr) -> str:
    text = format_expr(e)
    return f"({text})" if isinstance(e, A.Unary | A.Binary) else text


def _format_param(p: A.Param) -> str:
    if isinstance(p, A.TensorParam):
        dtype = f" {p.dtype}" if p.dtype else ""
        return f"{p.name}: [{', '.join(format_expr(d) for d in p.shape)}]{dtype}"
    default = "" if p.default is None else f" = {format_expr(p.default)}"
    return f"{p.name}: {p.type}{default}"


def _format_stmt(st: A.Stmt) -> str:
    if isinstance(st, A.Let):
        return f"let {st.name} = {format_expr(st.value)}"
    if isinstance(st, A.ScoreStmt):
        return f"score = {format_expr(st.value)}"
    if isinstance(st, A.MaskStmt):
        return f"mask = {format_expr(st.value)}"
    if isinstance(st, A.OutputStmt):
        return f"output = {format_expr(st.value)}"
    if isinstance(st, A.FeatureStmt):
        return f"feature {st.target} = {format_expr(st.value)}"
    if isinstance(st, A.NormStmt):
        args = ", ".join(f"{kw.name} = {format_expr(kw.value)}" for kw in st.kwargs)
        return f"norm = {st.kind}({args})" if st.kwargs else f"norm = {st.kind}"
    if isinstance(st, A.StateStmt):
        return f"state {st.name} = {format_expr(st.value)}"
    if isinstance(st, A.ReadStmt):
        return f"read = {format_expr(st.value)}"
    raise TypeError(f"cannot print {type(st).__name__}")  # pragma: no cover


def format_attention(att: A.Attention) -> str:
    params = ",\n".join(f"    {_format_param(p)}" for p in att.params)
    body = "\n".join(f"    {_format_stmt(st)}" for st in att.body)
    return f"attention {att.name}(\n{params}\n) {{\n{body}\n}}\n"


def format_spec(spec: A.SpecFile | A.Attention) -> str:
    """Spec text for a file (or one block) that parses back to an equal AST (spans aside)."""
    atts = (spec,) if isinstance(spec, A.Attention) else spec.attentions
    return "\n".join(format_attention(a) for a in atts)


# ---- the scale applied to dot(q, k) ------------------------------------------------------------------------


@dataclass(frozen=True)
class DotCoefficient:
    """How the score scales `dot(q, k)`: `factors` multiply it and `divisors` divide it, each a constant
    expression (literals, size symbols, scalar parameters); e.g. `dot(q, k) * D ** -0.5` has factors
    `(D ** -0.5,)`, `dot(q, k) / sqrt(D)` divisors `(sqrt(D),)`."""

    factors: tuple[A.Expr, ...]
    divisors: tuple[A.Expr, ...]

    def names(self) -> set[str]:
        out: set[str] = set()
        for e in (*self.factors, *self.divisors):
            out |= _names(e)
        return out


def _names(e: A.Expr) -> set[str]:
    out = {e.id} if isinstance(e, A.Name) else set()
    if isinstance(e, A.Index):
        out.add(e.tensor)
    for c in e.children():
        out |= _names(c)
    return out


def _is_dot(e: A.Expr) -> bool:
    return isinstance(e, A.Call) and e.func == "dot"


def _contains_dot(e: A.Expr, lets: dict[str, A.Expr]) -> bool:
    if _is_dot(e):
        return True
    if isinstance(e, A.Name) and e.id in lets:
        return _contains_dot(lets[e.id], lets)
    return any(_contains_dot(c, lets) for c in e.children())


def dot_coefficient(att: A.Attention, constants: set[str]) -> DotCoefficient | None:
    """The constant factor the score applies directly to `dot(q, k)`, found by walking up from the single
    `dot` call through `*` and `/` by operands that use only `constants` (size symbols, scalar parameters)
    and literals. `let`s are followed. None when the score has no `dot` or several."""
    lets: dict[str, A.Expr] = {}
    score: A.Expr | None = None
    for st in att.body:
        if isinstance(st, A.Let):
            lets[st.name] = st.value
        elif isinstance(st, A.ScoreStmt):
            score = st.value
    if score is None:
        return None

    def constant(e: A.Expr) -> bool:
        if isinstance(e, A.Name):
            return e.id in constants
        if isinstance(e, A.Index):
            return False
        if isinstance(e, A.Call) and e.func == "dot":
            return False
        return all(constant(c) for c in e.children())

    def walk(e: A.Expr) -> DotCoefficient | None:
        """The coefficient of the dot inside `e` when `e` is (constant factors of) the dot itself."""
        if _is_dot(e):
            return DotCoefficient((), ())
        if isinstance(e, A.Name) and e.id in lets:
            return walk(lets[e.id])
        if isinstance(e, A.Unary) and e.op == "+":
            return walk(e.operand)
        if isinstance(e, A.Binary) and e.op == "*":
            for inner, other in ((e.left, e.right), (e.right, e.left)):
                if constant(other):
                    c = walk(inner)
                    if c is not None:
                        return DotCoefficient((*c.factors, other), c.divisors)
        if isinstance(e, A.Binary) and e.op == "/" and constant(e.right):
            c = walk(e.left)
            if c is not None:
                return DotCoefficient(c.factors, (*c.divisors, e.right))
        return None

    found: list[DotCoefficient] = []

    def visit(e: A.Expr) -> None:
        c = walk(e)
        if c is not None:
            found.append(c)
            return
        if isinstance(e, A.Name) and e.id in lets:
            visit(lets[e.id])
            return
        for ch in e.children():
            visit(ch)

    visit(score)
    return found[0] if len(found) == 1 else None


def evaluate_constant(e: A.Expr, values: dict[str, float]) -> float:
    """The value of a constant expression (literals, names in `values`, arithmetic and the elementary
    functions the language has). Raises KeyError for an unknown name, ValueError for anything else."""
    import math

    if isinstance(e, A.IntLit | A.FloatLit):
        return float(e.value)
    if isinstance(e, A.Name):
        return float(values[e.id])
    if isinstance(e, A.Unary) and e.op in "+-":
        x = evaluate_constant(e.operand, values)
        return -x if e.op == "-" else x
    if isinstance(e, A.Binary) and e.op in ("+", "-", "*", "/", "**", "//", "%"):
        a, b = evaluate_constant(e.left, values), evaluate_constant(e.right, values)
        ops = {
            "+": lambda: a + b,
            "-": lambda: a - b,
            "*": lambda: a * b,
            "/": lambda: a / b,
            "**": lambda: a**b,
            "//": lambda: float(math.floor(a / b)),
            "%": lambda: a - b * math.floor(a / b),
        }
        return ops[e.op]()
    funcs = {"sqrt": math.sqrt, "rsqrt": lambda x: 1 / math.sqrt(x), "exp": math.exp, "log": math.log}
    funcs |= {"exp2": lambda x: 2.0**x, "log2": math.log2}
    if isinstance(e, A.Call) and e.func in funcs and len(e.args) == 1:
        return funcs[e.func](evaluate_constant(e.args[0], values))
    raise ValueError(f"not a constant expression: {format_expr(e)}")
