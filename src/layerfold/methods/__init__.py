"""Planners.  Importing this package registers every method once."""

from layerfold.methods import angular, laco, last_n, shortened, shortgpt, sleb, slm  # noqa: F401
from layerfold.methods.base import METHODS, Method, PlanContext, PlanResult, Target, make_method

__all__ = ["METHODS", "Method", "PlanContext", "PlanResult", "Target", "make_method"]
