"""Recovery after pruning: LoRA or the decoder layers, on text or distilled from the original model (which can
write the text itself: ``data="self"``).

``heal(pruned, out, HealConfig(...))`` fine-tunes LoRA adapters on every linear projection of
the decoder layers, merges them back and saves a plain transformers folder with ``heal.json``.
"""

from layerfold.recover.config import HealConfig, make_config
from layerfold.recover.heal import HealReport, heal

__all__ = ["HealConfig", "HealReport", "heal", "make_config"]
