"""``layerfold methods``: the registered methods and merge operators."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command()(methods)


def methods() -> None:
    """List the registered methods and merge operators."""
    import layerfold.methods  # noqa: F401
    from layerfold.merge import MERGES
    from layerfold.methods.base import METHODS

    for name in METHODS.names():
        doc = (METHODS.get(name).__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:18s} {doc}")
    typer.echo("merge operators: " + ", ".join(MERGES.names()))

