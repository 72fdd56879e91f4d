"""`PruneMasks`: a 0/1 mask for every prunable weight (qkv, proj, fc1, fc2 of each block)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import ArtifactError, MaskError
from .io import regular_file, write_tensors
from .models.adapter import BlockLayout, ViTLayout, prunable_weights, unit_weights, vit_layout
from .structure import BlockStructure, Structure


@dataclass
class UnitState:
    """Per unit (head or neuron) of one block: whether its incoming / outgoing weights are all kept
    or all removed. A unit whose incoming or outgoing part is mixed is not quasi-structured."""

    in_ones: torch.Tensor
    in_zeros: torch.Tensor
    out_ones: torch.Tensor
    out_zeros: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        return self.in_ones & self.out_ones

    @property
    def whole(self) -> torch.Tensor:
        """Units that are all kept or all removed across every one of their weights."""
        return self.kept | (self.in_zeros & self.out_zeros)

    @property
    def mixed(self) -> torch.Tensor:
        return ~(self.in_ones | self.in_zeros) | ~(self.out_ones | self.out_zeros)


def head_view(name: str, t: torch.Tensor, block: BlockLayout) -> torch.Tensor:
    """Reshape a qkv ([3A, D]) or proj ([D, A]) tensor so dim 1 indexes heads."""
    if name.endswith("qkv.weight"):
        return t.reshape(3, block.num_heads, block.head_dim, -1)
    return t.reshape(t.shape[0], block.num_heads, block.head_dim)


def per_head(name: str, t: torch.Tensor, block: BlockLayout) -> torch.Tensor:
    """Sum a qkv or proj tensor over each head's weights: one value per head."""
    v = head_view(name, t, block)
    return v.sum(dim=(0, 2, 3)) if name.endswith("qkv.weight") else v.sum(dim=(0, 2))


def per_neuron(name: str, t: torch.Tensor) -> torch.Tensor:
    """Sum an fc1 ([H, D]) or fc2 ([D, H]) tensor over each neuron's weights."""
    return t.sum(dim=1 if name.endswith("fc1.weight") else 0)


def per_unit(name: str, t: torch.Tensor, block: BlockLayout) -> torch.Tensor:
    """Sum over each unit's weights, heads for attention tensors and neurons for MLP tensors."""
    if ".attn." in name:
        return per_head(name, t, block)
    return per_neuron(name, t)


def _all_per_unit(name: str, m: torch.Tensor, block: BlockLayout) -> torch.Tensor:
    return per_unit(name, (~m).to(torch.int32), block) == 0


def _first_mixed(block: BlockLayout, states: tuple[UnitState | None, UnitState | None]) -> str | None:
    for unit, state in zip(("head", "neuron"), states):
        if state is not None and not bool(state.whole.all()):
            return f"block {block.index} {unit} {int((~state.whole).nonzero()[0])}"
    return None


