"""The `vitcompact` command. Thin: parse, call the library, print."""

from __future__ import annotations

from typing import Optional

import typer

import vitcompact as vc

from .bench_cmd import bench
from .common import CommandGroup, exit_on_sigterm
from .compact_cmd import compact
from .deploy_cmd import deploy_cmd
from .export_cmd import export_app
from .inspect_cmd import inspect
from .pipeline_cmd import demo, pipeline
from .prune_cmd import prune
from .train_cmd import train

app = typer.Typer(
    name="vitcompact",
    help="Prune ViT attention heads and MLP neurons, build the smaller model, export it and "
         "measure the speed-up.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=CommandGroup,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitcompact {vc.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """vitcompact: smaller, faster Vision Transformers."""


app.command()(train)
app.command()(prune)
app.command()(compact)
app.command()(inspect)
app.add_typer(export_app, name="export")
app.command()(bench)
app.command("deploy")(deploy_cmd)
app.command()(pipeline)
app.command()(demo)


def main() -> None:
    exit_on_sigterm()
    app()
