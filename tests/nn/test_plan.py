import json

import pytest

from qbert.nn import Rounding, linear_format
from qbert.nn.plan import PLAN_FORMAT, PLAN_VERSION, Plan, PlanError


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
    (lambda d: d.update(version=3), "plan version 3; this qbert reads versions 1, 2"),
    (lambda d: d.update(layers=[]), "'layers' must be an object"),
    (lambda d: d["layers"]["b"].update(weight_bits=4), "layer 'b': .*contradicts the mode 'w2a8'"),
    (lambda d: d["layers"]["b"].update(group_size=48), "layer 'b': .*group_size must be a positive multiple of 32"),
    (lambda d: d.update(meta=[]), "'meta' must be an object"),
], ids=["format", "version", "layers", "contradiction", "bad-group", "meta"])
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


def _with_entry(entry: dict):
    def change(data):
        data["layers"]["b"] = entry
    return change


W2A8 = {"name": "w2a8", "weight_bits": 2, "activation_bits": 8, "symmetric": True, "group_size": None,
        "row_groups": 12}
W8A8 = {"name": "w8a8", "weight_bits": 8, "activation_bits": 8, "symmetric": True, "group_size": None,
        "row_groups": None}


def _assert_refused_in_file_and_text(tmp_path, data: dict, match: str) -> None:
    """``data`` is a PlanError matching ``match`` after the source: ``Plan.load`` names the file,
    ``Plan.from_json`` the default source ``plan``."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"^{path}: {match}"):
        Plan.load(path)
    with pytest.raises(PlanError, match=f"^plan: {match}"):
        Plan.from_json(json.dumps(data))


@pytest.mark.parametrize("change,match", [
    (_with_entry({**W8A8, "group_size": 64}), "w8a8 is per-channel symmetric int8 and takes no group_size"),
    (_with_entry({**W8A8, "symmetric": False}), "w8a8 is per-channel symmetric int8 and takes no group_size"),
    (_with_entry({**W8A8, "row_groups": 4}), "w8a8 is per-channel symmetric int8 and takes no group_size"),
    (_with_entry({**W2A8, "weight_bits": 2.0}), "weight_bits must be int, got float 2.0"),
    (_with_entry({**W2A8, "weight_bits": True}), "weight_bits must be int, got bool True"),
    (_with_entry({**W2A8, "symmetric": "false"}), "symmetric must be bool, got str 'false'"),
    (_with_entry({**W2A8, "symmetric": 0}), "symmetric must be bool, got int 0"),
    (_with_entry({**W2A8, "row_groups": 12.0}), "row_groups must be int or None, got float 12.0"),
    (_with_entry({**W2A8, "row_groups": None, "group_size": "64"}), "group_size must be int or None, got str '64'"),
    (_with_entry({**W2A8, "activation_bits": 4}), "activation_bits must be 8 .* or None .*, got 4"),
    (_with_entry({**W2A8, "activation_bits": None}), r"\(a w2a16 format\) contradicts the mode 'w2a8'"),
    (_with_entry({**W2A8, "name": "w5a16"}), "unknown quantization mode 'w5a16'"),
    (_with_entry({**W2A8, "name": 5}), r"mode must be a mode name \(str\) or a LinearFormat, got int 5"),
    (_with_entry({**W2A8, "colour": "red"}), r"unknown keys \['colour'\], missing keys \[\]"),
    (_with_entry({"name": "w2a8", "weight_bits": 2}), r"missing keys \['activation_bits', 'symmetric'"),
    (_with_entry("w2a8"), "expected a dict with the keys"),
], ids=["w8a8-group", "w8a8-asym", "w8a8-rows", "float-bits", "bool-bits", "str-symmetric", "int-symmetric",
        "float-rows", "str-group", "a4", "contradiction", "unknown-mode", "int-name", "unknown-key", "missing-keys",
        "not-a-dict"])
def test_an_entry_no_format_serves_is_refused_with_the_layer_name(tmp_path, change, match):
    data = json.loads(_plan().to_json())
    change(data)
    _assert_refused_in_file_and_text(tmp_path, data, f"layer 'b': .*{match}")


def test_a_layer_listed_twice_is_refused(tmp_path):
    text = _plan().to_json().replace('"a.key":', '"a.query":')
    path = tmp_path / "twice.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=rf"{path}: a JSON object repeats the keys \['a.query'\]"):
        Plan.load(path)


@pytest.mark.parametrize("layers,meta,match", [
    ([("a", linear_format("w8a8"))], {}, "layers must be a dict of module name -> LinearFormat, got list"),
    ({"a": {"name": "w8a8"}}, {}, "layers must map module names to LinearFormat, got 'a': {'name': 'w8a8'}"),
    ({3: linear_format("w8a8")}, {}, "layers must map module names to LinearFormat, got 3"),
    ({}, [], "meta must be a dict, got list"),
], ids=["layers-list", "dict-entry", "int-name", "meta-list"])
def test_plan_construction_checks_its_fields(layers, meta, match):
    with pytest.raises(PlanError, match=f"^Plan: {match}"):
        Plan(layers, meta)


NESTING = 100_000  # deeper than json's recursion limit
TOO_MANY_DIGITS = 5_000  # over int's default limit on digits (4300)


@pytest.mark.parametrize("content,match", [
    (b"[" * NESTING, "not a plan: JSON nested too deeply to parse"),
    (b'{"a": ' * NESTING, "not a plan: JSON nested too deeply to parse"),
    (b"\xff\xfe{\x00}\x00", "not a plan: not UTF-8 text"),
    ('{"format": "qbert.plan", "meta": {"model": "\u00e9"}}'.encode("latin-1"), "not a plan: not UTF-8 text"),
    (b"1" * TOO_MANY_DIGITS, "not valid JSON: .*digits"),
], ids=["deep-list", "deep-object", "utf16", "latin1", "digits"])
def test_unreadable_plan_files_are_plan_errors_naming_the_file(tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(PlanError, match=f"^{path}: {match}"):
        Plan.load(path)


# ---- rounding (plan version 2) -------------------------------------------------------------------------

def _plan_with_rounding():
    plan = _plan()
    return Plan(plan.layers, plan.meta, {"a.query": Rounding("gptq", damp=0.1, act_order=True),
                                         "b": Rounding("nearest")})


def test_rounding_round_trips_through_json_and_files(tmp_path):
    plan = _plan_with_rounding()
    assert Plan.from_json(plan.to_json()) == plan
    data = json.loads(plan.to_json())
    assert data["version"] == PLAN_VERSION == 2
    assert data["rounding"] == {"a.query": {"method": "gptq", "damp": 0.1, "block_size": 128, "act_order": True},
                                "b": {"method": "nearest", "damp": 0.01, "block_size": 128, "act_order": False}}
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan and loaded.rounding["a.query"] == Rounding("gptq", damp=0.1, act_order=True)
    assert _plan() != plan  # the rounding is part of the plan


def _version_1(data: dict) -> None:
    data["version"] = 1
    del data["rounding"]


def test_a_version_1_file_loads_without_rounding(tmp_path):
    data = json.loads(_plan().to_json())
    _version_1(data)
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    loaded = Plan.load(path)
    assert loaded == _plan() and loaded.rounding == {}


@pytest.mark.parametrize("rounding", [{}, {"b": {"method": "gptq"}}], ids=["empty", "gptq"])
def test_a_version_1_file_with_rounding_is_refused(tmp_path, rounding):
    data = json.loads(_plan().to_json())
    _version_1(data)
    data["rounding"] = rounding
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=rf"^{path}: a version 1 plan has no 'rounding' \(version 2 added it\)"):
        Plan.load(path)


def test_rounding_of_a_layer_without_a_format_is_refused(tmp_path):
    with pytest.raises(PlanError, match=r"^Plan: rounding names 'c', which the plan gives no format"):
        Plan(_plan().layers, {}, {"c": Rounding("gptq")})
    data = json.loads(_plan().to_json())
    data["rounding"] = {"c": {"method": "gptq"}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=rf"^{path}: Plan: rounding names 'c', which the plan gives no format"):
        Plan.load(path)


@pytest.mark.parametrize("entry,match", [
    ({"method": "adaround"}, "method must be one of nearest, gptq, got 'adaround'"),
    ({"method": "gptq", "colour": "red"}, r"expected a dict with 'method' and optionally \['damp'"),
    ({"damp": 0.1}, r"expected a dict with 'method'"),
    ("gptq", r"expected a dict with 'method'"),
    ({"method": "gptq", "damp": -1}, "damp must be a float >= 0, got -1"),
    ({"method": "gptq", "damp": "0.1"}, "damp must be a float >= 0, got '0.1'"),
    ({"method": "gptq", "block_size": 0}, "block_size must be a positive int, got 0"),
    ({"method": "gptq", "block_size": 64.0}, "block_size must be a positive int, got 64.0"),
    ({"method": "gptq", "act_order": "yes"}, "act_order must be a bool, got 'yes'"),
], ids=["unknown-method", "unknown-key", "no-method", "not-a-dict", "damp-negative", "damp-str", "block-0",
        "block-float", "act-order-str"])
def test_a_bad_rounding_entry_is_refused_with_the_layer_name(tmp_path, entry, match):
    data = json.loads(_plan().to_json())
    data["rounding"] = {"a.query": entry}
    _assert_refused_in_file_and_text(tmp_path, data, f"rounding of 'a.query': .*{match}")


def test_rounding_must_be_an_object(tmp_path):
    data = json.loads(_plan().to_json())
    data["rounding"] = [["a.query", {"method": "gptq"}]]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=rf"^{path}: 'rounding' must be an object mapping module names"):
        Plan.load(path)


@pytest.mark.parametrize("rounding,match", [
    ([("a.query", Rounding("gptq"))], "rounding must be a dict of module name -> qbert.nn.Rounding, got list"),
    ({"a.query": "gptq"}, "rounding must map module names to qbert.nn.Rounding, got 'a.query': 'gptq'"),
    ({"a.query": {"method": "gptq"}}, "rounding must map module names to qbert.nn.Rounding, got 'a.query': {"),
], ids=["list", "str-entry", "dict-entry"])
def test_plan_construction_checks_the_rounding(rounding, match):
    with pytest.raises(PlanError, match=f"^Plan: {match}"):
        Plan(_plan().layers, {}, rounding)
