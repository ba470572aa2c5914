"""Extra CLI commands, one module each, registered by :func:`register_all`.

Each module defines ``register(app)`` adding its typer command(s); modules import heavy
libraries lazily inside their command functions so that ``layerfold --help`` stays instant.
"""

from __future__ import annotations

import importlib
import pkgutil


def register_all(app) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
