"""``layerfold methods``: the registered methods and merge operators; ``layerfold methods NAME``: one
method's description and options."""

from __future__ import annotations

import inspect
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(methods)


def methods(name: Annotated[str | None, typer.Argument(help="A method: its description and options.")] = None) -> None:
    """List the registered methods and merge operators, or one method's description and options."""
    import layerfold.methods  # noqa: F401
    from layerfold.merge import MERGES
    from layerfold.methods.base import METHODS

    if name is not None:
        method = METHODS.get(name)  # an unknown name fails with "did you mean"
        typer.echo(inspect.cleandoc(method.__doc__ or method.name))
        fields = method.model_fields
        if fields:
            typer.echo("\noptions (--set key=value):")
            for key, field in fields.items():
                typer.echo(f"  {key:15s} default {field.default!r}")
        return
    for each in METHODS.names():
        doc = (METHODS.get(each).__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{each:18s} {doc}")
    typer.echo("merge operators: " + ", ".join(MERGES.names()))
    typer.echo("layerfold methods NAME: one method's description and options")
