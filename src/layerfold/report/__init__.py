"""Reports on a model's layers: similarity matrices between layer outputs and their heatmaps.

:func:`layerfold.report.analysis.analyze` is the entry point; it is imported lazily so that
importing this package does not pull in matplotlib.
"""

from __future__ import annotations

__all__ = ["analyze"]


def __getattr__(name: str):
    if name == "analyze":
        from layerfold.report.analysis import analyze

        return analyze
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
