"""Per-epoch and per-state metrics: a JSONL file (rewritten atomically) and optional wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import write_text


class MetricsLog:
    """Collects metric records; mirrors them to `path` (JSONL) and to wandb when asked.

    wandb is imported only when `wandb_project` is given; `WANDB_MODE=offline` keeps it local.
    """

    def __init__(self, path: str | os.PathLike | None = None, wandb_project: str | None = None,
                 records: list[dict[str, Any]] | None = None, run_config: dict[str, Any] | None = None,
                 enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = list(records or [])
        self.enabled = enabled
        self._wandb = None
        if wandb_project and enabled:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb logging was requested but wandb is not installed: "
                                  "pip install 'vitcompact[wandb]', or drop --wandb") from None
            self._wandb = wandb.init(project=wandb_project, config=run_config or {})

    @classmethod
    def read(cls, path: str | os.PathLike) -> list[dict[str, Any]]:
        path = Path(path)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if self.path is not None:
            self.save(self.path)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
