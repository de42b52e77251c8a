"""`attnc show-mask`: a picture of a mask and of the compiler's block-sparsity decisions.

The dense mask is drawn (visible pairs dark, masked pairs white, pairs that depend on tensor data grey), and
over it every tile is tinted by what the kernel does with it: skipped (never loaded), full (loaded, no mask
arithmetic) or partial (loaded, mask applied). The title gives the fraction of tiles visited. Masks larger
than the picture are pooled: a pixel's darkness is the fraction of visible pairs it covers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from attnc.dsl.analysis.tiles import (
    FULL,
    PARTIAL,
    SKIP,
    BindingError,
    bind,
    classify,
    mask_bounds,
    plan_tiles,
    visited_fraction,
)
from attnc.dsl.ir import Attention, Op, walk

DEFAULT_BLOCK = (64, 64)  # the Triton backend's default tile (BLOCK_M x BLOCK_N)
MAX_PAIRS = 1 << 28  # larger masks take too long to evaluate densely
MAX_PIXELS = 1024  # per side of the drawn mask; larger masks are pooled
_CHUNK_PAIRS = 1 << 22  # pairs evaluated at once

# Each pair is coloured by its tile's class: (visible pair, masked pair). A visible pair in a skipped tile
# would be a compiler bug: it is drawn in red.
COLORS = {
    FULL: ((0.09, 0.45, 0.20), (0.80, 0.93, 0.82)),
    PARTIAL: ((0.85, 0.40, 0.00), (1.00, 0.88, 0.70)),
    SKIP: ((0.90, 0.00, 0.00), (1.00, 1.00, 1.00)),
}
UNKNOWN = (0.55, 0.55, 0.55)  # depends on tensor data that show-mask does not have


def bindings(att: Attention, M: int, N: int, values: Mapping[str, int | float]) -> tuple[dict, dict]:
    """--shape M,N and --scalar NAME=VALUE as (sizes, scalars) for `dsl.analysis.tiles`. `values` may also
    set size symbols other than the query and key lengths. Raises BindingError for what does not fit."""
    if M < 1 or N < 1:
        raise BindingError(f"--shape needs M, N >= 1, got {M},{N}")
    sizes: dict[str, int] = {}
    for node, value, what in (
        (att.layout.q_len, M, "query length M"),
        (att.layout.kv_len, N, "key length N"),
    ):
        if node.op is Op.SIZE:
            name = str(node.attr)
            if sizes.get(name, value) != value:
                raise BindingError(
                    f"{att.name} uses {name} for both the query and the key length: --shape needs M == N"
                )
            sizes[name] = value
        elif node.op is Op.CONST and node.attr != value:
            raise BindingError(f"{att.name} fixes the {what} to {node.attr}, not {value}")
    size_names = {str(n.attr) for p in att.tensors for d in p.shape for n in walk([d]) if n.op is Op.SIZE}
    scalar_names = {p.name for p in att.scalars}
    scalars: dict[str, int | float] = {}
    for name, v in values.items():
        if name in sizes:
            raise BindingError(f"{name} is set by --shape")
        if name in scalar_names:
            scalars[name] = v
        elif name in size_names:
            if isinstance(v, float):
                raise BindingError(f"size {name} must be an integer, got {v}")
            sizes[name] = int(v)
        else:
            known = ", ".join(sorted(scalar_names | (size_names - set(sizes)))) or "none"
            raise BindingError(f"{att.name} has no scalar or size named '{name}' (known: {known})")
    return sizes, scalars


def _pooled_mask(
    att: Attention, sizes: dict, scalars: dict, aux: Mapping[str, np.ndarray] | None, M: int, N: int, f: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fractions of visible and of data-dependent pairs in each f x f block of the mask."""
    h, w = -(-M // f), -(-N // f)
    vis = np.zeros((h, w))
    unk = np.zeros((h, w))
    step = max(f, (_CHUNK_PAIRS // max(N, 1)) // f * f)
    for r0 in range(0, M, step):
        r1 = min(r0 + step, M)
        may, must = mask_bounds(att, sizes, scalars, aux, rows=(r0, r1))
        for src, dst in ((must, vis), (may & ~must, unk)):
            pad = np.zeros((-(-(r1 - r0) // f) * f, w * f))
            pad[: r1 - r0, :N] = src
            dst[r0 // f : r0 // f + pad.shape[0] // f] = pad.reshape(-1, f, w, f).mean(axis=(1, 3))
    return vis, unk


def _image(
    vis: np.ndarray, unk: np.ndarray, cls: np.ndarray, f: int, block_m: int, block_n: int
) -> np.ndarray:
    """RGB: each pixel mixes the colours of its tile's class by the fractions of visible, unknown and masked
    pairs it covers (the tile of a pooled pixel is the one holding its centre)."""
    h, w = vis.shape
    rows = np.minimum((np.arange(h) * f + f // 2) // block_m, cls.shape[0] - 1)
    cols = np.minimum((np.arange(w) * f + f // 2) // block_n, cls.shape[1] - 1)
    pixel_cls = cls[np.ix_(rows, cols)]
    on = np.zeros((h, w, 3))
    off = np.zeros((h, w, 3))
    for k, (c_on, c_off) in COLORS.items():
        sel = pixel_cls == k
        on[sel], off[sel] = c_on, c_off
    masked = np.clip(1.0 - vis - unk, 0.0, 1.0)
    rgb = vis[..., None] * on + unk[..., None] * np.asarray(UNKNOWN) + masked[..., None] * off
    return rgb, bool(np.any((pixel_cls == SKIP) & (vis > 0)))


def render_mask_png(
    att: Attention,
    M: int,
    N: int,
    scalars: Mapping[str, int | float],
    block_m: int,
    block_n: int,
    path: str | Path,
    *,
    aux: Mapping[str, np.ndarray] | None = None,
) -> str:
    """Draw `att`'s mask for M queries and N keys with the tile classification for block_m x block_n tiles,
    write a PNG to `path` and return a one-paragraph summary. `scalars` may also set size symbols the mask
    uses. A data-dependent mask whose tensors are not in `aux` is drawn as far as it is static."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if block_m < 1 or block_n < 1:
        raise BindingError(f"--block needs sizes >= 1, got {block_m},{block_n}")
    if M * N > MAX_PAIRS:
        raise BindingError(
            f"{M} x {N} is too large to draw (more than {MAX_PAIRS} pairs); use a smaller --shape"
        )
    sizes, scal = bindings(att, M, N, scalars)
    bound = bind(att, sizes, scal)  # checks names and fills the defaults
    plan = plan_tiles(att)
    cls = classify(att, plan, sizes, scal, block_m, block_n)
    nq, nk = cls.shape
    f = max(1, math.ceil(max(M, N) / MAX_PIXELS))
    vis, unk = _pooled_mask(att, sizes, scal, aux, M, N, f)
    static_only = bool(unk.any())
    image, skipped_visible = _image(vis, unk, cls, f, block_m, block_n)

    visited = int(np.count_nonzero(cls != SKIP))
    counts = {k: int(np.count_nonzero(cls == k)) for k in (FULL, PARTIAL, SKIP)}
    used = sorted({str(n.attr) for n in walk([att.mask])} if att.mask is not None else set())
    shown = {k: v for k, v in bound.scalars.items() if k in used}
    setting = ", ".join(f"{k}={v}" for k, v in shown.items())

    ratio = M / N
    width = 8.0
    height = min(max(width * ratio, 3.0), 10.0) + 1.2
    fig = Figure(figsize=(width, height), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    aspect = "equal" if 0.25 <= ratio <= 4 else "auto"
    ax.imshow(
        image, extent=(0, image.shape[1] * f, image.shape[0] * f, 0), interpolation="nearest", aspect=aspect
    )
    if max(nq, nk) <= 256:  # tile borders, while they stay readable
        lw = max(0.15, min(0.8, 24 / max(nq, nk)))
        segs = [((x, 0), (x, M)) for x in range(0, N + 1, block_n)]
        segs += [((0, y), (N, y)) for y in range(0, M + 1, block_m)]
        ax.add_collection(LineCollection(segs, colors=[(0.45, 0.45, 0.45, 0.6)], linewidths=lw))
    ax.set_xlim(0, N)
    ax.set_ylim(M, 0)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(
        f"{att.name}: {visited}/{cls.size} tiles visited ({visited_fraction(cls):.1%})\n"
        f"M={M}, N={N}, tiles {block_m}x{block_n}" + (f", {setting}" if setting else ""),
        fontsize=11,
    )
    handles = [
        Patch(facecolor=COLORS[FULL][0], label=f"full tile, no mask arithmetic ({counts[FULL]})"),
        Patch(facecolor=COLORS[PARTIAL][0], label=f"partial tile: visible pair ({counts[PARTIAL]})"),
        Patch(facecolor=COLORS[PARTIAL][1], label="partial tile: masked pair"),
        Patch(
            facecolor=COLORS[SKIP][1], edgecolor="0.5", label=f"skipped tile, never loaded ({counts[SKIP]})"
        ),
    ]
    if static_only:
        handles.append(Patch(facecolor=UNKNOWN, label="depends on tensor data"))
    if skipped_visible:  # cannot happen while the analysis is sound
        handles.append(Patch(facecolor=COLORS[SKIP][0], label="visible pair in a skipped tile (bug)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)

    lines = [
        f"{att.name}: {visited}/{cls.size} tiles visited ({visited_fraction(cls):.1%}): "
        f"{counts[FULL]} full, {counts[PARTIAL]} partial, {counts[SKIP]} skipped "
        f"(M={M}, N={N}, tiles {block_m}x{block_n}{', ' + setting if setting else ''}) -> {path}"
    ]
    if static_only:
        reads = sorted({str(n.attr) for n in walk([att.mask]) if n.op is Op.LOAD}) if att.mask else []
        lines.append(
            f"note: the mask reads {', '.join(reads)}, which show-mask does not have: drawn is its static part "
            f"(grey: depends on the data); tiles are classified from the conditions without loads, and a "
            f"runtime pre-pass can skip more"
        )
    return "\n".join(lines)
