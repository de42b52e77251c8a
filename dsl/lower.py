"""AST -> IR: resolve names, type every expression (via `dsl.builder`) and assemble an `ir.Attention`.

Each expression is lowered in a context that fixes which index variables and inputs it may use: the score
sees b, h, hk, i, j and dot(q, k); the mask the same but no dot(q, k) (it must not depend on q or k); the
softmax sink b, h, hk, i; the output epilogue o and b, h, hk, i, e; a feature map its own tensor and
b, h|hk, i|j, d. `let` bindings are lowered afresh in the context that uses them.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import ast as A
from . import builder as bld
from .analysis.ranges import index_status
from .check import (
    FUNCTIONS,
    INDEX_VARS,
    LANGUAGE_NAMES,
    NORMS,
    BlockNames,
    GeneratedNames,
    Scope,
    build_scope,
    check_body,
    check_identifier,
    dim_text,
    generated_namespaces,
)
from .errors import Span, SpecError, did_you_mean
from .ir import (
    Attention,
    DType,
    Layout,
    Node,
    Norm,
    NormKind,
    Op,
    Program,
    ScalarParam,
    TensorParam,
    const,
    size,
    uses,
    var,
)
from .parser import parse
from .scope import ROOT_ELEMENT, ROOT_VARS, Root

MAX_IR_DEPTH = 300

_UNARY_FUNCS = {
    "exp": Op.EXP,
    "exp2": Op.EXP2,
    "log": Op.LOG,
    "log2": Op.LOG2,
    "sqrt": Op.SQRT,
    "rsqrt": Op.RSQRT,
    "tanh": Op.TANH,
    "sigmoid": Op.SIGMOID,
    "relu": Op.RELU,
    "elu": Op.ELU,
    "abs": Op.ABS,
    "floor": Op.FLOOR,
    "ceil": Op.CEIL,
}
_BINARY = {
    "+": Op.ADD,
    "-": Op.SUB,
    "*": Op.MUL,
    "/": Op.DIV,
    "//": Op.FLOORDIV,
    "%": Op.MOD,
    "**": Op.POW,
    "<": Op.LT,
    "<=": Op.LE,
    ">": Op.GT,
    ">=": Op.GE,
    "==": Op.EQ,
    "!=": Op.NE,
    "and": Op.AND,
    "or": Op.OR,
}


# The contexts of lowering: the roots of dsl.scope (same names and values), a parameter default and a shape.
Ctx = enum.Enum(
    "Ctx", [*((r.name, r.value) for r in Root), ("DEFAULT", "a parameter default"), ("SHAPE", "a shape")]
)


# The roots' scopes come from the one table in dsl.scope (Ctx values are its Root values).
_VARS: dict[Ctx, frozenset[str]] = {
    **{Ctx(r.value): frozenset(v.value for v in vs) for r, vs in ROOT_VARS.items()},
    Ctx.DEFAULT: frozenset(),
    Ctx.SHAPE: frozenset(),
}
_ELEM = {Ctx(r.value): e for r, e in ROOT_ELEMENT.items()}


@dataclass
class _Let:
    index: int
    stmt: A.Let


class _Lowerer:
    def __init__(self, att: A.Attention, scope: Scope) -> None:
        self.att = att
        self.scope = scope
        self.lets: dict[str, _Let] = {}
        self.let_cache: dict[tuple[str, Ctx], Node | SpecError] = {}
        self.used_lets: set[str] = set()
        self.let_order: list[str] = []  # let names in statement order
        self.lowered_upto: dict[Ctx, int] = {}  # per context: how many of let_order are in let_cache
        self.layout: Layout | None = None

    # ---- names ------------------------------------------------------------------------------------------

    def visible_names(self, ctx: Ctx, before: int) -> list[str]:
        names = list(_VARS[ctx]) + list(self.scope.sizes)
        if ctx is not Ctx.DEFAULT:
            names += list(self.scope.scalars) + list(self.scope.tensors)
            names += [n for n, let in self.lets.items() if let.index < before]
        if ctx in _ELEM:
            names.append(_ELEM[ctx])
        return names

    def name(self, e: A.Name, ctx: Ctx, before: int) -> Node:
        n = e.id
        let = self.lets.get(n)
        if let is not None and ctx not in (Ctx.DEFAULT, Ctx.SHAPE):
            if let.index >= before:
                raise SpecError(f"'{n}' is used before its 'let'", e.span)
            self.used_lets.add(n)
            return self.let_value(n, ctx)
        if n in INDEX_VARS:
            if n not in _VARS[ctx]:
                allowed = ", ".join(sorted(_VARS[ctx])) or "no index variables"
                raise SpecError(
                    f"index variable '{n}' cannot be used in {ctx.value} (it may use {allowed})", e.span
                )
            return var(INDEX_VARS[n])
        if n == _ELEM.get(ctx):
            return Node(Op.ELEM, DType.FLOAT, (), n)
        if n in self.scope.scalars:
            p = self.scope.scalars[n]
            if ctx is Ctx.DEFAULT:
                raise SpecError("a parameter default may only use size symbols and constants", e.span)
            if ctx is Ctx.SHAPE and p.type != "int":
                raise SpecError(f"float parameter '{n}' cannot be used in a shape", e.span)
            return Node(Op.SCALAR, DType.INT if p.type == "int" else DType.FLOAT, (), n)
        if n in self.scope.sizes:
            return size(n)
        if n in self.scope.tensors:
            if n in ("q", "k", "v"):
                hint = (
                    "use dot(q, k)" if n != "v" else "v is combined by the normalisation, not in expressions"
                )
                if ctx in (Ctx.FEATURE_Q, Ctx.FEATURE_K):
                    hint = f"a feature map of {_ELEM[ctx]} may use only {_ELEM[ctx]}"
                raise SpecError(f"'{n}' cannot be used directly in {ctx.value}", e.span, hint=hint)
            rank = len(self.scope.tensors[n].shape)
            example = ", ".join(["h", "i", "j", "b"][:rank])
            raise SpecError(f"tensor '{n}' must be indexed", e.span, hint=f"e.g. {n}[{example}]")
        if n in FUNCTIONS:
            raise SpecError(f"'{n}' is a function; call it like {n}(...)", e.span)
        if n in ("o", "q", "k", "e", "d"):
            where = {"o": "output", "q": "feature q", "k": "feature k", "e": "output", "d": "feature maps"}[n]
            raise SpecError(f"'{n}' can only be used in {where}", e.span)
        hint = did_you_mean(n, self.visible_names(ctx, before))
        if hint is None and n[:1].isupper():
            hint = "size symbols must appear in a parameter's shape"
        raise SpecError(f"unknown name '{n}'", e.span, hint=hint)

    def check_unused_lets(self) -> None:
        """A let no statement uses must still be valid in some context (typos do not hide in dead code)."""
        for name in self.lets:
            if name in self.used_lets:
                continue
            errors = []
            for ctx in (Ctx.SCORE, Ctx.MASK, Ctx.OUTPUT, Ctx.FEATURE_Q, Ctx.FEATURE_K):
                try:
                    self.let_value(name, ctx)
                    break
                except SpecError as err:
                    errors.append(err)
            else:
                raise errors[0]

    def let_value(self, target: str, ctx: Ctx) -> Node:
        """Lower lets in statement order, each once per context, so a chain of lets never recurses deeply.
        A let that is invalid in this context is an error only if it is actually used here. Each context
        remembers how far it has lowered, so n lets cost O(n) per context, not O(n) per use."""
        order = self.let_order
        done = self.lowered_upto.get(ctx, 0)
        while (target, ctx) not in self.let_cache:
            name = order[done]
            try:
                self.let_cache[(name, ctx)] = self.expr(
                    self.lets[name].stmt.value, ctx, self.lets[name].index
                )
            except SpecError as err:
                self.let_cache[(name, ctx)] = err
            done += 1
            self.lowered_upto[ctx] = done
        value = self.let_cache[(target, ctx)]
        if isinstance(value, SpecError):
            raise value
        return value

    # ---- expressions ------------------------------------------------------------------------------------

    def expr(self, e: A.Expr, ctx: Ctx, before: int) -> Node:
        try:
            node = self._expr(e, ctx, before)
        except bld.BuildError as err:
            raise SpecError(err.message, e.span, hint=err.hint) from None
        if node.depth > MAX_IR_DEPTH:
            raise SpecError(
                f"expression is too deep (depth {node.depth} > {MAX_IR_DEPTH})",
                e.span,
                hint="the depth counts expanded let bindings and min/max chains; simplify the expression",
            )
        return node

    def _expr(self, e: A.Expr, ctx: Ctx, before: int) -> Node:
        if isinstance(e, A.IntLit | A.FloatLit | A.BoolLit):
            return const(e.value)
        if isinstance(e, A.Name):
            return self.name(e, ctx, before)
        if isinstance(e, A.Unary):
            x = self.expr(e.operand, ctx, before)
            if e.op == "+":
                if x.dtype is DType.BOOL:
                    raise bld.BuildError("unary '+' needs a number")
                return x
            return bld.unary(Op.NOT if e.op == "not" else Op.NEG, x)
        if isinstance(e, A.Binary):
            if e.op == "@":
                raise SpecError(
                    "'@' (a matrix product) is only valid in 'state' and 'read' statements",
                    e.span,
                    hint='see docs/linear.md, "State recurrences"'
                    if ctx is not Ctx.STATE
                    else "inside a gate or vector, use '*' (element-wise)",
                )
            a = self.expr(e.left, ctx, before)
            b = self.expr(e.right, ctx, before)
            return bld.binary(_BINARY[e.op], a, b)
        if isinstance(e, A.Index):
            return self.load(e, ctx, before)
        if isinstance(e, A.Call):
            return self.call(e, ctx, before)
        raise SpecError("unsupported expression", e.span)  # pragma: no cover

    def call(self, e: A.Call, ctx: Ctx, before: int) -> Node:
        f = e.func
        if f not in FUNCTIONS:
            hint = did_you_mean(f, FUNCTIONS)
            if f in self.scope.tensors:
                hint = f"'{f}' is a tensor: index it with [ ], e.g. {f}[h]"
            raise SpecError(f"unknown function '{f}'", e.span, hint=hint)
        arity = FUNCTIONS[f]
        if (arity >= 0 and len(e.args) != arity) or (arity < 0 and len(e.args) < -arity):
            want = f"{arity}" if arity >= 0 else f"at least {-arity}"
            raise SpecError(f"{f}() takes {want} argument(s), got {len(e.args)}", e.span)
        if f == "dot":
            if ctx is not Ctx.SCORE:
                raise SpecError(
                    f"dot(q, k) cannot be used in {ctx.value}",
                    e.span,
                    hint="only the score (and lets it uses) may depend on q and k",
                )
            names = [a.id if isinstance(a, A.Name) else None for a in e.args]
            if names != ["q", "k"]:
                raise SpecError(
                    "dot() takes exactly (q, k)", e.span, hint="feature maps go in 'feature q = ...'"
                )
            return Node(Op.DOT, DType.FLOAT)
        args = [self.expr(a, ctx, before) for a in e.args]
        try:
            if f in _UNARY_FUNCS:
                return bld.unary(_UNARY_FUNCS[f], args[0])
            if f == "where":
                return bld.where(*args)
            if f in ("min", "max"):
                op = Op.MIN if f == "min" else Op.MAX
                out = args[0]
                for a in args[1:]:
                    out = bld.binary(op, out, a)
                return out
            # clamp(x, lo, hi) = min(max(x, lo), hi)
            x, lo, hi = args
            return bld.binary(Op.MIN, bld.binary(Op.MAX, x, lo), hi)
        except bld.BuildError as err:
            msg = err.message if err.message.startswith(f"{f}()") else f"{f}(): {err.message}"
            raise SpecError(msg, e.span, hint=err.hint) from None

    def load(self, e: A.Index, ctx: Ctx, before: int) -> Node:
        t = e.tensor
        if t not in self.scope.tensors:
            if t in self.scope.scalars or t in self.scope.sizes or t in INDEX_VARS or t in self.lets:
                raise SpecError(f"'{t}' is not a tensor and cannot be indexed", e.span)
            raise SpecError(f"unknown tensor '{t}'", e.span, hint=did_you_mean(t, self.scope.tensors))
        if t in ("q", "k", "v"):
            raise SpecError(f"'{t}' cannot be indexed in expressions", e.span, hint="use dot(q, k)")
        if ctx in (Ctx.DEFAULT, Ctx.SHAPE):
            raise SpecError(f"tensors cannot be read in {ctx.value}", e.span)
        param = self.scope.tensors[t]
        if len(e.indices) != len(param.shape):
            raise SpecError(
                f"'{t}' has {len(param.shape)} dimension(s) but is indexed with {len(e.indices)}",
                e.span,
            )
        idx = []
        for k, ie in enumerate(e.indices):
            n = self.expr(ie, ctx, before)
            if n.dtype is not DType.INT:
                raise SpecError(
                    f"index {k} of '{t}' must be an int, got {_article(n.dtype)}",
                    ie.span,
                    hint="use floor(x) to turn a float into an int" if n.dtype is DType.FLOAT else None,
                )
            idx.append(n)
        ttype = self.scope.tensor_types[t]
        node = Node(Op.LOAD, ttype.kind, tuple(idx), t)
        assert self.layout is not None
        shape = self.aux_shape(param)
        for k, (ie, n) in enumerate(zip(e.indices, idx, strict=True)):
            if index_status(n, shape[k], self.layout) == "out":
                raise SpecError(
                    f"index {k} of '{t}' is always out of range (dimension {k} has size "
                    f"{dim_text(param.shape[k], 'the declared size')})",
                    ie.span,
                )
        return node

    def aux_shape(self, p: A.TensorParam) -> tuple[Node, ...]:
        return tuple(self.dim(d) for d in p.shape)

    def dim(self, d: A.Expr) -> Node:
        n = self.expr(d, Ctx.SHAPE, 0)
        if n.dtype is not DType.INT:
            raise SpecError("a dimension must be an int expression", d.span)
        if n.op is Op.CONST and n.attr < 1:  # type: ignore[operator]
            raise SpecError("a dimension must be at least 1", d.span)
        return n

    # ---- the whole block --------------------------------------------------------------------------------

    def lower(self) -> Attention:
        att, scope = self.att, self.scope
        q, k, v = (scope.tensors[r].shape for r in ("q", "k", "v"))
        self.layout = Layout(
            batch=self.dim(q[0]),
            heads=self.dim(q[1]),
            kv_heads=self.dim(k[1]),
            q_len=self.dim(q[2]),
            kv_len=self.dim(k[2]),
            head_dim=self.dim(q[3]),
            v_dim=self.dim(v[3]),
        )
        params: list[TensorParam | ScalarParam] = []
        for p in att.params:
            if isinstance(p, A.TensorParam):
                params.append(
                    TensorParam(p.name, scope.roles[p.name], self.aux_shape(p), scope.tensor_types[p.name])
                )
            else:
                default = None
                if p.default is not None:
                    default = self.expr(p.default, Ctx.DEFAULT, 0)
                    if default.dtype is DType.BOOL:
                        raise SpecError("a default must be a number", p.default.span)
                    if p.type == "int" and default.dtype is DType.FLOAT:
                        raise SpecError(f"int parameter '{p.name}' has a float default", p.default.span)
                    if p.type == "float":
                        default = bld.to_float(default)
                params.append(ScalarParam(p.name, DType.INT if p.type == "int" else DType.FLOAT, default))

        _register_lets(self, att)

        score = mask = output = fq = fk = None
        norm = Norm(NormKind.SOFTMAX)
        for pos, st in enumerate(att.body):
            if isinstance(st, A.Let):
                continue
            if isinstance(st, A.ScoreStmt):
                score = self.number(st.value, Ctx.SCORE, pos, "the score")
            elif isinstance(st, A.MaskStmt):
                mask = self.expr(st.value, Ctx.MASK, pos)
                if mask.dtype is not DType.BOOL:
                    raise SpecError(
                        f"the mask must be a bool, got {_article(mask.dtype)}",
                        st.value.span,
                        hint="compare positions, e.g. 'mask = j <= i'",
                    )
            elif isinstance(st, A.OutputStmt):
                output = self.number(st.value, Ctx.OUTPUT, pos, "the output")
            elif isinstance(st, A.FeatureStmt):
                ctx = Ctx.FEATURE_Q if st.target == "q" else Ctx.FEATURE_K
                node = self.number(st.value, ctx, pos, f"feature {st.target}")
                if not uses(node, lambda n: n.op is Op.ELEM):
                    # An element-wise map that ignores its element makes every query (key) the same; it is
                    # nearly always a slip, and the backends' derivative φ'(q) would have nothing to act on.
                    raise SpecError(
                        f"feature {st.target} does not depend on {st.target}",
                        st.value.span,
                        hint=f"a feature map transforms each element of {st.target}, "
                        f"e.g. 'feature {st.target} = elu({st.target}) + 1'",
                    )
                if st.target == "q":
                    fq = node
                else:
                    fk = node
            elif isinstance(st, A.NormStmt):
                norm = self.norm(st, pos)
        assert score is not None
        self.check_unused_lets()
        if mask is not None and mask.op is Op.CONST and mask.attr is True:
            mask = None
        return Attention(att.name, tuple(params), self.layout, score, mask, norm, fq, fk, output)

    def number(self, e: A.Expr, ctx: Ctx, pos: int, what: str) -> Node:
        n = self.expr(e, ctx, pos)
        if n.dtype is DType.BOOL:
            raise SpecError(f"{what} must be a number, got a bool", e.span, hint="use where(cond, a, b)")
        return bld.to_float(n)

    def norm(self, st: A.NormStmt, pos: int) -> Norm:
        if st.kind not in NORMS:
            raise SpecError(
                f"unknown normalisation '{st.kind}'",
                st.kind_span,
                hint=did_you_mean(st.kind, NORMS) or "one of " + ", ".join(NORMS),
            )
        allowed = NORMS[st.kind]
        values: dict[str, Node] = {}
        ctxs = {"sink": Ctx.SINK, "bias": Ctx.BIAS, "eps": Ctx.EPS}
        for kw in st.kwargs:
            if kw.name not in allowed:
                accepted = f"accepts only {', '.join(allowed)}" if allowed else "takes no arguments"
                raise SpecError(
                    f"{st.kind}() has no argument '{kw.name}'", kw.span, hint=f"{st.kind}() {accepted}"
                )
            if kw.name in values:
                raise SpecError(f"argument '{kw.name}' given twice", kw.span)
            values[kw.name] = self.number(kw.value, ctxs[kw.name], pos, f"{st.kind}({kw.name} = ...)")
        return Norm(NormKind(st.kind), values.get("sink"), values.get("bias"), values.get("eps"))


def _register_lets(low: _Lowerer, att: A.Attention) -> None:
    """Register every let first, so that a use before the definition gets a precise message."""
    scope = low.scope
    for pos, st in enumerate(att.body):
        if isinstance(st, A.Let):
            if st.name in scope.tensors or st.name in scope.scalars or st.name in scope.sizes:
                raise SpecError(f"'let {st.name}' shadows a parameter or size symbol", st.span)
            if st.name in INDEX_VARS or st.name in FUNCTIONS or st.name in ("o", "q", "k", "v"):
                raise SpecError(f"'let {st.name}' shadows a built-in name", st.span)
            check_identifier(st.name, st.span, "let")
            low.lets[st.name] = _Let(pos, st)
            low.let_order.append(st.name)


def _article(t: DType) -> str:
    return {DType.INT: "an int", DType.FLOAT: "a float", DType.BOOL: "a bool"}[t]


def lower_attention(att: A.Attention) -> Attention:
    scope = build_scope(att)
    check_body(att)
    return _Lowerer(att, scope).lower()


# Other kinds of block, lowered by the modules that register them here: (is it one?, lower it) pairs.
# dsl.state registers the `state S = ...` blocks (it builds on this module's lowerer, so this module cannot
# import it; the package's __init__ does, so the registration precedes every use).
BLOCK_KINDS: list[tuple[Callable[[A.Attention], bool], Callable[[A.Attention, Scope], object]]] = []


def lower_file(spec: A.SpecFile, generated: Sequence[GeneratedNames] | None = None) -> Program:
    """Lower every attention block of a parsed file. Block names must be unique within the file, and the names
    generated for them (`generated`, default: the registered generators', `dsl.check.RESERVED_PROVIDERS`)
    must meet neither each other nor the generated module's own."""
    names = BlockNames(generated_namespaces() if generated is None else [LANGUAGE_NAMES, *generated])
    out: list[Attention] = []
    recurrences = []
    try:
        for att in spec.attentions:
            check_identifier(att.name, att.name_span, "attention")
            names.add(att)
            kind = next((lower for is_kind, lower in BLOCK_KINDS if is_kind(att)), None)
            if kind is not None:  # e.g. a matrix-state recurrence (dsl.state): its own IR
                scope = build_scope(att)
                check_body(att)
                recurrences.append(kind(att, scope))
                continue
            out.append(lower_attention(att))
    except SpecError as err:
        raise err.with_source(spec.filename, spec.source) from None
    if not out and not recurrences:
        raise SpecError("no 'attention' block in the file", Span(1, 1)).with_source(
            spec.filename, spec.source
        )
    sha = hashlib.sha256(spec.source.encode("utf-8", "surrogatepass")).hexdigest()
    return Program(spec.filename, sha, tuple(out), tuple(recurrences))


def compile_to_ir(
    source: str, filename: str = "<spec>", *, generated: Sequence[GeneratedNames] | None = None
) -> Program:
    """Parse, check and lower, then run the IR pass pipeline (see `dsl.passes`). `generated`: the names the
    code generator will define (see `lower_file`)."""
    from .passes import run_pipeline

    return run_pipeline(lower_file(parse(source, filename), generated))
