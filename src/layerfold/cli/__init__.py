"""The ``layerfold`` command: thin, one module per command, options declared once (:mod:`.options`).

Each command module defines ``register(app)``; modules import heavy libraries lazily inside their
command functions so that ``layerfold --help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys

import typer

from layerfold.errors import LayerfoldError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fold redundant consecutive transformer layers of a causal LM into one.")

_COMMANDS = ("prune", "plan", "eval", "analyze", "bench", "heal", "shrink", "methods")
_registered = False


def register_all() -> None:
    """Add every command to ``app`` once (main() may run more than once in a process)."""
    global _registered
    if not _registered:
        for name in _COMMANDS:
            importlib.import_module(f"{__name__}.{name}").register(app)
        _registered = True


def main() -> None:
    register_all()
    try:
        app()
    except LayerfoldError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into exit code 130; saves are atomic
            typer.echo("interrupted; nothing was written", err=True)
        raise
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            raise
        typer.echo(f"error: {out_of_memory(exc)}", err=True)
        sys.exit(3)


def out_of_memory(exc: BaseException) -> str:
    """One line for a GPU out-of-memory error: torch's first sentence and the options that need less memory
    (saves are atomic, so the output folder was not written)."""
    sentences = str(exc).split(". ")
    said = sentences[0].strip() or "CUDA out of memory"
    if len(sentences) > 1 and sentences[1].startswith("Tried to allocate"):
        said += f" ({sentences[1][0].lower()}{sentences[1][1:]})"
    return (f"{said}; the output folder was not written. Lower --batch-size (eval, heal, bench; zero-shot batches hold "
            "batch x prompt length x vocabulary logits), stream layers with --max-gpu-memory (prune, plan, "
            "analyze), or run on --device cpu.")


if __name__ == "__main__":
    main()
