"""Ahead-of-time compile jobs for every kernel of a generated module (what `attnc inspect` and CI run).

Each kernel is compiled for a real NVIDIA target with the default schedule of the runtime, so CI catches what
the interpreter accepts but the GPU compiler rejects, and reports shared memory, registers, spills and wgmma.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from attnc.dsl.ir import Attention

from attnc.runtime.signature import TMA_GATE, WS_GATE, Group, KernelSignature
from attnc.runtime.triton import (
    _default_config,
    _default_split_config,
    _KernelConfig,
    _schedule_constexprs,
    _ws_ok,
)

from .aot import CompileJob
from .kernels import KERNEL_KINDS, KernelWriter


@dataclass(frozen=True)
class Target:
    cc: int
    dtype: str  # "fp16" | "bf16" | "fp32"
    head_dim: int
    kernels: tuple[str, ...] = ("fwd", "bwd_dkdv", "bwd_dq", "fwd_split", "fwd_combine")
    layout: bool = False  # compile the explicit-block-layout form (`_LAYOUT`) instead of the plain one
    varlen: bool = False  # the packed variable-length form (`_VARLEN`)
    paged: bool = False  # the paged-KV-cache form (`_PAGED`: the forward kernels)
    shift: bool = False  # context parallelism's global positions (`_SHIFT`: attnc.distributed)
    # Compile what a launch compiles (`launch_specialised`): the runtime passes q, k, v and o contiguous, and
    # Triton's launcher specialises on the values. False: every stride an unknown int (any strides at all).
    launch: bool = True
    # Tile loads through tensor descriptors (`_TMA`). None: as a launch decides (`runtime.triton._tma_ok`) for
    # contiguous inputs: on sm_90 and later, with rows of 16-byte multiples, not in the paged form.
    tma: bool | None = None
    # Compile the dQ and dK/dV kernels with their auxiliary-gradient code (`_AUX_GRAD`), as a launch whose
    # learned inputs need a gradient does; False: as one where none does (the gated groups unbound).
    aux_grads: bool = True

    def uses_tma(self) -> bool:
        if self.tma is not None:
            return self.tma
        size = {"fp16": 2, "bf16": 2, "fp32": 4}[self.dtype]
        return self.cc >= 90 and self.launch and not self.paged and self.head_dim * size % 16 == 0


# What the issue asks CI to compile: forward and backward for sm_90 at D = 64 in fp16 and D = 128 in bf16,
# and the forward for sm_80.
CI_TARGETS = (Target(90, "fp16", 64), Target(90, "bf16", 128), Target(80, "fp16", 64, ("fwd",)))


def jobs(
    att: Attention,
    kernels_module: object,
    target: Target,
    config: _KernelConfig | None = None,
    configs: Mapping[str, _KernelConfig] | None = None,
) -> list[CompileJob]:
    """One compile per kernel of `target`, typed from the kernel's signature and bound as the launcher binds
    it (`KernelSignature.compile_args`): the gated groups that the compiled form does not read (the layout
    without `target.layout`, the visit probe) are None, constexprs, so the kernel compiles without them.
    `config`: a schedule instead of the runtime's default (the autotuner's candidates); `configs`: one per
    kernel kind ("fwd", "bwd_dkdv", ...), before `config` (`attnc inspect --config`)."""
    writer = KernelWriter(att)
    _, kernels = writer.kernels()  # fixes the hoisted uniforms, hence the signatures
    by_kind = dict(zip(KERNEL_KINDS, kernels, strict=True))
    D = E = target.head_dim
    out = []
    for kind in target.kernels:
        sig = by_kind[kind].signature
        cfg = (
            (configs or {}).get(kind)
            or config
            or _schedule(kind, D, E, writer.heavy, target.cc, target.dtype, bool(writer.plan.kv_reads()))
        )
        forms = (
            (Group.LAYOUT, target.layout),
            (Group.VARLEN, target.varlen),
            (Group.PAGED, target.paged),
            (Group.SHIFT, target.shift),
        )
        unbound = () if target.aux_grads else (Group.AUX_GRADS, Group.AUX_GRADS_KV)
        absent = [g for g in (Group.PROBE, *(g for g, on in forms if not on), *unbound) if sig.has(g)]
        fixed = _schedule_constexprs(cfg, D, E, target.dtype == "fp32")
        if TMA_GATE in sig.group(Group.CONSTEXPRS).names:
            fixed[TMA_GATE] = target.uses_tma()
        fixed[WS_GATE] = _ws_ok(fixed[WS_GATE], fixed.get(TMA_GATE), target.layout)  # as a launch decides
        types, constexprs = sig.compile_args(target.dtype, fixed, absent)
        divisible = None
        if target.launch:
            types, constexprs, divisible = launch_specialised(sig, types, constexprs, D, E)
        out.append(
            CompileJob(
                getattr(kernels_module, sig.name),
                types,
                constexprs,
                cc=target.cc,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                divisible_by_16=divisible,
            )
        )
    return out


def launch_specialised(
    sig: KernelSignature, types: dict[str, str], constexprs: dict[str, object], D: int, E: int
) -> tuple[dict[str, str], dict[str, object], list[str]]:
    """The compile a launch makes, for the runtime's contiguous q, k, v and o (`_triton_forward` and
    `_triton_backward` pass them `.contiguous()`) at head dims D, E: Triton's launcher turns an int argument
    equal to 1 into a constant (each tensor's channel stride, `_s?_d`) and marks ints divisible by 16 (the
    other strides of q, k, v, o, all multiples of D or E, and the head dims) as such, as it marks 16-byte
    aligned pointers (torch's allocations are). Without this, every load is a gather of unknown stride and
    the registers and spills reported are not those of the kernel a GPU runs. Sequence lengths and the
    auxiliary tensors' strides stay unknown ints."""
    strides = sig.group(Group.STRIDES).names if sig.has(Group.STRIDES) else ()
    unit = [n for n in strides if n.endswith("_d") and n in types]
    types = {n: t for n, t in types.items() if n not in unit}
    constexprs = {**constexprs, **dict.fromkeys(unit, 1)}
    divisible = [n for n, t in types.items() if t.startswith("*")]
    if D % 16 == 0 and E % 16 == 0:
        divisible += [n for n in strides if n in types]
        divisible += [n for n in ("_D", "_E") if n in types]
    return types, constexprs, divisible


def _schedule(
    kind: str,
    D: int,
    E: int,
    heavy: bool,
    cc: int | None = None,
    dtype: str = "fp16",
    kv_reads: bool = False,
) -> _KernelConfig:
    """The runtime's default schedule of each kernel on a GPU of compute capability `cc` with `dtype` inputs
    (the combine: the split's rows, four warps); `kv_reads`: k's feature map reads auxiliary tensors."""
    if kind in ("fwd_split", "fwd_combine"):
        cfg = _default_split_config(D, E, heavy)
        return cfg if kind == "fwd_split" else _KernelConfig(cfg.block_m, cfg.block_n, 4, 1)
    nbytes = 4 if dtype == "fp32" else 2
    kernel = {"fwd": "fwd", "bwd_dkdv": "dkdv", "bwd_dq": "dq"}[kind]
    return _default_config(D, E, kernel, heavy, cc, nbytes, kv_reads)


def all_jobs(
    atts: Sequence[Attention],
    kernels_module: object,
    targets: Sequence[Target] = CI_TARGETS,
    configs: Mapping[str, _KernelConfig] | None = None,
) -> list[CompileJob]:
    return [j for att in atts for t in targets for j in jobs(att, kernels_module, t, configs=configs)]


# `attnc inspect --config`: the kinds a schedule may name, and its keys.
CONFIG_KINDS = {
    "fwd": "fwd",
    "dkdv": "bwd_dkdv",
    "dq": "bwd_dq",
    "split": "fwd_split",
    "combine": "fwd_combine",
}
_CONFIG_KEYS = {
    "BLOCK_M": "block_m",
    "BLOCK_N": "block_n",
    "warps": "num_warps",
    "stages": "num_stages",
    "ws": "warp_specialize",  # 1: warp-specialised key loops (sm_100; see autotune/resource.py)
}


def parse_configs(texts: Sequence[str], head_dim: int) -> dict[str, _KernelConfig]:
    """`attnc inspect --config` values, in order (a later one overrides an earlier one's keys), -> {kernel
    kind: schedule}; keys no value names keep the default schedule's."""
    values: dict[str, dict[str, int]] = {}
    for text in texts:
        for kind, vals in parse_config(text).items():
            values.setdefault(kind, {}).update(vals)
    return {k: _schedule(k, head_dim, head_dim, False)._replace(**v) for k, v in values.items()}


def parse_config(text: str) -> dict[str, dict[str, int]]:
    """`[KIND:]BLOCK_M=128,BLOCK_N=64,warps=8,stages=3` -> {kernel kind: {schedule field: value}}; without
    KIND (fwd, dkdv, dq, split, combine) for every kind. Raises ValueError with what is wrong."""
    kind, sep, body = text.partition(":")
    if not sep:
        kind, body = "", text
    if kind and kind not in CONFIG_KINDS:
        raise ValueError(f"--config {text!r}: unknown kernel {kind!r} (one of {', '.join(CONFIG_KINDS)})")
    values: dict[str, int] = {}
    for item in filter(None, body.split(",")):
        key, eq, val = item.partition("=")
        if not eq or key.strip() not in _CONFIG_KEYS:
            raise ValueError(
                f"--config {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(_CONFIG_KEYS)}"
            )
        try:
            n = int(val)
        except ValueError:
            raise ValueError(f"--config {text!r}: {key}={val!r} is not an integer") from None
        pow2 = n > 0 and n & (n - 1) == 0
        if key.strip() in ("BLOCK_M", "BLOCK_N") and not (pow2 and n >= 16):
            raise ValueError(
                f"--config {text!r}: {key} must be a power of two, at least 16 (tl.dot's minimum)"
            )
        if key.strip() == "warps" and not (pow2 and n <= 16):
            raise ValueError(f"--config {text!r}: warps must be 1, 2, 4, 8 or 16")
        if key.strip() == "stages" and n < 1:
            raise ValueError(f"--config {text!r}: stages must be at least 1")
        if key.strip() == "ws" and n not in (0, 1):
            raise ValueError(f"--config {text!r}: ws must be 0 or 1")
        values[_CONFIG_KEYS[key.strip()]] = n
    if not values:
        raise ValueError(f"--config {text!r}: give at least one of {', '.join(_CONFIG_KEYS)}")
    kinds = [CONFIG_KINDS[kind]] if kind else list(CONFIG_KINDS.values())
    return {k: dict(values) for k in kinds}
