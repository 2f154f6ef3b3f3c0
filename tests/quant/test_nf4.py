"""NF4 weights (--weights nf4): the code table, packing, ONNX Runtime's own quantizer as the
reference for the MatMulBnb4 layout, and compiled linears that ORT's MatMulBnb4 runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgeq.targets.x86 import W_S4_BLOCK
from onnx import TensorProto, helper, numpy_helper

from edgeq.compiler import compile
from edgeq.errors import OptionError
from edgeq.options import CompileOptions
from edgeq.quant.nf4 import (
    _THRESHOLDS,
    NF4_TABLE,
    dequantize_nf4,
    nf4_codes,
    pack_nibbles,
    quantize_nf4,
    unpack_nibbles,
)
from edgeq.quant.numerics import dequantize, quantize_weight


def _reference_quantize(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy NF4: flatten W^T, absmax per block, nearest level, one code per entry."""
    flat = w.T.reshape(-1).astype(np.float64)
    codes, absmax = [], []
    for start in range(0, flat.size, block):
        part = flat[start:start + block]
        amax = np.abs(part).max()
        absmax.append(amax)
        scaled = part / amax if amax else part
        codes.extend(np.abs(scaled[:, None] - NF4_TABLE[None, :].astype(np.float64)).argmin(axis=1))
    return np.array(codes, np.uint8), np.array(absmax, np.float32)


