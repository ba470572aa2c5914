"""The Plan: JSON round trip, bookkeeping, and validation errors that say what is wrong."""

from __future__ import annotations

import json

import pytest

from layerfold.errors import LayerfoldError
from layerfold.plan import PLAN_VERSION, Operation, Plan


def _plan(**fields) -> Plan:
    ops = [Operation("fuse", 6, 9, score=0.93, detail={"rejected_next": 0.71}),
           Operation("drop", 2, 2, score=0.5), Operation("fuse", 0, 1)]
    base = dict(method="slm", num_layers=12, operations=ops, model="tiny", architecture="llama",
                merge={"operator": "diff", "norms": "base", "scale": 1.0}, criterion="output-cosine",
                threshold=0.87, target={"layers": 7}, calibration={"source": "books", "samples": 4},
                seed=1234, scores={"candidates_evaluated": 17}, provenance={"versions": {"torch": "x"}})
    return Plan(**{**base, **fields})


def test_bookkeeping():
    plan = _plan()
    assert plan.num_layers_after == 12 - 3 - 1 - 1 == 7
    assert plan.removed_layers == 5
    assert plan.kept_sources() == [0, 3, 4, 5, 6, 10, 11]
    assert plan.windows() == [(6, 9), (0, 1)]
    assert plan.summary() == "slm: 12 -> 7 layers (fuse 6-9; drop 2; fuse 0-1)"
    assert Plan(method="m", num_layers=4, operations=[]).summary() == "m: 4 -> 4 layers (no change)"
    scaled = Plan(method="slm", num_layers=6, operations=[Operation("fuse", 1, 3, detail={"branch_scale": 1.4})])
    assert scaled.summary() == "slm: 6 -> 4 layers (fuse 1-3 x1.4)"


def test_drop_range_removes_every_layer_in_it():
    plan = Plan(method="m", num_layers=8, operations=[Operation("drop", 2, 4)])
    assert plan.kept_sources() == [0, 1, 5, 6, 7]
    assert plan.num_layers_after == 5


def test_json_round_trip(tmp_path):
    plan = _plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    raw = json.loads(path.read_text())
    assert raw["version"] == PLAN_VERSION
    assert raw["operations"][0] == {"kind": "fuse", "lo": 6, "hi": 9, "score": 0.93,
                                    "detail": {"rejected_next": 0.71}}
    again = Plan.load(path)
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert Plan.from_dict(plan.to_dict()) == plan


def test_numpy_and_torch_scores_serialise():
    import numpy as np
    import torch

    plan = _plan(scores={"per_layer": torch.tensor([0.5, 0.25]), "best": np.float32(0.5)})
    raw = json.loads(plan.to_json())
    assert raw["scores"] == {"per_layer": [0.5, 0.25], "best": 0.5}


@pytest.mark.parametrize(("ops", "message"), [
    ([Operation("fuse", 2, 5), Operation("drop", 5, 5)], "layer 5 appears in two operations"),
    ([Operation("fuse", 2, 5), Operation("fuse", 4, 7)], "layer 4 appears in two operations"),
    ([Operation("drop", 12, 12)], r"layers 12\.\.12 outside 0\.\.11"),
    ([Operation("fuse", 10, 12)], r"layers 10\.\.12 outside 0\.\.11"),
    ([Operation("drop", -1, -1)], r"outside 0\.\.11"),
    ([Operation("fuse", 3, 3)], "has one layer"),
    ([Operation("fuse", 5, 3)], r"5\.\.3"),
    ([Operation("drop", 0, 11)], "removes every layer"),
    ([Operation("fuse", 0, 11)], None),  # one fused layer stays: allowed
    ([Operation("cut", 1, 2)], "unknown operation 'cut'"),
])
def test_validation(ops, message):
    if message is None:
        assert Plan(method="m", num_layers=12, operations=ops).num_layers_after == 1
        return
    with pytest.raises(LayerfoldError, match=message):
        Plan(method="m", num_layers=12, operations=ops)


@pytest.mark.parametrize(("raw", "message"), [
    ({"method": "m", "num_layers": 4, "operations": [], "colour": "red"}, r"unknown fields \['colour'\]"),
    ({"method": "m", "num_layers": 4, "operations": [], "version": PLAN_VERSION + 1}, "newer"),
    ({"method": "m", "num_layers": 4, "operations": [{"kind": "drop", "lo": 1}]}, "operation 1"),
    ({"method": "m", "num_layers": 4, "operations": [{"kind": "drop", "lo": 1, "hi": 1, "why": 2}]},
     "operation 1"),
    ({"method": "m", "num_layers": 4, "operations": [{"kind": "drop", "lo": "1", "hi": 1}]}, "integer"),
    ({"method": "m", "num_layers": "four", "operations": []}, "integer"),
    ({"method": "m", "operations": []}, "num_layers"),
    ({"method": "m", "num_layers": 4, "operations": {"kind": "drop"}}, "list"),
    (["not", "an", "object"], "JSON object"),
])
def test_bad_plan_files_say_what_is_wrong(raw, message, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(LayerfoldError, match=message):
        Plan.load(path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(LayerfoldError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LayerfoldError, match="not valid JSON"):
        Plan.load(bad)
