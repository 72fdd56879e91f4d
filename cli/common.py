"""Shared CLI plumbing: consoles, the user-error wrapper, JSON output and a few option types."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from vitcompact.errors import VitCompactError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the Exit(2) to raise."""
    err_console.print(f"error: {message}", markup=False)
    return typer.Exit(code=2)


def user_errors(fn: F) -> F:
    """Turn VitCompactError (and a missing/unreadable file) into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VitCompactError as e:
            raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise fail(f"{e.strerror}: {e.filename}") from None
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(code=130) from None
    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


JsonOption = typer.Option(False, "--json", help="Print the result as JSON instead of tables.")
