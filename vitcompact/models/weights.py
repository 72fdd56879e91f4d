"""Weight files read into a model: safetensors, or torch checkpoints read with `weights_only`."""

from __future__ import annotations

import re
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
            raise ArtifactError(f"{path} could not be read as a weights-only checkpoint: {_why(e)}") from None
        for key in STATE_KEYS:
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ArtifactError(f"{path} does not hold a state dict of tensors")
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise ArtifactError(f"{path}: unsupported checkpoint type {path.suffix!r}; use .safetensors, .pth or .pt")


def _why(error: Exception) -> str:
    """Why torch would not read a checkpoint, in one line. Its refusal of a pickled object advises
    `weights_only=False`, which vitcompact never passes: name the blocked global instead."""
    blocked = re.search(r"GLOBAL ([\w.]+)", str(error))
    if blocked is not None:
        return (f"it holds the Python object {blocked.group(1)}, which loading would run; vitcompact reads "
                "tensors only: save the model's state_dict (or .safetensors) instead")
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_values(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: Path) -> None:
    """Floating-point weights where the model has them (an int or bool tensor would be cast, bools
    to 0/1, without a word), and finite ones."""
    for k, expected in own.items():
        if not expected.is_floating_point():
            continue
        if not state[k].is_floating_point():
            raise ArtifactError(f"{where}: {k} holds {str(state[k].dtype).removeprefix('torch.')} values, not "
                                "floating-point weights; this is not a checkpoint of the model's weights")
        if not torch.isfinite(state[k]).all():
            bad = "NaN" if torch.isnan(state[k]).any() else "infinite values"
            raise ArtifactError(f"{where}: {k} holds {bad}; the checkpoint is damaged (a diverged run saves "
                                "such weights): use an earlier one")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load `state` into `model` strictly: every key, every shape, floating-point and finite values,
    or one line naming the first misfit."""
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
    _check_values(state, own, where)
    model.load_state_dict(state, strict=True)
