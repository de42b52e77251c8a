"""Generated attnc operators as Hugging Face transformers attention implementations.

    from attnc.integrations import transformers as attnc_hf
    attnc_hf.register_spec("alibi.attn", name="attnc_alibi", tensors={"slopes": slopes})
    model = LlamaForCausalLM(config)                    # or from_pretrained(..., attn_implementation=...)
    model.set_attn_implementation("attnc_alibi")        # every attention layer now runs the generated op

transformers picks a layer's attention through `AttentionInterface` (the function) and
`AttentionMaskInterface` (how the model's mask is built); `register` fills both. The function maps
transformers' arguments onto the spec:

- query `[B, H, M, D]`, key/value `[B, Hk, N, D]`: a grouped-query spec (`k: [B, G, N, D]`) takes them as
  they are; a spec with one head symbol gets key/value repeated to H heads.
- `scaling` goes to the spec's scale scalar (the float scalar that multiplies `dot(q, k)`), or must equal
  the spec's built-in scale; `sliding_window` and `softcap` go to the spec's window (int) and cap (float)
  scalars. What the spec cannot honour raises `ValueError`, as does dropout.
- `attention_mask` is the boolean `[B, 1, M, N]` mask of `transformers.masking_utils.sdpa_mask` (or None
  when it is plain causal without padding). Its key padding becomes the tensor `kv_valid: [B, N] int32` of a
  padded variant of the spec that attnc compiles itself (`attnc.dsl.transforms.add_key_padding`); the rest
  of the mask must be the causal (and sliding-window) pattern, bottom-right aligned, which is checked once
  per mask tensor (one host synchronisation per forward; `check_masks=False` skips it).

Before first use with a given head layout, window and dims, the operator is probed on small random inputs
with the reference backend: it must never attend a key the model's causal mask excludes, apply
transformers' window exactly, and give the last rows of a full forward when called with only those query
rows (what a decoding step with a KV cache computes). A spec that fails gets a `ValueError` that says why.
"""

from __future__ import annotations

import inspect
import math
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnc.dsl import ast as A
from attnc.dsl import transforms
from attnc.dsl.parser import parse

__all__ = [
    "SPECS_DIR",
    "AttentionFunction",
    "Operator",
    "register",
    "register_spec",
    "spec_path",
]

SPECS_DIR = Path(__file__).with_name("specs")

# Scalar parameter names recognised when the caller does not name them (window="...", softcap="...").
_WINDOW_NAMES = ("W", "window", "sliding_window", "window_size")
_SOFTCAP_NAMES = ("cap", "softcap", "logit_cap")
_PROBE_N = 16  # key positions in the probe: more than the probe window, small enough to be instant
_PROBE_WINDOW = 3
_PROBE_DECODE_M = (1, 3)


def spec_path(name: str) -> Path:
    """A spec shipped for the integration: "causal", "sliding_window" or "alibi" (bottom-right aligned,
    grouped-query, with a `scale` scalar)."""
    path = SPECS_DIR / f"{name}.attn"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.attn")))
        raise ValueError(f"no shipped spec {name!r} (shipped: {shipped})")
    return path


