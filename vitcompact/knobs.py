"""Config fields that carry their help text: the configs are the one place a setting is described,
and the CLI makes its options (and their `--help`) from them."""

from __future__ import annotations

import dataclasses
from typing import Any


def knob(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None,  # noqa: A002
         **kwargs: Any) -> Any:
    """A dataclass field with its help text, and the CLI flag it goes by where `--field-name` would
    not say enough (e.g. `--budget-axes` for a budget's `axes`)."""
    metadata = {"help": help, **({"flag": flag} if flag else {})}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def help_of(config: type, name: str) -> str:
    """The help text of `config`'s field `name` ("" when it has none)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def flag_of(config: type, name: str) -> str | None:
    """The CLI flag `config`'s field `name` goes by, where it names one (None: `--field-name`)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.metadata.get("flag")
    return None
