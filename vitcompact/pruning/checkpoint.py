"""Per-state checkpoints of the pruning loop: safetensors for tensors, JSON for the rest.

A state's folder is finished once its `state.json` exists; it is written last, so a run killed
mid-write leaves a folder that `last_finished` ignores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import ArtifactError
from ..io import ensure_dir, read_json, regular_file, write_json, write_tensors
from ..masks import PruneMasks

CHECKPOINTS = "checkpoints"


def state_dir(out_dir: Path, state: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"state_{state:03d}"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    regular_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_split_optimizer`: an optimizer state_dict to load."""
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def load_optimizer(out_dir: Path, state: int) -> dict[str, Any] | None:
    """The optimiser state a finished state saved, or None when that state trained nothing."""
    folder = state_dir(out_dir, state)
    rest = read_json(folder / "state.json").get("optimizer")
    return None if rest is None else _join_optimizer(load_tensors(folder / "optimizer.safetensors"), rest)


def save_state(out_dir: Path, state: int, model: nn.Module, element: PruneMasks, hard: PruneMasks,
               optimizer_state: dict[str, Any] | None, info: dict[str, Any]) -> Path:
    """Write one finished state: weights, both masks, optimiser, and `info` (RNG, λ, metrics)."""
    folder = ensure_dir(state_dir(out_dir, state))
    write_tensors(folder / "model.safetensors", model.state_dict())
    element.save(folder / "element_masks.safetensors")
    hard.save(folder / "masks.safetensors")
    optimizer_json = None
    if optimizer_state is not None:
        tensors, optimizer_json = _split_optimizer(optimizer_state)
        write_tensors(folder / "optimizer.safetensors", tensors)
    write_json(folder / "state.json", {**info, "state": state, "optimizer": optimizer_json})
    return folder


def last_finished(out_dir: Path) -> int | None:
    """Index of the last state whose checkpoint is complete, or None."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [int(p.name.split("_")[1]) for p in root.glob("state_*") if (p / "state.json").is_file()]
    return max(done) if done else None


def load_state(out_dir: Path, state: int, model: nn.Module) -> tuple[PruneMasks, PruneMasks, dict[str, Any]]:
    """Load a state's weights into `model` (copied, never aliased); return (element, hard, info)."""
    folder = state_dir(out_dir, state)
    weights = load_tensors(folder / "model.safetensors")
    own = model.state_dict()
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise ArtifactError(f"{folder} was written for a different model; resume with the same model")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(weights[k])
    info = read_json(folder / "state.json")
    return (PruneMasks.load(folder / "element_masks.safetensors"),
            PruneMasks.load(folder / "masks.safetensors"), info)
