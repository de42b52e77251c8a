"""IR expressions as Triton tile code.

Only Triton builtins are called (not `tl.sigmoid`, `tl.max`, `tl.sum` or `tl.zeros`: those are themselves
jit functions, which break when Triton was imported in the other of compiled/interpreted mode).
Index variables are tiles (i = offs_m[:, None], j = offs_n[None, :]) or program scalars (b, h, hk);
uniform sub-expressions arrive as kernel arguments (`_u0`, ...) computed on the host. Transcendentals are
lowered to Triton primitives that both the compiler and the interpreter support (no libdevice); tanh and
general powers go through the kernels file's helpers `_tanh` (a series for small |x|, where the exp form
cancels) and `_pow` (torch's results for negative bases and zero exponents). Integer `//` and `%` get Python's floor semantics
unless interval analysis proves both operands non-negative (Triton truncates).
"""

from __future__ import annotations

import ast
import math
import struct
from collections.abc import Callable

from attnc.dsl.analysis.ranges import bounds, nonneg
from attnc.dsl.ir import Attention, DType, Node, Op, TensorParam

from ..emit import Emitter, constant, expr_from_string, name

_TEMPLATES = {
    Op.NEG: "-{a}",
    Op.ADD: "{a} + {b}",
    Op.SUB: "{a} - {b}",
    Op.MUL: "{a} * {b}",
    Op.DIV: "{a} / {b}",
    Op.LT: "{a} < {b}",
    Op.LE: "{a} <= {b}",
    Op.GT: "{a} > {b}",
    Op.GE: "{a} >= {b}",
    Op.EQ: "{a} == {b}",
    Op.NE: "{a} != {b}",
    # As int32 operands: the interpreter refuses `&` of a tile's bool with a program scalar's bool compare
    # (`j <= i and 0.5 < w[hk]`); the compiler folds the conversions away.
    Op.AND: "(({a}).to(tl.int32) & ({b}).to(tl.int32)) != 0",
    Op.OR: "(({a}).to(tl.int32) | ({b}).to(tl.int32)) != 0",
    Op.NOT: "{a} == 0",
    Op.ABS: "tl.abs({a})",
    Op.EXP: "tl.exp({a})",
    Op.EXP2: "tl.exp2({a})",
    Op.LOG: "tl.log({a})",
    Op.LOG2: "tl.log2({a})",
    Op.SQRT: "tl.sqrt({a})",
    Op.RSQRT: "tl.rsqrt({a})",
    Op.TANH: "_tanh({a})",  # the kernels file's helper: accurate for small arguments too
    Op.SIGMOID: "1.0 / (1.0 + tl.exp(-{a}))",
    Op.RELU: "tl.maximum({a}, 0)",
    Op.ELU: "tl.where({a} > 0, {a}, tl.exp({a}) - 1.0)",
    Op.FLOOR: "tl.floor({a}).to(tl.int32)",
    Op.CEIL: "tl.ceil({a}).to(tl.int32)",
    Op.TO_FLOAT: "({a}).to(tl.float32)",
    Op.MIN: "tl.minimum({a}, {b})",
    Op.MAX: "tl.maximum({a}, {b})",
    Op.WHERE: "tl.where({a}, {b}, {c})",
}

# Float min/max/relu: NaN in, NaN out, as torch's minimum/maximum/clamp/relu (Triton's default, `minnum`,
# drops a NaN operand). Integer operands keep the plain form.
_FLOAT_TEMPLATES = {
    Op.RELU: "tl.maximum({a}, 0.0, propagate_nan=tl.PropagateNan.ALL)",
    Op.MIN: "tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)",
    Op.MAX: "tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)",
}


_F32_TINY = 2.0**-126  # the smallest normal float32
_F32_MAX = 3.4028234663852886e38


def _f32_constant(value: bool | int | float) -> ast.expr | None:
    """A float literal Triton would type as float64 (nonzero below float32's normal range, or beyond its
    maximum), which then meets float32 tiles in a dot ('Both operands must be same dtype'): a float32
    constant instead, with the value float32 rounding gives it (the kernels compute in float32).
    None: the plain literal."""
    if (
        isinstance(value, float)
        and value != 0
        and math.isfinite(value)
        and not _F32_TINY <= abs(value) <= _F32_MAX
    ):
        rounded = (
            struct.unpack("f", struct.pack("f", value))[0]
            if abs(value) < 1
            else math.copysign(math.inf, value)
        )
        return expr_from_string("tl.full([], {v}, tl.float32)", v=constant(rounded))
    return None


