"""Weight files read into a model: safetensors, or torch checkpoints read with `weights_only`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import ArtifactError
from ..io import regular_file

STATE_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")  # where trainers nest the weights


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a .pth/.pt/.bin checkpoint (unwrapped from a trainer's
    dict and DDP's `module.` prefix); never unpickles anything but tensors."""
    regular_file(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt or unsafe files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path} could not be read as a weights-only checkpoint: {first}") from None
        for key in STATE_KEYS:
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ArtifactError(f"{path} does not hold a state dict of tensors")
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise ArtifactError(f"{path}: unsupported checkpoint type {path.suffix!r}; use .safetensors, .pth or .pt")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load `state` into `model` strictly: every key, every shape, or one line naming the first misfit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ArtifactError(f"{where} does not match the model: missing keys {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
    for k, expected in own.items():
        if tuple(state[k].shape) != tuple(expected.shape):
            raise ArtifactError(f"{where}: {k} has shape {tuple(state[k].shape)} but the model "
                                f"expects {tuple(expected.shape)}")
    model.load_state_dict(state, strict=True)
