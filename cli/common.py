"""Shared CLI plumbing: consoles, the user-error wrapper, JSON output and a few option types."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

import vitcompact as vc
from vitcompact.data import AUGMENTATIONS, DATA_SOURCES
from vitcompact.errors import VitCompactError, one_line
from vitcompact.validate import finite

from .options import Fields, split

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the Exit(2) to raise."""
    err_console.print(f"error: {message}", markup=False)
    return typer.Exit(code=2)


def _finite_options(options: dict[str, Any]) -> None:
    # No option takes NaN or an infinity (typer's float type accepts both); refused before any work.
    for name, value in options.items():
        if isinstance(value, float):
            finite(f"--{name.replace('_', '-')}", value)


def user_errors(fn: F) -> F:
    """Turn VitCompactError (and a missing/unreadable file) into one line on stderr and exit code 2.

    Float options are checked to be finite first: out-of-range values are the configs' to refuse.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _finite_options(kwargs)
            return fn(*args, **kwargs)
        except VitCompactError as e:
            raise fail(one_line(e)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise fail(f"{e.strerror}: {e.filename}") from None
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(code=130) from None
    return wrapper  # type: ignore[return-value]


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, `timeout`, a scheduler stopping a job) end the command as Ctrl-C does,
    through every `finally` (its default action kills the process where it stands): staging and
    partial folders are removed, and the exit code is 143, as for a process the signal killed."""
    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        err_console.print("terminated", markup=False)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


class CommandGroup(TyperGroup):
    """The root command group (`typer.Typer(cls=CommandGroup)`): typer's own parameter errors (a
    value that is not a number, a missing option, an unknown command) become one `error:` line
    and exit code 2, as the library's errors do, instead of a framed usage box."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return _one_line(super().parse_args, ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        return _one_line(super().invoke, ctx)


def _one_line(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except typer.TyperException as e:  # the public base of typer's usage and parameter errors
        if type(e).__name__ == "NoArgsIsHelpError":  # the help text, not an error (typer tests the name too)
            raise
        raise fail(" ".join(e.format_message().split())) from None


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


JsonOption = typer.Option(False, "--json", help="Print the result as JSON instead of tables.")


DataOption = typer.Option("digits", "--data", help=f"Data source: {', '.join(DATA_SOURCES.names())}.")
DataRootOption = typer.Option(None, "--data-root", help="Folder of the data source's files.")
AugOption = typer.Option("light", "--aug", help=f"Training augmentation: {', '.join(AUGMENTATIONS)} "
                         "(light: small shifts and flips; randaugment: timm's RandAugment and random erasing).")
WorkersOption = typer.Option(None, "--workers", help="DataLoader worker processes for image folders and per-image "
                             "transforms (default: one per core but one).")
PretrainedOption = typer.Option(False, "--pretrained", help="Start a timm model from its hub weights (needs the "
                                "internet; offline, pass --checkpoint FILE).")
ResetClassifierOption = typer.Option(False, "--reset-classifier", help="Give an artifact a new classifier when the "
                                     "data has another class count.")


def token_merge_options(which: str) -> Fields:
    """`--token-merge R` and `--token-merge-schedule` (TokenMergeConfig's `r` and `schedule`); `which`
    says in the help which model merges."""
    return Fields(vc.TokenMergeConfig, "token_merge.", names=("r", "schedule"),
                  flags={"r": "--token-merge", "schedule": "--token-merge-schedule"},
                  help={"r": f"Token merging (ToMe) on {which}: tokens merged per block, at most half a "
                             "block's tokens (0: off)."})


def token_merge_config(given: dict[str, Any]) -> vc.TokenMergeConfig | None:
    """The TokenMergeConfig the `token_merge_options` given make; None when none was given."""
    fields = split(given, "token_merge.")
    if not fields:
        return None
    if "r" not in fields:
        raise vc.ConfigError("--token-merge-schedule needs --token-merge R (tokens merged per block)")
    return vc.TokenMergeConfig(**fields)


def check_writable(out: Path) -> None:
    """Fail before any work when `out` cannot be created or written (nothing half-written)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise vc.ArtifactError(f"cannot write to {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK):
        raise vc.ArtifactError(f"cannot write to {out}: {probe} is not writable")

