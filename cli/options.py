"""CLI options made from config dataclasses: one mechanism for `train`, `prune` and `pipeline`.

A command lists which configs' fields it offers (`Fields`); each becomes a `--kebab-name` option
whose help is the field's own (`vitcompact.knobs.knob`) and whose default is unset, so the config
keeps its default and a command can tell which options were given. The command receives them as
`{dotted name: value}` of the given ones only, and builds its configs from them
(`vitcompact.pipeline.config.with_overrides` does the same for the pipeline's file).

A new config field therefore appears in the CLI (and in the pipeline's TOML) without hand copying.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import typer

from vitcompact.knobs import flag_of, help_of


@dataclass(frozen=True)
class Fields:
    """The fields of `config` a command offers: `names` (default: every field that is not itself a
    config), minus `exclude`, under `prefix` (e.g. "prune.") in the dotted names it receives;
    `flags` renames an option (field name -> its flags, e.g. {"epochs": "--train-epochs"}, {"out": "--out -o"});
    a field may name its own flag (`knob(flag=...)`), used wherever it is offered."""

    config: type
    prefix: str = ""
    names: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    flags: dict[str, str] = dataclasses.field(default_factory=dict)
    help: dict[str, str] = dataclasses.field(default_factory=dict)  # field name -> help text, over the field's

    def options(self) -> list[tuple[str, str, Any, str]]:
        """(dotted name, flag, type, help) of each offered field."""
        hints = typing.get_type_hints(self.config)
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        names = self.names if self.names is not None else [
            n for n in fields if not _is_config(hints[n])]
        return [(self.prefix + n, self.flags.get(n) or flag_of(self.config, n) or "--" + n.replace("_", "-"),
                 _option_type(hints[n]),
                 self.help.get(n) or help_of(self.config, n))
                for n in names if n not in self.exclude]


def _is_config(kind: Any) -> bool:
    return any(dataclasses.is_dataclass(k) for k in (kind, *typing.get_args(kind)))


def _option_type(kind: Any) -> Any:
    """The option's type: the field's, made optional (unset = the config's default)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if len(args) == 1 else str
    return typing.Optional[str if typing.get_origin(kind) is tuple else kind]


def _switch(flags: str, kind: Any) -> str:
    """A yes/no field's flags as an on/off pair (`--x/--no-x`), so a default of true can be turned
    off; other fields' flags unchanged."""
    if kind != typing.Optional[bool] or "/" in flags:
        return flags
    first, *rest = flags.split()
    return " ".join([f"{first}/--no-{first.removeprefix('--')}", *rest])


def config_options(*groups: Fields) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command `fn(..., given: dict[str, Any])` so typer sees its own parameters (minus
    `given`) followed by one option per offered field; `given` receives the options that were set."""
    specs = [spec for group in groups for spec in group.options()]
    seen: dict[str, str] = {}
    for dotted, flags, _, _ in specs:
        for flag in flags.split():
            if flag in seen:
                raise ValueError(f"option {flag} would stand for both {seen[flag]} and {dotted}")
            seen[flag] = dotted

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "given"]
        hints = {k: v for k, v in typing.get_type_hints(fn).items() if k != "given"}
        # Named for the flag, so messages about a parameter name the option the user typed.
        params = {flag.split()[0].lstrip("-").replace("-", "_"): (dotted, flag, kind, text)
                  for dotted, flag, kind, text in specs}
        clash = params.keys() & {p.name for p in own}
        if clash:
            raise ValueError(f"options {sorted(clash)} are both the command's own and a config's")
        generated = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                       default=typer.Option(None, *_switch(flag, kind).split(), help=_escape(text),
                                                            show_default=False))
                     for name, (_, flag, kind, text) in params.items()]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {params[k][0]: v for k, v in kwargs.items() if k in params and v is not None}
            return fn(**{k: v for k, v in kwargs.items() if k not in params}, given=given)

        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = inspect.Signature(keyword + generated)
        command.__annotations__ = {**hints, **{name: spec[2] for name, spec in params.items()}}
        del command.__wrapped__  # typer reads the signature above, not the wrapped function's
        return command
    return decorate


def _escape(text: str) -> str:
    """rich markup would swallow `[section]` in a help text."""
    return text.replace("[", r"\[")


def split(given: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The given options under `prefix`, by field name."""
    return {k[len(prefix):]: v for k, v in given.items() if k.startswith(prefix) and "." not in k[len(prefix):]}


__all__ = ["Fields", "config_options", "split"]
