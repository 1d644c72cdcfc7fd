import json

import pytest

from qbert.allocate import PLAN_FORMAT, PLAN_VERSION, Plan, PlanError
from qbert.nn import linear_format


def _plan():
    return Plan({"a.query": linear_format("w4a16", group_size=64), "a.key": linear_format("w8a8"),
                 "b": linear_format("w2a8", row_groups=12, symmetric=True)}, {"method": "trace", "budget": "3bits"})


def test_json_round_trip():
    plan = _plan()
    assert Plan.from_json(plan.to_json()) == plan
    data = json.loads(plan.to_json())
    assert data["format"] == PLAN_FORMAT and data["version"] == PLAN_VERSION
    assert data["layers"]["b"] == {"name": "w2a8", "weight_bits": 2, "activation_bits": 8, "symmetric": True,
                                   "group_size": None, "row_groups": 12}


def test_save_load(tmp_path):
    path = tmp_path / "plan.json"
    _plan().save(path)
    assert Plan.load(path) == _plan()


def test_a_failed_save_leaves_the_earlier_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    _plan().save(path)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        Plan({}, {}).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(format="other"), "not a qbert plan: 'format' is 'other'"),
    (lambda d: d.update(version=2), "plan version 2; this qbert reads version 1"),
    (lambda d: d.update(layers=[]), "'layers' must be an object"),
    (lambda d: d["layers"]["b"].update(weight_bits=4), "layer 'b': .*contradicts the mode 'w2a8'"),
    (lambda d: d["layers"]["b"].update(colour="red"), "layer 'b': .*keys among"),
    (lambda d: d["layers"]["b"].update(group_size=48), "layer 'b': .*group_size must be a positive multiple of 32"),
    (lambda d: d.update(meta=[]), "'meta' must be an object"),
], ids=["format", "version", "layers", "contradiction", "unknown-key", "bad-group", "meta"])
def test_bad_plans_name_the_file_and_the_problem(tmp_path, change, match):
    data = json.loads(_plan().to_json())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"{path}: {match}"):
        Plan.load(path)


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
