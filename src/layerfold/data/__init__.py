"""Text sources for calibration and evaluation, and deterministic token sampling."""

from layerfold.data.sources import SOURCES, load_text, source_description
from layerfold.data.tokens import CalibrationConfig, sample_windows, token_stream

__all__ = ["SOURCES", "CalibrationConfig", "load_text", "sample_windows", "source_description", "token_stream"]
