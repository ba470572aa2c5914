"""User-facing errors: one clear line, turned into a non-zero exit by the CLI."""

from __future__ import annotations

import difflib


class LayerfoldError(Exception):
    """An error caused by the user's input or environment, with advice on what to fix."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], what: str) -> LayerfoldError:
    by_folded = {c.casefold(): c for c in choices}  # close in spelling, whatever the case
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=1)
    hint = f" Did you mean '{by_folded[close[0]]}'?" if close else ""
    return LayerfoldError(f"unknown {what} '{name}'.{hint} Choose one of: {', '.join(sorted(choices))}.")
