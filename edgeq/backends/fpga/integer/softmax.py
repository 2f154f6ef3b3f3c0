"""Integer-only softmax over the last axis (I-BERT, Kim et al., 2021, "Integer-only Softmax").

Datapath (every value non-negative after the max subtraction, so it runs unsigned):
  x (+ mask)               int64: int32 scores plus an int32 additive mask cannot overflow
  t = rowmax - x           >= 0, < 2^33
  t' = t << p  (or >> -p)  onto i-exp's working grid (I-BERT folds S into the constants; the
                           prescale keeps those constants, and every width, independent of S)
  e = i-exp(t')            < 2^27; exactly 0 beyond ~27 ln2 below the row max
  recip = 2^62 // sum(e)   one divider per row (sum <= 2^62 for rows up to 2^35 elements)
  y = round(e * recip / 2^(62 - f)), clipped to the output range (f = 8 uint8, 7 int8)

Attention masks: pass the additive mask (quantized with the scores' scale, saturated to
int32 — a float mask of finfo.min becomes -2^31) as `mask`, or add it to the int32 scores
upstream; both are exact. A row whose every entry is masked gets the softmax of its
mask-shifted scores, as float softmax does for a finite mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import OptionError
import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import IntGraphBuilder, QTensor
from edgeq.backends.fpga.integer.fixedpoint import (Rounding, np_saturate, np_shift, np_shift_right_rounding,
                                      probability_frac_bits)
from edgeq.backends.fpga.integer.iexp import IExp

# Reciprocal precision: e * (2^62 // sum) <= 2^62 since e <= sum.
RECIP_BITS = 62


@dataclass(frozen=True)
class Softmax:
    """Softmax over the last axis of integer scores with scale `in_scale` (any positive float)."""

    exp: IExp
    out_dtype: np.dtype
    frac_bits: int

    @classmethod
    def plan(cls, in_scale: float, out_dtype: np.dtype | type = np.uint8) -> Softmax:
        return cls(IExp.for_scale(in_scale), np.dtype(out_dtype), probability_frac_bits(out_dtype))

    @property
    def out_scale(self) -> float:
        return 2.0**-self.frac_bits

    def emit(self, b: IntGraphBuilder, x: QTensor, mask: QTensor | None = None) -> QTensor:
        self._check_inputs(x, mask)
        with b.scope("softmax"):
            scores = ops.load(b, x)
            if mask is not None:
                scores = b.op("Add", [scores, ops.load(b, mask)], "masked_scores")
            distance = b.op("Sub", [ops.reduce_last(b, "ReduceMax", scores), scores], "distance_from_max")
            t = ops.shift(b, ops.cast(b, distance, ops.U64), self.exp.prescale)
            e = self.exp.emit(b, t)
            total = ops.cast(b, ops.reduce_last(b, "ReduceSum", ops.cast(b, e, ops.I64)), ops.U64)
            recip = b.op("Div", [b.const(1 << RECIP_BITS, ops.U64, "recip_numerator"), total], "recip")
            prob = ops.shift_right_rounding(b, b.op("Mul", [e, recip], "e_times_recip"), RECIP_BITS - self.frac_bits)
            out = ops.saturate(b, prob, self.out_dtype)
        return QTensor(out, self.out_dtype, self.out_scale)

    def reference(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """numpy mirror of `emit`: integer scores (and mask) in, out_dtype probabilities out."""
        scores = np.asarray(x, np.int64)
        if mask is not None:
            scores = scores + np.asarray(mask, np.int64)
        t = np_shift(scores.max(axis=-1, keepdims=True) - scores, self.exp.prescale)
        e = self.exp.reference(t)
        recip = (1 << RECIP_BITS) // e.sum(axis=-1, keepdims=True)
        prob = np_shift_right_rounding(e * recip, RECIP_BITS - self.frac_bits, Rounding.HALF_UP)
        return np_saturate(prob, self.out_dtype)

    @staticmethod
    def _check_inputs(x: QTensor, mask: QTensor | None) -> None:
        if mask is not None and mask.scale != x.scale:
            raise OptionError(f"attention mask scale {mask.scale!r} differs from the scores' scale {x.scale!r}",
                              fix="quantize the additive mask with the scores' scale")
        for tensor in (x,) if mask is None else (x, mask):
            if tensor.dtype not in (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32)):
                raise OptionError(f"softmax input '{tensor.name}' has dtype {tensor.dtype}; it takes signed integers")


def emit_softmax(b: IntGraphBuilder, x: QTensor, *, mask: QTensor | None = None,
                 out_dtype: np.dtype | type = np.uint8) -> QTensor:
    """Append an integer softmax over x's last axis; output scale 1/256 (uint8) or 1/128 (int8)."""
    return Softmax.plan(x.scale, out_dtype).emit(b, x, mask)


def softmax_reference(x: np.ndarray, scale: float, *, mask: np.ndarray | None = None,
                      out_dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """Bit-exact numpy model of `emit_softmax`."""
    return Softmax.plan(scale, out_dtype).reference(x, mask)
