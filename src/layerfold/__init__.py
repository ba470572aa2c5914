"""layerfold: fold redundant consecutive transformer layers of a causal LM into one.

The public Python API lives in :mod:`layerfold.api`; heavy imports happen lazily so that
``import layerfold`` and ``layerfold --help`` answer at once.
"""

from __future__ import annotations

from layerfold.version import __version__

__all__ = ["__version__", "analyze", "evaluate", "load_model", "make_plan", "prune", "apply_plan"]


def __getattr__(name: str):
    if name in {"analyze", "evaluate", "load_model", "make_plan", "prune", "apply_plan"}:
        from layerfold import api

        return getattr(api, name)
    raise AttributeError(name)
