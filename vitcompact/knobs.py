"""Config fields that carry their help text: the configs are the one place a setting is described,
and the CLI makes its options (and their `--help`) from them."""

from __future__ import annotations

import dataclasses
from typing import Any


def knob(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with its help text."""
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def help_of(config: type, name: str) -> str:
    """The help text of `config`'s field `name` ("" when it has none)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""
