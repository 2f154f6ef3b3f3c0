"""Weight rounding in the [K, N] layout (K = reduction axis, N = output channels): round to
nearest (`quantize_kn`, `dequantize_kn`), the Hessian-weighted output error of a rounding
(`output_errors`), GPTQ's error-compensating rounding (`gptq_quantize`) and the search for
clipped quantization parameters (`search_params`, over `CLIP_RATIOS`).

For a layer y = x W with input second moment H = 2/n * sum_t x_t x_t^T (see
`edgeq.calibration.layer_inputs`), the output error of a weight error E = W_q - W on the
calibration data is exactly tr(E^T H E) / 2 per token: everything here works from H.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeq.quant.numerics import floor_channel_scales, np_storage_dtype, qparams, quantize_weight
from edgeq.targets.base import Granularity, QSpec

_COLUMNS_PER_GEMM = 8192  # output_errors multiplies H by this many columns at a time

# Range shrink ratios tried per output channel and group (AWQ's grid: max_shrink 0.5, 20 steps).
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(11))   # 1.0, 0.95, ..., 0.5
# How far a least-squares refit may move a scale (a factor either way; `refit_scales`).
REFIT_RANGE = 2.0


# --------------------------------------------------------------------------------------------
# Round to nearest, and its error.

def quantize_kn(w: np.ndarray, spec: QSpec, clip_ratio: float | np.ndarray = 1.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_weight` for a [K, N] weight: blocks along K, channels along N."""
    if spec.granularity == Granularity.BLOCK:
        spec = spec.replace(axis=0)
    return quantize_weight(w, spec, channel_axis=1, clip_ratio=clip_ratio)


def dequantize_kn(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QSpec) -> np.ndarray:
    """The float weight [K, N] that DequantizeLinear gives for `quantize_kn`'s output."""
    k = q.shape[0]
    if spec.granularity == Granularity.BLOCK:
        scale = np.repeat(scale, spec.block_size, axis=0)[:k]
        zero = np.repeat(zero, spec.block_size, axis=0)[:k]
    return (q.astype(np.float32) - np.asarray(zero).astype(np.float32)) * np.asarray(scale, np.float32)


