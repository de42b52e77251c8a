"""Code emission from IR expressions: small placeholder templates whose holes are filled with Python `ast`
nodes (as Helion's `expr_from_string`), then unparsed, so generated code is always valid, minimally
parenthesised Python. Nothing from a spec reaches the output except validated identifiers and numbers.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from attnc.dsl.ir import DType, Node, Op, is_uniform, linearize, walk

_HOLE = "__hole_"
MAX_INLINE_DEPTH = 24  # deeper expressions are split into temporaries


@functools.cache
def _parse_template(template: str) -> ast.expr:
    text = template.replace("{", _HOLE).replace("}", "")
    return ast.parse(text, mode="eval").body


class _Fill(ast.NodeTransformer):
    def __init__(self, holes: dict[str, ast.expr]) -> None:
        self.holes = holes

    def visit_Name(self, node: ast.Name) -> ast.expr:
        if node.id.startswith(_HOLE):
            return self.holes[node.id[len(_HOLE) :]]
        return node


def _copy(node: object) -> object:
    """A structural copy of a parsed template (ast nodes and lists; the leaves, str/int/float/None and the
    shared Load/Store contexts, are immutable). `copy.deepcopy` does the same through its generic memo and
    reduce protocol, about five times slower, and it was the largest single cost of emitting a module."""
    if isinstance(node, list):
        return [_copy(x) for x in node]
    if isinstance(node, (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)):
        return node
    if isinstance(node, ast.AST):
        new = node.__class__()
        for f in node._fields:
            setattr(new, f, _copy(getattr(node, f, None)))
        for a in node._attributes:
            if hasattr(node, a):
                setattr(new, a, getattr(node, a))
        return new
    return node


def expr_from_string(template: str, **holes: ast.expr) -> ast.expr:
    """`expr_from_string("torch.exp({x})", x=ast.Name("t"))` -> the ast of `torch.exp(t)`."""
    return _Fill(holes).visit(_copy(_parse_template(template)))


Hole = ast.expr | str | list[ast.stmt]


@functools.cache
def _parse_statements(template: str) -> list[ast.stmt]:
    import textwrap

    text = textwrap.dedent(template).replace("{", _HOLE).replace("}", "")
    return ast.parse(text).body


class _FillStatements(_Fill):
    """Fills expression holes, and splices statement lists where a hole stands alone as a statement."""

    def __init__(self, holes: dict[str, Hole]) -> None:
        exprs = {k: v for k, v in holes.items() if not isinstance(v, list)}
        super().__init__({k: (parse_expr(v) if isinstance(v, str) else v) for k, v in exprs.items()})
        self.blocks = {k: v for k, v in holes.items() if isinstance(v, list)}

    def visit_Expr(self, node: ast.Expr) -> ast.AST | list[ast.stmt]:
        v = node.value
        if isinstance(v, ast.Name) and v.id.startswith(_HOLE) and v.id[len(_HOLE) :] in self.blocks:
            return self.blocks[v.id[len(_HOLE) :]] or [ast.Pass()]
        return self.generic_visit(node)


def statement_from_string(template: str, **holes: Hole) -> list[ast.stmt]:
    """Statements from a template (Helion's `statement_from_string`): `{x}` holes take expressions (an ast
    node, or code text of one expression, parsed), and a hole standing alone as a statement takes a list of
    statements, spliced in (an empty list becomes `pass`).

        statement_from_string("for t in range({n}):\n    {body}", n=name("N"), body=[...])
    """
    out: list[ast.stmt] = []
    for st in _copy(_parse_statements(template)):
        filled = _FillStatements(holes).visit(st)
        out += filled if isinstance(filled, list) else [filled]
    return out


def parse_expr(text: str) -> ast.expr:
    """One expression of generated code (text that an emitter built) as an ast node."""
    return ast.parse(text, mode="eval").body


def name(id_: str) -> ast.expr:
    return ast.Name(id_, ast.Load())


def constant(value: bool | int | float) -> ast.expr:
    if isinstance(value, bool):
        return ast.Constant(value)
    if isinstance(value, float) and not math.isfinite(value):
        return expr_from_string(f"float('{value}')")
    if value < 0:
        return ast.UnaryOp(ast.USub(), ast.Constant(-value))
    return ast.Constant(value)


def comment_text(text: str) -> str:
    """Outside text (a file name, a path) for a `#` comment of generated code. ascii() escapes every line
    break, control and non-ASCII character (a comment ends at LF or CR, and NUL stops the import), so the
    text can never end the comment and become code; plain ASCII names read unchanged."""
    return ascii(text)[1:-1]


def docstring(text: str) -> str:
    """A module docstring holding `text` (which may quote outside text: a spec, a file name) as a statement
    built from an ast constant, so that no quote, backslash or control character in it can end the string."""
    return ast.unparse(ast.Module([ast.Expr(ast.Constant(text))], []))


def code(e: ast.expr) -> str:
    return ast.unparse(ast.fix_missing_locations(e))


def code_statement(st: ast.stmt) -> str:
    return ast.unparse(ast.fix_missing_locations(st))


# Templates by op: tensor code (torch) and scalar code (Python numbers, for uniform sub-expressions).
_BOTH = {
    Op.NEG: "-{a}",
    Op.ADD: "{a} + {b}",
    Op.SUB: "{a} - {b}",
    Op.MUL: "{a} * {b}",
    Op.DIV: "{a} / {b}",
    Op.FLOORDIV: "{a} // {b}",  # torch and Python both floor (float tensors: see _apply_tensor)
    Op.MOD: "{a} % {b}",  # torch.remainder and Python both take the divisor's sign
    Op.LT: "{a} < {b}",
    Op.LE: "{a} <= {b}",
    Op.GT: "{a} > {b}",
    Op.GE: "{a} >= {b}",
    Op.EQ: "{a} == {b}",
    Op.NE: "{a} != {b}",
}
TENSOR_TEMPLATES = {
    **_BOTH,
    Op.POW: "{a} ** {b}",
    Op.NOT: "~{a}",
    Op.AND: "{a} & {b}",
    Op.OR: "{a} | {b}",
    Op.ABS: "torch.abs({a})",
    Op.EXP: "torch.exp({a})",
    Op.EXP2: "torch.exp2({a})",
    Op.LOG: "torch.log({a})",
    Op.LOG2: "torch.log2({a})",
    Op.SQRT: "torch.sqrt({a})",
    Op.RSQRT: "torch.rsqrt({a})",
    Op.TANH: "torch.tanh({a})",
    Op.SIGMOID: "torch.sigmoid({a})",
    Op.RELU: "torch.relu({a})",
    Op.ELU: "torch.nn.functional.elu({a})",
    Op.FLOOR: "_rt._to_int(torch.floor({a}))",
    Op.CEIL: "_rt._to_int(torch.ceil({a}))",
    Op.TO_FLOAT: "{a}.to(_cdt)",
}
SCALAR_TEMPLATES = {
    **_BOTH,
    Op.POW: "math.pow({a}, {b})",
    Op.NOT: "not {a}",
    Op.AND: "{a} and {b}",
    Op.OR: "{a} or {b}",
    Op.ABS: "abs({a})",
    Op.EXP: "math.exp({a})",
    Op.EXP2: "math.pow(2.0, {a})",
    Op.LOG: "math.log({a})",
    Op.LOG2: "math.log2({a})",
    Op.SQRT: "math.sqrt({a})",
    Op.RSQRT: "1.0 / math.sqrt({a})",
    Op.TANH: "math.tanh({a})",
    Op.SIGMOID: "_sigmoid_scalar({a})",
    Op.ELU: "{a} if {a} > 0 else math.expm1({a})",
    Op.RELU: "max({a}, 0.0) if isinstance({a}, float) else max({a}, 0)",  # keeps the int/float type
    Op.FLOOR: "math.floor({a})",
    Op.CEIL: "math.ceil({a})",
    Op.TO_FLOAT: "float({a})",
    Op.MIN: "min({a}, {b})",
    Op.MAX: "max({a}, {b})",
    Op.WHERE: "{b} if {a} else {c}",
}


@dataclass
class Emitter:
    """Emits expressions of one generated function.

    Uniform sub-expressions (sizes, scalars, constants only) are hoisted once into `hoisted` as Python-number
    code; non-uniform nodes used more than once become temporaries of the closure that uses them.
    `load_code(node, args)` renders a LOAD (so the backend decides on bounds checks).
    """

    load_code: Callable[[Node, list[ast.expr]], ast.expr]
    leaf_code: Callable[[Node], ast.expr]
    # How a non-uniform node becomes code (torch by default; the Triton backend passes its own).
    tensor_apply: Callable[[Node, list[ast.expr], list[bool]], ast.expr] = field(
        default_factory=lambda: _apply_tensor
    )
    uniform_prefix: str = "_u"
    # How a runtime scalar is named where the code runs (a kernel names its parameters apart from the spec's
    # names, so that no spec name can meet a kernel local); hoisted uniforms run on the host, under the
    # spec's own names.
    scalar_name: Callable[[str], str] | None = None
    # How a constant becomes code where `constant` would not do (None from it: the plain literal); the Triton
    # backend keeps float literals float32.
    constant_code: Callable[[bool | int | float], ast.expr | None] | None = None
    hoisted: list[tuple[str, str]] = field(default_factory=list)
    _uniform_names: dict[Node, str] = field(default_factory=dict)

    def _uniform(self, node: Node) -> ast.expr:
        if node.op is Op.CONST:
            special = self.constant_code(node.attr) if self.constant_code is not None else None  # type: ignore[arg-type]
            return special if special is not None else constant(node.attr)  # type: ignore[arg-type]
        if node.op is Op.SCALAR and self.scalar_name is not None:
            return name(self.scalar_name(str(node.attr)))
        if node.op in (Op.SIZE, Op.SCALAR):
            return name(str(node.attr))
        if node not in self._uniform_names:
            vals: dict[Node, ast.expr] = {}
            for n in linearize([node]):
                if n.op is Op.CONST:
                    vals[n] = constant(n.attr)  # type: ignore[arg-type]
                elif n.op in (Op.SIZE, Op.SCALAR):
                    vals[n] = name(str(n.attr))  # hoisted code runs on the host: the spec's names
                elif n in self._uniform_names:
                    vals[n] = name(self._uniform_names[n])
                else:
                    vals[n] = _apply(SCALAR_TEMPLATES, n, [vals[a] for a in n.args])
                    if n is not node and n.depth % MAX_INLINE_DEPTH == 0:
                        var = f"{self.uniform_prefix}{len(self.hoisted)}"
                        self.hoisted.append((var, code(vals[n])))
                        self._uniform_names[n] = var
                        vals[n] = name(var)
            var = f"{self.uniform_prefix}{len(self.hoisted)}"
            self.hoisted.append((var, code(vals[node])))
            self._uniform_names[node] = var
        return name(self._uniform_names[node])

    def body(self, root: Node, prefix: str = "_t") -> tuple[list[str], str]:
        """Statements (temporaries named `prefix<k>`) and the expression computing `root`."""
        stmts, e = self.body_nodes(root, prefix)
        return [code_statement(st) for st in stmts], code(e)

    def body_nodes(self, root: Node, prefix: str = "_t") -> tuple[list[ast.stmt], ast.expr]:
        """`body` as ast: assignments of the temporaries, and the expression computing `root`."""
        if is_uniform(root):
            return [], self._uniform(root)
        order = linearize([root])
        uses: dict[Node, int] = {}
        for n in order:
            for a in n.args:
                uses[a] = uses.get(a, 0) + 1
        vals: dict[Node, ast.expr] = {}
        depth: dict[Node, int] = {}  # nesting of each inline expression: bounded so unparse stays shallow
        stmts: list[ast.stmt] = []
        for n in order:
            if is_uniform(n):
                continue  # hoisted on demand, as a whole, by its first non-uniform user
            args = [vals[a] if a in vals else self._uniform(a) for a in n.args]
            if n.op is Op.LOAD:
                e = self.load_code(n, args)
            elif not n.args:
                e = self.leaf_code(n)
            else:
                e = self.tensor_apply(n, args, [is_uniform(a) for a in n.args])
            depth[n] = 1 + max((depth.get(a, 0) for a in n.args), default=0)
            shared = uses.get(n, 0) > 1 and n.args
            if n is not root and (shared or depth[n] >= MAX_INLINE_DEPTH):
                tmp = f"{prefix}{len(stmts)}"
                stmts.append(ast.Assign([ast.Name(tmp, ast.Store())], e))
                e = name(tmp)
                depth[n] = 0
            vals[n] = e
        return stmts, vals[root]


def _apply(table: dict[Op, str], n: Node, args: list[ast.expr]) -> ast.expr:
    holes = dict(zip("abc", args, strict=False))
    return expr_from_string(table[n.op], **holes)


def _apply_tensor(n: Node, args: list[ast.expr], uniform: list[bool]) -> ast.expr:
    if n.op in (Op.MIN, Op.MAX):
        fn = "minimum" if n.op is Op.MIN else "maximum"
        bound = "max" if n.op is Op.MIN else "min"
        a, b = args
        # `_rt._clamp`, not torch.clamp: a Python-number bound may lie beyond the tensor's dtype (1e39).
        if uniform[1]:
            return expr_from_string(f"_rt._clamp({{a}}, {bound}={{b}})", a=a, b=b)
        if uniform[0]:
            return expr_from_string(f"_rt._clamp({{b}}, {bound}={{a}})", a=a, b=b)
        return expr_from_string(f"torch.{fn}({{a}}, {{b}})", a=a, b=b)
    if n.op is Op.WHERE:
        if uniform[0]:
            # A uniform condition picks one branch; a uniform branch is a Python number, so it becomes a 0-d
            # tensor: the node is a tensor (its other branch is), and torch functions of it need one.
            b, c = (
                expr_from_string("torch.as_tensor({x}, dtype=_cdt)", x=x) if u else x
                for x, u in zip(args[1:], uniform[1:], strict=True)
            )
            return _apply(SCALAR_TEMPLATES, n, [args[0], b, c])
        return expr_from_string("torch.where({a}, {b}, {c})", a=args[0], b=args[1], c=args[2])
    if n.op is Op.FLOORDIV and n.dtype is DType.FLOAT:
        # torch's floor_divide has no derivative; floor(a / b) is the same value with the derivative 0 (as
        # the Triton kernels compute it), so a floor-divided score trains like any piecewise-constant one.
        return expr_from_string("torch.floor({a} / {b})", a=args[0], b=args[1])
    if n.op is Op.MOD and n.dtype is DType.FLOAT:
        # torch.remainder of a number by a tensor has no derivative; a - floor(a / b) b is its value (the
        # formula the Triton kernels use), with the derivatives 1 and -floor(a / b).
        return expr_from_string("{a} - torch.floor({a} / {b}) * {b}", a=args[0], b=args[1])
    if n.op in (Op.AND, Op.OR) and all(uniform):  # pragma: no cover - hoisted as uniform
        return _apply(SCALAR_TEMPLATES, n, args)
    return _apply(TENSOR_TEMPLATES, n, args)


def loads(roots: Iterable[Node]) -> list[Node]:
    return [n for n in walk(roots) if n.op is Op.LOAD]


def is_float(n: Node) -> bool:
    return n.dtype is DType.FLOAT
