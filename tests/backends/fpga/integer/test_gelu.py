"""i-GELU: bit-exact against its numpy reference; error against float GELU measured and bounded."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from edgeq.backends.fpga.integer import Gelu, emit_gelu, gelu_reference

# I-BERT's i-erf polynomial alone is ~0.018 off GELU at worst (near |x| ~ 1.6-2.5); the int8
# output adds half a step. Measured: see the printed lines (pytest -rP).
IGELU_APPROX_ERROR = 0.019


def float_gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _inputs(rng: np.random.Generator, in_scale: float) -> np.ndarray:
    real = np.concatenate([np.linspace(-6, 6, 3001), rng.normal(0, 3, 2000), [-1e4, 1e4]])
    ints = np.clip(np.round(real / in_scale), -(2**31), 2**31 - 1).astype(np.int32)
    return np.concatenate([ints, [-(2**31), 2**31 - 1, 0, 1, -1]]).astype(np.int32)


@pytest.mark.parametrize("in_bits", [4, 10, 16, 24])
@pytest.mark.parametrize("out_bits", [3, 5, 7])
def test_gelu_bit_exact_and_error(run_kernel, rng, in_bits: int, out_bits: int) -> None:
    in_scale, out_scale = 2.0**-in_bits, 2.0**-out_bits
    x = _inputs(rng, in_scale)
    got = run_kernel(functools.partial(emit_gelu, out_scale=out_scale), x=(x, in_scale))
    assert np.array_equal(got, gelu_reference(x, in_scale, out_scale=out_scale))
    ideal = np.clip(float_gelu(x * in_scale), -128 * out_scale, 127 * out_scale)
    error = float(np.abs(got * out_scale - ideal).max())
    print(f"gelu in 2^-{in_bits} out 2^-{out_bits}: max abs error {error:.5f} "
          f"(half step {out_scale / 2:.5f} + i-erf {error - out_scale / 2:.5f})")
    assert error <= out_scale / 2 + IGELU_APPROX_ERROR


def test_gelu_int8_input_and_non_pow2_scale(run_kernel, rng) -> None:
    x8 = np.arange(-128, 128, dtype=np.int8)
    got = run_kernel(functools.partial(emit_gelu, out_scale=2**-5), x=(x8, 2**-4))
    assert np.array_equal(got, gelu_reference(x8, 2**-4, out_scale=2**-5))
    x = _inputs(rng, 3.7e-4)
    got = run_kernel(functools.partial(emit_gelu, out_scale=2**-5), x=(x, 3.7e-4))
    assert np.array_equal(got, gelu_reference(x, 3.7e-4, out_scale=2**-5))


def test_gelu_constants_are_ibert_folded() -> None:
    plan = Gelu.plan(2.0**-10, 2.0**-5)
    assert plan.prescale == 0
    erf_scale = 2.0**-10 / math.sqrt(2.0)
    assert plan.clip_int == -math.floor(-1.769 / erf_scale)
    assert plan.one_int == -math.floor(1.0 / (-0.2888 * erf_scale**2))