def aux_name(spec_name: str) -> str:
    """A kernel's parameter for the spec's auxiliary tensor: apart from every kernel local (`s`, `p`, `acc`...)."""
    return f"_a_{spec_name}"


def scalar_name(spec_name: str) -> str:
    """A kernel's parameter for the spec's runtime scalar."""
    return f"_c_{spec_name}"


def _holes(args: list[ast.expr]) -> dict[str, ast.expr]:
    return dict(zip("abc", args, strict=False))


class TritonExprs:
    """Builds an `Emitter` whose tensor code is Triton, for one attention block."""

    def __init__(self, att: Attention) -> None:
        self.att = att

    def _nonneg(self, n: Node) -> bool:
        b = bounds(n, self.att.layout)
        return b is not None and nonneg(b[0])

    def apply(self, n: Node, args: list[ast.expr], uniform: list[bool]) -> ast.expr:
        op = n.op
        if op in (Op.FLOORDIV, Op.MOD):
            a, b = n.args
            if n.dtype is DType.FLOAT:
                tpl = "tl.floor({a} / {b})" if op is Op.FLOORDIV else "{a} - tl.floor({a} / {b}) * {b}"
            elif self._nonneg(a) and self._nonneg(b):
                tpl = "{a} // {b}" if op is Op.FLOORDIV else "{a} % {b}"  # truncation == floor here
            else:
                tpl = "_floordiv({a}, {b})" if op is Op.FLOORDIV else "_floormod({a}, {b})"
            return expr_from_string(tpl, **_holes(args))
        if op is Op.POW:
            return self._pow(n, args, uniform)
        if op is Op.WHERE and all(uniform[1:]):
            # tl.where needs a tensor branch to know the result type: make the first one a tile of the node's
            # type (an int where stays int: `where(c, 0, 1) // 1` must floor-divide ints; found by the fuzz run).
            if n.dtype is DType.FLOAT:
                return expr_from_string("tl.where({a}, {b} + 0.0 * {a}, {c})", **_holes(args))
            return expr_from_string("tl.where({a}, {b} + 0 * ({a}).to(tl.int32), {c})", **_holes(args))
        if op in _FLOAT_TEMPLATES and n.dtype is DType.FLOAT:
            return expr_from_string(_FLOAT_TEMPLATES[op], **_holes(args))
        return expr_from_string(_TEMPLATES[op], **_holes(args))

    def _pow(self, n: Node, args: list[ast.expr], uniform: list[bool]) -> ast.expr:
        ex = n.args[1]
        if ex.op is Op.CONST:
            k = float(ex.attr)  # type: ignore[arg-type]
            if k == 0.5:
                return expr_from_string("tl.sqrt({a})", a=args[0])
            if k == -0.5:
                return expr_from_string("tl.rsqrt({a})", a=args[0])
            if k.is_integer() and 1 <= abs(k) <= 8:
                prod: ast.expr = args[0]
                for _ in range(int(abs(k)) - 1):
                    prod = expr_from_string("{a} * {b}", a=prod, b=args[0])
                return prod if k > 0 else expr_from_string("1.0 / ({a})", a=prod)
            if k.is_integer():  # a constant whole exponent: |a| ** k, negative for a negative base and odd k
                mag = expr_from_string("tl.exp2({b} * tl.log2(tl.abs({a})))", a=args[0], b=args[1])
                if k == 0:
                    return expr_from_string("tl.where({a} == 0, 1.0, 1.0)", a=args[0])
                if k % 2:
                    return expr_from_string("tl.where({a} < 0, -{m}, {m})", a=args[0], m=mag)
                return mag
            # A constant fractional exponent: NaN for a negative base, as torch's pow.
            return expr_from_string("tl.exp2({b} * tl.log2({a}))", a=args[0], b=args[1])
        expo = args[1]
        if ex.op is Op.TO_FLOAT and ex.args[0].dtype is DType.INT and isinstance(expo, ast.Call):
            assert isinstance(expo.func, ast.Attribute)  # `(n).to(tl.float32)`: the int tile is its receiver
            expo = expo.func.value
        if (ex.dtype is DType.INT or expo is not args[1]) and not uniform[1]:
            # An int tile exponent (a decay gamma ** (i - j)): `_pow_int` skips `_pow`'s fraction tests, and a
            # Triton-valued uniform base stays a scalar (retention's forward, sm_90, fp16, D = 64: 128 -> 96
            # registers).
            literal = isinstance(args[0], ast.Constant) or (
                isinstance(args[0], ast.UnaryOp) and isinstance(args[0].operand, ast.Constant)
            )
            base = (
                self._float_tile(args[0], args[1], True)
                if literal
                else expr_from_string("({a}).to(tl.float32)", a=args[0])
            )
            return expr_from_string("_pow_int({a}, {b})", a=base, b=expo)
        # A tile exponent (a float one): the helper gives torch's pow for
        # negative and zero bases, where exp2(b * log2(a)) is NaN. Both operands as float32 tiles.
        base, expo = (
            self._float_tile(x, other, u)
            for x, other, u in ((args[0], args[1], uniform[0]), (args[1], args[0], uniform[1]))
        )
        return expr_from_string("_pow({a}, {b})", a=base, b=expo)

    @staticmethod
    def _float_tile(x: ast.expr, other: ast.expr, is_uniform: bool) -> ast.expr:
        """`x` as a float32 value the helper can compute with: a literal or a uniform (a Python number, not a
        Triton value, under the interpreter: it has no `.to`) becomes a tile of the other operand's shape."""
        if (
            is_uniform
            or isinstance(x, ast.Constant)
            or (isinstance(x, ast.UnaryOp) and isinstance(x.operand, ast.Constant))
        ):
            x = expr_from_string("tl.where({o} == {o}, {x}, {x})", o=other, x=x)
        return expr_from_string("({x}).to(tl.float32)", x=x)

    def emitter(
        self, load_code: Callable[[Node, list[ast.expr]], ast.expr], leaf_code: Callable[[Node], ast.expr]
    ) -> Emitter:
        return Emitter(
            load_code=load_code,
            leaf_code=leaf_code,
            tensor_apply=self.apply,
            uniform_prefix="_ku",
            scalar_name=scalar_name,
            constant_code=_f32_constant,
        )

    def load(self, n: Node, args: list[ast.expr]) -> ast.expr:
        """A masked gather: never reads out of bounds; out-of-range lanes read 0 (and are masked later)."""
        p = self.att.param(str(n.attr))
        assert isinstance(p, TensorParam)
        offset: ast.expr | None = None
        in_bounds: ast.expr | None = None
        for k, idx in enumerate(args):
            term = expr_from_string("({a}) * {s}", a=idx, s=name(f"_s_{p.name}_{k}"))
            offset = term if offset is None else expr_from_string("{a} + {b}", a=offset, b=term)
            # Each axis check as an int, multiplied: the interpreter mis-types `scalar_bool & tile_bool`.
            ok = expr_from_string(
                "((({a}) >= 0) & (({a}) < {n})).to(tl.int32)", a=idx, n=name(f"_n_{p.name}_{k}")
            )
            in_bounds = ok if in_bounds is None else expr_from_string("{a} * {b}", a=in_bounds, b=ok)
        assert offset is not None and in_bounds is not None
        load = expr_from_string(
            "tl.load({t} + {o}, mask={m} != 0, other=0)", t=name(aux_name(p.name)), o=offset, m=in_bounds
        )
        if n.dtype is DType.FLOAT:
            return expr_from_string("({a}).to(tl.float32)", a=load)
        if n.dtype is DType.BOOL:
            return expr_from_string("({a}) != 0", a=load)
        return expr_from_string("({a}).to(tl.int32)", a=load)


def leaf(names: dict[str, str]) -> Callable[[Node], ast.expr]:
    """Leaves by name: index variables as given in `names` (e.g. {'i': 'i', 'j': 'j'}), dot as `qk`."""

    def code(n: Node) -> ast.expr:
        if n.op is Op.VAR:
            return name(names[n.attr.value])  # type: ignore[union-attr]
        if n.op is Op.DOT:
            return name("qk")
        if n.op is Op.ELEM:
            return name(names[str(n.attr)])
        raise AssertionError(n)  # pragma: no cover

    return code
