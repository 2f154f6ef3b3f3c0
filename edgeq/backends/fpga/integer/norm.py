"""Integer-only LayerNorm and RMSNorm over the last axis (after I-BERT, Kim et al., 2021,
"Integer-only LayerNorm"), int8 output with a power-of-two scale.

Datapath, all int64, with every width proven at compile time:
  D = N*x - sum(x)               LayerNorm: N times the centred value, exact (no rounded mean);
                                 RMSNorm: D = x
  e = bitlen(max|D|)             per row, a priority encoder (leading-zero count)
  k = min(W - e, K_eps)          per-row exponent: d = D * 2^k has W significant bits, where
  d = D * 2^k                    N * 2^2W <= 2^61 (a barrel shift, rounding when k < 0); so every
                                 row keeps full precision whatever its magnitude (block floating
                                 point), and an int32 input needs no declared range
  eps_k = eps * N^3 / S^2 * 2^2k eps on the same grid (N/S^2 for RMSNorm), as a 31-bit mantissa
                                 shifted by the row exponent; K_eps keeps it below 2^61
  std = max(isqrt(sum(d^2) + eps_k), 1)   exact floor sqrt, 62-bit guarded Newton; >= |d_i|
  factor = 2^61 // std           one divider per row (I-BERT's 2^31 // std, wider)
  n = round(d * factor / 2^37)   normalized value, scale sqrt(N) * 2^-24, |n| <= 2^24
  y = round((n * M_c + B_c) / 2^s_c)   per-channel dyadic gamma (M_c) and beta (B_c), saturated
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeq.errors import OptionError
import edgeq.backends.fpga.integer.ops as ops
from edgeq.backends.fpga.integer.builder import IntGraphBuilder, QTensor
from edgeq.backends.fpga.integer.fixedpoint import (DyadicAffine, Rounding, dyadic_affine, np_bit_length, np_dyadic,
                                      np_saturate, np_shift_by, np_shift_right_rounding, require_pow2)
from edgeq.backends.fpga.integer.isqrt import ISqrt

SQUARE_SUM_BITS = 61        # sum(d^2) and eps_k each stay below 2^61, so isqrt sees < 2^62
EPS_MANTISSA_BITS = 31      # eps_k = mantissa * 2^(exponent + 2k), mantissa <= 2^31
RECIP_BITS = 61             # factor = 2^61 // std, so |d * factor| <= 2^61
NORMALIZED_BITS = 24        # |n| <= 2^24, scale sqrt(N) * 2^-24
VALUE_BITS = 62             # |D| < 2^62 (N * 2^32 for N < 2^30)
OUT_DTYPE = np.dtype(np.int8)
# int16 output: the residual stream of a post-norm encoder (its LayerNorm outputs feed the next
# residual add), kept wider than the int8 multiplier inputs, as I-BERT keeps it in int32.
OUT_DTYPES = (np.dtype(np.int8), np.dtype(np.int16))


@dataclass(frozen=True)
class Normalization:
    """Shared plan of LayerNorm (centered) and RMSNorm (not centered); build with `plan`."""

    centered: bool
    channels: int
    work_bits: int           # W
    max_exponent: int        # K_eps: the row exponent's cap that keeps eps_k below 2^61
    eps_mantissa: int        # eps_k = eps_mantissa * 2^(eps_exponent + 2k); 0 when eps == 0
    eps_exponent: int
    affine: DyadicAffine
    out_scale: float
    out_dtype: np.dtype = OUT_DTYPE

    @classmethod
    def plan(cls, *, centered: bool, in_scale: float, in_dtype: np.dtype | type, gamma: np.ndarray,
             beta: np.ndarray | None, eps: float, out_scale: float,
             out_dtype: np.dtype | type = OUT_DTYPE) -> Normalization:
        out_dtype = np.dtype(out_dtype)
        if out_dtype not in OUT_DTYPES:
            raise OptionError(f"normalization output dtype {out_dtype} must be int8 or int16")
        gamma = np.asarray(gamma, np.float64)
        channels = gamma.size
        if gamma.ndim != 1 or channels == 0 or (beta is not None and np.shape(beta) != gamma.shape):
            raise OptionError("gamma must be a non-empty vector and beta (if given) of the same shape")
        if channels >= 1 << 29:
            raise OptionError(f"normalization over {channels} channels is too wide for int64 accumulation")
        if not (eps >= 0 and math.isfinite(eps)):
            raise OptionError(f"epsilon {eps!r} must be non-negative and finite")
        if not np.issubdtype(in_dtype, np.signedinteger):
            raise OptionError(f"normalization input dtype {np.dtype(in_dtype)} must be a signed integer")
        require_pow2(out_scale, "normalization output")
        work_bits = (SQUARE_SUM_BITS - math.ceil(math.log2(channels))) // 2
        # D is N * (x - mean) for LayerNorm, so its variance carries N^2 (and the mean's 1/N).
        eps_base = eps * (channels**3 if centered else channels) / in_scale**2
        eps_mantissa, eps_exponent, max_exponent = 0, 0, work_bits
        if eps_base > 0:
            eps_exponent = math.floor(math.log2(eps_base)) - (EPS_MANTISSA_BITS - 1)
            eps_mantissa = round(eps_base * 2.0**-eps_exponent)
            headroom = SQUARE_SUM_BITS - EPS_MANTISSA_BITS  # eps_k <= 2^31 * 2^30
            max_exponent = min(work_bits, (headroom - eps_exponent) // 2)
            if max_exponent < -30:  # eps would dwarf any variance the input can express
                raise OptionError(f"epsilon {eps!r} is too large for input scale {in_scale!r}",
                                  fix="check the epsilon and the input scale")
        gamma_real = gamma * math.sqrt(channels) * 2.0**-NORMALIZED_BITS / out_scale
        beta_real = None if beta is None else np.asarray(beta, np.float64) / out_scale
        affine = dyadic_affine(gamma_real, input_bound=1 << NORMALIZED_BITS, real_bias=beta_real)
        return cls(centered, channels, work_bits, max_exponent, eps_mantissa, eps_exponent, affine, out_scale,
                   out_dtype)

    def emit(self, b: IntGraphBuilder, x: QTensor) -> QTensor:
        with b.scope("layernorm" if self.centered else "rmsnorm"):
            d, exponent = self._emit_block_scaled(b, ops.load(b, x))
            square_sum = ops.reduce_last(b, "ReduceSum", b.op("Mul", [d, d], "square"))
            if self.eps_mantissa:
                square_sum = b.op("Add", [square_sum, self._emit_eps(b, exponent)], "square_sum_eps")
            std = ISqrt(SQUARE_SUM_BITS + 1).emit(b, square_sum)
            std = b.op("Max", [std, b.const(1, ops.I64, "one")], "std")
            factor = b.op("Div", [b.const(1 << RECIP_BITS, ops.I64, "recip_numerator"), std], "inv_std")
            normalized = ops.shift_right_rounding(b, b.op("Mul", [d, factor], "scaled"),
                                                  RECIP_BITS - NORMALIZED_BITS)
            out = ops.saturate(b, ops.dyadic(b, normalized, self.affine), self.out_dtype)
        return QTensor(out, self.out_dtype, self.out_scale)

    def _emit_block_scaled(self, b: IntGraphBuilder, x: str) -> tuple[str, str]:
        """(d, k): the centred row scaled by 2^k to W significant bits, and k per row (int64)."""
        big = x
        if self.centered:
            total = ops.reduce_last(b, "ReduceSum", x)
            big = b.op("Sub", [b.op("Mul", [x, b.const(self.channels, ops.I64, "channels")], "n_times_x"), total],
                       "centred_times_n")
        peak = ops.cast(b, ops.reduce_last(b, "ReduceMax", b.op("Abs", [big], "abs")), ops.U64)
        length = ops.cast(b, ops.bit_length(b, peak, VALUE_BITS), ops.I64)
        exponent = b.op("Sub", [b.const(self.work_bits, ops.I64, "work_bits"), length], "row_exponent")
        if self.max_exponent < self.work_bits:  # else the cap can never bind (the bit length is >= 0)
            exponent = b.op("Min", [exponent, b.const(self.max_exponent, ops.I64, "max_exponent")], "row_exponent")
        return ops.shift_by(b, big, exponent), exponent

    def _emit_eps(self, b: IntGraphBuilder, exponent: str) -> str:
        """eps_mantissa * 2^(eps_exponent + 2k), right shifts capped at 62 (the result is 0 there)."""
        doubled = b.op("Add", [exponent, exponent], "two_k")
        eps_exponent = b.op("Add", [doubled, b.const(self.eps_exponent, ops.I64, "eps_exponent")], "eps_shift")
        eps_exponent = b.op("Max", [eps_exponent, b.const(-62, ops.I64, "min_eps_shift")], "eps_shift")
        return ops.shift_by(b, b.const(self.eps_mantissa, ops.I64, "eps_mantissa"), eps_exponent)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """numpy mirror of `emit`."""
        d, exponent = self._block_scaled(np.asarray(x, np.int64))
        square_sum = (d * d).sum(axis=-1, keepdims=True)
        if self.eps_mantissa:
            square_sum = square_sum + np_shift_by(self.eps_mantissa, np.maximum(2 * exponent + self.eps_exponent, -62))
        std = np.maximum(ISqrt(SQUARE_SUM_BITS + 1).reference(square_sum), 1)
        normalized = np_shift_right_rounding(d * ((1 << RECIP_BITS) // std), RECIP_BITS - NORMALIZED_BITS,
                                             Rounding.HALF_UP)
        return np_saturate(np_dyadic(normalized, self.affine), self.out_dtype)

    def _block_scaled(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        big = x * self.channels - x.sum(axis=-1, keepdims=True) if self.centered else x
        length = np_bit_length(np.abs(big).max(axis=-1, keepdims=True), VALUE_BITS)
        exponent = np.minimum(self.work_bits - length, self.max_exponent)
        return np_shift_by(big, exponent), exponent


def emit_layernorm(b: IntGraphBuilder, x: QTensor, gamma: np.ndarray, beta: np.ndarray | None, *, out_scale: float,
                   eps: float = 1e-5) -> QTensor:
    """Append integer LayerNorm over x's last axis (len(gamma) channels); int8 out, scale `out_scale`."""
    return Normalization.plan(centered=True, in_scale=x.scale, in_dtype=x.dtype, gamma=gamma, beta=beta, eps=eps,
                              out_scale=out_scale).emit(b, x)


