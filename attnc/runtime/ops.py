"""torch.library: every attention block is a custom op (with a fake implementation and an autograd
formula), so that torch.compile(fullgraph=True) traces models calling it without looking inside."""

from __future__ import annotations

import hashlib

import torch


def _lse_dtype(q):
    return torch.float64 if q.dtype is torch.float64 else torch.float32


def _custom_op(name, impl, fake, key, file, schema=None):
    """Register `attnc::<name>_<key>_<file hash>` once per process. `key` hashes the spec and the compiler
    (the module's `_OP_KEY`) and `file` is the module's path, so two generated files, or two specs written to
    one path in turn, never share an op, while the same file loaded twice reuses the first registration.
    `schema`: the op's schema (None: inferred from `impl`'s annotations). Returns the op and whether it is
    new."""
    where = hashlib.sha256(str(file).encode()).hexdigest()[:8]
    name = f"{name}_{key}_{where}"
    existing = getattr(torch.ops.attnc, name, None) if _attnc_ns_exists() else None
    if existing is not None:
        return existing, False
    op = torch.library.custom_op(f"attnc::{name}", mutates_args=(), schema=schema)(impl)
    op.register_fake(fake)
    return op, True


def _attnc_ns_exists():
    try:
        torch.ops.attnc  # noqa: B018 - the namespace object is created on first registration
    except (AttributeError, RuntimeError):
        return False
    return True


# The dispatch keys a custom op's implementation runs below: the autograd keys (and ADInplaceOrView).
_AUTOGRAD_KEYS = tuple(
    k
    for k in torch._C.DispatchKey.__members__.values()
    if k.name.startswith("Autograd") or k.name == "ADInplaceOrView"
)


def _with_autograd(fn):
    """Run `fn` with autograd available, on this thread. A custom op's implementation runs below the autograd
    dispatch keys (they sit in the thread-local exclude set), so lift them for `fn` and enable grad mode: the
    reentrant backward that torch.utils.checkpoint also runs. Not a helper thread: under a CUDA backward the
    caller is the autograd engine's device thread, which the helper's autograd.grad would queue its CUDA work
    to while that thread waits for the helper (a deadlock, seen on an H200)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        if exclude.has(key):
            exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        return fn()


def _grad(outputs, inputs, grad_outputs):
    """torch.autograd.grad over the outputs that depend on any input: a score without dot(q, k) makes the LSE
    a constant, and an empty N or M makes o one, and torch refuses outputs outside the graph. The inputs
    such outputs do not reach get None (zeros, in the caller)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    if not pairs:
        return (None,) * len(inputs)
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
