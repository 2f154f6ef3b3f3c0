"""Wide (int16) LayerNorm/GELU outputs and the online Walsh-Hadamard step: bit-exact in ONNX
Runtime against the numpy reference, and the transform equal to Sylvester's matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeq.errors import OptionError
from edgeq.quant.hadamard import sylvester
from edgeq.backends.fpga.integer import Gelu, IntGraphBuilder, Normalization, QTensor
from edgeq.backends.fpga.integer.program import HadamardInt, IntegerProgram


def float_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _run_program_step(run_model, step, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ORT output, numpy reference) of one program step on integer input x."""
    b = IntGraphBuilder()
    b.declare_value("x", x.dtype)
    program = IntegerProgram()
    out = program.add(step, b)
    model = b.to_model([(QTensor("x", x.dtype, 1.0), list(x.shape))],
                       [QTensor(out, b.dtype(out), 1.0)])
    return run_model(model, {"x": x}), step.run({"x": x})


@pytest.mark.parametrize("block", [2, 128, 512])
def test_hadamard_is_sylvester_blockwise_and_bit_exact(run_model, rng, block: int) -> None:
    channels = 3 * block
    x = rng.integers(-(2**15), 2**15, size=(2, 5, channels)).astype(np.int16)
    got, ref = _run_program_step(run_model, HadamardInt("x", block, "int32"), x)
    assert got.dtype == np.int32 and np.array_equal(got, ref)
    dense = np.kron(np.eye(3, dtype=np.int64), sylvester(block).astype(np.int64))
    assert np.array_equal(got, x.astype(np.int64) @ dense)   # no overflow: |y| <= block * 2^15 < 2^31


def test_hadamard_saturates_to_its_dtype(run_model) -> None:
    x = np.full((1, 8), 2**15 - 1, np.int16)
    got, ref = _run_program_step(run_model, HadamardInt("x", 8, "int16"), x)
    assert np.array_equal(got, ref) and got[0, 0] == 2**15 - 1 and got.dtype == np.int16


@pytest.mark.parametrize("out_bits", [8, 11])
def test_gelu_int16_output_bit_exact_and_finer(run_kernel, rng, out_bits: int) -> None:
    in_scale = 2.0**-16
    real = np.concatenate([np.linspace(-8, 30, 4001), rng.normal(0, 4, 2000)])
    x = np.round(real / in_scale).astype(np.int32)
    plan = Gelu.plan(in_scale, 2.0**-out_bits, np.int16)
    got = run_kernel(lambda b, t: plan.emit(b, t), x=(x, in_scale))
    assert got.dtype == np.int16 and np.array_equal(got, plan.reference(x))
    ideal = np.clip(float_gelu(x * in_scale), -(2**15) * 2.0**-out_bits, (2**15 - 1) * 2.0**-out_bits)
    # no saturation below the int16 range: the clamp follows the int16 output, not int8's 129 steps
    assert float(np.abs(got * 2.0**-out_bits - ideal).max()) <= 2.0**-out_bits / 2 + 0.019


def test_layernorm_int16_output_bit_exact(run_kernel, rng) -> None:
    x = (rng.normal(0, 1, (6, 384)) * 2**12).astype(np.int32)
    x[:, 7] *= 20   # an outlier channel
    gamma, beta = rng.uniform(0.5, 3.0, 384), rng.normal(0, 0.2, 384)
    plan = Normalization.plan(centered=True, in_scale=2.0**-12, in_dtype=np.int32, gamma=gamma, beta=beta,
                              eps=1e-12, out_scale=2.0**-9, out_dtype=np.int16)
    got = run_kernel(lambda b, t: plan.emit(b, t), x=(x, 2.0**-12))
    assert got.dtype == np.int16 and np.array_equal(got, plan.reference(x))
    real = x * 2.0**-12
    centred = real - real.mean(-1, keepdims=True)
    ideal = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-12) * gamma + beta
    assert float(np.abs(got * 2.0**-9 - ideal).max()) <= 0.51 * 2.0**-9


def test_wide_output_dtypes_are_checked() -> None:
    with pytest.raises(OptionError, match="int8 or int16"):
        Gelu.plan(2.0**-10, 2.0**-5, np.int32)
    with pytest.raises(OptionError, match="int8 or int16"):
        Normalization.plan(centered=True, in_scale=1.0, in_dtype=np.int32, gamma=np.ones(4), beta=None, eps=1e-5,
                           out_scale=1.0, out_dtype=np.uint8)