def emit_rmsnorm(b: IntGraphBuilder, x: QTensor, gamma: np.ndarray, *, out_scale: float,
                 eps: float = 1e-6) -> QTensor:
    """Append integer RMSNorm over x's last axis (len(gamma) channels); int8 out, scale `out_scale`."""
    return Normalization.plan(centered=False, in_scale=x.scale, in_dtype=x.dtype, gamma=gamma, beta=None, eps=eps,
                              out_scale=out_scale).emit(b, x)


def layernorm_reference(x: np.ndarray, scale: float, gamma: np.ndarray, beta: np.ndarray | None, *, out_scale: float,
                        eps: float = 1e-5) -> np.ndarray:
    """Bit-exact numpy model of `emit_layernorm`."""
    return Normalization.plan(centered=True, in_scale=scale, in_dtype=np.asarray(x).dtype, gamma=gamma, beta=beta,
                              eps=eps, out_scale=out_scale).reference(x)


def rmsnorm_reference(x: np.ndarray, scale: float, gamma: np.ndarray, *, out_scale: float,
                      eps: float = 1e-6) -> np.ndarray:
    """Bit-exact numpy model of `emit_rmsnorm`."""
    return Normalization.plan(centered=False, in_scale=scale, in_dtype=np.asarray(x).dtype, gamma=gamma, beta=None,
                              eps=eps, out_scale=out_scale).reference(x)
