"""`Structure`: which heads and neurons each block keeps. JSON-able; what compaction consumes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import ArtifactError
from .io import read_json, write_json
from .models.adapter import ViTLayout
from .models.blocks import BlockShape, ShapedBlock


@dataclass
class BlockStructure(ShapedBlock):
    """The heads and neurons one block keeps (original numbering), out of those of its `shape`."""

    heads: list[int]
    neurons: list[int]
    shape: BlockShape

    @property
    def kept(self) -> BlockShape:
        return BlockShape(len(self.heads), self.head_dim, len(self.neurons))

    @property
    def removed_heads(self) -> list[int]:
        return sorted(set(range(self.num_heads)) - set(self.heads))

    @property
    def removed_neurons(self) -> list[int]:
        return sorted(set(range(self.hidden)) - set(self.neurons))


@dataclass
class Structure:
    """Per block the kept head indices and kept neuron indices (original numbering)."""

    embed_dim: int
    num_tokens: int
    blocks: list[BlockStructure] = field(default_factory=list)
    layout: ViTLayout | None = None  # the dense model's layout, for accounting

    def shape(self) -> list[BlockShape]:
        """Per block the kept shape: what the compact model's cost and latency depend on. Each
        unpacks as (kept heads, kept neurons)."""
        return [b.kept for b in self.blocks]

    @property
    def kept_heads(self) -> int:
        return sum(len(b.heads) for b in self.blocks)

    @property
    def total_heads(self) -> int:
        return sum(b.num_heads for b in self.blocks)

    @property
    def kept_neurons(self) -> int:
        return sum(len(b.neurons) for b in self.blocks)

    @property
    def total_neurons(self) -> int:
        return sum(b.hidden for b in self.blocks)

    def to_dict(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "num_tokens": self.num_tokens,
            "blocks": [
                {"heads": b.heads, "neurons": b.neurons, "num_heads": b.num_heads,
                 "hidden": b.hidden, "head_dim": b.head_dim}
                for b in self.blocks
            ],
            "layout": self.layout.to_dict() if self.layout is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Structure":
        try:
            blocks = [BlockStructure(list(map(int, b["heads"])), list(map(int, b["neurons"])),
                                     BlockShape(int(b["num_heads"]), int(b["head_dim"]), int(b["hidden"])))
                      for b in d["blocks"]]
            layout = ViTLayout.from_dict(d["layout"]) if d.get("layout") else None
            return cls(int(d["embed_dim"]), int(d["num_tokens"]), blocks, layout)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"structure JSON is missing or has a bad field: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Structure":
        return cls.from_dict(read_json(path))

    def summary(self) -> str:
        return (f"{self.kept_heads}/{self.total_heads} heads, "
                f"{self.kept_neurons}/{self.total_neurons} neurons kept")
