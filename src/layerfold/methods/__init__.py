"""Planners.  Importing this package registers every method once."""

from layerfold.methods import slm  # noqa: F401
from layerfold.methods.base import METHODS, Method, PlanContext, PlanResult, Target, make_method

__all__ = ["METHODS", "Method", "PlanContext", "PlanResult", "Target", "make_method"]
