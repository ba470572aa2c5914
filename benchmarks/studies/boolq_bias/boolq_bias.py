"""How much of a pruned model's BoolQ accuracy is its yes/no bias?

BoolQ asks yes/no questions; 62.2% of its validation answers are "yes".  A model that answers "yes"
to everything scores 62.2, one that answers "no" to everything 37.8, without reading a passage.  For
every row of ``benchmarks/quality/run.py --zs-docs`` with BoolQ outcomes this reports the accuracy, the
share of questions answered "yes" (recovered from each document's outcome and its gold answer), and
the balanced accuracy, the mean of the accuracies on the "yes" and the "no" questions: 50 for any
answerer that ignores the question, whatever its bias.

    R=benchmarks/quality/results.jsonl
    python benchmarks/studies/boolq_bias/boolq_bias.py --rows "SmolLM2-135M=$R@model=SmolLM2-135M,table=full-sets"

``--rows`` takes ``LABEL=PATH`` as benchmarks/quality/paired.py does (``;`` joins sources).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from quality.paired import outcomes, read  # noqa: E402


def boolq_answers() -> np.ndarray:
    """The gold answers of BoolQ validation in the order lm-evaluation-harness scores them (1 = yes)."""
    import datasets

    from layerfold.evaluate.zeroshot import TASKS, prepare_tasks, task_data_files

    (path,) = task_data_files(TASKS["boolq"], prepare_tasks(["boolq"]))
    return np.asarray(datasets.Dataset.from_file(str(path))["answer"], dtype=np.uint8)


def bias(correct: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy, share answered yes and balanced accuracy of outcomes ``correct`` on the first
    ``len(correct)`` questions, whose gold answers are ``gold``."""
    gold = gold[: len(correct)]
    said_yes = np.where(correct == 1, gold, 1 - gold)
    return {"accuracy": float(correct.mean()), "yes_rate": float(said_yes.mean()),
            "balanced": float((correct[gold == 1].mean() + correct[gold == 0].mean()) / 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", action="append", required=True, help="LABEL=PATH of quality.py --zs-docs rows")
    args = parser.parse_args()
    gold = boolq_answers()
    print(f"BoolQ validation: {len(gold)} questions, {100 * gold.mean():.1f}% answered yes. Balanced accuracy: the "
          "mean of the accuracies on the yes and on the no questions (50: the answer ignores the question).\n")
    print("| model | ratio | configuration | questions | accuracy | answered yes | balanced accuracy |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.rows:
        label, rows = read(spec)
        for row in sorted(rows, key=lambda r: (r["ratio"], r["config"])):
            if "boolq" not in row.get("zeroshot_docs", {}):
                continue
            (correct,) = outcomes(row, "zeroshot", ["boolq"])
            b = bias(correct, gold)
            print(f"| {label} | {row['ratio']:.0%} | {row['config']} | {len(correct)} | {100 * b['accuracy']:.1f} | "
                  f"{100 * b['yes_rate']:.1f} | {100 * b['balanced']:.1f} |")


if __name__ == "__main__":
    main()
