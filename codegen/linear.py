"""Emits `NAME_linear` for blocks with a linear-time form (dsl/analysis/linear.py).

The generated function evaluates the prologue — q~ = φ(q)·a(i), k~ = ψ(k)·c(j) and the log-decay G at
positions −1..N−1 — in PyTorch (autograd carries gradients to every auxiliary tensor), runs the core with
the Triton kernels or exactly in PyTorch, and finishes the norm and the output epilogue. As in
flash-linear-attention, element-wise feature maps are applied before the kernels; the kernels fuse the
decays, the causal mask, the carried state and both normalisers.
"""

from __future__ import annotations

import ast

from attnc.dsl.analysis.linear import LinearForm, linear_form
from attnc.dsl.ir import Attention, DType, Node, NormKind

from .emit import Emitter, expr_from_string, name
from .reference import Extension, _checks, _closures, _hoisted, _leaf, _Loads, _signature


def _zero_load(n: Node, args: list[ast.expr]) -> ast.expr:
    return expr_from_string(
        "_rt_lin._lin_load0({t}, {idx})", t=name(f"_a_{n.attr}"), idx=ast.Tuple(args, ast.Load())
    )


def _closure(em: Emitter, fn: str, params: str, root: Node, prelude: tuple[str, ...] = ()) -> list[str]:
    stmts, ret = em.body(root)
    body = [*prelude, *stmts]
    return [f"    def {fn}({params}):", *[f"        {s}" for s in body], f"        return {ret}", ""]


def linear_kwargs() -> list[str]:
    return [
        "    algorithm: str | None = None,",
        "    initial_state: torch.Tensor | None = None,",
        "    return_state: bool = False,",
    ]


def dispatch_lines(att: Attention, has_triton: bool) -> list[str]:
    """Lines of the entry point `NAME` that route to the linear forms (after `backend` is resolved)."""
    nm = att.name
    args = ", ".join(p.name for p in att.params)
    L = ["    if algorithm is not None or initial_state is not None or return_state:"]
    L.append("        if block_layout is not None:")
    L.append(
        '            raise ValueError("block_layout= selects key blocks of the quadratic kernels; the linear '
        'forms (algorithm=, initial_state=, return_state=) visit every key")'
    )
    L.append(
        f"        return {nm}_linear({args}, algorithm=algorithm or 'chunk', backend=backend, "
        "initial_state=initial_state, return_state=return_state)"
    )
    if has_triton:
        L.append(
            "    if backend == 'triton' and block_layout is None and q.dim() == 4 "
            "and q.shape[2] > _rt_lin._LINEAR_PARALLEL_MAX_N:"
        )
        L.append(f"        return {nm}_linear({args}, algorithm='chunk', backend=backend)")
    return L


