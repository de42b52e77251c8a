"""Which global positions each rank holds: the contiguous and zigzag layouts of a sharded sequence.

A sequence of N positions over R ranks is cut into chunks. `contiguous`: R chunks of N / R, rank r holds
chunk r. `zigzag`: 2R chunks of N / 2R, rank r holds chunks r and 2R - 1 - r (in that order), which balances
causal-like masks: every rank then holds one early and one late chunk (Brandon et al., 2023, "Striped
attention", and the zigzag layout of ring-flash-attention). A rank's local tensor is its chunks
concatenated along the sequence axis.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Option(enum.Enum):
    """A typed option given as its member or its string value; a bad value names the choices."""

    @classmethod
    def parse(cls, value: object):  # type: ignore[no-untyped-def]
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            name = cls.__name__.lower()
            raise ValueError(
                f"{name}={value!r}: expected one of {', '.join(repr(m.value) for m in cls)}"
            ) from None


class Layout(Option):
    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


@dataclass(frozen=True)
class Chunk:
    """Global positions [start, start + length) held at local rows [local, local + length)."""

    start: int
    length: int
    local: int

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Sharding:
    """A sequence of `total` positions over `world` ranks in `layout`; `shard` positions per rank."""

    layout: Layout
    world: int
    shard: int

    @property
    def total(self) -> int:
        return self.shard * self.world

    @property
    def pieces(self) -> int:
        """Chunks per rank."""
        return 2 if self.layout is Layout.ZIGZAG else 1

    def chunks(self, rank: int) -> tuple[Chunk, ...]:
        """The chunks rank `rank` holds, in local order."""
        if self.layout is Layout.CONTIGUOUS:
            return (Chunk(rank * self.shard, self.shard, 0),)
        c = self.shard // 2
        return (Chunk(rank * c, c, 0), Chunk((2 * self.world - 1 - rank) * c, c, c))

    def positions(self, rank: int) -> torch.Tensor:
        """The global positions of rank's local rows (int64)."""
        return torch.cat([torch.arange(c.start, c.stop) for c in self.chunks(rank)])

    def order(self) -> torch.Tensor:
        """For the rank-major concatenation of all shards, the global position of each row: gathering a
        sequence-sharded tensor and indexing with `inverse_order()` gives it in global order."""
        return torch.cat([self.positions(r) for r in range(self.world)])

    def inverse_order(self) -> torch.Tensor:
        return torch.argsort(self.order())


def sharding_for(layout: Layout | str, world: int, shard: int) -> Sharding:
    """The sharding of a sequence whose every rank holds `shard` rows; zigzag needs an even shard."""
    lay = Layout.parse(layout)
    if lay is Layout.ZIGZAG and shard % 2:
        raise ValueError(
            f"layout='zigzag' cuts each rank's {shard} positions into two equal chunks: the shard length must be even"
        )
    return Sharding(lay, world, shard)


def shard(t: torch.Tensor, dim: int, sharding: Sharding, rank: int) -> torch.Tensor:
    """Rank's shard of a full-sequence tensor `t` along `dim` (for tests, examples and data loaders)."""
    idx = sharding.positions(rank).to(t.device)
    return t.index_select(dim, idx)


def unshard(parts: list[torch.Tensor], dim: int, sharding: Sharding) -> torch.Tensor:
    """The full-sequence tensor from every rank's shard (rank order) along `dim`."""
    cat = torch.cat(parts, dim=dim)
    return cat.index_select(dim, sharding.inverse_order().to(cat.device))
