"""SmoothRot's search: before an online Hadamard, the per-channel smoothing x / s (s =
max|x|^a / max|W|^(1-a)) whose rotated, quantized output error on calibration samples is
lowest, with a chosen from a grid (0: no smoothing)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgeq.calibration.layer_inputs import ActivationStream
from edgeq.quant.hadamard import Rotation
from edgeq.quant.numerics import dequantize, qparams, quantize
from edgeq.quant.rounding import quantize_kn
from edgeq.targets.base import Granularity, QSpec

# Inputs probed per pass over the samples: the probes of all 60 SmolLM2 inputs together would
# hold ~0.8 GB of float64 activations.
PROBE_CHUNK = 8


def activation_samples(stream: ActivationStream, names: list[str]) -> dict[str, np.ndarray]:
    """The tensors `names` on every sample of `stream` (an `ActivationStream`: the graph in ONNX
    Runtime, weights fed from a memory-mapped side file), float64 [tokens, channels]."""
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    for arrays in stream.samples(names):
        for name, value in zip(names, arrays):
            rows[name].append(value.astype(np.float64))
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def fake_quant_weight(w: np.ndarray, spec: QSpec) -> np.ndarray:
    """w [in, out] rounded to `spec` in that layout (`quantize_kn`: channels along `out`,
    blocks along `in`) and dequantized in float64. Not `dequantize_kn`: it computes
    (q - zero) * scale in float32, which rounds the product where float64 holds it exactly,
    and the errors this search compares would move in their last bits."""
    q, scale, zero = quantize_kn(w.astype(np.float32), spec)
    q = q.astype(np.float64)
    if spec.granularity == Granularity.BLOCK:
        block = int(spec.block_size)
        scale = np.repeat(scale, block, axis=0)[: w.shape[0]]
        zero = np.repeat(zero, block, axis=0)[: w.shape[0]]
    elif np.ndim(scale) == 1:
        scale, zero = scale.reshape(1, -1), zero.reshape(1, -1)
    return (q - zero.astype(np.float64)) * scale.astype(np.float64)


def search_smoothing(x: np.ndarray, weights: list[np.ndarray], rotation: Rotation, grid: tuple[float, ...],
                     act_spec: QSpec, w_spec: QSpec) -> tuple[float, np.ndarray | None]:
    """The alpha of `grid` (0: none) whose smoothing + rotation gives the lowest simulated
    quantized output error of the group (activation range: min/max over the samples)."""
    act_max = np.abs(x).max(axis=0)
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    probe = x[:: max(1, len(x) // 2048)]
    reference = [probe @ w for w in weights]
    best, best_err, best_scale = 0.0, np.inf, None
    for alpha in sorted(grid):
        scale = np.ones_like(act_max) if not alpha else np.clip(
            np.maximum(act_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha), 1e-4, 1e4)
        rotated = rotation.apply(x / scale, -1)
        s, z = qparams(rotated.min(), rotated.max(), act_spec)
        probe_rot = rotation.apply(probe / scale, -1)
        xq = dequantize(quantize(probe_rot, s, z, act_spec), s, z).astype(np.float64)
        err = 0.0
        for w, ref in zip(weights, reference):
            wq = fake_quant_weight(rotation.apply(w * scale[:, None], 0), w_spec)
            err += float(np.sum((xq @ wq - ref) ** 2) / max(np.sum(ref**2), 1e-30))
        if err < best_err * (0.98 if alpha else 1.0):   # smoothing must earn its keep
            best, best_err, best_scale = alpha, err, (scale if alpha else None)
    return best, best_scale
