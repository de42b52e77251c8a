"""The model zoo: attention variants of the literature as attnc specs, layers and small models.

```python
from attnc import zoo

zoo.list()                       # ['agent', 'alibi', ...]
layer = zoo.get("alibi")(dim=256, heads=8, kv_heads=2)   # an nn.Module backed by generated kernels
zoo.variant("alibi").spec_file   # zoo/specs/alibi.attn (also .family, .paper, .layer)
```

Each variant's operator is generated from `zoo/specs/<spec>.attn` at first use, through the on-disk cache
of `codegen.compile_file` (see `zoo.ops`). See docs/zoo.md.
"""

from __future__ import annotations

import builtins

from torch import nn

from .registry import BLOCKED, VARIANTS, Family, Use, Variant

_BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}


def list(family: Family | str | None = None) -> builtins.list[str]:
    """The variant names, sorted (optionally only one family's)."""
    fam = None if family is None else Family(family)
    return sorted(v.name for v in VARIANTS if fam in (None, v.family))


def variant(name: str) -> Variant:
    """The catalogue entry of `name` (family, paper, spec file, layer class)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _BY_NAME, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"no zoo variant {name!r}{hint}; zoo.list() names them") from None


def get(name: str) -> type[nn.Module]:
    """The layer class of variant `name`."""
    return variant(name).layer


__all__ = ["BLOCKED", "VARIANTS", "Family", "Use", "Variant", "get", "list", "variant"]
