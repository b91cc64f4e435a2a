"""Budget JSON: schema, every validation error, model matching, lossless round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest

from acttail_core.allocation import AllocationSettings, allocate_sparsities
from acttail_core.budget import keep_count, load_budget, make_budget, save_budget
from acttail_core.errors import BudgetError
from acttail_core.projections import find_projections


@pytest.fixture
def tiny_budget(tiny_loaded):
    projections = find_projections(tiny_loaded.model)
    alphas = np.linspace(2, 6, len(projections))
    sparsities = allocate_sparsities(alphas, projections, 0.6, AllocationSettings(temperature=1.0))
    return make_budget(projections, sparsities, model_name="tiny", model_fingerprint=tiny_loaded.fingerprint,
                       method="acttail", target_sparsity=0.6, alphas=alphas, params={"temperature": 1.0},
                       direction="keep-light", group="projection", xmin_rule="ks")


def test_header_and_body_fields(tiny_budget) -> None:
    data = json.loads(tiny_budget.to_json())
    for field in ("schema_version", "model_name", "model_fingerprint", "method", "target_sparsity", "params",
                  "direction", "group", "xmin_rule", "weighting", "effective_sparsity", "tool_version", "created_at"):
        assert field in data
    assert data["params"] == {"temperature": 1.0} and "temperature" not in data and "eps" not in data
    assert data["weighting"] == "params"
    entry = data["projections"][0]
    assert {"name", "layer", "type", "in_features", "params", "alpha", "sparsity", "keep"} <= set(entry)
    assert entry["keep"] == keep_count(entry["sparsity"], entry["in_features"])
    assert abs(data["effective_sparsity"] - 0.6) < 1e-9


def test_save_load_identical(tiny_budget, tiny_loaded, tmp_path) -> None:
    path = save_budget(tiny_budget, tmp_path / "b.json")
    again = load_budget(path, find_projections(tiny_loaded.model), tiny_loaded.fingerprint)
    assert again == tiny_budget
    assert load_budget(path.read_bytes()) == tiny_budget


def test_keep_rounds_half_up() -> None:
    assert keep_count(0.5, 5) == 3 and keep_count(0.5, 4) == 2 and keep_count(0.0, 7) == 7


def mutate(budget, change):
    data = json.loads(budget.to_json())
    change(data)
    return data


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(schema_version=99), "schema_version: .*unsupported schema_version 99"),
        (lambda d: d.pop("model_fingerprint"), "model_fingerprint: missing field"),
        (lambda d: d["projections"][2].pop("keep"), r"projections.2.keep: missing field"),
        (lambda d: d["projections"][1].update(sparsity=1.0), r"projections.1.sparsity: .*less than 1"),
        (lambda d: d["projections"][1].update(sparsity=-0.1), r"projections.1.sparsity: .*greater than or equal to 0"),
        (lambda d: d["projections"][0].update(sparsity=float("nan")), r"projections.0.sparsity"),
        (lambda d: d["projections"][1].update(name=d["projections"][0]["name"]), "duplicate projection name"),
        (lambda d: d["projections"][0].update(keep=1), r"projections.0: keep must be"),
        (lambda d: d.update(method="magic"), "method: unknown method"),
        (lambda d: d.update(direction="sideways"), "direction"),
        (lambda d: d.update(effective_sparsity=0.1), "effective_sparsity 0.1 does not match"),
        (lambda d: d.update(surprise=1), "surprise: unknown field"),
    ],
)
def test_validation_errors_name_the_field(tiny_budget, change, message) -> None:
    with pytest.raises(BudgetError, match=message):
        load_budget(mutate(tiny_budget, change))


def test_nan_in_a_file_is_rejected(tiny_budget, tmp_path) -> None:
    text = tiny_budget.to_json().replace('"alpha": 2.0', '"alpha": NaN', 1)
    path = tmp_path / "nan.json"
    path.write_text(text)
    with pytest.raises(BudgetError, match="alpha"):
        load_budget(path)


def test_file_errors(tmp_path) -> None:
    with pytest.raises(BudgetError, match="not found"):
        load_budget(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(BudgetError, match="not valid JSON"):
        load_budget(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(BudgetError, match="JSON object"):
        load_budget(bad)


def test_budget_for_another_model_is_rejected(tiny_budget) -> None:
    from tests.conftest import make_tiny_llama

    bigger = find_projections(make_tiny_llama(layers=3))
    with pytest.raises(BudgetError, match="missing"):
        load_budget(json.loads(tiny_budget.to_json()), bigger)
    wider = find_projections(make_tiny_llama(hidden=96))
    with pytest.raises(BudgetError, match="in the budget but"):
        load_budget(json.loads(tiny_budget.to_json()), wider)
    data = json.loads(tiny_budget.to_json())
    data["projections"][0]["name"] = "model.layers.0.self_attn.x_proj"
    with pytest.raises(BudgetError, match="missing|not a projection"):
        load_budget(data, find_projections(make_tiny_llama()))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(schema_version="1"), "schema_version: Input should be a valid integer"),
        (lambda d: d.update(schema_version=1.0), "schema_version: Input should be a valid integer"),
        (lambda d: d.update(schema_version=True), "schema_version: Input should be a valid integer"),
        (lambda d: d["projections"][0].update(layer="0"), r"projections.0.layer: Input should be a valid integer"),
        (lambda d: d.update(target_sparsity="0.6"), "target_sparsity: Input should be a valid number"),
        (lambda d: d.update(target_sparsity=0.3), "target_sparsity 0.3 does not match"),
        (lambda d: d.update(target_sparsity=0.97), "target_sparsity: .*less than or equal to 0.95"),
        (lambda d: d.update(params={"temperature": 1e6}), "params: temperature must be in \\[0, 1000\\]"),
        (lambda d: d.update(params={"eps": 0.5}), "params: 'eps' is not a knob of method 'acttail'"),
        (lambda d: d.update(params={"temperature": "1"}), "params.temperature: Input should be a valid number"),
        (lambda d: d.update(temperature=1.0), "temperature: a version-2 budget keeps temperature in params"),
        (lambda d: d.update(created_at="yesterday"), "created_at: not an ISO 8601"),
    ],
)
def test_strict_types_and_header_checks(tiny_budget, change, message) -> None:
    with pytest.raises(BudgetError, match=message):
        load_budget(mutate(tiny_budget, change))


def test_keep_zero_everywhere_is_refused(tiny_budget) -> None:
    def zero_keep(d):
        for entry in d["projections"]:
            entry["sparsity"], entry["keep"] = 0.999, 0
        d["target_sparsity"] = d["effective_sparsity"] = 0.999

    with pytest.raises(BudgetError, match="target_sparsity: .*less than or equal to 0.95"):
        load_budget(mutate(tiny_budget, zero_keep))
    with pytest.raises(BudgetError, match=r"projections.0.keep: Input should be greater than or equal to 1"):
        load_budget(mutate(tiny_budget, lambda d: d["projections"][0].update(sparsity=0.995, keep=0)))


def test_duplicate_keys_oversize_and_pathological_json(tiny_budget, tmp_path) -> None:
    text = tiny_budget.to_json()
    with pytest.raises(BudgetError, match="duplicate key 'method'"):
        load_budget(text.replace('"method": "acttail"', '"method": "uniform", "method": "acttail"'))
    with pytest.raises(BudgetError, match="nested too deeply"):
        load_budget(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(BudgetError, match="not valid JSON"):
        load_budget(b'{"schema_version": 1' + b"0" * 5000 + b"}")
    with pytest.raises(BudgetError, match="more than a budget can be"):
        load_budget(b" " * (5 << 20) + text.encode())
    big = tmp_path / "big.json"
    big.write_bytes(text.encode() + b" " * (5 << 20))
    with pytest.raises(BudgetError, match="more than a budget can be"):
        load_budget(big)


def test_entry_layer_and_type_are_checked_against_the_model(tiny_budget, tiny_loaded) -> None:
    projections = find_projections(tiny_loaded.model)
    with pytest.raises(BudgetError, match=r"projections\[0\].layer: .* has layer 1 in the budget but 0"):
        load_budget(mutate(tiny_budget, lambda d: d["projections"][0].update(layer=1)), projections)
    with pytest.raises(BudgetError, match=r"projections\[0\].type: .* has type 'k' in the budget but 'q'"):
        load_budget(mutate(tiny_budget, lambda d: d["projections"][0].update(type="k")), projections)


def test_another_models_budget_needs_an_explicit_override(tiny_budget, tiny_loaded) -> None:
    projections = find_projections(tiny_loaded.model)
    data = mutate(tiny_budget, lambda d: d.update(model_fingerprint="0123456789abcdef"))
    with pytest.raises(BudgetError, match="made for weights 0123456789abcdef.*budget made for other weights"):
        load_budget(data, projections, tiny_loaded.fingerprint)
    allowed = load_budget(data, projections, tiny_loaded.fingerprint, allow_other_weights=True)
    assert allowed.model_fingerprint == "0123456789abcdef"


# --------------------------------------------------------------------------- schema version 2


RECORD = {"texts": ["demo:lcet10"], "tokens": 2046, "seqlen": 1024, "search": "coordinate", "runs": 11,
          "seconds": 412.5, "uniform_nll": 6.2, "nll": 5.9}


def test_version_1_files_still_load_unchanged(tiny_budget) -> None:
    """A file written before version 2 (no calibration field, a version-1 method) loads as it was."""
    data = json.loads(tiny_budget.to_json())
    assert data["schema_version"] == 2 and data["calibration"] is None
    data["schema_version"] = 1
    del data["calibration"]
    data["temperature"] = data.pop("params")["temperature"]  # version 1 kept each knob in a field of its own
    old = load_budget(data)
    assert old.schema_version == 1 and old.calibration is None
    assert old.sparsity_by_name() == tiny_budget.sparsity_by_name()
    assert old.knob("temperature") == tiny_budget.knob("temperature") == 1.0 and old.knob("eps") is None
    assert json.loads(old.to_json())["temperature"] == 1.0 and "params" not in json.loads(old.to_json())
    with pytest.raises(BudgetError, match="params: needs schema_version 2"):
        load_budget({**data, "params": {"temperature": 1.0}})


def test_calibration_record_round_trip_and_field_errors(tiny_budget, tmp_path) -> None:
    from acttail_core.budget import CalibrationRecord

    calibrated = tiny_budget.model_copy(update={"calibration": CalibrationRecord(**RECORD)})
    path = save_budget(calibrated, tmp_path / "calibrated.json")
    again = load_budget(path)
    assert again == calibrated and again.calibration.runs == 11
    for change, message in [
        (lambda d: d.update(schema_version=1, temperature=d.pop("params")["temperature"]),
         "calibration: .*needs schema_version 2"),
        (lambda d: d["calibration"].update(runs=0), r"calibration.runs: .*greater than or equal to 1"),
        (lambda d: d["calibration"].update(search="grid"), r"calibration.search"),
        (lambda d: d["calibration"].update(texts=[]), r"calibration.texts"),
        (lambda d: d["calibration"].update(extra=1), r"calibration.extra: unknown field"),
        (lambda d: d["calibration"].pop("nll"), r"calibration.nll: missing field"),
    ]:
        with pytest.raises(BudgetError, match=message):
            load_budget(mutate(calibrated, change))


def test_greedy_block_method_needs_version_2(tiny_budget) -> None:
    block = load_budget(mutate(tiny_budget, lambda d: d.update(method="greedy-block", params={})))
    assert block.method == "greedy-block"
    with pytest.raises(BudgetError, match="params: 'temperature' is not a knob of method 'greedy-block'"):
        load_budget(mutate(tiny_budget, lambda d: d.update(method="greedy-block")))
    with pytest.raises(BudgetError, match="method: method 'greedy-block' needs schema_version 2"):
        load_budget(mutate(tiny_budget, lambda d: d.update(method="greedy-block", schema_version=1, calibration=None,
                                                           params={})))
    with pytest.raises(BudgetError, match="schema_version: unsupported schema_version 3"):
        load_budget(mutate(tiny_budget, lambda d: d.update(schema_version=3)))
