"""Typed IR construction with constant folding (like an IR builder that folds as it goes).

Every IR node is made here, so the typing rules of the language live in one place:

- `+ - * // %` on two ints give an int; with a float operand, a float (the int is cast explicitly);
- `/` and `**` always give a float (`**` is real power);
- comparisons give a bool; `and or not` take bools; bools never take part in arithmetic.

Folding follows Python's semantics (floor `//` and `%`) and is bounded: results outside int64 or the finite
floats are errors, never big-int computations, so `9 ** 9 ** 9` is rejected at once.

`ieee_unary` / `ieee_binary` build the same nodes for expressions the compiler derives itself (derivatives):
there a float fold that leaves the finite numbers gives the IEEE-754 value the backends would compute at run
time (inf, -inf, NaN) instead of an error, because no spec text is at fault.
"""

from __future__ import annotations

import math

from .ir import INFIX, DType, Node, Op, const

MAX_INT = 2**63 - 1


class BuildError(Exception):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


_OP_SYMBOL = {**INFIX, Op.MIN: "min", Op.MAX: "max"}


def _check_value(value: object) -> Node:
    if isinstance(value, bool):
        return const(value)
    if isinstance(value, int):
        if not -MAX_INT - 1 <= value <= MAX_INT:
            raise BuildError("constant expression overflows int64")
        return const(value)
    assert isinstance(value, float)
    if math.isnan(value):
        raise BuildError("constant expression is not a number (NaN)")
    if math.isinf(value):
        raise BuildError("constant expression overflows to infinity")
    return const(value)


def to_float(x: Node) -> Node:
    if x.dtype is DType.FLOAT:
        return x
    if x.dtype is DType.BOOL:
        raise BuildError("a bool cannot be used as a number", "use where(cond, 1.0, 0.0)")
    if x.op is Op.CONST:
        return const(float(x.attr))  # type: ignore[arg-type]
    return Node(Op.TO_FLOAT, DType.FLOAT, (x,))


def _numeric(x: Node, what: str) -> None:
    if x.dtype is DType.BOOL:
        raise BuildError(
            f"{what} needs a number, got a bool", "use where(cond, a, b) to turn a bool into a number"
        )


def _fold_unary(op: Op, v: float | int) -> float | int:
    try:
        if op is Op.NEG:
            return -v
        if op is Op.ABS:
            return abs(v)
        if op is Op.RELU:
            return max(v, 0 if isinstance(v, int) else 0.0)
        if op is Op.EXP:
            return math.exp(v)
        if op is Op.EXP2:
            return 2.0**v
        if op is Op.LOG:
            return math.log(v)
        if op is Op.LOG2:
            return math.log2(v)
        if op is Op.SQRT:
            return math.sqrt(v)
        if op is Op.RSQRT:
            return 1.0 / math.sqrt(v)
        if op is Op.TANH:
            return math.tanh(v)
        if op is Op.SIGMOID:
            return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))
        if op is Op.ELU:
            return float(v) if v > 0 else math.expm1(v)
        if op is Op.FLOOR:
            return math.floor(v)
        if op is Op.CEIL:
            return math.ceil(v)
        if op is Op.TO_FLOAT:
            return float(v)
    except OverflowError:
        raise BuildError(f"{op.value}({v}) overflows") from None
    except (ValueError, ZeroDivisionError):
        raise BuildError(f"{op.value}({v}) is undefined") from None
    raise AssertionError(op)  # pragma: no cover


def unary(op: Op, x: Node) -> Node:
    if op is Op.NOT:
        if x.dtype is not DType.BOOL:
            raise BuildError("'not' needs a bool")
        if x.op is Op.CONST:
            return const(not x.attr)
        if x.op is Op.NOT:
            return x.args[0]
        return Node(Op.NOT, DType.BOOL, (x,))
    _numeric(x, f"{op.value}()" if op is not Op.NEG else "unary '-'")
    if op in (Op.FLOOR, Op.CEIL):
        if x.dtype is DType.INT:
            return x
        out = DType.INT
    elif op in (Op.NEG, Op.ABS, Op.RELU):
        out = x.dtype
    else:
        out = DType.FLOAT
        x = to_float(x)
    if x.op is Op.CONST:
        return _check_value(_fold_unary(op, x.attr))  # type: ignore[arg-type]
    if op is Op.NEG and x.op is Op.NEG:
        return x.args[0]
    return Node(op, out, (x,))


def _fold_binary(op: Op, a: float | int | bool, b: float | int | bool) -> float | int | bool:
    try:
        if op is Op.ADD:
            return a + b
        if op is Op.SUB:
            return a - b
        if op is Op.MUL:
            return a * b
        if op is Op.DIV:
            return a / b
        if op is Op.FLOORDIV:
            r = a // b
            return float(r) if isinstance(r, float) else r
        if op is Op.MOD:
            return a % b
        if op is Op.POW:
            r = float(a) ** float(b)
            if isinstance(r, complex):
                raise BuildError(f"{a} ** {b} is not a real number")
            return r
        if op is Op.MIN:
            return min(a, b)
        if op is Op.MAX:
            return max(a, b)
        if op is Op.LT:
            return a < b
        if op is Op.LE:
            return a <= b
        if op is Op.GT:
            return a > b
        if op is Op.GE:
            return a >= b
        if op is Op.EQ:
            return a == b
        if op is Op.NE:
            return a != b
        if op is Op.AND:
            return bool(a and b)
        if op is Op.OR:
            return bool(a or b)
    except ZeroDivisionError:
        raise BuildError("division by zero in a constant expression") from None
    except OverflowError:
        raise BuildError(f"constant expression {a} {_OP_SYMBOL.get(op, op.value)} {b} overflows") from None
    raise AssertionError(op)  # pragma: no cover


