"""--latency-budget: each linear's weight width (int4/int8) chosen so that the fpga estimate on the
device meets the budget. The compiled model's own estimate is within the budget, a larger budget
widens more layers and lowers the estimated error, the widths reach the integer datapath (int8
layers' codes beyond int4's range, int4 layers' within), and bad requests are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from edgeq.models import synthetic

import edgeq
from edgeq.cli import app, main
from edgeq.errors import CostModelError, OptionError
from edgeq.options import CompileOptions
from edgeq.quant.budget import Unit, Width, choose
from edgeq.registry import get_target

# A BERT too large for the dataflow template on a Zynq-7020 (its weights do not fit on chip), so
# the estimate prices the overlay, where a layer's cycles depend on its weights' width.
CONFIG = synthetic.BertConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024,
                              max_positions=128)
DEVICE = "xc7z020"


@pytest.fixture(scope="module")
def bert_256(tmp_path_factory):
    path = tmp_path_factory.mktemp("latency") / "bert.onnx"
    onnx.save(synthetic.bert(0, CONFIG), str(path))
    return path


@pytest.fixture(scope="module")
def feeds():
    return [synthetic.bert_feeds(batch=1, seq=32, seed=i, config=CONFIG) for i in range(6)]


def _compile(path, feeds, budget):
    return edgeq.compile(path, "fpga", CompileOptions(weights="int4", latency_budget=budget), calibration=feeds,
                         cost_device=DEVICE)


def _estimate_ms(graph) -> float:
    report = get_target("fpga").cost_model.estimate(edgeq.ir.to_model_proto(graph), device=DEVICE)
    return 1e3 * report.latency_cycles / (report.clock_mhz * 1e6)


def _weight_bits(graph) -> dict[str, int]:
    """Each matrix-vector layer's weight bits as the estimate reads them from the integer model
    (codes within [-8, 7] price as 4 bits), by the float linear's name."""
    from edgeq.backends.fpga.layers import MatVecLayer, layers_from_onnx
    from edgeq.metadata import recorded_input_shapes

    proto = edgeq.ir.to_model_proto(graph)
    shapes = recorded_input_shapes({p.key: p.value for p in proto.metadata_props})
    return {layer.name: layer.weight_bits for layer in layers_from_onnx(proto, input_shapes=shapes)
            if isinstance(layer, MatVecLayer)}


def test_budgets_are_met_and_a_larger_one_buys_accuracy(bert_256, feeds):
    results = {}
    for budget in (5.0, 6.5, 100.0):
        compiled = _compile(bert_256, feeds, budget)
        choice = next(r for r in compiled.report.passes if r.name == "latency-budget").stats
        low, high = (float(x) for x in choice["reachable_ms"].split(".."))
        actual = _estimate_ms(compiled.graph)
        assert actual <= budget and abs(actual - choice["estimated_ms"]) <= 0.02 * actual  # priced as chosen
        note = next(n for n in compiled.report.notes if n.startswith("latency budget"))
        assert "within the budget" in note
        results[budget] = (choice, compiled, actual)
    assert results[5.0][0].get("int8_weights", 0) < results[6.5][0]["int8_weights"] < results[100.0][0]["int8_weights"]
    assert results[100.0][0]["int8_weights"] == 12 and "int4_weights" not in results[100.0][0]
    errors = [results[b][0]["error_estimate"] for b in (5.0, 6.5, 100.0)]
    assert errors[0] > errors[1] > errors[2]
    assert results[5.0][2] < results[6.5][2] < results[100.0][2] <= high + 1e-3 and low - 1e-3 <= results[5.0][2]
    # The chosen widths reach the integer datapath: int8 layers' codes go past int4's [-8, 7].
    widths = results[6.5][1].report.weight_widths
    bits = _weight_bits(results[6.5][1].graph)
    assert set(widths) == {"int4", "int8"} and sum(map(len, widths.values())) == len(bits) == 12
    for dtype, ops in widths.items():
        assert {bits[name] for name in ops} == {int(dtype[3:])}, (dtype, ops)


def test_a_budget_below_every_int4_layer_is_one_line(bert_256, tmp_path, feeds, capsys, monkeypatch):
    monkeypatch.setitem(app._DEBUG, "on", False)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(calib / f"s{i}.npz", **feed)
    out = tmp_path / "m.onnx"
    code = main(["compile", str(bert_256), "-t", "fpga", "--weights", "int4", "--latency-budget", "1",
                 "--device", DEVICE, "--calib", str(calib), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert "--latency-budget 1 ms is below the fastest model the weight widths reach on xc7z020" in err
    code = main(["compile", str(bert_256), "-t", "fpga", "--weights", "int4", "--latency-budget", "6.5ms",
                 "--device", DEVICE, "--calib", str(calib), "-o", str(out), "--json", "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    data = json.loads(stdout)
    assert data["report"]["options"]["latency_budget"] == 6.5
    assert data["report"]["settings"]["latency budget"].startswith("6.5 ms on xc7z020:")
    assert 1e3 * data["estimate"]["latency_cycles"] / (data["estimate"]["clock_mhz"] * 1e6) <= 6.5


@pytest.mark.parametrize("target, options, device, message", [
    ("x86-vnni", {"weights": "int4"}, None, "x86-vnni does not take --latency-budget"),
    ("fpga", {"weights": "int4"}, None, "--latency-budget is a latency on a device"),
    ("fpga", {}, DEVICE, "int8 weights leave one"),
])
def test_requests_it_cannot_serve_fail_before_work(bert_256, feeds, target, options, device, message):
    with pytest.raises(OptionError, match=message):
        edgeq.compile(bert_256, target, CompileOptions(latency_budget=5, **options), calibration=feeds,
                      cost_device=device)


def test_a_model_that_fits_as_dataflow_is_refused_with_the_reason(synthetic_bert, bert_samples):
    with pytest.raises(CostModelError, match="dataflow template") as caught:
        edgeq.compile(synthetic_bert, "fpga", CompileOptions(weights="int4", latency_budget=5), calibration=bert_samples,
                      cost_device=DEVICE)
    assert "a weight's width changes its resources, not the latency" in str(caught.value)


def test_option_parsing():
    assert CompileOptions(latency_budget="12ms").latency_budget == 12.0
    assert CompileOptions(latency_budget=3).latency_budget == 3.0
    for bad in ("x", 0, -1, "inf", True):
        with pytest.raises(OptionError, match="--latency-budget must be a positive number of milliseconds"):
            CompileOptions(latency_budget=bad)
    with pytest.raises(OptionError, match="not both"):
        CompileOptions(latency_budget=5, size_budget=0.2)


def test_the_widest_choice_fits_when_the_budget_covers_it():
    """Sizes rounded up to grid cells must not push the all-widest choice off the grid."""
    units = [Unit(f"w{i}", [f"op{i}"], [Width("int4", None, 0, 1.0), Width("int8", None, 0, 0.0)]) for i in range(12)]
    costs = [[163_900, 327_740]] * 8 + [[655_420, 1_310_780]] * 4
    picks, error = choose(units, 100_000_000, costs)
    assert picks == [1] * 12 and error == 0.0
