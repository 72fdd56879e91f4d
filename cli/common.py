"""Shared CLI plumbing: consoles, the user-error wrapper, JSON output and a few option types."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from vitcompact.errors import VitCompactError
from vitcompact.validate import finite

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
            raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise fail(f"{e.strerror}: {e.filename}") from None
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(code=130) from None
    return wrapper  # type: ignore[return-value]


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
