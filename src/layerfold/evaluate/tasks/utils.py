"""Prompt helpers that the task YAMLs of this folder name with ``!function utils.<name>``.

lm-evaluation-harness loads this file by path (next to the YAML), so it must stay free of
layerfold imports.  Each helper reproduces what lm-eval's built-in task of the same name
renders; ``tests/test_zeroshot.py`` checks the rendering against the built-in task.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_BRACKETED = re.compile(r"\[.*?\]")


def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry markup such as "[title]" and "[header]" that the harness removes.
    text = text.strip().replace(" [title]", ". ")
    return _BRACKETED.sub("", text).replace("  ", " ")


def hellaswag_docs(dataset):
    """Add ``query`` (activity label + context) and cleaned ``choices`` to each record."""

    def add_fields(doc: dict) -> dict:
        context = f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}"
        return {"query": _hellaswag_clean(context), "choices": [_hellaswag_clean(e) for e in doc["endings"]]}

    base = getattr(dataset, "_fingerprint", None)
    if base is None:
        return dataset.map(add_fields, keep_in_memory=True)
    # datasets identifies a function of a module by its name only, so an edit of the cleaning
    # above would silently reuse a stale cached map: key the cache on this file's source too.
    fingerprint = hashlib.sha256(base.encode() + Path(__file__).read_bytes()).hexdigest()[:32]
    return dataset.map(add_fields, new_fingerprint=fingerprint)


def _blank(doc: dict) -> int:
    return doc["sentence"].index("_")


def winogrande_contexts(doc: dict) -> list[str]:
    """The sentence up to the blank, filled with each option: the harness varies the context."""
    head = doc["sentence"][: _blank(doc)]
    return [head + doc["option1"], head + doc["option2"]]


def winogrande_continuation(doc: dict) -> str:
    """What follows the blank: the scored continuation, the same for both contexts."""
    return doc["sentence"][_blank(doc) + 1 :].strip()


def winogrande_answer_index(doc: dict) -> int:
    """Index of the right context ("1" or "2" in the data)."""
    return {"1": 0, "2": 1}[doc["answer"]]


_COPA_CONNECTIVE = {"cause": "because", "effect": "therefore"}


def copa_premise(doc: dict) -> str:
    """The premise without its final period, joined to the alternatives by because/therefore."""
    return f"{doc['premise'].strip()[:-1]} {_COPA_CONNECTIVE[doc['question']]}"


def copa_choices(doc: dict) -> list[str]:
    """Both alternatives, first letter lower-cased, each after a space."""
    return [" " + text[0].lower() + text[1:] for text in (doc["choice1"], doc["choice2"])]
