"""Emits the entry points of a state block (`state S = ...`): `NAME` and `NAME_reference`.

The generated function checks its arguments (errors name the parameter), evaluates the plan's per-token
inputs (dsl/analysis/recurrence.py: q', k', v', β or a, b, and the log-gate g) in PyTorch over index grids
[B, H, T, ·] — autograd carries gradients to q, k, v and every float auxiliary — and calls the delta-rule
runtime, `attnc.runtime.delta` (Triton kernels, or its exact PyTorch reference for backend="reference").
Float auxiliaries are computed in at least float32 (float64 stays float64) and never rounded to q's dtype.
"""

from __future__ import annotations

from attnc.dsl.analysis.recurrence import DeltaPlan, GateShape, PlanKind, analyse
from attnc.dsl.ir import DType, Node, Role, TensorParam
from attnc.dsl.state_ir import Recurrence, Side, side_of

from .emit import Emitter
from .reference import _hoisted, _leaf, _Loads, _shape_text, _signature, argument_checks, dim_code

_GRID = "q, k, v, b, h, hk, i, d, e"


def _closure(em: Emitter, fn: str, root: Node) -> list[str]:
    stmts, ret = em.body(root)
    return [f"    def {fn}({_GRID}):", *[f"        {s}" for s in stmts], f"        return {ret}", ""]


def _plan_doc(plan: DeltaPlan) -> str:
    if plan.kind is PlanKind.DELTA:
        gate = {GateShape.NONE: "DeltaNet", GateShape.SCALAR: "Gated DeltaNet", GateShape.CHANNEL: "KDA"}
        return f"the delta rule ({gate[plan.gate]} form): attnc.runtime.delta.delta_rule"
    rank1 = "diagonal plus rank 1" if plan.a is not None else "diagonal"
    return f"a {rank1} transition: attnc.runtime.delta.dplr"


def emit_recurrence(rec: Recurrence) -> str:
    plan = analyse(rec)
    nm = rec.name
    q = next(p for p in rec.tensors if p.role is Role.Q)
    v = next(p for p in rec.tensors if p.role is Role.V)
    dims = [dim_code(x) for x in q.shape[:3]]
    B, H, T = dims
    D, E, G = dim_code(rec.layout.head_dim), dim_code(v.shape[3]), dim_code(rec.layout.kv_heads)
    doc_params = ", ".join(
        f"{p.name}: {_shape_text(p)}" if isinstance(p, TensorParam) else p.name for p in rec.params
    )
    returns = f"Returns o: [{B}, {H}, {T}, {E}] (q's dtype), and the final state [{B}, {H}, {E}, {D}] (float32) with return_state=True."
    call_args = ", ".join(p.name for p in rec.params)

    L = [f"def {nm}("]
    L += _signature(rec)  # type: ignore[arg-type]
    L += [
        "    *,",
        "    initial_state: torch.Tensor | None = None,",
        "    return_state: bool = False,",
        "    algorithm: str = 'auto',",
        "    backend: str | None = None,",
        "):",
        f'    """`{nm}`: a state recurrence computed as {_plan_doc(plan)}.',
        "",
        f"    {doc_params}",
        f"    {returns}",
        "    initial_state: [B, H, E, D] (float32); algorithm: 'auto', 'chunk' (scalar-gated delta rule only),",
        "    'recurrent'; backend: None (Triton on CUDA tensors, else the reference), 'reference' or 'triton'.",
        '    """',
    ]
    L += argument_checks(rec)  # type: ignore[arg-type]  # a state block has the same parameters
    L.append("    if backend is None:")
    L.append('        backend = "triton" if q.is_cuda and _rt._has_triton() else "reference"')
    L.append('    if backend not in ("reference", "triton"):')
    L.append(
        f"        raise ValueError(f\"backend={{backend!r}}: {nm} has the backends 'reference' or 'triton'\")"
    )
    L.append('    if algorithm not in ("auto", "chunk", "recurrent"):')
    L.append(
        f"        raise ValueError(f\"algorithm={{algorithm!r}}: {nm} takes 'auto', 'chunk' or 'recurrent'\")"
    )
    L.append("    _cdt = torch.float64 if q.dtype is torch.float64 else torch.float32")
    for p in rec.aux_tensors:
        if p.type.kind is DType.FLOAT:
            # Never narrower than the compute dtype: a float32 (or float64) gate is not rounded to q's dtype.
            L.append(f"    {p.name} = {p.name}.to(torch.promote_types({p.name}.dtype, _cdt))")
    L.append(f"    _grid = _rt_delta.spec_grid({B}, {H}, {G}, {T}, {D}, {E}, q.device)")
    L.append(f"    _rows = _rt_delta.spec_rows(q, k, v, {H}, {G})")
    em = Emitter(load_code=_Loads(rec), leaf_code=_leaf)  # type: ignore[arg-type]
    members: list[tuple[str, Node, str]] = []  # (runtime argument, expression, shape kind)
    for field_name in ("q", "k", "v", "g", "beta", "a", "b"):
        node = getattr(plan, field_name)
        if node is None:
            continue
        side = side_of(node)
        kind = "value" if side is Side.VALUE else "key" if side is Side.KEY else "scalar"
        if field_name in ("q", "k", "a", "b") or (field_name == "g" and plan.gate is GateShape.CHANNEL):
            kind = "key"  # a key-side input even where the expression does not vary along d
        if field_name == "v":
            kind = "value"
        members.append((field_name, node, kind))
    closures: list[str] = []
    for field_name, node, _ in members:
        closures += _closure(em, f"_in_{field_name}", node)
    L += _hoisted(rec, em.hoisted)  # type: ignore[arg-type]
    L.append("")
    L += closures
    for field_name, _, kind in members:
        L.append(
            f"    _x_{field_name} = _rt_delta.spec_input(_in_{field_name}(*_rows, *_grid), {kind!r}, _grid)"
        )
    st = "initial_state=initial_state, return_state=return_state"
    alg = "algorithm='reference' if backend == 'reference' else algorithm"
    g = "_x_g" if plan.g is not None else "None"
    if plan.kind is PlanKind.DELTA:
        L.append(f"    return _rt_delta.delta_rule(_x_q, _x_k, _x_v, _x_beta, g={g}, {st}, {alg})")
    else:
        ab = "_x_a, _x_b" if plan.a is not None else "None, None"
        L.append(f"    return _rt_delta.dplr(_x_q, _x_k, _x_v, {ab}, g={g}, {st}, {alg})")
    L += ["", ""]
    L += [f"def {nm}_reference("]
    L += _signature(rec)  # type: ignore[arg-type]
    L += [
        "    *,",
        "    initial_state: torch.Tensor | None = None,",
        "    return_state: bool = False,",
        "):",
        f'    """Exact PyTorch reference for `{nm}` (token by token; float64 for float64 inputs, else float32)."""',
        f"    return {nm}({call_args}, initial_state=initial_state, return_state=return_state, backend='reference')",
    ]
    return "\n".join(L) + "\n"
