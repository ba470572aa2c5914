"""Recovery after pruning: LoRA healing, optionally distilling from the original model.

``heal(pruned, out, HealConfig(...))`` fine-tunes LoRA adapters on every linear projection of
the decoder layers, merges them back and saves a plain transformers folder with ``heal.json``.
"""

from layerfold.recover.config import HealConfig, make_config
from layerfold.recover.heal import HealReport, heal

__all__ = ["HealConfig", "HealReport", "heal", "make_config"]
