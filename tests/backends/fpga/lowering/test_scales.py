"""Forms and scale choice of the fpga lowering: shifts between power-of-two scales, int16 scales
covering the calibrated bound, int32 grids WIDE_BITS below it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from edgeq.backends.fpga.lowering.forms import INT32, Form, exponent, scale_field
from edgeq.backends.fpga.lowering.scales import WIDE_BITS, Scales
from edgeq.errors import OptionError


def test_exponents_are_exact_powers_of_two() -> None:
    assert exponent(np.asarray(8.0), "x") == 3
    assert exponent(np.asarray([0.25, 1.0, 2.0]), "x") == (-2, 0, 1)
    with pytest.raises(OptionError, match="requantizing 'x': scale ratio .*1.5.* is not a power of two"):
        exponent(np.asarray([1.0, 1.5]), "requantizing 'x'")


def test_scale_fields_are_a_float_per_tensor_or_a_tuple_per_channel() -> None:
    assert scale_field(np.asarray(0.5)) == 0.5
    assert scale_field(np.asarray([0.5, 0.25])) == (0.5, 0.25)


def _scales(bound: float) -> Scales:
    return Scales(graph=None, roles=None, ranges=SimpleNamespace(bound=lambda name: bound), options=None)


def test_int16_scales_cover_the_calibrated_bound() -> None:
    assert float(_scales(1.0).int16_scale("x")) == 2.0**-14   # 32767 * 2^-14 >= 1 > 32767 * 2^-15
    assert float(_scales(40000.0).int16_scale("x")) == 2.0
    assert float(_scales(0.0).int16_scale("x")) == 1.0


def test_wide_grids_keep_wide_bits_below_the_bound_unless_the_inputs_are_coarser() -> None:
    fine, coarse = (Form("a", INT32, np.asarray(2.0**-40)), Form("b", INT32, np.asarray(2.0**-10)))
    assert _scales(3.0).wide_scale("x", (fine,)) == math.ldexp(1.0, 2 - WIDE_BITS)
    assert _scales(3.0).wide_scale("x", (fine, coarse)) == math.ldexp(1.0, 2 - WIDE_BITS)
    assert _scales(3.0).wide_scale("x", (coarse,)) == 2.0**-10
    assert _scales(0.0).wide_scale("x", (fine, coarse)) == 2.0**-40
