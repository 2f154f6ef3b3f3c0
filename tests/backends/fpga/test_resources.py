"""FPGA resource/latency model: published must-shows, ONNX extraction, folding, devices."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import CostModelError, EdgeqError, OptionError
from edgeq.backends.fpga import (
    AttentionMatMul,
    FoldingError,
    LayerFolding,
    LayoutOp,
    MatVecLayer,
    NonlinearUnit,
    UnpricedOpError,
    estimate,
    layers_from_onnx,
)
from edgeq.backends.fpga.reference import (
    FQBERT_MEASURED,
    FQBERT_OVERLAY,
    UNSW_FOLDING,
    UNSW_MEASURED,
    fq_bert_layers,
    unsw_nb15_layers,
)
from edgeq.backends.fpga.devices import (
    CATALOG,
    UnknownDeviceError,
    device_names,
    get_device,
)

OPSET = 25  # first opset whose QuantizeLinear/DequantizeLinear accept INT2/UINT2


# --- UNSW-NB15 MLP (FINN cybersecurity example) -------------------------------------------------
def _unsw_layers_direct() -> list[MatVecLayer]:
    # 600-64-64-64-1, bipolar (1-bit signed) input, 2-bit weights, 2-bit ReLU, bipolar output.
    return [
        MatVecLayer("fc0", 64, 600, weight_bits=2, act_bits=1, out_bits=2, act_signed=True),
        MatVecLayer("fc1", 64, 64, weight_bits=2, act_bits=2, out_bits=2),
        MatVecLayer("fc2", 64, 64, weight_bits=2, act_bits=2, out_bits=2),
        MatVecLayer("fc3", 1, 64, weight_bits=2, act_bits=2, out_bits=1),
    ]


def _unsw_folding() -> dict[str, LayerFolding]:
    return {"fc0": LayerFolding(16, 40), "fc1": LayerFolding(1, 64),
            "fc2": LayerFolding(1, 64), "fc3": LayerFolding(1, 1)}


def test_unsw_reference_list_is_the_direct_list():
    assert unsw_nb15_layers() == _unsw_layers_direct()
    assert UNSW_FOLDING == _unsw_folding()


def test_unsw_nb15_must_show():
    report = estimate(_unsw_layers_direct(), "pynq-z1", template="dataflow",
                      folding=_unsw_folding(), clock_mhz=100.0)
    assert report.template == "dataflow" and report.fits
    lut_ratio = report.totals.lut / UNSW_MEASURED["lut"].value  # 7,234 LUT, OOC synthesis
    bram_ratio = report.totals.bram18 / UNSW_MEASURED["bram18"].value  # 44 BRAM18
    cycle_ratio = report.latency_cycles / UNSW_MEASURED["latency_cycles"].value  # 213 cycles
    assert 0.5 <= lut_ratio <= 1.6, lut_ratio
    assert 0.8 <= bram_ratio <= 1.2, bram_ratio
    assert 0.7 <= cycle_ratio <= 1.3, cycle_ratio
    # per-layer cycles are FINN's MH/PE * MW/SIMD
    assert [row.cycles for row in report.rows] == [60, 64, 64, 64]
    assert any("lut_estimation" in a for a in report.assumptions)


def _qdq_activation(x: str, out: str, scale: str, zp: str) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [x, scale, zp], [out + "_q"], name=out + "_Q"),
            helper.make_node("DequantizeLinear", [out + "_q", scale, zp], [out], name=out + "_DQ")]


def _unsw_onnx(weight_dtype: int = TensorProto.INT2) -> onnx.ModelProto:
    """600-64-64-64-1 QDQ MLP: INT2 (or int8 holding 2-bit values) weights, UINT2 activations."""
    rng = np.random.RandomState(0)
    sizes = [600, 64, 64, 64, 1]
    inits = [numpy_helper.from_array(np.float32(0.5), "a_scale"),
             helper.make_tensor("a_zp", TensorProto.UINT2, [], [0]),
             numpy_helper.from_array(np.float32(0.25), "w_scale")]
    if weight_dtype == TensorProto.INT2:
        inits.append(helper.make_tensor("w_zp", TensorProto.INT2, [], [0]))
    else:
        inits.append(numpy_helper.from_array(np.int8(0), "w_zp"))
    nodes = _qdq_activation("x", "a0", "a_scale", "a_zp")
    act = "a0"
    for i in range(4):
        w = rng.randint(-2, 2, size=(sizes[i], sizes[i + 1])).astype(np.int8)
        if weight_dtype == TensorProto.INT2:
            inits.append(helper.make_tensor(f"w{i}", TensorProto.INT2, w.shape, w.flatten()))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(rng.randn(sizes[i + 1]).astype(np.float32), f"b{i}"))
        nodes += [
            helper.make_node("DequantizeLinear", [f"w{i}", "w_scale", "w_zp"], [f"w{i}_dq"],
                             name=f"w{i}_DQ"),
            helper.make_node("MatMul", [act, f"w{i}_dq"], [f"mm{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"pre{i}"], name=f"bias{i}"),
            helper.make_node("Relu", [f"pre{i}"], [f"relu{i}"], name=f"relu{i}"),
        ]
        nodes += _qdq_activation(f"relu{i}", f"a{i + 1}", "a_scale", "a_zp")
        act = f"a{i + 1}"
    graph = helper.make_graph(nodes, "unsw_nb15_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600])],
                              [helper.make_tensor_value_info(act, TensorProto.FLOAT, [1, 1])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 11
    return model


@pytest.mark.parametrize("weight_dtype", [TensorProto.INT2, TensorProto.INT8])
def test_unsw_onnx_extraction(weight_dtype):
    model = _unsw_onnx(weight_dtype)
    onnx.checker.check_model(model, full_check=True)
    # ONNX Runtime runs it, so the QDQ graph is a real, executable model. ORT 1.32's QDQ fusion
    # (MatMul+Add -> QGemm) rejects 2-bit inputs, so run the unfused reference kernels.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones((1, 600), np.float32)})
    assert y.shape == (1, 1)

    layers = layers_from_onnx(model)
    matvecs = [layer for layer in layers if isinstance(layer, MatVecLayer)]
    assert [(m.name, m.mh, m.mw, m.vectors) for m in matvecs] == [
        ("fc0", 64, 600, 1), ("fc1", 64, 64, 1), ("fc2", 64, 64, 1), ("fc3", 1, 64, 1)]
    # INT2 storage gives 2 bits from the dtype; int8 storage of values in [-2, 1] is narrowed
    assert all(m.weight_bits == 2 and m.weight_signed for m in matvecs)
    assert all(m.act_bits == 2 and not m.act_signed and m.out_bits == 2 for m in matvecs)
    assert matvecs[0].absorbed == ("bias0", "relu0", "a1_Q")
    assert all(isinstance(layer, (MatVecLayer, LayoutOp)) for layer in layers)
    assert any(isinstance(op, LayoutOp) and "host" in op.reason for op in layers)  # input Q

    # ONNX has no 1-bit type, so the bipolar input of FINN's model becomes a 2-bit one here:
    # same cycles and weight memory, more LUTs in fc0 than the bipolar original.
    from_onnx = estimate(layers, "pynq-z1", template="dataflow", folding=_unsw_folding())
    direct = estimate(_unsw_layers_direct(), "pynq-z1", template="dataflow",
                      folding=_unsw_folding())
    assert [r.cycles for r in from_onnx.rows] == [r.cycles for r in direct.rows]
    assert from_onnx.totals.bram18 == direct.totals.bram18
    assert from_onnx.rows[0].resources.lut > direct.rows[0].resources.lut


def test_matmulinteger_graph_extraction():
    w = np.arange(-8, 8, dtype=np.int8).reshape(16, 1).repeat(8, axis=1)  # needs 4 bits
    nodes = [helper.make_node("MatMulInteger", ["x", "w"], ["acc"], name="mmi"),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["accf", "s"], ["y"], name="scale")]
    graph = helper.make_graph(
        nodes, "int_only", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.1), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(CostModelError, match="not static"):
        layers_from_onnx(model)
    (layer,) = layers_from_onnx(model, input_shapes={"x": [4, 16]})
    assert (layer.mh, layer.mw, layer.vectors) == (8, 16, 4)
    assert (layer.weight_bits, layer.act_bits, layer.act_signed) == (4, 8, False)
    assert layer.out_bits is None and layer.absorbed == ("cast", "scale")


def test_attention_and_softmax_extraction():
    zp8 = helper.make_tensor("zp", TensorProto.INT8, [], [0])
    nodes = (_qdq_activation("q", "qa", "s", "zp") + _qdq_activation("kt", "ka", "s", "zp")
             + [helper.make_node("MatMul", ["qa", "ka"], ["scores"], name="qk"),
                helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="softmax")])
    graph = helper.make_graph(
        nodes, "attn",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 12, 128, 64]),
         helper.make_tensor_value_info("kt", TensorProto.FLOAT, [1, 12, 64, 128])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 12, 128, 128])],
        [numpy_helper.from_array(np.float32(0.1), "s"), zp8])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    layers = [x for x in layers_from_onnx(model) if not isinstance(x, LayoutOp)]
    assert layers == [
        AttentionMatMul("qk", heads=12, rows=128, cols=128, depth=64, a_bits=8, b_bits=8),
        NonlinearUnit("softmax", "softmax", rows=12 * 128, row_length=128, bits=None),
    ]


# --- FQ-BERT (overlay) --------------------------------------------------------------------------
def test_fq_bert_must_show():
    report = estimate(fq_bert_layers(), "zcu102", template="overlay", overlay=FQBERT_OVERLAY)
    assert report.template == "overlay"
    assert FQBERT_OVERLAY.lanes == 1536 and report.clock_mhz == 214.0
    latency_ratio = report.latency_ms / FQBERT_MEASURED["latency_ms"].value  # 43.89 ms
    dsp_ratio = report.totals.dsp / FQBERT_MEASURED["dsp"].value  # 1,751 DSP
    assert 0.7 <= latency_ratio <= 1.4, latency_ratio
    assert 0.7 <= dsp_ratio <= 1.3, dsp_ratio
    assert any("no DSP packing" in a for a in report.assumptions)
    assert any("16 lanes" in a for a in report.assumptions)


def test_fq_bert_layer_list_counts():
    layers = fq_bert_layers()
    macs = sum(x.macs for x in layers if isinstance(x, (MatVecLayer, AttentionMatMul)))
    # 12 x (4·768² + 2·768·3072 + 2·12·128·64)·128 MACs of BERT-base at sequence 128
    assert macs == 12 * (4 * 768 * 768 + 2 * 768 * 3072) * 128 + 12 * 2 * 12 * 128 * 128 * 64


def test_w4a8_packing_halves_array_dsps_and_keeps_cycles():
    packed_cfg = dataclasses.replace(FQBERT_OVERLAY, pack_two_per_dsp=True)
    plain = estimate(fq_bert_layers(), "zcu102", template="overlay", overlay=FQBERT_OVERLAY)
    packed = estimate(fq_bert_layers(), "zcu102", template="overlay", overlay=packed_cfg)
    array = {r.name: r.resources.dsp for r in plain.units}["pe_array"]
    packed_array = {r.name: r.resources.dsp for r in packed.units}["pe_array"]
    assert (array, packed_array) == (1536, 768)
    assert packed.latency_cycles == plain.latency_cycles


def test_auto_template_choice():
    small = estimate(_unsw_layers_direct(), "pynq-z1", fps=1e6)
    assert small.template == "dataflow"
    assert "auto: the dataflow template fits" in small.assumptions[0]
    bert = estimate(fq_bert_layers(encoders=1), "zcu102")  # weights do not fit on chip
    assert bert.template == "overlay"
    assert bert.assumptions[0].startswith("auto: the dataflow template does not fit")


def _units(report) -> dict:
    return {row.name: row for row in report.units}


def _minilm_w8a8_layers() -> list:
    """A MiniLM-shaped encoder (hidden 384, 12 heads of 32, FFN 1536), W8A8, with a GELU whose
    int32 input the activation buffer must hold: the shape `edgeq compile --target fpga` prices."""
    base = fq_bert_layers(encoders=1, hidden=384, ffn=1536)
    layers = [dataclasses.replace(x, weight_bits=8) if isinstance(x, MatVecLayer) else x for x in base]
    return layers + [NonlinearUnit("gelu_int32_in", "gelu", 128, 1536, bits=32)]


def test_default_overlay_reserves_the_requantisers_it_instantiates():
    """The array sizing and the requantiser unit use one count per PU (Q.K^T of depth 32 over 8
    PEs needs 2 per PU, not the 1 the sizing used to reserve); the DSPs stay within the limit."""
    from edgeq.backends.fpga.overlay import default_overlay, requantizers_per_pu
    from edgeq.backends.fpga.devices import FINN_UTILISATION_LIMITS

    layers = _minilm_w8a8_layers()
    device = get_device("zcu102")
    cfg = default_overlay(device, layers, FINN_UTILISATION_LIMITS, 214.0)
    per_pu = requantizers_per_pu(cfg, layers)
    assert per_pu == 2 and "72 DSPs per PU: 64 for the lanes, 2 requantiser(s)" in cfg.source
    report = estimate(layers, "zcu102", template="overlay")
    assert _units(report)["requant"].detail.startswith(f"2 per PU x {cfg.pus} PUs")
    assert report.totals.dsp <= device.dsp.value * FINN_UTILISATION_LIMITS.dsp


def test_default_overlay_shrinks_until_every_resource_fits():
    """BRAM18 (weight tiles grow with the array) binds before the DSPs on ZCU102: fewer PUs than
    the DSP limit allows, the report fits, and one PU more would not."""
    from edgeq.backends.fpga.overlay import OverlayConfig

    layers = _minilm_w8a8_layers()
    report = estimate(layers, "zcu102", template="overlay")
    assert report.fits, report.over_limit
    note = next(a for a in report.assumptions if a.startswith("template overlay"))
    assert "the most PUs whose LUT/FF/BRAM18/URAM/DSP fit the limits (26 by DSPs alone)" in note
    pus = int(note.split(" PUs: the most")[0].rsplit(" ", 1)[-1])
    assert pus < 26
    bigger = OverlayConfig(pus=pus + 1, pes_per_pu=8, mults_per_pe=16, clock_mhz=214.0)
    assert estimate(layers, "zcu102", template="overlay", overlay=bigger).over_limit == ("bram18",)
    # FQ-BERT-shaped W4A8 layers fit at the DSP bound
    fq = estimate(fq_bert_layers(encoders=1), "zcu102", template="overlay")
    assert fq.fits and any("as many PUs as the DSP limit allows" in a for a in fq.assumptions)


def test_default_overlay_puts_the_activation_buffer_in_uram_when_bram_is_short():
    """ZCU104 (624 BRAM18, 96 URAM): the activation buffer does not fit the BRAM at any PU count,
    so it goes to UltraRAM and the DSP-bound array fits; ZCU102 has no URAM and keeps BRAM."""
    layers = _minilm_w8a8_layers()
    report = estimate(layers, "zcu104", template="overlay")
    assert report.fits, report.over_limit
    assert report.totals.uram > 0
    assert any("activation buffer in URAM (it does not fit the BRAM)" in a for a in report.assumptions)
    assert any("the activation buffer in URAM288" in a for a in report.assumptions)
    assert estimate(layers, "zcu102", template="overlay").totals.uram == 0
    with pytest.raises(CostModelError, match="activation_memory"):
        from edgeq.backends.fpga.overlay import OverlayConfig

        OverlayConfig(pus=1, pes_per_pu=8, mults_per_pe=16, clock_mhz=100.0, activation_memory="hbm")


def test_default_overlay_says_when_nothing_fits():
    report = estimate(fq_bert_layers(encoders=1), "pynq-z1", template="overlay")
    assert not report.fits
    assert any("no PU count fits the device" in a for a in report.assumptions)


# --- no op silently costs zero ------------------------------------------------------------------
def test_unpriced_onnx_op_raises_naming_it():
    model = _unsw_onnx()
    model.graph.node.append(helper.make_node("TopK", ["a4", "k"], ["v", "i"], name="top1"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "k"))
    with pytest.raises(UnpricedOpError, match="TopK 'top1'") as info:
        layers_from_onnx(model)
    assert isinstance(info.value, CostModelError)


def test_float_matmul_raises():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="float_mm")], "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(UnpricedOpError, match="float_mm.*floating point"):
        layers_from_onnx(model)


def test_unpriced_layer_kind_raises_in_both_templates():
    layers = [MatVecLayer("fc", 8, 8, 4, 8, out_bits=8), NonlinearUnit("odd", "fft", 1, 8)]
    for template in ("dataflow", "overlay"):
        with pytest.raises(CostModelError, match="fft 'odd'"):
            estimate(layers, "kv260", template=template)


# --- folding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fps", [1e5, 1e6, 3e6])
def test_folding_search_meets_fps(fps):
    report = estimate(_unsw_layers_direct(), "pynq-z1", template="dataflow", fps=fps)
    assert report.throughput_fps >= fps
    assert all(row.cycles <= 100e6 / fps for row in report.rows)


def test_folding_search_reports_unreachable_target():
    layers = [MatVecLayer("fc", 4, 4, 2, 2, vectors=1000, out_bits=2)]
    report = estimate(layers, "pynq-z1", template="dataflow", fps=1e6)  # 100 cycles < 1000
    assert any("not reachable for 'fc'" in a for a in report.assumptions)


def test_folding_from_finn_json_file(tmp_path):
    config = {"Defaults": {}, **{name: {"PE": f.pe, "SIMD": f.simd, "ram_style": "auto",
                                        "resType": "lut", "mem_mode": "internal_decoupled"}
                                 for name, f in _unsw_folding().items()}}
    path = tmp_path / "folding.json"
    path.write_text(json.dumps(config))
    from_file = estimate(_unsw_layers_direct(), "pynq-z1", template="dataflow", folding=path)
    direct = estimate(_unsw_layers_direct(), "pynq-z1", template="dataflow",
                      folding=_unsw_folding())
    assert from_file.totals == direct.totals
    assert from_file.latency_cycles == direct.latency_cycles


def test_bad_folding_is_a_clear_error(tmp_path):
    layers = _unsw_layers_direct()
    with pytest.raises(FoldingError, match="MW=600 % SIMD=7"):
        estimate(layers, "pynq-z1", template="dataflow",
                 folding={**_unsw_folding(), "fc0": LayerFolding(16, 7)})
    with pytest.raises(FoldingError, match="does not have"):
        estimate(layers, "pynq-z1", template="dataflow",
                 folding={**_unsw_folding(), "fc9": LayerFolding()})
    with pytest.raises(FoldingError, match="no entry"):
        estimate(layers, "pynq-z1", template="dataflow", folding={"fc0": LayerFolding()})
    with pytest.raises(OptionError):
        estimate(layers, "pynq-z1", fps=1e6, folding=_unsw_folding())


# --- device catalog -----------------------------------------------------------------------------
@pytest.mark.parametrize("alias,key", [
    ("pynq-z1", "xc7z020"), ("XC7Z020", "xc7z020"), ("zcu102", "xczu9eg"),
    ("xczu9eg", "xczu9eg"), ("zcu104", "xczu7ev"), ("kv260", "xck26"), ("k26", "xck26"),
    ("zcu111", "xczu28dr"), ("u250", "xcu250")])
def test_device_aliases(alias, key):
    assert get_device(alias).key == key


def test_unknown_device_error_is_clear():
    with pytest.raises(UnknownDeviceError) as info:
        get_device("zcu999")
    message = str(info.value)
    assert "zcu999" in message and "pynq-z1" in message and "u250" in message
    assert isinstance(info.value, EdgeqError) and info.value.exit_code == 2
    assert set(device_names()) >= {"pynq-z1", "zcu102", "zcu104", "kv260", "zcu111", "u250"}


def test_catalog_numbers_all_have_sources():
    for device in CATALOG.values():
        for field, source in device.sources().items():
            assert source.strip(), (device.key, field)
        counts = device.resource_counts()
        assert counts["lut"] > 0 and counts["ff"] > 0 and counts["dsp"] > 0
        assert device.clock_mhz.value and device.clock_mhz.value > 0


@pytest.mark.parametrize("board", ["zcu102", "zcu104", "zcu111"])
def test_zynq_ultrascale_boards_have_sourced_ps_ddr_bandwidth(board):
    device = get_device(board)
    assert device.dram_gbps.value == pytest.approx(64 / 8 * 2133e6 / 1e9)
    assert "XilinxBoardStore" in device.dram_gbps.source and "DDR4_2133P" in device.dram_gbps.source
    assert all(d.dram_gbps.value for d in CATALOG.values())


def test_missing_dram_bandwidth_is_named_not_guessed():
    from edgeq.backends.fpga.devices import Sourced

    unknown = dataclasses.replace(get_device("zcu102"), dram_gbps=Sourced(None, "not in any readable source"))
    with pytest.raises(CostModelError, match="dram_gbps"):
        unknown.dram_gbps.require("dram_gbps", unknown.key)
    report = estimate(fq_bert_layers(encoders=1), unknown, template="overlay")
    assert any("board DRAM bandwidth not in catalog" in a for a in report.assumptions)


# --- report -------------------------------------------------------------------------------------
def test_report_outputs_name_template_and_assumptions():
    report = estimate(_unsw_layers_direct(), "pynq-z1", template="dataflow",
                      folding=_unsw_folding())
    data = json.loads(report.to_json())
    assert data["template"] == "dataflow" and data["fits"] is True
    assert [layer["name"] for layer in data["layers"]] == ["fc0", "fc1", "fc2", "fc3"]
    assert data["assumptions"] and data["utilisation"]["lut"] > 0
    markdown = report.to_markdown()
    assert "dataflow template" in markdown and "| fc0 |" in markdown and "Assumptions" in markdown
    text = report.to_text()
    assert "TOTAL" in text and "assumptions:" in text
