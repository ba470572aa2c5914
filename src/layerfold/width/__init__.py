"""Structured width pruning (see :mod:`layerfold.width.planning`)."""

from layerfold.width.planning import *  # noqa: F403
from layerfold.width.planning import (  # noqa: F401
    Geometry,
    LayerWidth,
    check_width_support,
    held_out_windows,
    masked_loss,
    unit_costs,
)
