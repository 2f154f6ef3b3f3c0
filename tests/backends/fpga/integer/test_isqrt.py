"""Integer square root: exact floor(sqrt(n)) on boundary cases and large random samples.
Every int32 is covered by tools/check_isqrt_exhaustive.py (too slow for the test run)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from edgeq.errors import OptionError
from edgeq.backends.fpga.integer import IntGraphBuilder, ISqrt, QTensor
from edgeq.backends.fpga.integer.builder import OPSET, onnx_type
from edgeq.backends.fpga.integer.isqrt import newton_iterations


def exact_isqrt(n: np.ndarray) -> np.ndarray:
    """math.isqrt, elementwise (exact for any size)."""
    return np.array([math.isqrt(int(v)) for v in np.ravel(n)], dtype=np.int64).reshape(np.shape(n))


def _isqrt_model(dtype: type, value_bits: int) -> onnx.ModelProto:
    builder = IntGraphBuilder()
    n = builder.declare_value("n", dtype)
    root = ISqrt(value_bits).emit(builder, n)
    graph = onnx.helper.make_graph(builder.nodes, "isqrt",
                                   [onnx.helper.make_tensor_value_info("n", onnx_type(dtype), ["N"])],
                                   [onnx.helper.make_tensor_value_info(root, onnx_type(dtype), ["N"])],
                                   builder.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def int32_boundaries() -> np.ndarray:
    """0, 1, 2^31-1, every perfect square below 2^31 and both its neighbours."""
    k = np.arange(0, 46341, dtype=np.int64)  # 46340^2 < 2^31 - 1 < 46341^2
    squares = k * k
    values = np.concatenate([squares - 1, squares, squares + 1, [0, 1, 2, 3, 2**31 - 2, 2**31 - 1],
                             2 ** np.arange(31, dtype=np.int64), 2 ** np.arange(1, 31, dtype=np.int64) - 1])
    return np.unique(values[(values >= 0) & (values <= 2**31 - 1)])


def test_int32_boundaries_exact(run_model) -> None:
    n = int32_boundaries().astype(np.int32)
    expected = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int64)  # exact here: float64 sqrt of int32
    assert np.array_equal(expected[:1000], exact_isqrt(n[:1000]))
    got = run_model(_isqrt_model(np.int32, 31), {"n": n})
    assert np.array_equal(got, expected)
    assert np.array_equal(ISqrt(31).reference(n), expected)


def test_int32_random_sample_exact(run_model, rng) -> None:
    n = np.concatenate([rng.integers(0, 2**31, 1_000_000), rng.integers(0, 2**16, 100_000)]).astype(np.int32)
    expected = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int32)
    assert np.array_equal(run_model(_isqrt_model(np.int32, 31), {"n": n}), expected)
    assert np.array_equal(ISqrt(31).reference(n[:200_000]), expected[:200_000])


def test_negative_inputs_give_zero(run_model) -> None:
    n = np.array([-1, -(2**31), -12345], np.int32)
    assert run_model(_isqrt_model(np.int32, 31), {"n": n}).tolist() == [0, 0, 0]


def test_62_bit_exact(run_model, rng) -> None:
    """The width LayerNorm uses: squares and neighbours up to 2^62, powers of two, random."""
    roots = np.concatenate([rng.integers(0, 2**31, 3000), [0, 1, 2, 2**31 - 1]])
    roots = roots[roots * roots < 2**62]
    squares = roots * roots
    n = np.concatenate([squares, squares + 1, np.maximum(squares - 1, 0), 2 ** np.arange(62),
                        2 ** np.arange(1, 63) - 1, rng.integers(0, 2**62, 20000), rng.integers(0, 2**20, 2000)])
    n = n[(n >= 0) & (n < 2**62)].astype(np.int64)
    expected = exact_isqrt(n)
    assert np.array_equal(run_model(_isqrt_model(np.int64, 62), {"n": n}), expected)
    assert np.array_equal(ISqrt(62).reference(n), expected)


def test_iteration_count_matches_the_error_recursion() -> None:
    assert newton_iterations(31) == 5 and newton_iterations(62) == 6
    assert ISqrt(31).work_dtype == np.uint32 and ISqrt(62).work_dtype == np.uint64


@pytest.mark.parametrize("value_bits", [0, 63])
def test_unsupported_widths(value_bits: int) -> None:
    with pytest.raises(OptionError):
        ISqrt(value_bits)


def test_isqrt_accepts_qtensor_names(run_model) -> None:
    builder = IntGraphBuilder()
    n = QTensor("n", np.int32, 1.0)
    root = ISqrt().emit(builder, builder.declare(n))
    model = builder.to_model([(n, [4])], [QTensor(root, np.int32, 1.0)])
    assert run_model(model, {"n": np.array([0, 15, 16, 2**31 - 1], np.int32)}).tolist() == [0, 3, 4, 46340]