def _read_spec(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    """(source, filename), with the same path-or-text rule as `attnc.compile`."""
    text = os.fspath(path_or_text)
    if "\n" not in text and "{" not in text and (text.endswith(".attn") or os.path.exists(text)):
        return Path(text).read_text(encoding="utf-8"), text
    return text, "<spec>"


@dataclass
class Operator:
    """A generated attention and what the integration knows about its spec.

    `fn` is the generated `NAME(q, k, v, ..., backend=...)`; the padded variant (the same spec with
    `kv_valid: [B, N] int32` and `kv_valid[b, j] != 0` in its mask) is compiled on first need. `att` is the
    spec's AST when known (None for a bare generated function, which then cannot take padded batches)."""

    fn: Callable[..., torch.Tensor]
    tensors: tuple[str, ...]  # auxiliary tensor parameters, in declaration order
    scalars: Mapping[str, str]  # scalar parameter -> "int" | "float"
    att: A.Attention | None = None
    filename: str = "<spec>"
    gqa: bool | None = None  # k declared with its own head symbol; None: unknown (bare function)
    same_length: bool = False  # q and k share their length symbol: only M == N calls
    _padded: tuple[Callable[..., torch.Tensor], str] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.att.name if self.att is not None else self.fn.__name__

    @classmethod
    def from_spec(cls, path_or_text: str | os.PathLike[str], attention: str | None = None) -> Operator:
        """Compile `attention` (or the file's only block) of a spec path or text. Raises SpecError."""
        import attnc

        source, filename = _read_spec(path_or_text)
        spec = parse(source, filename)
        att = transforms.select_attention(spec, attention)
        mod = attnc.compile_source(source, filename)
        tensors = tuple(
            p.name for p in att.params if isinstance(p, A.TensorParam) and p.name not in ("q", "k", "v")
        )
        scalars = {p.name: p.type for p in att.params if isinstance(p, A.ScalarParam)}
        shapes = {p.name: p.shape for p in att.params if isinstance(p, A.TensorParam)}
        return cls(
            fn=getattr(mod, att.name),
            tensors=tensors,
            scalars=scalars,
            att=att,
            filename=filename,
            gqa=shapes["k"][1] != shapes["q"][1],
            same_length=shapes["k"][2] == shapes["q"][2],
        )

    @classmethod
    def from_function(cls, fn: Callable[..., torch.Tensor]) -> Operator:
        """Wrap a bare generated function `NAME`: parameters from its signature (those with a default are
        scalars; float unless the default is an int)."""
        params = list(inspect.signature(fn).parameters.values())
        names = [p.name for p in params[:3]]
        if names != ["q", "k", "v"]:
            raise TypeError(f"{fn!r} is not a generated attnc operator (its parameters start {names})")
        tensors: list[str] = []
        scalars: dict[str, str] = {}
        for p in params[3:]:
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                break
            if p.default is inspect.Parameter.empty:
                tensors.append(p.name)
            else:
                scalars[p.name] = "int" if isinstance(p.default, int) else "float"
        return cls(fn=fn, tensors=tuple(tensors), scalars=scalars)

    def padded(self) -> tuple[Callable[..., torch.Tensor], str]:
        """The padded variant and the name of its key-validity parameter (compiled once)."""
        if self._padded is None:
            if self.att is None:
                raise ValueError(
                    f"attnc operator {self.name}: this batch has padding, and a bare generated function "
                    "cannot take it; register the spec with register_spec(...) (or Operator.from_spec) so "
                    "attnc compiles a padded variant"
                )
            import attnc

            att, param = transforms.add_key_padding(self.att)
            stem = Path(self.filename).stem if self.filename != "<spec>" else self.att.name
            mod = attnc.compile_source(transforms.format_spec(att), f"{stem}_kv_padded.attn")
            self._padded = (getattr(mod, att.name), param)
        return self._padded

    def size_bindings(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, int]:
        """Size symbols of q, k and v bound to these tensors' dimensions."""
        out: dict[str, int] = {}
        if self.att is None:
            return out
        for p in self.att.params:
            t = {"q": q, "k": k, "v": v}.get(p.name) if isinstance(p, A.TensorParam) else None
            if t is not None:
                for dim, size in zip(p.shape, t.shape, strict=False):
                    if isinstance(dim, A.Name):
                        out.setdefault(dim.id, int(size))
        return out


TensorSource = torch.Tensor | Callable[[torch.nn.Module], torch.Tensor]


@dataclass(frozen=True)
class _ProbeKey:
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    window: int | None
    padded: bool
    scalars: tuple[tuple[str, float], ...]


class AttentionFunction:
    """The function registered with `AttentionInterface`: transformers' attention signature in, the
    operator's call out. Build it with `register` / `register_spec`."""

    def __init__(
        self,
        operator: Operator,
        *,
        tensors: Mapping[str, TensorSource] | None = None,
        scalars: Mapping[str, float] | None = None,
        backend: str | None = None,
        window: str | None = None,
        softcap: str | None = None,
        scale: str | None = None,
        check_masks: bool = True,
    ) -> None:
        self.operator = operator
        self.tensors = dict(tensors or {})
        self.scalars = dict(scalars or {})
        self.backend = backend
        self.check_masks = check_masks
        op = operator
        missing = [t for t in op.tensors if t not in self.tensors]
        unknown = [t for t in self.tensors if t not in op.tensors]
        if missing or unknown:
            raise ValueError(
                f"attnc operator {op.name}: tensors= must give exactly its auxiliary tensors "
                f"{list(op.tensors)} (missing {missing}, unknown {unknown})"
            )
        bad = [s for s in self.scalars if s not in op.scalars]
        if bad:
            raise ValueError(
                f"attnc operator {op.name} has no scalar parameters {bad} (it has {list(op.scalars)})"
            )
        self.window = self._pick(window, _WINDOW_NAMES, "int", "window")
        self.softcap = self._pick(softcap, _SOFTCAP_NAMES, "float", "softcap")
        self.coefficient: transforms.DotCoefficient | None = None
        self.scale = scale
        if op.att is not None:
            constants = set(op.scalars)
            for p in op.att.params:
                if isinstance(p, A.TensorParam):
                    constants |= {d.id for d in p.shape if isinstance(d, A.Name)}
            self.coefficient = transforms.dot_coefficient(op.att, constants)
            if self.coefficient is not None and self.softcap is not None:
                # A soft-cap `cap * tanh(s / cap)` divides the scaled dot by the cap: that is not the scale.
                drop = lambda es: tuple(e for e in es if not (isinstance(e, A.Name) and e.id == self.softcap))  # noqa: E731
                self.coefficient = transforms.DotCoefficient(
                    drop(self.coefficient.factors), drop(self.coefficient.divisors)
                )
            if scale is None and self.coefficient is not None and not self.coefficient.divisors:
                factors = self.coefficient.factors
                if len(factors) == 1 and isinstance(factors[0], A.Name) and factors[0].id in op.scalars:
                    self.scale = factors[0].id
        elif scale is None and op.scalars.get("scale") == "float":
            self.scale = "scale"
        if self.scale is not None and op.scalars.get(self.scale) != "float":
            raise ValueError(
                f"attnc operator {op.name}: scale={self.scale!r} is not a float scalar parameter"
            )
        self._probed: set[_ProbeKey] = set()
        # id(mask) -> (a weak reference to it, its version, {(M, N, window): kv_valid})
        self._masks: dict[int, tuple[weakref.ref[torch.Tensor], int, dict[Any, torch.Tensor]]] = {}

    def _pick(self, given: str | None, names: tuple[str, ...], kind: str, what: str) -> str | None:
        op = self.operator
        if given is not None:
            if op.scalars.get(given) != kind:
                raise ValueError(
                    f"attnc operator {op.name}: {what}={given!r} is not an {kind} scalar parameter"
                )
            return given
        found = [n for n in names if op.scalars.get(n) == kind]
        return found[0] if found else None

    # ---- the call transformers makes ------------------------------------------------------------------

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        softcap: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """query [B, H, M, D], key/value [B, Hk, N, D|E] -> (output [B, M, H, E], None)."""
        op = self.operator
        if dropout:
            raise ValueError(
                f"attnc operator {op.name}: attention dropout ({dropout}) is not supported; set the "
                "config's attention_dropout to 0.0"
            )
        for unsupported in ("position_bias", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"attnc operator {op.name}: transformers passed {unsupported}=, which it does not take"
                )
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if not is_causal:
            raise ValueError(
                f"attnc operator {op.name}: {type(module).__name__} is bidirectional (is_causal=False); the "
                "integration runs causal decoder attention"
            )
        B, H, M = query.shape[:3]
        Hk, N = key.shape[1], key.shape[2]
        scalars = self._scalars(query, key, value, scaling, sliding_window, softcap)
        if op.gqa is False and Hk != H:
            rep = H // Hk  # the spec has one head symbol: give every query head its key/value head
            key = key.repeat_interleave(rep, dim=1)
            value = value.repeat_interleave(rep, dim=1)
        aux = {name: self._tensor(name, module, query) for name in op.tensors}

        kv_valid: torch.Tensor | None = None
        if attention_mask is None:
            if 1 < M < N:
                # transformers' `None` with M < N is a prefill into an empty static cache: causal over the
                # first M keys, the rest not yet written (sdpa_attention_forward crops the same way).
                key, value, N = key[:, :, :M], value[:, :, :M], M
        else:
            kv_valid = self._kv_valid(attention_mask, B, M, N, sliding_window, query.device)
        if op.same_length and M != N:
            raise ValueError(
                f"attnc operator {op.name}: its spec gives q and k the same length, but this call has {M} "
                f"queries and {N} keys (decoding with a cache); declare q: [B, H, M, D] and a bottom-right "
                "aligned mask (j <= i + N - M)"
            )
        self._probe(module, query, key, value, scalars, aux, sliding_window, kv_valid is not None)
        fn = op.fn
        if kv_valid is not None:
            fn, param = op.padded()
            aux[param] = kv_valid
        o = fn(query, key, value, **aux, **scalars, backend=self.backend)
        return o.transpose(1, 2).contiguous(), None

    def _tensor(self, name: str, module: torch.nn.Module, query: torch.Tensor) -> torch.Tensor:
        src = self.tensors[name]
        t = src(module) if callable(src) and not isinstance(src, torch.Tensor) else src
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attnc operator {self.operator.name}: tensors[{name!r}] gave {type(t).__name__}")
        return t.to(query.device)

    def _scalars(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None,
        softcap: float | None,
    ) -> dict[str, float]:
        op = self.operator
        out: dict[str, float] = dict(self.scalars)
        if sliding_window is not None:
            if self.window is None:
                raise ValueError(
                    f"attnc operator {op.name}: the model asks for a sliding window of {sliding_window}, and "
                    f"the spec has no int window scalar (one of {', '.join(_WINDOW_NAMES)}, or window=...)"
                )
            out[self.window] = int(sliding_window)
        if softcap is not None:
            if self.softcap is None:
                raise ValueError(
                    f"attnc operator {op.name}: the model asks for logit soft-capping ({softcap}), and the "
                    f"spec has no float cap scalar (one of {', '.join(_SOFTCAP_NAMES)}, or softcap=...)"
                )
            out[self.softcap] = float(softcap)
        if scaling is not None:
            if self.scale is not None:
                out[self.scale] = float(scaling)
            else:
                self._check_scale(float(scaling), query, key, value, out)
        return out

    def _check_scale(
        self, scaling: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scalars: dict[str, float]
    ) -> None:
        op = self.operator
        hint = (
            "declare `scale: float = D ** -0.5` and write `dot(q, k) * scale`, so the integration passes it"
        )
        D = q.shape[-1]
        if op.att is None:
            builtin = D**-0.5  # a bare function without a `scale` scalar: the language's convention
            how = f"D ** -0.5 = {builtin:g} (assumed for a bare generated function)"
        else:
            c = self.coefficient
            if c is None:
                raise ValueError(
                    f"attnc operator {op.name}: cannot tell how its score scales dot(q, k); {hint}"
                )
            values: dict[str, float] = dict(op.size_bindings(q, k, v))
            for p in op.att.params:
                if isinstance(p, A.ScalarParam):
                    if p.name in scalars:
                        values[p.name] = scalars[p.name]
                    elif p.default is not None:
                        values[p.name] = transforms.evaluate_constant(p.default, values)
            try:
                builtin = math.prod(transforms.evaluate_constant(e, values) for e in c.factors) / math.prod(
                    transforms.evaluate_constant(e, values) for e in c.divisors
                )
            except (KeyError, ValueError, ZeroDivisionError) as err:
                raise ValueError(
                    f"attnc operator {op.name}: cannot evaluate its dot(q, k) scale ({err}); {hint}"
                ) from None
            how = f"{builtin:g}"
        if not math.isclose(builtin, scaling, rel_tol=1e-6):
            raise ValueError(
                f"attnc operator {op.name}: the model scales scores by {scaling:g}, the spec by {how}; {hint}"
            )

    # ---- masks ------------------------------------------------------------------------------------------

    def _kv_valid(
        self, mask: torch.Tensor, B: int, M: int, N: int, window: int | None, device: torch.device
    ) -> torch.Tensor:
        """[B, N] int32 key validity from transformers' mask, after checking that the mask is the causal
        (+ window) pattern with key padding and nothing else."""
        name = self.operator.name
        if not isinstance(mask, torch.Tensor):
            raise ValueError(
                f"attnc operator {name}: attention_mask is a {type(mask).__name__}; expected a boolean "
                "[B, 1, M, N] tensor (the integration registers transformers' sdpa_mask for its name)"
            )
        if mask.ndim == 2:  # a key-padding mask [B, N], nonzero = keep
            if mask.shape[-1] != N:
                raise ValueError(
                    f"attnc operator {name}: attention_mask [B, N] has {mask.shape[-1]} keys, expected {N}"
                )
            return (mask != 0).to(device=device, dtype=torch.int32).expand(B, N).contiguous()
        if mask.ndim != 4 or mask.shape[-2] != M or mask.shape[-1] < N:
            raise ValueError(
                f"attnc operator {name}: attention_mask of shape {list(mask.shape)}; expected [B, 1, {M}, {N}]"
            )
        memo_key = (M, N, window)
        memo = self._memo(mask)
        if memo_key in memo:
            return memo[memo_key]  # every layer of a forward gets the same mask tensor: check it once
        mask = mask[..., :N]
        if mask.dtype == torch.bool:
            allowed = mask
        elif mask.is_floating_point():
            # An additive mask: 0 keeps, the dtype's minimum (or -inf) drops; any other value is a bias the
            # operator cannot take.
            allowed = mask == 0
            if self.check_masks and not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
                raise ValueError(
                    f"attnc operator {name}: attention_mask is a float mask with values other than 0 and "
                    "-inf (an additive bias); put the bias in the spec's score instead"
                )
        else:
            raise ValueError(
                f"attnc operator {name}: attention_mask has dtype {mask.dtype}; expected bool or float"
            )
        kv_valid = allowed[:, 0].any(dim=-2).expand(B, N)  # a key is real iff some query may see it
        if self.check_masks:
            i = torch.arange(M, device=mask.device)[:, None] + (N - M)  # the query's position among the keys
            j = torch.arange(N, device=mask.device)[None, :]
            pattern = j <= i
            if window is not None:
                pattern = pattern & (i - j < window)
            expected = pattern[None, None] & kv_valid[:, None, None, :]
            if not torch.equal(*torch.broadcast_tensors(allowed, expected)):  # per-head masks too
                raise ValueError(
                    f"attnc operator {name}: the model's attention mask is not the causal"
                    f"{' sliding-window' if window is not None else ''} pattern (bottom-right aligned: query "
                    "i is position i + N - M) plus key padding, so the operator cannot honour it (a packed "
                    "batch, a custom mask, or a static cache chunk?)"
                )
        out = kv_valid.to(device=device, dtype=torch.int32).contiguous()
        memo[memo_key] = out
        return out

    def _memo(self, mask: torch.Tensor) -> dict[tuple[int, int, int | None], torch.Tensor]:
        """The checked results for this mask tensor (dropped when it dies or changes in place)."""
        entry = self._masks.get(id(mask))
        if entry is None or entry[0]() is not mask or entry[1] != mask._version:
            for key in [key for key, (ref, _, _) in self._masks.items() if ref() is None]:
                del self._masks[key]
            entry = (weakref.ref(mask), mask._version, {})
            self._masks[id(mask)] = entry
        return entry[2]

    # ---- the probe ----------------------------------------------------------------------------------------

    def _probe(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scalars: dict[str, float],
        aux: dict[str, torch.Tensor],
        window: int | None,
        padded: bool,
    ) -> None:
        """Check, once per configuration, on small inputs and the reference backend, that the operator
        computes what transformers' mask and KV cache assume (see the module docstring)."""
        H, Hk, D, E = query.shape[1], key.shape[1], query.shape[-1], value.shape[-1]
        pkey = _ProbeKey(H, Hk, D, E, window, padded, tuple(sorted(scalars.items())))
        if pkey in self._probed:
            return
        op = self.operator
        B, N = 2, _PROBE_N
        gen = torch.Generator().manual_seed(0)
        f32 = torch.float32
        aux32 = {n: (t.detach().float() if t.is_floating_point() else t).cpu() for n, t in aux.items()}
        valid = torch.ones(B, N, dtype=torch.int32)
        if padded:
            valid[1, :3] = 0  # left padding on the second sequence
        fn = op.fn
        if padded:
            fn, param = op.padded()
            aux32[param] = valid

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extra: float) -> torch.Tensor:
            try:
                return fn(q, k, v, **aux32, **{**scalars, **extra}, backend="reference")
            except ValueError as err:
                raise ValueError(
                    f"attnc operator {op.name}: the transformers integration cannot call it on "
                    f"q {list(q.shape)}, k {list(k.shape)} ({err})"
                ) from None

        q = torch.randn(B, H, N, D, generator=gen, dtype=f32) * 0.1
        k = torch.randn(B, Hk, N, D, generator=gen, dtype=f32) * 0.1
        if op.gqa is False and Hk != H:
            k = k.repeat_interleave(H // Hk, dim=1)
        kv_heads = k.shape[1]

        # 1. Which keys each row attends: one-hot values (in chunks of E channels) reveal the support.
        windows = [window] if window is None else sorted({window, _PROBE_WINDOW})
        for w in windows:
            extra = {} if w is None else {self.window: w}
            rows = [N] if op.same_length else [N, *_PROBE_DECODE_M]
            for m in rows:
                support = torch.zeros(B, H, m, N, dtype=torch.bool)
                for c0 in range(0, N, E):
                    v = torch.zeros(B, kv_heads, N, E, dtype=f32)
                    idx = torch.arange(c0, min(c0 + E, N))
                    v[:, :, idx, idx - c0] = 1.0
                    o = run(q[:, :, N - m :], k, v, **extra)
                    support[..., idx] = o[..., : len(idx)].abs() > 0
                i = torch.arange(m)[:, None] + (N - m)
                j = torch.arange(N)[None, :]
                allowed = (j <= i)[None, None] & (valid[:, None, None, :] != 0)
                if w is not None:
                    allowed = allowed & (i - j < w)
                    if not torch.equal(support, allowed.expand_as(support)):
                        raise ValueError(
                            f"attnc operator {op.name}: with {self.window}={w} its mask is not transformers' "
                            f"causal sliding window of {w} (query at position p sees keys p-{w}+1..p, with "
                            f"{m} queries as the last of {N} keys); write mask = j <= i + N - M and "
                            f"i + N - M - j < {self.window}"
                        )
                elif bool((support & ~allowed).any()):
                    raise ValueError(
                        f"attnc operator {op.name}: it attends keys that transformers' causal mask excludes "
                        f"(with {m} queries as the last of {N} keys{', and padding' if padded else ''}); a "
                        "decoder needs mask = j <= i + N - M (bottom-right aligned) or narrower"
                    )
        # 2. Decoding: the last m rows of a full forward equal a call with only those m query rows.
        if not op.same_length:
            v = torch.randn(B, kv_heads, N, E, generator=gen, dtype=f32)
            q, k = q * 10, k * 10
            full = run(q, k, v)
            for m in _PROBE_DECODE_M:
                part = run(q[:, :, N - m :], k, v)
                if not torch.allclose(part, full[:, :, N - m :], atol=1e-5, rtol=1e-4):
                    raise ValueError(
                        f"attnc operator {op.name}: a call with the last {m} queries differs from the last "
                        f"rows of the full forward, so decoding with a KV cache would be wrong; write positions "
                        "bottom-right aligned (the query's position is i + N - M, e.g. ALiBi's "
                        "slopes[h] * (j - (i + N - M)))"
                    )
        self._probed.add(pkey)


def register(
    name: str,
    operator: Operator | Callable[..., torch.Tensor],
    *,
    tensors: Mapping[str, TensorSource] | None = None,
    scalars: Mapping[str, float] | None = None,
    backend: str | None = None,
    window: str | None = None,
    softcap: str | None = None,
    scale: str | None = None,
    check_masks: bool = True,
) -> AttentionFunction:
    """Register `operator` as transformers' attention implementation `name`.

    operator: an `Operator` (`Operator.from_spec`) or a bare generated function `mod.NAME` (which then
    cannot take padded batches, and without a `scale` scalar is taken to scale by D ** -0.5).
    tensors: the spec's auxiliary tensors by name, each a tensor or a function of the attention module
    (e.g. `lambda m: m.slopes`, gradients flow). scalars: fixed values of scalar parameters.
    backend: passed to every call (None: Triton on CUDA, reference elsewhere; "triton" on CPU runs the
    interpreter). window / softcap / scale: the spec's scalar parameters that take transformers'
    `sliding_window`, `softcap` and `scaling` (found by name or by the score when not given).
    check_masks: check each attention mask is causal + padding (one host synchronisation per forward).
    Returns the registered `AttentionFunction`."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "attnc.integrations.transformers needs transformers: pip install 'attnc[hf]'"
        ) from err
    op = operator if isinstance(operator, Operator) else Operator.from_function(operator)
    fn = AttentionFunction(
        op,
        tensors=tensors,
        scalars=scalars,
        backend=backend,
        window=window,
        softcap=softcap,
        scale=scale,
        check_masks=check_masks,
    )
    AttentionInterface.register(name, fn)
    # Without a mask function of its own, transformers hands a registered name no mask at all (padding would
    # be lost); sdpa's boolean [B, 1, M, N] mask, or None when plain causal, is what the function reads.
    AttentionMaskInterface.register(name, sdpa_mask)
    return fn


def register_spec(
    path_or_text: str | os.PathLike[str],
    name: str | None = None,
    attention: str | None = None,
    **options: Any,
) -> AttentionFunction:
    """Compile a spec (path or text; `attention` picks a block of a multi-block file) and register it as
    `name` (default `attnc_<block name>`). Options as for `register`."""
    op = Operator.from_spec(path_or_text, attention)
    return register(name or f"attnc_{op.name}", op, **options)