def binary(op: Op, a: Node, b: Node) -> Node:
    sym = _OP_SYMBOL.get(op, op.value)
    if op in (Op.AND, Op.OR):
        if a.dtype is not DType.BOOL or b.dtype is not DType.BOOL:
            raise BuildError(f"'{op.value}' needs bools on both sides", "compare numbers first, e.g. 'x > 0'")
        for x, y in ((a, b), (b, a)):
            if x.op is Op.CONST:  # true and y -> y; false and y -> false; true or y -> true; false or y -> y
                return y if x.attr == (op is Op.AND) else const(op is Op.OR)
        return Node(op, DType.BOOL, (a, b))
    if op in (Op.EQ, Op.NE) and a.dtype is DType.BOOL and b.dtype is DType.BOOL:
        out = DType.BOOL
    elif op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE):
        if DType.BOOL in (a.dtype, b.dtype):
            raise BuildError(f"cannot compare a bool with a number using '{_OP_SYMBOL.get(op, op.value)}'")
        if a.dtype is not b.dtype:
            a, b = to_float(a), to_float(b)
        out = DType.BOOL
    else:
        _numeric(a, f"'{sym}'")
        _numeric(b, f"'{sym}'")
        if op in (Op.DIV, Op.POW) or DType.FLOAT in (a.dtype, b.dtype):
            a, b, out = to_float(a), to_float(b), DType.FLOAT
        else:
            out = DType.INT
    if a.op is Op.CONST and b.op is Op.CONST:
        return _check_value(_fold_binary(op, a.attr, b.attr))  # type: ignore[arg-type]
    if op is Op.SUB and out is DType.INT and a == b:
        return const(0)  # i - i: lets later folds (and their errors) happen here, where spans are known
    if op in (Op.DIV, Op.FLOORDIV, Op.MOD) and b.op is Op.CONST and b.attr == 0:
        raise BuildError("division by zero")
    return Node(op, out, (a, b))


def where(c: Node, a: Node, b: Node) -> Node:
    if c.dtype is not DType.BOOL:
        raise BuildError("where() needs a bool condition as its first argument")
    if a.dtype is not b.dtype:
        if DType.BOOL in (a.dtype, b.dtype):
            raise BuildError("where() branches must both be bools or both be numbers")
        a, b = to_float(a), to_float(b)
    if c.op is Op.CONST:
        return a if c.attr else b
    if a == b:
        return a
    return Node(Op.WHERE, a.dtype, (c, a, b))


def _ieee_float(op: Op, args: tuple[float, ...]) -> float:
    """The IEEE-754 double result of a float operation Python refuses (x / 0, log(0), overflow, ...)."""
    nan, inf = math.nan, math.inf
    if op in (Op.LOG, Op.LOG2):
        (x,) = args
        return -inf if x == 0 else nan
    if op is Op.SQRT:
        return nan
    if op is Op.RSQRT:
        (x,) = args
        return inf if x == 0 else nan
    if op in (Op.EXP, Op.EXP2):
        return inf
    if op is Op.DIV:
        a, b = args
        if a == 0 or math.isnan(a):
            return nan
        return math.copysign(inf, a) * math.copysign(1.0, b)
    if op is Op.POW:
        a, b = args
        if a == 0:  # 0 ** negative
            odd = b.is_integer() and int(b) % 2 == 1
            return math.copysign(inf, a) if odd else inf
        if a < 0 and not b.is_integer():
            return nan
        odd = b.is_integer() and int(b) % 2 == 1
        return -inf if a < 0 and odd else inf
    return nan


def ieee_unary(op: Op, x: Node) -> Node:
    """`unary`, except that a float constant folding to inf or NaN gives that constant (see the module doc)."""
    try:
        return unary(op, x)
    except BuildError:
        if x.op is not Op.CONST or x.dtype is not DType.FLOAT or op in (Op.FLOOR, Op.CEIL):
            raise
        return const(_ieee_float(op, (float(x.attr),)))  # type: ignore[arg-type]


def ieee_binary(op: Op, a: Node, b: Node) -> Node:
    """`binary`, except that a float constant folding to inf or NaN gives that constant (see the module doc)."""
    try:
        return binary(op, a, b)
    except BuildError:
        if op is Op.DIV and b.op is Op.CONST and a.op is not Op.CONST:  # x / 0: inf or NaN at run time
            return Node(Op.DIV, DType.FLOAT, (to_float(a), to_float(b)))
        if not (a.op is Op.CONST and b.op is Op.CONST and DType.FLOAT in (a.dtype, b.dtype)):
            raise
        if op in (Op.FLOORDIV, Op.MOD) or op not in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MIN, Op.MAX):
            raise
        x, y = float(a.attr), float(b.attr)  # type: ignore[arg-type]
        if op in (Op.ADD, Op.SUB, Op.MUL):  # Python floats already overflow to inf (and inf - inf to NaN)
            value = x + y if op is Op.ADD else x - y if op is Op.SUB else x * y
        else:
            value = _ieee_float(op, (x, y))
        return const(value)
