"""Scale choice: which power of two each integer tensor gets, from the calibrated ranges.

int8 tensors take the configured range method rounded up to a power of two (or the best of its
neighbours by expected squared error, scale_choice="mse"), per tensor, or with equalization
per last-axis channel where every reader can take that; int16 tensors cover the min/max bound;
int32 grids keep WIDE_BITS bits below it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from edgeq.backends.fpga.lowering.forms import Form
from edgeq.backends.fpga.lowering.options import LoweringOptions
from edgeq.backends.fpga.lowering.ranges import Ranges
from edgeq.frontend.patterns import Role, Roles
from edgeq.ir import Graph, Value
from edgeq.quant.numerics import qparams

# An int32 grid keeps this many bits below the calibrated maximum magnitude: 2^-24 relative
# resolution, and 2^7 = 128x the calibrated maximum before saturating.
WIDE_BITS = 24


class Scales:
    """The scale policy of one lowering: reads `ranges`, and the graph for who reads a tensor."""

    def __init__(self, graph: Graph, roles: Roles, ranges: Ranges, options: LoweringOptions):
        self.graph = graph
        self.roles = roles
        self.ranges = ranges
        self.options = options

    def act_scale(self, name: str) -> float:
        spec = self.options.act
        lo, hi = self.ranges.act(name)
        scale = float(qparams(lo, hi, spec)[0])
        return self.ranges.pow2_mse(name, scale, spec) if self.options.scale_choice == "mse" else scale

    def out_scale(self, value: Value) -> np.ndarray:
        """The int8 scale of `value`: per tensor, or with equalization and readers that take it,
        per last-axis channel: s_t * 2^-k_c, s_t covering the tensor's max and k_c =
        min(floor(alpha * log2(s_t / s_c)), max_channel_shift), s_c covering channel c's max."""
        if self.options.equalization is None or not self.takes_channel_scales(value):
            return np.asarray(self.act_scale(value.name), np.float64)
        return self.channel_scales(value, self.options.equalization)

    def channel_scales(self, value: Value, alpha: float) -> np.ndarray:
        spec = self.options.act
        amax = self.ranges.channel(value.name)
        tensor = float(qparams(-amax.max(), amax.max(), spec)[0])
        channel = qparams(-amax, amax, spec)[0].astype(np.float64)
        k = np.floor(alpha * np.log2(tensor / channel) + 1e-9)
        k = np.clip(k, 0, self.options.max_channel_shift)
        return tensor * np.exp2(-k)

    def takes_channel_scales(self, value: Value) -> bool:
        """Whether every reader of `value` takes one power-of-two scale per last-axis channel:
        linear layers (partial sums per channel group, shifted), residual adds and norms
        (shifts per channel)."""
        graph = self.graph
        for reader, slot in graph.uses(value):
            ins = graph.inputs_of(reader)
            if reader.op_type == "MatMul" and slot == 0 and graph.is_const(ins[1]):
                continue
            if reader.op_type == "Add" and not any(graph.is_const(v) for v in ins) and \
                    self.roles.role(reader) != Role.GELU:
                continue
            if reader.op_type == "LayerNormalization" and slot == 0:
                continue
            return False
        return True

    def int16_scale(self, name: str) -> np.ndarray:
        """The power-of-two int16 scale covering the calibrated min/max bound of `name` (a wide
        tensor saturates nothing that calibration saw; its int8 requantization clips)."""
        bound = self.ranges.bound(name)
        return np.asarray(math.ldexp(1.0, math.ceil(math.log2(bound / 32767.0))) if bound > 0 else 1.0,
                          np.float64)

    def wide_scale(self, name: str, forms: Iterable[Form]) -> float:
        """A power-of-two int32 grid for `name`: no finer than its inputs need, WIDE_BITS below
        the calibrated bound."""
        finest = min(float(np.min(f.scale)) for f in forms)
        bound = self.ranges.bound(name)
        if bound <= 0:
            return finest
        floor = math.ldexp(1.0, math.ceil(math.log2(bound)) - WIDE_BITS)
        return max(finest, floor)
