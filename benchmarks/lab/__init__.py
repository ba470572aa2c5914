"""Options measured and not adopted, kept runnable outside the package.

Importing this package (``benchmarks/`` on ``sys.path``, then ``import lab``) registers method
``slm-lab`` into layerfold's method registry: ``slm`` with ``fit=ridge``, ``refine``,
``pick=kl|choice``, ``rescale=kl|criterion|channels+kl`` and ``scale`` (:mod:`lab.slm_lab`),
giving the plans ``slm`` gave with them.
Their measured outcomes: docs/measured-options.md.
"""

from . import slm_lab
from .slm_lab import RESCALE_GRID, LabEngine, SlmLab

__all__ = ["RESCALE_GRID", "LabEngine", "SlmLab", "slm_lab"]