def test_code_table_is_normal_quantiles_with_exact_zero():
    assert NF4_TABLE.shape == (16,) and NF4_TABLE[0] == -1.0 and NF4_TABLE[-1] == 1.0
    assert np.all(np.diff(NF4_TABLE) > 0) and NF4_TABLE[7] == 0.0
    # 8 positive levels, 7 negative: the asymmetric table of QLoRA
    assert (NF4_TABLE > 0).sum() == 8 and (NF4_TABLE < 0).sum() == 7
    np.testing.assert_allclose(_THRESHOLDS, (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2, atol=1e-7)
    assert np.array_equal(nf4_codes(NF4_TABLE), np.arange(16))


@pytest.mark.parametrize("k,n,block", [(64, 48, 64), (128, 40, 32), (96, 8, 16), (33, 7, 16)])
def test_quantize_matches_numpy_reference_and_onnxruntime_quantizer(k, n, block):
    rng = np.random.default_rng(k * n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[0, :3] = 0.0
    packed, absmax = quantize_nf4(w, block)
    codes, ref_absmax = _reference_quantize(w, block)
    assert np.array_equal(unpack_nibbles(packed, k * n), codes)
    np.testing.assert_array_equal(absmax, ref_absmax)
    # ONNX Runtime's own bnb4 quantizer (what its MatMulBnb4Quantizer writes), bit for bit.
    from onnxruntime.capi._pybind_state import quantize_matmul_bnb4
    ort_packed = np.zeros((k * n + 1) // 2, np.uint8)
    ort_absmax = np.zeros(-(-k * n // block), np.float32)
    quantize_matmul_bnb4(ort_packed, np.ascontiguousarray(w.T), ort_absmax, block, 1, n, k)
    assert np.array_equal(packed, ort_packed)
    assert np.array_equal(absmax, ort_absmax)
    deq = dequantize_nf4(packed, absmax, k, n, block)
    assert deq.shape == (k, n)
    np.testing.assert_allclose(deq, NF4_TABLE[codes].reshape(n, k).T * np.repeat(absmax, block)[:k * n]
                               .reshape(n, k).T, rtol=0, atol=0)


def test_packing_round_trip_high_nibble_first():
    codes = np.array([1, 2, 15, 0, 7], np.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x70]
    assert unpack_nibbles(packed, 5).tolist() == codes.tolist()
    rng = np.random.default_rng(0)
    many = rng.integers(0, 16, 1001).astype(np.uint8)
    assert np.array_equal(unpack_nibbles(pack_nibbles(many), many.size), many)


def test_nf4_beats_symmetric_int4_on_normal_weights_at_equal_block():
    """NF4 levels are normal quantiles: on Gaussian weights its error is below symmetric int4
    round-to-nearest at the same block size (same bits, same fp32 scale per block)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((512, 256)).astype(np.float32)
    for block in (64, 128):
        nf4 = dequantize_nf4(*quantize_nf4(w, block), 512, 256, block)
        q, s, z = quantize_weight(w, W_S4_BLOCK.blocked(block), channel_axis=1)
        int4 = dequantize(q, np.repeat(s, block, axis=0), np.repeat(z, block, axis=0))
        nf4_mse, int4_mse = np.mean((nf4 - w) ** 2), np.mean((int4 - w) ** 2)
        assert nf4_mse < 0.85 * int4_mse, (block, nf4_mse, int4_mse)


def _linear_model(k: int, n: int, *, bias: bool, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    # A Relu after the linear: a linear writing a graph output is an LM head (kept int8).
    nodes = [helper.make_node("MatMul", ["x", "w"], ["lin" if not bias else "mm"], name="linear")]
    inits = [numpy_helper.from_array(w, "w")]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["lin"], name="bias"))
        inits.append(numpy_helper.from_array(b, "b"))
    nodes.append(helper.make_node("Relu", ["lin"], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w, b


@pytest.mark.parametrize("bias", [False, True], ids=["matmul", "gemm-bias"])
def test_compiled_matmulbnb4_equals_numpy_dequantized_matmul(bias, tmp_path):
    k, n, block = 128, 48, 32
    model, w, b = _linear_model(k, n, bias=bias)
    rng = np.random.default_rng(5)
    samples = [{"x": rng.standard_normal((1, 6, k)).astype(np.float32)} for _ in range(4)]
    compiled = compile(model, "x86-vnni", CompileOptions(weights="nf4", group=block, activations="float"),
                       calibration=samples, provider="cpu")
    proto = onnx.load(compiled.save(tmp_path / "nf4.onnx"))
    bnb = [node for node in proto.graph.node if node.op_type == "MatMulBnb4"]
    assert len(bnb) == 1 and bnb[0].domain == "com.microsoft"
    attrs = {a.name: helper.get_attribute_value(a) for a in bnb[0].attribute}
    assert attrs == {"K": k, "N": n, "block_size": block, "quant_type": 1}
    assert not any(node.op_type in ("MatMul", "Gemm", "DequantizeLinear") for node in proto.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    packed, absmax = inits[bnb[0].input[1]], inits[bnb[0].input[2]]
    assert packed.dtype == np.uint8 and packed.size == k * n // 2 and absmax.size == k * n // block
    assert compiled.report.verification is not None and compiled.report.scheme.endswith("NF4")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    got = session.run(None, {"x": x})[0]
    want = np.maximum(x @ dequantize_nf4(packed, absmax, k, n, block) + (b if bias else 0), 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the quantization itself: within NF4's error of the float layer, and not the float layer
    exact = np.maximum(x @ w + (b if bias else 0), 0)
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 1e-4 < rel < 0.15


def test_nf4_options_errors():
    model, _, _ = _linear_model(64, 16, bias=False)
    samples = [{"x": np.ones((1, 2, 64), np.float32)}]
    with pytest.raises(OptionError, match="block size 512"):
        compile(model, "x86-vnni", CompileOptions(weights="nf4", group=512, activations="float"),
                calibration=samples, provider="cpu")
    with pytest.raises(OptionError, match="rounded to nearest"):
        compile(model, "x86-vnni", CompileOptions(weights="nf4", activations="float", weight_rounding="gptq"),
                calibration=samples, provider="cpu")
    with pytest.raises(OptionError, match="weight-only"):
        compile(model, "x86-vnni", CompileOptions(weights="nf4", activations="int8"), calibration=samples,
                provider="cpu")
    with pytest.raises(OptionError, match="--weights must be"):
        CompileOptions(weights="nf3")
