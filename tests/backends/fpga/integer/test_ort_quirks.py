"""The ONNX Runtime (CPU provider) integer behaviour the kernels are built on, pinned so that an
ORT upgrade that changes any of it fails here first, not as a silent bit difference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.backends.fpga.integer.builder import OPSET, onnx_type

I64, U64 = np.dtype(np.int64), np.dtype(np.uint64)


def _model(op: str, in_dtypes: list[np.dtype], out_dtype: np.dtype, inits: tuple = (),
           **attrs: object) -> onnx.ModelProto:
    names = [f"x{i}" for i in range(len(in_dtypes))]
    inputs = [helper.make_tensor_value_info(n, onnx_type(d), None) for n, d in zip(names, in_dtypes, strict=True)]
    node = helper.make_node(op, names + [i.name for i in inits], ["y"], **attrs)
    output = helper.make_tensor_value_info("y", onnx_type(out_dtype), None)
    model = helper.make_model(helper.make_graph([node], "quirk", inputs, [output], list(inits)),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, *arrays: np.ndarray) -> list:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {f"x{i}": a for i, a in enumerate(arrays)})[0].tolist()


def _has_kernel(op: str, dtype: type, n_inputs: int = 2, **attrs: object) -> bool:
    """Whether ORT's CPU provider loads and runs `op` on `dtype` (Where gets a bool condition first)."""
    dtype = np.dtype(dtype)
    in_dtypes = [dtype] * n_inputs
    arrays = [np.ones(3, dtype)] * n_inputs
    if op == "Where":
        in_dtypes, arrays = [np.dtype(bool)] + in_dtypes, [np.ones(3, bool)] + arrays
    if op == "Clip":  # its bounds are scalars
        arrays = arrays[:1] + [np.ones((), dtype)] * (n_inputs - 1)
    try:
        _run(_model(op, in_dtypes, dtype, **attrs), *arrays)
        return True
    except Exception:  # a missing kernel is NOT_IMPLEMENTED (or a type error) at session creation
        return False


def test_integer_div_truncates_toward_zero() -> None:
    assert _run(_model("Div", [I64, I64], I64), np.array([-7, -1, 7]), np.full(3, 2)) == [-3, 0, 3]


def test_bitshift_is_unsigned_only() -> None:
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        assert _has_kernel("BitShift", dtype, direction="RIGHT")
    for dtype in (np.int8, np.int32, np.int64):
        assert not _has_kernel("BitShift", dtype, direction="RIGHT")


def test_cast_between_integers_wraps() -> None:
    to_int8 = _model("Cast", [I64], np.dtype(np.int8), to=TensorProto.INT8)
    assert _run(to_int8, np.array([127, 128, -129, 300])) == [127, -128, 127, 44]
    assert _run(_model("Cast", [I64], U64, to=TensorProto.UINT64), np.array([-1])) == [2**64 - 1]


def test_quantize_linear_rounds_half_to_even() -> None:
    qparams = (numpy_helper.from_array(np.array(1.0, np.float32), "s"),
               numpy_helper.from_array(np.array(0, np.int8), "z"))
    quantize = _model("QuantizeLinear", [np.dtype(np.float32)], np.dtype(np.int8), qparams)
    assert _run(quantize, np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)) == [0, 2, 2, 0, -2]


@pytest.mark.parametrize("op, dtype, n_inputs, expected", [
    ("Where", np.int64, 2, True), ("Where", np.uint64, 2, False), ("Where", np.int16, 2, False),
    ("ReduceSum", np.int64, 1, True), ("ReduceSum", np.uint64, 1, False), ("ReduceSum", np.int8, 1, False),
    ("ReduceMax", np.int64, 1, True), ("ReduceMax", np.uint64, 1, False),
    ("Max", np.uint64, 2, True), ("Max", np.int16, 2, False),
    ("Clip", np.int64, 3, True), ("Clip", np.int16, 3, False),  # with bounds: a bare Clip is optimized away
    ("Neg", np.uint64, 1, False), ("Sum", np.int64, 2, False),  # variadic Sum has no integer kernel
    ("Mul", np.int8, 2, True), ("Div", np.uint64, 2, True), ("BitwiseAnd", np.int64, 2, True),
])
def test_integer_kernel_coverage(op: str, dtype: type, n_inputs: int, expected: bool) -> None:
    assert _has_kernel(op, dtype, n_inputs) is expected


@pytest.mark.parametrize("op", ["Floor", "Sqrt"])
def test_float_only_ops_reject_integers(op: str) -> None:
    assert not _has_kernel(op, np.int32, 1)
