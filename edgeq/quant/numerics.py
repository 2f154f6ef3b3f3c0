"""Quantization arithmetic: scales and zero points from ranges, weight quantization at tensor,
channel and block granularity. Rounding is half to even, as ONNX QuantizeLinear rounds."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from edgeq.targets.base import Granularity, QSpec

_NP_DTYPES = {
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
    "int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4,
    "float8e4m3fn": ml_dtypes.float8_e4m3fn, "float8e5m2": ml_dtypes.float8_e5m2,
}
if hasattr(ml_dtypes, "int2"):
    _NP_DTYPES.update(int2=ml_dtypes.int2, uint2=ml_dtypes.uint2)

# Smallest scale used for an all-zero range, so dequantization stays finite and exact (0).
_MIN_SCALE = np.float32(2.0**-24)
# Smallest non-zero scale: a tensor of subnormal values (PP-OCR's Conv weights hold float32s below
# 1.2e-38) would otherwise get a subnormal scale, and an int32 bias scale s_x * s_w (s_x >= 2^-24)
# would underflow to 0. Values that small quantize to 0 at this scale, as they would in float.
_SCALE_FLOOR = np.float32(np.finfo(np.float32).tiny / _MIN_SCALE)


def np_storage_dtype(spec: QSpec) -> np.dtype:
    return np.dtype(_NP_DTYPES[spec.dtype])


def stored(array: np.ndarray):
    """A quantized array as an initializer: float8 arrays as a Tensor over their bytes (the IR's
    writer serializes numpy-native dtypes only through a memoryview), others as they are."""
    array = np.asarray(array)
    if array.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
        from edgeq.ir.tensor import Tensor, elem_type_of
        return Tensor(elem_type_of(array), array.shape, raw=np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    return array


def qparams(lo: np.ndarray | float, hi: np.ndarray | float, spec: QSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (spec dtype) covering [lo, hi] (elementwise)."""
    if spec.fixed is not None:
        scale, zero = spec.fixed
        return np.asarray(scale, np.float32), np.asarray(zero).astype(np_storage_dtype(spec))
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        # Signed: [-amax, amax] onto [-q, q] with q = min(|qmin|, qmax); unsigned: centred zero point.
        half = min(-qmin, qmax) if spec.signed else (qmax - qmin) / 2.0
        scale = amax / half
        zero = np.zeros_like(scale) if spec.signed else np.full_like(scale, (qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = None
    scale = np.where(scale > 0, np.maximum(scale, _SCALE_FLOOR), _MIN_SCALE).astype(np.float64)
    if spec.scale_pow2:
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = scale.astype(np.float32)
    if zero is None:
        zero = np.clip(np.round(qmin - lo / scale.astype(np.float64)), qmin, qmax)
    return scale, np.asarray(zero).astype(np_storage_dtype(spec))


def floor_channel_scales(scale: np.ndarray, zero: np.ndarray, lo: np.ndarray, spec: QSpec
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, zero point) with every scale raised to at least
    `spec.channel_scale_floor` of the largest; zero points of asymmetric specs follow their
    channel's minimum `lo`."""
    if not spec.channel_scale_floor or np.ndim(scale) == 0 or spec.fixed is not None:
        return scale, zero
    floor = np.float32(float(np.max(np.abs(scale))) * spec.channel_scale_floor)
    raised = np.abs(scale) < floor
    if not raised.any():
        return scale, zero
    scale = np.where(raised, np.copysign(floor, scale), scale).astype(np.float32)
    if not spec.symmetric:
        lo = np.minimum(np.asarray(lo, np.float64), 0.0)
        fresh = np.clip(np.round(spec.qmin - lo / scale.astype(np.float64)), spec.qmin, spec.qmax)
        zero = np.where(raised, fresh, zero).astype(zero.dtype)
    return scale, zero


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QSpec) -> np.ndarray:
    """ONNX QuantizeLinear semantics (round half to even, saturate) with broadcastable params.
    Float8: x / scale (+ zero point) saturated to the finite range and cast, rounding to the
    nearest representable value, ties to even (QuantizeLinear's saturate=1)."""
    if spec.is_float:
        y = x.astype(np.float32) / scale.astype(np.float32) + zero.astype(np.float32)
        return np.clip(y, spec.qmin, spec.qmax).astype(np_storage_dtype(spec))
    q = np.round(x.astype(np.float32) / scale.astype(np.float32)) + zero.astype(np.float32)
    return np.clip(q, spec.qmin, spec.qmax).astype(np_storage_dtype(spec))


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return ((q.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)).astype(np.float32)


def quantize_weight(w: np.ndarray, spec: QSpec, channel_axis: int, *, clip_ratio: float | np.ndarray = 1.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a weight. Returns (q, scale, zero_point) shaped as DequantizeLinear wants them:
    scalars (tensor), 1-D along `channel_axis` (channel), or w's shape with the blocked axis
    divided by block_size (block, blocks along `spec.axis`)."""
    w = np.asarray(w, dtype=np.float32)
    if spec.granularity == Granularity.TENSOR:
        lo, hi = w.min(initial=0.0), w.max(initial=0.0)
        scale, zero = qparams(lo * clip_ratio, hi * clip_ratio, spec)
        return quantize(w, scale, zero, spec), scale.reshape(()), zero.reshape(())
    if spec.granularity == Granularity.CHANNEL:
        axis = channel_axis % w.ndim
        other = tuple(a for a in range(w.ndim) if a != axis)
        lo, hi = w.min(axis=other), w.max(axis=other)
        scale, zero = floor_channel_scales(*qparams(lo * clip_ratio, hi * clip_ratio, spec), lo * clip_ratio, spec)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = quantize(w, scale.reshape(shape), zero.reshape(shape), spec)
        return q, scale, zero
    return _quantize_blocks(w, spec, clip_ratio)


def _quantize_blocks(w: np.ndarray, spec: QSpec, clip_ratio) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axis = (spec.axis or 0) % w.ndim
    block = int(spec.block_size)
    length = w.shape[axis]
    padded = -(-length // block) * block
    moved = np.moveaxis(w, axis, 0)
    if padded != length:  # the last block is partial: pad with zeros for the statistics only
        moved = np.concatenate([moved, np.zeros((padded - length, *moved.shape[1:]), np.float32)])
    blocks = moved.reshape(padded // block, block, *moved.shape[1:])
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    scale, zero = qparams(lo * clip_ratio, hi * clip_ratio, spec)
    full_scale = np.repeat(scale, block, axis=0)[:length]
    full_zero = np.repeat(zero, block, axis=0)[:length]
    q = quantize(np.moveaxis(w, axis, 0), full_scale, full_zero, spec)
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis), np.moveaxis(zero, 0, axis)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(approx, np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)