def output_errors(hessian: np.ndarray, w: np.ndarray, *approximations: np.ndarray) -> list[float]:
    """Relative output error of replacing w by each approximation on the calibration inputs:
    tr(E^T H E) / tr(W^T H W), E = w_q - w (all [K, N]); one GEMM for all of them."""
    h = hessian.astype(np.float32)
    sums = np.zeros(1 + len(approximations))
    step = max(1, _COLUMNS_PER_GEMM // (1 + len(approximations)))
    for start in range(0, w.shape[1], step):  # bounded temporaries for wide layers (LM head)
        cols = slice(start, start + step)
        part = w[:, cols].astype(np.float32)
        stacked = np.concatenate([part, *[(a[:, cols] - part) for a in approximations]], axis=1)
        per_column = np.sum((h @ stacked) * stacked, axis=0, dtype=np.float64)
        sums += per_column.reshape(1 + len(approximations), -1).sum(axis=1)
    den = float(sums[0])
    return [float(v) / den if den > 0 else float(v) for v in sums[1:]]


# --------------------------------------------------------------------------------------------
# GPTQ (Frantar et al., 2023): column-by-column rounding with Hessian-based error compensation.

def gptq_quantize(w: np.ndarray, hessian: np.ndarray, spec: QSpec, *, damp: float = 0.01,
                  act_order: bool = False, block: int = 128, clip_ratios: Sequence[float] = (1.0,),
                  full_range: bool = False, refit_rounds: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round w [K, N] (K = reduction axis) to `spec` minimising tr(E^T H E).

    Rows of w (input channels) are rounded one at a time; each row's rounding error, scaled
    by the inverse Hessian (its upper Cholesky factor U), is spread over the rows not yet
    rounded, lazily in blocks of `block` rows (GPTQ's "lazy batch" updates).

    Quantization parameters, as GPTQ computes them:
    - tensor / channel granularity: from the whole original weight, before rounding;
    - block granularity (groups of g rows along K): from the group's current (already
      error-compensated) rows when rounding reaches the group's first row; with `act_order`
      the groups are static instead: from the original weight, per contiguous group, so the
      blocks DequantizeLinear reads stay contiguous along K while rows are rounded in order
      of decreasing Hessian diagonal.

    With several `clip_ratios`, each set of parameters (per output channel) is the one among
    the ranges shrunk by those ratios whose rounding error, weighted by the Hessian diagonal
    (sum_k H_kk d_k^2), is lowest. `full_range` (signed symmetric specs) also tries mapping the
    value of largest magnitude to qmin (-8 for int4: 16 levels instead of 15, the scale then
    carries the sign, as ONNX Runtime's own int4 quantizer does).

    With `refit_rounds` R > 0, the scales are then solved again for the final codes
    (`refit_scales`), and R - 1 times more the rows are rounded again by GPTQ on those scales
    and the scales refit; the rounding with the lowest tr(E^T H E) (H dampened) is returned.

    Channels that never fire (H_kk = 0) keep their rounded-to-nearest value and spread no
    error. Returns (q, scale, zero) shaped like `quantize_weight`'s for [K, N]: q [K, N],
    scale/zero () / [N] / [ceil(K/g), N].
    """
    q, scale, zero = _gptq_rows(w, hessian, spec, damp, act_order, block, clip_ratios, full_range)
    if refit_rounds <= 0:
        return q, scale, zero

    damped = _dampened(hessian, damp)  # the objective the refits minimise

    def error(q, scale, zero) -> float:
        return output_errors(damped, w, dequantize_kn(q, scale, zero, spec))[0]

    best = (error(q, scale, zero), q, scale, zero)
    for round_ in range(refit_rounds):
        scale = refit_scales(w, damped, q, scale, zero, spec, damp=0.0)  # already dampened
        best = min(best, (error(q, scale, zero), q, scale, zero), key=lambda r: r[0])
        if round_ + 1 < refit_rounds:
            q = _gptq_rows(w, hessian, spec, damp, act_order, block, clip_ratios, full_range, given=(scale, zero))[0]
            best = min(best, (error(q, scale, zero), q, scale, zero), key=lambda r: r[0])
    return best[1], best[2], best[3]


def _gptq_rows(w: np.ndarray, hessian: np.ndarray, spec: QSpec, damp: float, act_order: bool, block: int,
               clip_ratios: Sequence[float], full_range: bool, given: tuple | None = None):
    """GPTQ's rounding pass (`gptq_quantize`); `given`: (scale, zero) to round on instead of
    choosing them."""
    w = np.array(w, dtype=np.float32, copy=True)
    rows, cols = w.shape
    h = np.array(hessian, dtype=np.float64, copy=True)
    if h.shape != (rows, rows):
        raise ValueError(f"Hessian {h.shape} does not match weight {w.shape}")
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0

    blocked = spec.granularity == Granularity.BLOCK
    group = int(spec.block_size) if blocked else 0
    n_groups = -(-rows // group) if blocked else 0
    dtype = np_storage_dtype(spec)
    diag = np.diag(h).astype(np.float32)
    ratios = tuple(clip_ratios)

    def params(part: np.ndarray, weights: np.ndarray):
        return search_params(part, weights, spec, ratios, full_range)

    if given is not None:
        scale, zero = np.array(given[0], np.float32), np.array(given[1]).astype(dtype)
    elif spec.granularity == Granularity.TENSOR:
        s, z = params(w.reshape(-1, 1), np.repeat(diag, cols))
        scale, zero = s.reshape(()), z.reshape(())
    elif spec.granularity == Granularity.CHANNEL:
        scale, zero = floor_channel_scales(*params(w, diag), w.min(axis=0), spec)
    else:
        scale = np.zeros((n_groups, cols), np.float32)
        zero = np.zeros((n_groups, cols), dtype)
        if act_order:  # static groups from the original weight
            for g in range(n_groups):
                rows_g = slice(g * group, (g + 1) * group)
                scale[g], zero[g] = params(w[rows_g], diag[rows_g])

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(rows)
    w = w[perm]
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(rows)] += damp * float(np.mean(np.diag(h)))
    u = _inverse_cholesky_upper(h).astype(np.float32)
    del h

    if blocked and not act_order:  # groups must not straddle blocks: a multiple of the group
        block = group * max(1, round(block / group))
    q_rows = np.empty((rows, cols), np.float32)
    qmin, qmax = np.float32(spec.qmin), np.float32(spec.qmax)
    for i1 in range(0, rows, block):
        i2 = min(i1 + block, rows)
        w1 = w[i1:i2]  # a view: updated in place
        err1 = np.empty((i2 - i1, cols), np.float32)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            source = perm[row]
            if blocked:
                g = source // group
                if not act_order and given is None and row % group == 0:
                    scale[g], zero[g] = params(w1[i:i + group], diag[row:row + group])
                s, z = scale[g], zero[g].astype(np.float32)
            else:
                s, z = scale, np.asarray(zero).astype(np.float32)
            x = w1[i]
            qi = np.clip(np.round(x / s) + z, qmin, qmax)
            q_rows[row] = qi
            e = (x - (qi - z) * s) / u1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1:] -= np.outer(u1[i, i + 1:], e)
            err1[i] = e
        if i2 < rows:
            w[i2:] -= u[i1:i2, i2:].T @ err1
    q = np.empty_like(q_rows)
    q[perm] = q_rows
    return q.astype(dtype), np.asarray(scale, np.float32), np.asarray(zero).astype(dtype)


def search_params(part: np.ndarray, weights: np.ndarray, spec: QSpec, ratios: Sequence[float] = (1.0,),
                  full_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of `part` [rows, N]: the range shrunk by the ratio (and,
    with `full_range`, the signed 16-level mapping) whose rounding error sum_k weights_k d_k^2
    is lowest. One ratio and no full_range: exactly `qparams` of the column's min and max."""
    lo, hi = part.min(axis=0), part.max(axis=0)
    if len(ratios) == 1 and not full_range:
        return qparams(lo * ratios[0], hi * ratios[0], spec)
    signed_full = full_range and spec.symmetric and spec.signed and spec.fixed is None and not spec.scale_pow2
    extreme = np.where(-lo >= hi, lo, hi).astype(np.float64)  # the signed value of largest magnitude
    best = None
    for ratio in ratios:
        candidates = [qparams(lo * ratio, hi * ratio, spec)]
        if signed_full:
            s = (extreme * ratio / spec.qmin).astype(np.float32)
            s = np.where(s != 0, s, np.float32(2.0**-24))
            candidates.append((s, np.zeros_like(candidates[0][1])))
        for s, z in candidates:
            zf = z.astype(np.float32)
            q = np.clip(np.round(part / s) + zf, spec.qmin, spec.qmax)
            d = part - (q - zf) * s
            err = weights.astype(np.float32) @ (d * d)
            if best is None:
                best = [err, s.astype(np.float32).copy(), np.array(z, copy=True)]
            else:
                better = err < best[0]
                best[0] = np.where(better, err, best[0])
                best[1] = np.where(better, s, best[1]).astype(np.float32)
                best[2] = np.where(better, z, best[2]).astype(z.dtype)
    return best[1], best[2]


def refit_scales(w: np.ndarray, hessian: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                 spec: QSpec, damp: float = 0.01) -> np.ndarray:
    """The block (or channel) scales that minimise tr(E^T H E) for the codes q and zero points
    already chosen: with the codes fixed, each output channel's weight is linear in its G scales
    (w_n ~ sum_g s_gn (q_gn - z_gn) over the rows of block g), so the best scales solve a G x G
    least-squares system per channel, on the Hessian dampened as GPTQ's is (`damp` times its
    mean diagonal: the objective GPTQ's rounding minimised). The step is a correction of GPTQ's
    scales, not a new fit: a channel keeps its scales where the system is singular, a solved
    scale leaves [1/REFIT_RANGE, REFIT_RANGE] times the old one (a sign change included; on a
    small synthetic decoder calibrated on 128 tokens, unbounded solves moved scales 0.18x-5.3x),
    or the error does not go down. Scales a target constrains
    (powers of two, fixed, floored per channel) and per-tensor ones are returned unchanged."""
    if spec.scale_pow2 or spec.fixed is not None or spec.granularity == Granularity.TENSOR \
            or (spec.granularity == Granularity.CHANNEL and spec.channel_scale_floor):
        return scale
    rows, cols = q.shape
    group = int(spec.block_size) if spec.granularity == Granularity.BLOCK else rows
    n_groups = -(-rows // group)
    pad = n_groups * group - rows
    h = _dampened(hessian, damp)
    old = np.asarray(scale, np.float32).reshape(n_groups, cols)
    zeros = np.asarray(zero).astype(np.float32).reshape(-1, cols) if np.ndim(zero) else \
        np.full((1, cols), np.float32(zero))
    new = old.copy()
    step = max(1, _COLUMNS_PER_GEMM // max(1, n_groups))
    for start in range(0, cols, step):
        c = slice(start, start + step)
        # codes minus zero point per row ([K, n]); the dequantized weight is d * (the row's scale)
        d = q[:, c].astype(np.float32) - np.repeat(zeros[:, c], group, axis=0)[:rows]
        target = w[:, c].astype(np.float32)
        hw = h @ target
        d_blocks = np.pad(d, ((0, pad), (0, 0))).reshape(n_groups, group, -1)
        # M[n, g, g'] = sum_{k in g, k' in g'} d_kn H_kk' d_k'n: block g of d against H[:, g'] d_g'
        m = np.empty((d.shape[1], n_groups, n_groups), np.float64)
        for g2 in range(n_groups):
            rows_g2 = slice(g2 * group, min((g2 + 1) * group, rows))
            part = h[:, rows_g2] @ d[rows_g2]                  # [K, n]
            m[:, :, g2] = (d_blocks * np.pad(part, ((0, pad), (0, 0))).reshape(n_groups, group, -1)).sum(axis=1).T
        rhs = (d_blocks * np.pad(hw, ((0, pad), (0, 0))).reshape(n_groups, group, -1)).sum(axis=1).T  # [n, G]
        ridge = 1e-9 * np.maximum(np.trace(m, axis1=1, axis2=2), 1e-30)[:, None, None] * np.eye(n_groups)
        try:
            solved = np.linalg.solve(m + ridge, rhs[..., None])[..., 0]   # [n, G]
        except np.linalg.LinAlgError:
            continue
        s_old = old[:, c].T.astype(np.float64)
        ratio = solved / np.where(s_old != 0, s_old, 1.0)
        ok = (np.isfinite(solved).all(axis=1) & (ratio >= 1 / REFIT_RANGE).all(axis=1)
              & (ratio <= REFIT_RANGE).all(axis=1)
              & (_quadratic_error(solved, m, rhs) < _quadratic_error(s_old, m, rhs)))
        new[:, c] = np.where(ok[None, :], solved.T, s_old.T).astype(np.float32)
    return new.reshape(np.shape(scale))


def _dampened(hessian: np.ndarray, damp: float) -> np.ndarray:
    """H + damp * mean(diag H) * I in float32 (GPTQ's dampening), a copy."""
    h = np.array(hessian, np.float32)
    h[np.diag_indices(len(h))] += np.float32(damp * float(np.mean(np.diag(h))))
    return h


def _quadratic_error(s: np.ndarray, m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Per channel, the output error of scales s [n, G] up to a constant: s^T M s - 2 s^T rhs."""
    return np.einsum("ng,ngh,nh->n", s, m, s) - 2 * np.einsum("ng,ng->n", s, rhs)


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper triangular U with U^T U = H^-1 (GPTQ's Hinv), adding damping if H is not
    numerically positive definite. With J the reversal permutation and J H J = L L^T,
    U = J L^-1 J: one Cholesky factorisation and one triangular inverse."""
    flip = np.arange(len(h))[::-1]
    reversed_h = h[np.ix_(flip, flip)]
    extra = 0.0
    mean_diag = float(np.mean(np.diag(h)))
    for _ in range(6):
        try:
            lower = np.linalg.cholesky(reversed_h + extra * np.eye(len(h)))
            break
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-4 * mean_diag)
    else:
        raise np.linalg.LinAlgError("the layer's input Hessian is not positive definite even with damping")
    inverse = np.tril(np.linalg.inv(lower))
    return inverse[np.ix_(flip, flip)]
