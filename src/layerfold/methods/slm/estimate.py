"""How long the default plan will take on this machine, said before the plan runs.

The plan's work is counted in decoder-layer runs over the calibration tokens; one such run's
time is measured while the calibration activations are captured (``LayerCache.layer_seconds``),
so the estimate holds for this machine, device, dtype and calibration set alike.  The count
follows the default ``slm`` (selection=portfolio, rescale=channels):

- the greedy fold scores, at each of ``budget`` steps, every pair (``pairs=all``), each running the
  segments above the segment it removes: on average half of them; or the pairs of its shortlist (the
  default): at the first step the pairs of lowest block influence, whose positions (so their runs)
  the capture already tells, then ``by_score + by_influence`` pairs a step at the same mean position
  (the two pairs next to the window just formed are counted as among them);
- the portfolio's four candidate plans are each run from their first removed layer up (about
  half the model each), the two calibration KL divergences from the first window up, each with
  the LM head on the original's and the pruned model's states, and the channel fit runs each
  window's layers below it once more;
- the optimal windows, block influence and angular distances read cached activations (no
  layer run).
"""

from __future__ import annotations

from layerfold.calibrate import LayerCache
from layerfold.methods.shortgpt import block_influence
from layerfold.methods.slm.shortlist import Shortlist
from layerfold.models.arch import layer_parameter_count

OVERHEAD = 1.15  # scoring, norms, copies and Python around the layer runs (measured: benchmarks/prune_time)


def greedy_layer_runs(num_layers: int, budget: int) -> float:
    """Decoder-layer runs of the greedy fold scoring every pair (merge=base), a candidate counted at
    the mean of its possible positions."""
    return sum((segments - 1) * (segments - 2) / 2 for segments in range(num_layers, num_layers - budget, -1))


def shortlist_layer_runs(influence: dict[int, float], budget: int, shortlist: Shortlist) -> float:
    """Decoder-layer runs of the greedy fold on ``shortlist`` (merge=base), from each layer's block
    ``influence`` in the original model: the first step's pairs remove the ``first_step`` layers of
    lowest influence (layer 0 never), each running the layers above the one it removes; each later
    step scores ``by_score + by_influence`` pairs at that mean cost, shrinking with the model."""
    num_layers = len(influence)
    first = sorted((j for j in influence if j > 0), key=lambda j: (influence[j], j))[: shortlist.first_step]
    if not first or budget < 1:
        return 0.0
    runs = float(sum(num_layers - 1 - j for j in first))
    mean = runs / len(first)
    for segments in range(num_layers - 1, num_layers - budget, -1):
        pairs = min(segments - 1, shortlist.by_score + shortlist.by_influence)
        runs += pairs * mean * (segments - 2) / max(num_layers - 2, 1)
    return runs


def planning_layer_runs(num_layers: int, budget: int, head_ratio: float, greedy: float | None = None) -> float:
    """Decoder-layer runs of the default plan after the capture (``head_ratio``: the LM head's
    cost in decoder layers, vocabulary x hidden size / one layer's parameters; ``greedy``: the greedy
    fold's runs, None: every pair scored)."""
    half = num_layers / 2
    portfolio = 4 * half
    kl = 2 * (half + 2 * head_ratio)
    channels = half
    greedy = greedy_layer_runs(num_layers, budget) if greedy is None else greedy
    return greedy + portfolio + kl + channels


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
    greedy = None if shortlist is None else shortlist_layer_runs(block_influence(cache), budget, shortlist)
    runs = planning_layer_runs(cache.num_layers, budget, head_ratio(cache), greedy)
    return OVERHEAD * runs * cache.layer_seconds
