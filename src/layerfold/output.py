"""Writing an output folder, the one way: atomically, under the overwrite rule, with the command
line that made it and its model card.

Every command that writes a folder (prune, shrink, heal, analyze, the embedded model's conversion)
goes through :func:`write_folder`; nothing half-written is ever left at the target.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfold.errors import LayerfoldError


def command_line() -> str:
    """The command as the user typed it, quoted so that it can be pasted again."""
    return "layerfold " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def check_out(out: str | Path | None, overwrite: bool, what: str = "output folder") -> None:
    """Refuse an existing output before any work is done (the out-exists rule)."""
    if out is not None and Path(out).exists() and not overwrite:
        raise LayerfoldError(f"{what} {out} exists: choose another --out or pass --overwrite")


SHARD_SIZE = "5GB"  # safetensors shard size: transformers 4's default (5's is 50GB, one file up to that)


def save_model(model, tokenizer, out: str | Path, overwrite: bool = False,
               extra_files: dict[str, str] | None = None, write_extra=None,
               max_shard_size: str | int = SHARD_SIZE) -> Path:
    """Save with ``save_pretrained`` into a temporary folder beside ``out``, then rename.

    The weights are written as safetensors shards of at most ``max_shard_size`` (with an index
    when there are several), one shard at a time from wherever the weights are (the CPU for a
    streamed model).  Nothing half-written is ever left at ``out``: a failure removes the
    temporary folder.
    """
    out = Path(out).expanduser().resolve()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if write_extra is not None:
            write_extra(tmp)  # more files, written inside the temporary folder so they land atomically
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    write_folder(out, overwrite, write)
    return out


def write_folder(out: Path, overwrite: bool, write):
    """Run ``write(tmp)`` on a temporary folder beside ``out``, then rename it to ``out``
    (replacing an existing one only with ``overwrite``); return what ``write`` returned.
    Nothing half-written is ever left at ``out``: a failure removes the temporary folder."""
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        result = write(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is set aside first, put back if the
    rename fails, and removed once the new folder is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@dataclass
class PruneReport:
    plan: Any | None  # the depth plan; None when width alone removed everything (--split picked 0)
    out: Path | None
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    perplexity_before: dict[str, float] = field(default_factory=dict)
    perplexity_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    ppl_windows: int | None = None
    width: Any | None = None  # the WidthPlan, when width pruning took part
    depth_width: dict | None = None  # with --split: the split chosen and every candidate tried


def model_card(report: PruneReport, loaded, command: str) -> str:
    plan = report.plan
    rows = "\n".join(f"| {s} | {before:.2f} | {report.perplexity_after.get(s, float('nan')):.2f} |"
                     for s, before in report.perplexity_before.items())
    windows = "all" if report.ppl_windows is None else f"first {report.ppl_windows}"
    ppl = (f"\n## Perplexity (128-token windows, {windows}, no BOS)\n\n| text | before | after |\n|---|---|---|\n"
           f"{rows}\n") if rows else ""
    return f"""---
library_name: transformers
tags: [layerfold, depth-pruning]
---
# {Path(str(loaded.source)).name} pruned by layerfold ({plan.method})

Made with [layerfold](https://github.com/) from `{loaded.source}`: {report.layers_before} -> {report.layers_after}
decoder layers, {report.params_before:,} -> {report.params_after:,} parameters. Load it with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>")
```

## How it was made

    {command}

{plan.summary()}

Criterion: {plan.criterion or '-'}; threshold: {plan.threshold if plan.threshold is not None else '-'};
merge: {json.dumps(plan.merge) if plan.merge else '-'}; calibration: {json.dumps(plan.calibration)}.
The full plan is in `plan.json`; `layerfold prune {loaded.source} --plan plan.json` applies it again.
{ppl}"""
