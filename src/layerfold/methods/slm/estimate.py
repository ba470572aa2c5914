"""How long the default plan will take on this machine, said before the plan runs.

The plan's work is counted in decoder-layer runs over the calibration tokens; one such run's
time is measured while the calibration activations are captured (``LayerCache.layer_seconds``),
so the estimate holds for this machine, device, dtype and calibration set alike.  The count
follows the default ``slm`` (selection=portfolio, rescale=channels):

- the greedy fold scores, at each of ``budget`` steps, every pair (``pairs=all``) or the pairs of
  its shortlist (the default; each overlap between the shortlist's parts counted twice, so an upper
  bound), each running the segments above the segment it removes: on average half of them;
- the portfolio's four candidate plans are each run from their first removed layer up (about
  half the model each), the two calibration KL divergences from the first window up, each with
  the LM head on the original's and the pruned model's states, and the channel fit runs each
  window's layers below it once more;
- the optimal windows, block influence and angular distances read cached activations (no
  layer run).
"""

from __future__ import annotations

from layerfold.calibrate import LayerCache
from layerfold.methods.slm.shortlist import Shortlist
from layerfold.models.arch import layer_parameter_count

OVERHEAD = 1.15  # scoring, norms, copies and Python around the layer runs (measured: benchmarks/prune_time)


def greedy_layer_runs(num_layers: int, budget: int, shortlist: Shortlist | None = None) -> float:
    """Decoder-layer runs of the greedy fold (merge=base), a candidate counted at the mean of its
    possible positions; with a ``shortlist``, at most its pairs a step."""
    runs = 0.0
    for step, segments in enumerate(range(num_layers, num_layers - budget, -1)):
        pairs = segments - 1
        if shortlist is not None:
            first = step == 0
            pairs = min(pairs, shortlist.first_step if first else shortlist.by_score + shortlist.by_influence + 2)
        runs += pairs * (segments - 2) / 2
    return runs


def planning_layer_runs(num_layers: int, budget: int, head_ratio: float, shortlist: Shortlist | None = None) -> float:
    """Decoder-layer runs of the default plan after the capture (``head_ratio``: the LM head's
    cost in decoder layers, vocabulary x hidden size / one layer's parameters)."""
    half = num_layers / 2
    portfolio = 4 * half
    kl = 2 * (half + 2 * head_ratio)
    channels = half
    return greedy_layer_runs(num_layers, budget, shortlist) + portfolio + kl + channels


def head_ratio(cache: LayerCache) -> float:
    """The LM head's parameters over one decoder layer's: the cost of a logits pass in layer runs."""
    config = cache.model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    vocab = getattr(config, "vocab_size", 0)
    return vocab * hidden / max(layer_parameter_count(cache.layers[0]), 1)


def planning_seconds(cache: LayerCache, budget: int, shortlist: Shortlist | None = None) -> float:
    """Seconds the default plan is expected to take after the capture, from the layer time the
    capture measured (None there: 0); ``shortlist``: the greedy fold's (None: every pair)."""
    if not cache.layer_seconds:
        return 0.0
    runs = planning_layer_runs(cache.num_layers, budget, head_ratio(cache), shortlist)
    return OVERHEAD * runs * cache.layer_seconds
