"""A pruning run's folder: its `run.json` records the settings and inputs, which a resume must match.
The per-state checkpoints beside it are `checkpoint`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import ensure_dir, read_json, write_json
from ..training import distributed
from . import checkpoint

# Fields of run.json that may differ between a run and its resumption: where it is written and how
# it is shown. Every other one changes the result.
RESUME_FREE = ("out_dir", "resume", "wandb_project", "train.progress")
# How a resume refusal names a run.json field that is not an option of the same name.
RECORD_NAMES = {"inputs.model": "MODEL", "inputs.train_images": "training set (images)",
                "token_merge.r": "--token-merge", "token_merge.schedule": "--token-merge-schedule"}


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_record(settings: dict[str, Any], bundle) -> dict[str, Any]:
    """run.json: the settings (`PruneConfig.to_dict()`), and the inputs — as the caller names them
    in `settings["inputs"]`, plus what the data loaders show of themselves (a library caller may
    name nothing)."""
    record = dict(settings)
    named = settings.get("inputs") or {}
    loader = bundle.train
    seen = {"batch_size": loader.batch_size, "train_images": len(loader.dataset)}
    # The caller's names first: a refusal names the first difference, and those are what it typed.
    record["inputs"] = {**named, **{k: v for k, v in seen.items() if k not in named}}
    return json.loads(json.dumps(record, default=str))  # as it reads back: lists, not tuples


def check_resume(out: Path, record: dict[str, Any]) -> None:
    saved, now = _flat(read_json(out / "run.json")), _flat(record)
    for key, value in saved.items():
        if key not in RESUME_FREE and now.get(key) != value:
            option = RECORD_NAMES.get(key) or "--" + key.rpartition(".")[2].replace("_", "-")
            raise ConfigError(f"--resume with a different {option}: the run used {value!r}, now {now.get(key)!r}; "
                              "resume with the original value or start a new output folder")


def open_run(out: Path, settings: dict[str, Any], bundle, main: bool) -> int | None:
    """Refuse a used folder unless resuming (`settings["resume"]`) with the same settings, and
    write a new one's run.json (on the main process). Returns the last state a resumed run
    finished, or None."""
    started = (out / "run.json").is_file()
    if started and not settings.get("resume"):
        raise ConfigError(f"{out} already holds a pruning run; resume it (--resume) or choose a new folder")
    record = run_record(settings, bundle)
    done = None
    if started:
        check_resume(out, record)
        done = checkpoint.last_finished(out)
    # Every rank reads the folder before rank 0 writes to it.
    distributed.barrier()
    if main and not started:
        ensure_dir(out)
        write_json(out / "run.json", record)
    return done
