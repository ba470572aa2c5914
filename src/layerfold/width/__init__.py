"""Structured width pruning of the decoder layers, and depth plus width under one budget.

Width pruning removes whole MLP intermediate channels (a row of the gate and up projections
with the matching column of the down projection) and whole attention heads (rows of the
query, key and value projections with the matching columns of the output projection).
Under grouped-query attention the unit is a KV group: one key/value head together with
every query head that shares it; ``attention="query-heads"`` instead removes the same
number of query heads inside every group (the only way to thin multi-query attention).

transformers configs hold ONE ``intermediate_size`` and one head count for all layers, so
every layer loses the same number of channels and heads; which ones is chosen per layer by
importance.  The config is rewritten (``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads`` and an explicit ``head_dim``) and the result loads with plain
``AutoModelForCausalLM.from_pretrained``.

The package, in the order a width prune runs:

- :mod:`.layout`: where each layer's projections are (from the architecture description),
  the configured widths, and what one unit costs in parameters;
- :mod:`.importance`: scores per channel and head (``wanda-sp``, ``flap``, ``taylor``);
- :mod:`.budget`: units to remove for a parameter budget, and which ones (the lowest scores);
- :mod:`.planning`: :func:`plan_width` (data only) and :func:`shrink` (plan and apply);
- :mod:`.plan`: :class:`WidthPlan`, the kept units of every layer, as JSON;
- :mod:`.apply`: :func:`apply_width`, the only code here that edits a model;
- :mod:`.calibration`: calibration tokens and held-out windows of the same source;
- :mod:`.split`: :func:`depth_width_prune`, depth and width under one ``param_ratio``;
- :mod:`.request`: :class:`WidthRequest`, the width options of ``prune`` and ``shrink``;
- :mod:`.save`: the saved folder (``width_plan.json``, ``plan.json``, ``shrink.json``, card);
- :mod:`.prune`: :func:`prune_with_width`, the one path from a request to a saved folder.
"""

from layerfold.width.apply import apply_width
from layerfold.width.budget import ATTENTION_MODES, WidthBudget, plan_budget
from layerfold.width.calibration import held_out_windows
from layerfold.width.importance import IMPORTANCES, LayerScores, layer_scores
from layerfold.width.layout import Geometry, Layout, UnitCosts, unit_costs
from layerfold.width.plan import LayerWidth, WidthPlan
from layerfold.width.planning import masked_loss, plan_width, shrink
from layerfold.width.prune import prune_with_width
from layerfold.width.request import WidthRequest, check_width_support
from layerfold.width.save import ShrinkRecord, save_shrunk
from layerfold.width.split import AUTO_SPLITS, DepthWidthResult, SplitCandidate, depth_width_prune

__all__ = ["ATTENTION_MODES", "AUTO_SPLITS", "IMPORTANCES", "DepthWidthResult", "Geometry", "LayerScores",
           "LayerWidth", "Layout", "ShrinkRecord", "SplitCandidate", "UnitCosts", "WidthBudget", "WidthPlan",
           "WidthRequest", "apply_width", "check_width_support", "depth_width_prune", "held_out_windows",
           "layer_scores", "masked_loss", "plan_budget", "plan_width", "prune_with_width", "save_shrunk", "shrink",
           "unit_costs"]
