"""A width request: what ``layerfold prune --width/--split/--width-plan`` and ``layerfold shrink``
ask of width pruning, checked once when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerfold.errors import LayerfoldError, did_you_mean
from layerfold.width.budget import ATTENTION_MODES
from layerfold.width.importance import IMPORTANCES
from layerfold.width.layout import Geometry, Layout
from layerfold.width.split import parse_split


@dataclass(frozen=True)
class WidthRequest:
    """What width pruning is asked to do, for :func:`layerfold.width.prune_with_width`: exactly one of

    - ``ratio`` (``prune --width R``, ``shrink --width R``): after the depth step, if any (any
      depth target, or a saved ``--plan``), remove ``R`` of every remaining decoder layer's
      attention and MLP projection parameters;
    - ``split`` (``--split auto|D`` with ``--param-ratio P``): ``P`` of ALL parameters removed,
      the share ``D`` by depth and the rest by width;
    - ``plan`` (``prune --width-plan``, ``shrink --plan``): a saved ``width_plan.json`` applied
      after the depth step, if any.

    The other fields are the width options of both commands, with their defaults.
    """

    ratio: float | None = None
    split: float | str | None = None
    plan: str | Path | None = None
    importance: str = "wanda-sp"
    attention: str = "auto"
    heads: int | None = None
    multiple_of: int = 8
    held_out: int = 16

    def __post_init__(self) -> None:
        given = [name for name, v in (("--width", self.ratio), ("--split", self.split), ("--width-plan", self.plan))
                 if v is not None]
        if len(given) != 1:
            raise LayerfoldError("give one of --width (width after the depth step), --split (one --param-ratio "
                                 "shared by depth and width) and --width-plan" + (f", not {' and '.join(given)}"
                                                                                   if given else ""))
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise LayerfoldError(f"--width must be between 0 and 1 (exclusive), got {self.ratio}")
        if self.split is not None:
            parse_split(self.split)
        if self.plan is not None and not Path(self.plan).is_file():
            raise LayerfoldError(f"width plan file {self.plan} does not exist")
        if self.importance not in IMPORTANCES:
            raise did_you_mean(self.importance, IMPORTANCES, "importance")
        if self.attention not in ATTENTION_MODES:
            raise did_you_mean(self.attention, ATTENTION_MODES, "attention mode")
        if self.heads is not None and self.attention not in ("groups", "query-heads"):
            raise LayerfoldError("--heads needs --attention groups or query-heads")
        if self.multiple_of < 1:
            raise LayerfoldError("--multiple-of must be at least 1")
        if self.held_out < 1:
            raise LayerfoldError("--held-out must be at least 1")

    @classmethod
    def from_options(cls, ratio: float | None = None, split: str | None = None, plan: str | Path | None = None,
                     **options) -> WidthRequest | None:
        """From command-line options (``None``: not given); None when no width pruning is asked for."""
        given = {k: v for k, v in options.items() if v is not None}
        if ratio is None and split is None and plan is None:
            if given:
                names = ", ".join("--" + k.replace("_", "-") for k in given)
                raise LayerfoldError(f"{names}: width pruning options; add --width, --split (with --param-ratio) "
                                     "or --width-plan")
            return None
        return cls(ratio=ratio, split=split, plan=plan, **given)

    def check_depth(self, target, plan, options: dict | None) -> None:
        """Refuse depth settings that do not go with this request (before any work)."""
        if self.split is None:
            return
        if target is None or target.param_ratio is None or target.layers is not None or target.ratio is not None:
            raise LayerfoldError("--split shares --param-ratio between depth and width: give --param-ratio "
                                 "(not --ratio or --target-layers)")
        if plan is not None:
            raise LayerfoldError("--split plans depth and width together; it cannot apply a saved --plan "
                                 "(use --width or --width-plan with --plan)")
        if (options or {}).get("threshold") is not None:
            raise LayerfoldError("--split aims depth at a share of --param-ratio; drop --threshold")

    def width_options(self) -> dict:
        return {"importance": self.importance, "attention": self.attention, "heads": self.heads,
                "multiple_of": self.multiple_of}


def check_width_support(loaded) -> None:
    """Fail before any work on an architecture or config that width pruning cannot handle."""
    Layout.of(loaded.arch)
    Geometry.of(loaded.model.config)
