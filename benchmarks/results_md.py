"""The command line every benchmark's report.py shares: read its results.jsonl, write its RESULTS.md."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def report_main(render: Callable[[Path], str], folder: Path, description: str) -> None:
    """``report.py [--results FILE] [--out FILE]``: ``render(results)`` written to RESULTS.md."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results", type=Path, default=folder / "results.jsonl")
    parser.add_argument("--out", type=Path, default=folder / "RESULTS.md")
    args = parser.parse_args()
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")
