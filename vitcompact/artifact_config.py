"""An artifact's `config.json`, read and checked field by field before any module is built.

The file may have been edited by hand or by an attacker, so nothing in it is trusted: every field
has its type and range checked, the model it describes is built on the meta device (shapes only,
no memory) and compared with the tensor shapes in the safetensors header (read without loading
the weights). A mismatch is refused in one line that names the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .accounting import count
from .errors import ArtifactError, ConfigError
from .io import read_json, regular_file
from .models.adapter import input_size, vit_layout
from .models.args import check_model_args
from .models.blocks import CompactBlock
from .models.preprocess import CROP_MODES, INTERPOLATIONS
from .models.token_merge import TokenMergeConfig, check_token_merge
from .validate import field_types, finite, flag, in_range, integer

FORMAT_VERSION = 1
COUNT_KEYS = ("params", "macs", "heads", "neurons", "other_params", "other_macs")
BLOCK_COUNT_KEYS = ("index", "heads", "neurons", "params", "macs")


@dataclass
class ArtifactConfig:
    """The parts of `config.json` that rebuild the model, checked."""

    architecture: str
    model_args: dict[str, Any]
    preset: str | None
    blocks: list[dict[str, Any]] | None  # per block num_heads, hidden, proj_bias, fc2_bias (`compact_blocks`)
    structure: dict[str, Any] | None
    dense: dict[str, Any] | None     # accounting of the dense model (what inspect compares with)
    compact: dict[str, Any] | None   # accounting of this model, as saved
    data: dict[str, Any]  # num_classes, img_size, in_chans, mean, std (+ preprocessing) as `save` wrote them
    token_merge: TokenMergeConfig | None = None  # the model's token merging; absent: none


def _dict(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be an object, got {type(value).__name__}")
    return value


def _list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list, got {type(value).__name__}")
    return value


def _text(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _field(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ConfigError(f"{where}{key} is missing")
    return obj[key]


def _block(name: str, raw: Any) -> dict[str, Any]:
    raw = _dict(name, raw)
    keys = ("num_heads", "hidden", "proj_bias", "fc2_bias")
    extra = sorted(set(raw) - set(keys))
    if extra:
        raise ConfigError(f"{name} has unknown field(s) {', '.join(extra)}")
    return {"num_heads": integer(f"{name}.num_heads", _field(raw, "num_heads", f"{name}.")),
            "hidden": integer(f"{name}.hidden", _field(raw, "hidden", f"{name}.")),
            "proj_bias": flag(f"{name}.proj_bias", _field(raw, "proj_bias", f"{name}.")),
            "fc2_bias": flag(f"{name}.fc2_bias", _field(raw, "fc2_bias", f"{name}."))}


def _count(name: str, raw: Any) -> dict[str, Any]:
    raw = _dict(name, raw)
    for key in COUNT_KEYS:
        integer(f"{name}.{key}", _field(raw, key, f"{name}."), 0)
    for i, block in enumerate(_list(f"{name}.blocks", _field(raw, "blocks", f"{name}."))):
        block = _dict(f"{name}.blocks[{i}]", block)
        for key in BLOCK_COUNT_KEYS:
            integer(f"{name}.blocks[{i}].{key}", _field(block, key, f"{name}.blocks[{i}]."), 0)
    return raw


def _data(raw: dict[str, Any]) -> dict[str, Any]:
    num_classes = integer("num_classes", _field(raw, "num_classes", ""), 0)
    img_size = _list("img_size", _field(raw, "img_size", ""))
    if len(img_size) != 2:
        raise ConfigError(f"img_size must be [height, width], got {img_size!r}")
    img_size = [integer(f"img_size[{i}]", v, 1) for i, v in enumerate(img_size)]
    in_chans = integer("in_chans", _field(raw, "in_chans", ""), 1)
    stats = {}
    for key in ("mean", "std"):
        values = _list(key, _field(raw, key, ""))
        if len(values) != in_chans:
            raise ConfigError(f"{key} must hold one value per input channel ({in_chans}), got {len(values)}")
        stats[key] = [finite(f"{key}[{i}]", v) for i, v in enumerate(values)]
    if any(s <= 0 for s in stats["std"]):
        raise ConfigError(f"std values must be > 0, got {stats['std']}")
    return {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans, **stats, **_preprocessing(raw)}


def _preprocessing(raw: dict[str, Any]) -> dict[str, Any]:
    """The optional timm-style preprocessing keys; an artifact without `crop_pct` does not know its
    preprocessing (written before vitcompact recorded it, or by a model that never saw data)."""
    found = {}
    for key, choices in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        if key in raw:
            if raw[key] not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {raw[key]!r}")
            found[key] = raw[key]
    if "crop_pct" in raw:
        found["crop_pct"] = in_range("crop_pct", raw["crop_pct"], 0.0, 1.0, low_open=True)
    return found


def _parse(raw: Any) -> ArtifactConfig:
    raw = _dict("the file", raw)
    architecture = _text("architecture", _field(raw, "architecture", ""))
    model_args = check_model_args(dict(_dict("model_args", _field(raw, "model_args", ""))), "model_args.")
    section = _dict("vitcompact", _field(raw, "vitcompact", ""))
    version = _field(section, "format_version", "vitcompact.")
    if integer("vitcompact.format_version", version, 1) != FORMAT_VERSION:
        raise ConfigError(f"vitcompact.format_version is {version}, but this vitcompact reads format "
                          f"{FORMAT_VERSION} only; upgrade vitcompact or re-save the model")
    _text("vitcompact.version", section.get("version"), optional=True)
    preset = _text("vitcompact.preset", section.get("preset"), optional=True)
    blocks = section.get("blocks")
    if blocks is not None:
        blocks = [_block(f"vitcompact.blocks[{i}]", b)
                  for i, b in enumerate(_list("vitcompact.blocks", blocks))]
    structure = section.get("structure")
    if structure is not None:
        structure = _dict("vitcompact.structure", structure)
    accounting = _dict("vitcompact.accounting", section.get("accounting") or {})
    dense = accounting.get("dense")
    if dense is not None:
        dense = _count("vitcompact.accounting.dense", dense)
    compact = accounting.get("compact")
    if compact is not None:
        compact = _count("vitcompact.accounting.compact", compact)
    if section.get("provenance") is not None:
        _dict("vitcompact.provenance", section["provenance"])
    return ArtifactConfig(architecture, model_args, preset, blocks, structure, dense, compact, _data(raw),
                          _token_merge(section.get("token_merge")))


def _token_merge(raw: Any) -> TokenMergeConfig | None:
    """`vitcompact.token_merge`: written only for a model that merges tokens (`TokenMergeConfig`'s fields)."""
    if raw is None:
        return None
    raw = _dict("vitcompact.token_merge", raw)
    try:
        return TokenMergeConfig(**field_types(TokenMergeConfig, raw))
    except ConfigError as e:
        raise ConfigError(f"vitcompact.token_merge: {e}") from None


def read_config(path: Path) -> ArtifactConfig:
    """Parse and check `config.json` on its own (types and ranges)."""
    try:
        return _parse(read_json(path))
    except ConfigError as e:
        raise ArtifactError(f"{path}: {e}") from None


def _indices(name: str, value: Any, limit: int) -> list[int]:
    values = [integer(f"{name}[{i}]", v, 0, limit - 1) for i, v in enumerate(_list(name, value))]
    if values != sorted(set(values)):
        raise ConfigError(f"{name} must be increasing without repeats")
    return values


def _check_structure(structure: dict[str, Any], dense: nn.Module, compact: list[dict[str, Any]] | None) -> None:
    """The kept heads and neurons: indices within the model that was pruned, as many as kept."""
    layout = vit_layout(dense)
    blocks = _list("vitcompact.structure.blocks", _field(structure, "blocks", "vitcompact.structure."))
    if len(blocks) != len(layout.blocks):
        raise ConfigError(f"vitcompact.structure.blocks has {len(blocks)} entries for "
                          f"{len(layout.blocks)} blocks")
    integer("vitcompact.structure.embed_dim", _field(structure, "embed_dim", "vitcompact.structure."),
            layout.embed_dim, layout.embed_dim)
    integer("vitcompact.structure.num_tokens", _field(structure, "num_tokens", "vitcompact.structure."),
            layout.num_tokens, layout.num_tokens)
    if structure.get("layout") is not None:
        _dict("vitcompact.structure.layout", structure["layout"])
    for i, (raw, block) in enumerate(zip(blocks, layout.blocks)):
        name = f"vitcompact.structure.blocks[{i}]"
        raw = _dict(name, raw)
        num_heads = integer(f"{name}.num_heads", _field(raw, "num_heads", f"{name}."), 0, block.num_heads)
        hidden = integer(f"{name}.hidden", _field(raw, "hidden", f"{name}."), 0, block.hidden)
        integer(f"{name}.head_dim", _field(raw, "head_dim", f"{name}."), block.head_dim, block.head_dim)
        heads = _indices(f"{name}.heads", _field(raw, "heads", f"{name}."), num_heads)
        neurons = _indices(f"{name}.neurons", _field(raw, "neurons", f"{name}."), hidden)
        if compact is not None and (len(heads), len(neurons)) != (compact[i]["num_heads"], compact[i]["hidden"]):
            raise ConfigError(f"{name} keeps {len(heads)} heads and {len(neurons)} neurons but "
                              f"vitcompact.blocks[{i}] has {compact[i]['num_heads']} and {compact[i]['hidden']}")


def check_against(config: ArtifactConfig, dense: nn.Module, path: Path) -> None:
    """The fields that only make sense against the model the config describes (`dense`, a meta
    skeleton built from architecture and model_args): data config, compact blocks within the dense
    sizes, the structure, the accounting's block count and the token merging at the model's input size."""
    try:
        data = config.data
        in_chans, *img_size = input_size(dense)
        for key, value in (("num_classes", dense.num_classes), ("in_chans", in_chans), ("img_size", img_size)):
            if data[key] != value:
                raise ConfigError(f"{key} is {data[key]} but model_args build a model with {value}")
        depth = len(dense.blocks)
        if config.blocks is not None:
            if len(config.blocks) != depth:
                raise ConfigError(f"vitcompact.blocks has {len(config.blocks)} entries but model_args "
                                  f"give depth {depth}")
            for i, (entry, block) in enumerate(zip(config.blocks, vit_layout(dense).blocks)):
                integer(f"vitcompact.blocks[{i}].num_heads", entry["num_heads"], 0, block.num_heads,
                        note="at most the dense block's heads")
                integer(f"vitcompact.blocks[{i}].hidden", entry["hidden"], 0, block.hidden,
                        note="at most the dense block's MLP width")
        if config.structure is not None:
            _check_structure(config.structure, dense, config.blocks)
        if config.dense is not None and len(config.dense["blocks"]) != depth:
            raise ConfigError(f"vitcompact.accounting.dense.blocks has {len(config.dense['blocks'])} "
                              f"entries for {depth} blocks")
        if config.token_merge is not None:
            try:
                check_token_merge(dense, config.token_merge)
            except ConfigError as e:
                raise ConfigError(f"vitcompact.token_merge does not fit the model ({img_size[0]}x{img_size[1]} "
                                  f"input): {e}") from None
    except ConfigError as e:
        raise ArtifactError(f"{path}: {e}") from None


def compact_blocks(config: ArtifactConfig, dense: nn.Module) -> tuple[CompactBlock, ...] | None:
    """The compact blocks `vitcompact.blocks` describes (checked by `check_against` first), with the
    head size of the dense model they were cut from; None for a dense model."""
    if config.blocks is None:
        return None
    return tuple(CompactBlock.from_dict(entry, block.head_dim)
                 for entry, block in zip(config.blocks, vit_layout(dense).blocks))


def check_accounting(config: ArtifactConfig, model: nn.Module, path: Path) -> None:
    """The saved accounting of the model must be that of the model the config builds (`model`, a
    meta skeleton with the compact blocks applied): heads and neurons that the weights' shapes cannot
    show (e.g. `num_heads` of a dense model) are caught here."""
    if config.compact is None:
        return
    counted = count(model).to_dict()
    for key in ("heads", "neurons", "params", "macs"):
        if config.compact[key] != counted[key]:
            raise ArtifactError(f"{path}: vitcompact.accounting.compact.{key} is {config.compact[key]} but "
                                f"the model that model_args and vitcompact.blocks describe has {counted[key]}")


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, from its header alone."""
    regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None


def _field_of(key: str, compact: bool) -> str:
    """The config field that decides the shape of the tensor `key`."""
    block = re.match(r"blocks\.(\d+)\.(attn|mlp|norm1|norm2)\.(\w+)", key)
    if block and compact:
        i, branch, part = block.groups()
        attn = branch in ("attn", "norm1")
        if part == "value" or (part in ("proj", "fc2") and key.endswith(".bias")):
            return f"vitcompact.blocks[{i}].{'proj_bias' if attn else 'fc2_bias'}"
        return f"vitcompact.blocks[{i}].{'num_heads' if attn else 'hidden'}"
    for prefix, field in (("blocks.", "model_args (embed_dim, num_heads, mlp_ratio, depth)"),
                          ("head", "model_args.num_classes"), ("pos_embed", "model_args.img_size / patch_size"),
                          ("cls_token", "model_args.embed_dim"), ("reg_token", "model_args.reg_tokens / embed_dim"),
                          ("norm", "model_args.embed_dim"),
                          ("patch_embed", "model_args.patch_size / in_chans / embed_dim")):
        if key.startswith(prefix):
            return field
    return "model_args"


def match_weights(model: nn.Module, shapes: dict[str, tuple[int, ...]], weights: Path, compact: bool) -> None:
    """Refuse weights whose names or shapes differ from those of `model` (a meta skeleton)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ArtifactError(f"{weights} does not match config.json: missing keys {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''} (see {_field_of(key, compact)})")
    for key, expected in own.items():
        if shapes[key] != expected:
            raise ArtifactError(f"{weights}: {key} has shape {shapes[key]} but the model expects "
                                f"{expected} (config.json field {_field_of(key, compact)})")