def emit_linear(att: Attention, form: LinearForm, has_triton: bool) -> list[str]:
    nm = att.name
    norm_sum = att.norm.kind is NormKind.SUM
    state_shape = "[B, H, D, E + 1] (the last column is the normaliser z)" if norm_sum else "[B, H, D, E]"
    L = [f"def {nm}_linear("]
    L += _signature(att)
    L.append("    *,")
    L.append("    return_lse: bool = False,")
    L.append('    algorithm: str = "chunk",')
    L.append(f'    backend: str = "{"triton" if has_triton else "reference"}",')
    L.append("    initial_state: torch.Tensor | None = None,")
    L.append("    return_state: bool = False,")
    L.append("):")
    L.append(
        f'    """Linear-time forms of `{nm}`: algorithm "chunk" (chunked, carried state), "recurrent" (token by'
    )
    L.append('    token, for decoding) or "parallel" (the quadratic kernels; no state).')
    L.append("")
    L.append(f"    initial_state / the returned state: {state_shape}, float32, the state after position")
    L.append(
        "    N - 1 (the initial one sits at position -1). Returns o, or (o, state) when return_state=True."
    )
    L.append('    """')
    L += _checks(att)
    L.append("    if algorithm not in _rt_lin._LINEAR_ALGORITHMS:")
    L.append(
        f'        raise ValueError(f"algorithm={{algorithm!r}}: {nm} has the algorithms {{_rt_lin._LINEAR_ALGORITHMS}}")'
    )
    backends = "('reference', 'triton')" if has_triton else "('reference',)"
    L.append(f"    if backend not in {backends}:")
    L.append(f'        raise ValueError(f"backend={{backend!r}}: {nm}_linear has the backends {backends}")')
    if not form.causal:
        L.append('    if algorithm == "recurrent":')
        L.append(
            f"        raise ValueError(\"algorithm='recurrent': {nm} is bidirectional (no causal mask), "
            "so it has no token-by-token form; use 'chunk'\")"
        )
    L.append('    if algorithm == "parallel":')
    L.append("        if initial_state is not None or return_state:")
    L.append(
        "            raise ValueError(\"algorithm='parallel' carries no state; use algorithm='chunk' "
        'for initial_state/return_state")'
    )
    impl = f"{nm}_triton" if has_triton else f"{nm}_reference"
    call = ", ".join(p.name for p in att.params)
    if has_triton:
        L.append(f"        return ({impl} if backend == 'triton' else {nm}_reference)({call})")
    else:
        L.append(f"        return {impl}({call})")
    if has_triton:
        L.append('    if backend == "triton":')
        L.append(
            "        _rt._check_triton_dtype(q)  # and bfloat16 on CPU (the interpreter's bf16 dot is wrong)"
        )
    L.append("    _cdt = torch.float64 if q.dtype is torch.float64 else torch.float32")
    float_aux = [p for p in att.aux_tensors if p.type.kind is DType.FLOAT]
    for p in float_aux:
        L.append(f"    {p.name} = {p.name}.to(_cdt)")
    em = Emitter(load_code=_Loads(att), leaf_code=_leaf)
    closures, _ = _closures(att, em, only={"feature q", "feature k", "eps", "output"})
    if form.q_scale is not None:
        closures += _closure(em, "_lin_qs", "b, h, hk, i", form.q_scale)
    if form.k_scale is not None:
        closures += _closure(em, "_lin_ks", "b, h, hk, j", form.k_scale)
    gem = Emitter(load_code=_zero_load, leaf_code=_leaf, uniform_prefix="_ug")
    if form.log_decay is not None:
        aux = [p.name for p in att.aux_tensors]
        params = ", ".join(["b", "h", "hk", "j", *(f"_a_{a}" for a in aux)])
        closures += _closure(gem, "_lin_g", params, form.log_decay, ("_cdt = torch.float64",))
    L += _hoisted(att, [*em.hoisted, *gem.hoisted])
    L.append("")
    L += closures
    L.append("    _Bq, _Hq, _Nq, _Dq = q.shape")
    L.append("    _Gv, _Ev = v.shape[1], v.shape[3]")
    L.append("    _rep = _Hq // _Gv")
    L.append("    _dev = q.device")
    L.append("    b = torch.arange(_Bq, device=_dev).view(_Bq, 1, 1)")
    L.append("    h = torch.arange(_Hq, device=_dev).view(1, _Hq, 1)")
    L.append("    i = torch.arange(_Nq, device=_dev).view(1, 1, _Nq)")
    L.append("    d = torch.arange(_Dq, device=_dev).view(1, 1, 1, _Dq)")
    L.append("    _qt = q.to(_cdt)")
    if att.feature_q is not None:
        L.append(
            "    _qt = _rt._full(_feature_q(_qt, b[..., None], h[..., None], (h // _rep)[..., None], i[..., None], d), _qt.shape, _qt)"
        )
    if form.q_scale is not None:
        L.append("    _qt = _qt * _rt._full(_lin_qs(b, h, h // _rep, i), (_Bq, _Hq, _Nq), _qt)[..., None]")
    kt_heads = "_Hq" if form.k_per_query_head else "_Gv"
    L.append(f"    _kt = k.to(_cdt){'.repeat_interleave(_rep, dim=1)' if form.k_per_query_head else ''}")
    L.append(f"    hk = torch.arange({kt_heads}, device=_dev).view(1, {kt_heads}, 1)")
    hk_k = "hk // _rep" if form.k_per_query_head else "hk"
    if att.feature_k is not None:
        L.append(
            f"    _kt = _rt._full(_feature_k(_kt, b[..., None], ({hk_k})[..., None], i[..., None], d), _kt.shape, _kt)"
        )
    if form.k_scale is not None:
        L.append(
            f"    _kt = _kt * _rt._full(_lin_ks(b, hk, {hk_k}, i), (_Bq, {kt_heads}, _Nq), _kt)[..., None]"
        )
    if form.log_decay is not None:
        aux_args = "".join(
            f", {p.name}.double()" if p.type.kind is DType.FLOAT else f", {p.name}" for p in att.aux_tensors
        )
        L.append(
            "    # G at positions -1..N-1 in float64: chunks take differences of it (reads at -1 give 0)."
        )
        L.append("    _jj = torch.arange(-1, _Nq, device=_dev).view(1, 1, _Nq + 1)")
        L.append(
            f"    _gfull = _rt._full(_lin_g(b, h, h // _rep, _jj{aux_args}), (_Bq, _Hq, _Nq + 1), "
            "torch.empty((), dtype=torch.float64, device=_dev))"
        )
    else:
        L.append("    _gfull = None")
    L.append(
        f"    _s0, _z0 = _rt_lin._lin_state_split(initial_state, _Bq, _Hq, _Dq, _Ev, {norm_sum}, q.device)"
    )
    causal = form.causal
    if has_triton:
        L.append('    if backend == "triton":')
        L.append(
            f'        _opts = _rt_lin._LinOpts({causal}, {norm_sum}, algorithm == "recurrent", _rt_lin._lin_config(_STATE, {nm!r}, q, _Dq, _Ev, _Nq))'
        )
        L.append("        _s0 = None if _s0 is None else _s0.float()")
        L.append("        _z0 = None if _z0 is None else _z0.float()")
        L.append("        o, _den, _so, _zo = _rt_lin._lin_core(")
        L.append(
            "            _qt.to(q.dtype).contiguous(), _kt.to(q.dtype).contiguous(), v.contiguous(), _gfull, _s0, _z0, _opts"
        )
        L.append("        )")
        L.append("    else:")
        ind = "        "
    else:
        ind = "    "
    L.append(f"{ind}_s0 = None if _s0 is None else _s0.to(_cdt)")
    L.append(f"{ind}_z0 = None if _z0 is None else _z0.to(_cdt)")
    L.append(
        f"{ind}o, _den, _so, _zo = _rt_lin._lin_core_torch(_qt, _kt, v.to(_cdt), _gfull, _s0, _z0, {causal}, {norm_sum})"
    )
    if norm_sum:
        if att.norm.eps is not None:
            L.append("    _den = _den + _rt._full(_eps(b, h, h // _rep, i), _den.shape, _den)")
        L.append("    _alive = _den != 0")
        L.append("    o = torch.where(_alive[..., None], o / torch.where(_alive, _den, 1.0)[..., None], 0.0)")
    if att.output is not None:
        L.append("    o = _rt._dense_output(_output, o, _rep)")
    L.append("    o = o.to(q.dtype)")
    L.append("    if return_state:")
    L.append(f"        return o, _rt_lin._lin_state_join(_so, _zo, {norm_sum})")
    L.append("    return o")
    return L


__all__ = ["dispatch_lines", "emit_linear", "linear_kwargs"]


def extension(att: Attention, has_triton: bool) -> Extension | None:
    """The linear forms' additions to the block's entry point, or None for a block without a linear form."""
    lin = linear_form(att)
    if lin is None or lin.form is None:
        return None
    return Extension(
        tuple(linear_kwargs()),
        tuple(dispatch_lines(att, has_triton)),
        tuple(emit_linear(att, lin.form, has_triton)),
    )