class PruneMasks:
    """Element masks for the prunable weights of one model, with its layout.

    Masks are bool tensors keyed by parameter name (`blocks.3.attn.qkv.weight`). Quasi-structured
    masks keep or remove whole heads and neurons; `structure()` reads them out.
    """

    def __init__(self, masks: dict[str, torch.Tensor], layout: ViTLayout):
        self.masks = {k: v.bool() for k, v in masks.items()}
        self.layout = layout
        expected = layout.weight_names()
        if sorted(self.masks) != sorted(expected):
            missing = sorted(set(expected) - set(self.masks))
            extra = sorted(set(self.masks) - set(expected))
            raise MaskError(f"masks do not match the model's prunable weights "
                            f"(missing: {missing[:3]}, unexpected: {extra[:3]})")

    @classmethod
    def ones(cls, model: nn.Module) -> "PruneMasks":
        layout = vit_layout(model)
        weights = prunable_weights(model, layout)
        return cls({n: torch.ones_like(p, dtype=torch.bool) for n, p in weights.items()}, layout)

    @classmethod
    def from_weights(cls, model: nn.Module) -> "PruneMasks":
        """Masks of the nonzero weights: what an already-pruned model says about itself."""
        layout = vit_layout(model)
        weights = prunable_weights(model, layout)
        return cls({n: p.detach() != 0 for n, p in weights.items()}, layout)

    def clone(self) -> "PruneMasks":
        return PruneMasks({k: v.clone() for k, v in self.masks.items()}, self.layout)

    def to(self, device: torch.device | str) -> "PruneMasks":
        return PruneMasks({k: v.to(device) for k, v in self.masks.items()}, self.layout)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PruneMasks) or sorted(self.masks) != sorted(other.masks):
            return False
        return all(torch.equal(self.masks[k].cpu(), other.masks[k].cpu()) for k in self.masks)

    def block_masks(self, block: BlockLayout) -> dict[str, torch.Tensor]:
        return {n: self.masks[n] for n in block.weight_names()}

    def check_model(self, model: nn.Module) -> None:
        """Raise MaskError unless these masks fit the model's prunable weights name for name."""
        weights = prunable_weights(model)
        if sorted(weights) != sorted(self.masks):
            missing = sorted(set(weights) - set(self.masks))
            extra = sorted(set(self.masks) - set(weights))
            raise MaskError(f"masks do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, p in weights.items():
            if tuple(p.shape) != tuple(self.masks[name].shape):
                raise MaskError(f"mask {name} has shape {tuple(self.masks[name].shape)} but the "
                                f"model's weight has shape {tuple(p.shape)}")

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero the masked weights of `model` in place."""
        self.check_model(model)
        for b in self.layout.blocks:
            for name, p in unit_weights(model, b).items():
                p.mul_(self.masks[name].to(device=p.device, dtype=p.dtype))
        return model

    def unit_states(self, block: BlockLayout) -> tuple[UnitState | None, UnitState | None]:
        """(heads, neurons) states of one block; None for a branch the block no longer has."""
        states: list[UnitState | None] = []
        for kind, (n_in, n_out) in (("attn", ("attn.qkv.weight", "attn.proj.weight")),
                                    ("mlp", ("mlp.fc1.weight", "mlp.fc2.weight"))):
            n_in, n_out = f"{block.name}.{n_in}", f"{block.name}.{n_out}"
            if n_in not in self.masks:
                states.append(None)
                continue
            m_in, m_out = self.masks[n_in], self.masks[n_out]
            states.append(UnitState(_all_per_unit(n_in, m_in, block), _all_per_unit(n_in, ~m_in, block),
                                    _all_per_unit(n_out, m_out, block), _all_per_unit(n_out, ~m_out, block)))
        return states[0], states[1]

    def first_mixed_unit(self) -> str | None:
        """Name of the first unit whose weights are partly kept, or None when quasi-structured."""
        for block in self.layout.blocks:
            mixed = _first_mixed(block, self.unit_states(block))
            if mixed is not None:
                return mixed
        return None

    def is_quasi_structured(self) -> bool:
        return self.first_mixed_unit() is None

    def structure(self) -> Structure:
        """Kept heads and neurons per block; MaskError when the masks are not quasi-structured."""
        blocks = []
        for block in self.layout.blocks:
            heads, neurons = self.unit_states(block)
            mixed = _first_mixed(block, (heads, neurons))
            if mixed is not None:
                raise MaskError(f"masks are not quasi-structured: {mixed} is partly masked; "
                                "run regroup() first")
            blocks.append(BlockStructure(
                heads=heads.kept.nonzero().flatten().tolist() if heads is not None else [],
                neurons=neurons.kept.nonzero().flatten().tolist() if neurons is not None else [],
                shape=block.shape))
        return Structure(self.layout.embed_dim, self.layout.num_tokens, blocks, self.layout)

    def sparsity(self) -> dict[str, dict[str, int]]:
        """Total and pruned weight counts for attention, MLP and all prunable weights."""
        out = {k: {"total": 0, "pruned": 0} for k in ("attention", "mlp", "all")}
        for name, m in self.masks.items():
            kind = "attention" if ".attn." in name else "mlp"
            pruned = int((~m).sum())
            for k in (kind, "all"):
                out[k]["total"] += m.numel()
                out[k]["pruned"] += pruned
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write masks as safetensors (uint8) with the layout in the metadata, atomically."""
        tensors = {k: v.to(torch.uint8) for k, v in self.masks.items()}
        write_tensors(path, tensors, metadata={"vitcompact_layout": json.dumps(self.layout.to_dict())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruneMasks":
        from safetensors import safe_open

        path = os.fspath(regular_file(path))
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"{path} is not a readable safetensors mask file: {e}") from None
        if "vitcompact_layout" not in meta:
            raise ArtifactError(f"{path} has no vitcompact layout metadata; it is not a mask file")
        return cls(tensors, ViTLayout.from_dict(json.loads(meta["vitcompact_layout"])))
