"""The named configurations of the quality benchmark: name -> (method, options).

A name says what the configuration runs; a row of results.jsonl names the configuration it measured.
``slm`` is layerfold's default (portfolio selection, base merge, cosine pick, per-channel rescaling; since
commit 203d4c6 its greedy fold scores a shortlist of pairs; rows named ``slm`` before it scored every pair,
``slm/all-pairs``, whose plans the default's shortlist, 3 pairs by last score, 1 by influence and 12 at the first
step, gives in all four cells; ``slm/shortlist`` is its first sizes, 3, 3 and 6, which the default used from 203d4c6
until it was found to give another plan at SmolLM2-135M 35%);
``slm/no-rescale`` and ``slm/rescale-kl`` are earlier defaults kept under names that say what they are
(rows once named ``slm/portfolio`` or ``slm/channels`` ran what ``slm/no-rescale`` and ``slm`` run, and
carry those names).
Options that were measured and not adopted (``fit=ridge``, ``refine``, ``pick=kl|choice``,
``rescale=kl|criterion|channels+kl``) left the package: they run as method ``slm-lab``, which
``benchmarks/lab`` registers (:func:`require_lab`), with the same options as ``slm``.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
LAB = "slm-lab"
PAPER = {"selection": "sliding", "merge": "diff", "rescale": "none"}  # slm-paper's options, for slm-lab

CONFIGS: dict[str, tuple[str, dict]] = {
    "slm": ("slm", {}),  # the default
    "slm/no-rescale": ("slm", {"rescale": "none"}),
    "slm/shortlist": (LAB, {"pairs": "shortlist", "shortlist": [3, 3, 6]}),  # the first shortlist sizes
    "slm/all-pairs": ("slm", {"pairs": "all"}),  # the greedy fold scoring every pair: what rows named slm ran before
    "slm/rescale-kl": (LAB, {"rescale": "kl"}),  # one factor per window from a grid, by calibration KL
    "slm-paper": ("slm-paper", {}),
    "slm-reference": ("slm-reference", {}),
    "slm-paper/cka-linear": ("slm-paper", {"criterion": "cka-linear"}),
    "slm-paper/cka-rbf": ("slm-paper", {"criterion": "cka-rbf"}),
    "slm-paper/angular": ("slm-paper", {"criterion": "angular"}),
    "slm-paper/mean": ("slm-paper", {"merge": "mean"}),
    "slm-paper/base": ("slm-paper", {"merge": "base"}),
    "slm-paper/diff+fit": (LAB, {**PAPER, "fit": "ridge"}),
    "slm/optimal+base": ("slm", {"selection": "optimal", "merge": "base", "rescale": "none"}),
    "slm/optimal+base+fit": (LAB, {"selection": "optimal", "merge": "base", "fit": "ridge"}),
    "slm/optimal+diff+fit": (LAB, {"selection": "optimal", "merge": "diff", "fit": "ridge"}),
    "slm/optimal+mean+fit": (LAB, {"selection": "optimal", "merge": "mean", "fit": "ridge"}),
    "slm/greedy+base": ("slm", {"selection": "greedy", "merge": "base", "rescale": "none"}),
    "slm/greedy+base+fit": (LAB, {"selection": "greedy", "merge": "base", "fit": "ridge"}),
    "slm/greedy+mean+fit": (LAB, {"selection": "greedy", "merge": "mean", "fit": "ridge"}),
    "slm/greedy-loss+base+fit": (LAB, {"selection": "greedy", "criterion": "loss", "merge": "base", "fit": "ridge"}),
    "slm/greedy+refine": (LAB, {"selection": "greedy", "refine": 3, "rescale": "none"}),
    "slm/greedy+refine-r2": (LAB, {"selection": "greedy", "refine": 3, "refine_radius": 2, "rescale": "none"}),
    "slm/pick-kl": (LAB, {"pick": "kl", "rescale": "none"}),  # candidates compared by next-token KL
    "slm/rescale-cos": (LAB, {"rescale": "criterion"}),  # the window factor chosen by the output cosine
    "slm/pick-kl+rescale": (LAB, {"pick": "kl", "rescale": "kl"}),
    "slm/optimal+rescale": (LAB, {"selection": "optimal", "rescale": "kl"}),
    "slm/greedy+rescale": (LAB, {"selection": "greedy", "rescale": "kl"}),
    "slm/channels+kl": (LAB, {"rescale": "channels+kl"}),  # the channel factors, then the grid factor
    "slm/pick-kl+channels": (LAB, {"pick": "kl", "rescale": "channels"}),
    "slm/portfolio+refine": (LAB, {"selection": "portfolio", "refine": 3, "rescale": "none"}),
    "slm/greedy-loss+base": ("slm", {"selection": "greedy", "criterion": "loss", "rescale": "none"}),
    "slm/portfolio-loss+refine": (LAB, {"selection": "portfolio", "criterion": "loss", "refine": 3, "rescale": "none"}),
    "shortgpt": ("shortgpt", {}),
    "angular": ("angular", {}),
    "laco": ("laco", {}),
    "sleb": ("sleb", {}),
    "shortened-ppl": ("shortened-ppl", {}),
    "shortened-taylor": ("shortened-taylor", {}),
    "last-n": ("last-n", {}),
    # a baseline's removed layers with slm's per-channel factors fitted after (is the gain the correction
    # alone?); benchmark-only, see run.with_channels
    "shortgpt+channels": ("shortgpt", {}),
    "sleb+channels": ("sleb", {}),
    # the default planned on copy-aware calibration (studies/copying): each calibration window also shown as
    # its own first half twice, the same tokens; benchmark-only
    "slm/books+repeats": ("slm", {}),
    # ShortGPT's layers folded into the kept layer below with the channel correction: the same plans as
    # shortgpt+channels (channel factors within 1e-7, the plan's six-decimal rounding), whose rows measured it
    "slm/influence": ("slm", {"selection": "influence"}),
    # the portfolio's candidates compared by the continuation-choice probe on the calibration source
    "slm/pick-choice": (LAB, {"pick": "choice"}),
    # each portfolio candidate alone with the default's channel correction
    "slm/greedy+channels": ("slm", {"selection": "greedy"}),
    "slm/optimal+channels": ("slm", {"selection": "optimal"}),
    "slm/angular+channels": ("slm", {"selection": "angular"}),
}
# Rows of configurations whose greedy fold runs (selection greedy or portfolio) were measured before the
# default scored a shortlist of pairs: they keep scoring every pair (pairs=all), so that they still run what
# their rows measured; slm is the default (slm-lab scores every pair by default).
for _name, (_method, _options) in CONFIGS.items():
    if (_method == "slm" and _name != "slm" and "pairs" not in _options
            and _options.get("selection") in (None, "greedy", "portfolio")):
        _options["pairs"] = "all"
WITH_CHANNELS = ("shortgpt+channels", "sleb+channels")
CALIB_REPEATS = ("slm/books+repeats",)
BASELINES = ["shortgpt", "sleb", "angular", "laco", "shortened-ppl", "shortened-taylor", "last-n"]
ALWAYS_ZEROSHOT = ["slm", "slm-paper", "slm-reference", *BASELINES]


def require_lab() -> None:
    """Register method ``slm-lab`` by importing ``benchmarks/lab``; a clear error when it is missing."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    try:
        import lab  # noqa: F401  (registers slm-lab into layerfold's method registry)
    except ModuleNotFoundError as exc:
        if exc.name != "lab":
            raise
        raise SystemExit(f"method {LAB} (options measured and not adopted) comes from {BENCHMARKS / 'lab'}, "
                         "which is missing: restore benchmarks/lab/ or choose configurations of the package's "
                         "methods") from None
