"""Integer softmax: bit-exact against its numpy reference, within 0.01 of float softmax."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from edgeq.backends.fpga.integer import Softmax, emit_softmax, softmax_reference

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_ABS_ERROR = 0.01  # the target's requirement


def float_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def attention_scores(rng: np.random.Generator, logit_std: float, heads: int = 4, seq: int = 64,
                     head_dim: int = 64) -> tuple[np.ndarray, float]:
    """int32 Q.K^T accumulators of int8-quantized q, k and their scale s_q*s_k/sqrt(d)."""
    q = rng.normal(0.0, math.sqrt(logit_std), (heads, seq, head_dim))
    k = rng.normal(0.0, math.sqrt(logit_std), (heads, seq, head_dim))
    q[:, :, 3] *= 6.0  # an outlier channel, as real attention has
    s_q, s_k = np.abs(q).max() / 127, np.abs(k).max() / 127
    q_int = np.round(q / s_q).astype(np.int32)
    k_int = np.round(k / s_k).astype(np.int32)
    acc = np.einsum("hqd,hkd->hqk", q_int, k_int).astype(np.int32)
    return acc, s_q * s_k / math.sqrt(head_dim)


def _check(run_kernel, scores: np.ndarray, scale: float, mask: np.ndarray | None = None,
           out_dtype: type = np.uint8) -> float:
    """Bit-exactness against the reference; returns the max abs error against float softmax."""
    kernel = functools.partial(emit_softmax, out_dtype=out_dtype)
    inputs = {"scores": (scores, scale)} if mask is None else {"scores": (scores, scale), "mask": (mask, scale)}
    if mask is not None:
        kernel = lambda b, x, m: emit_softmax(b, x, mask=m, out_dtype=out_dtype)  # noqa: E731
    got = run_kernel(kernel, **inputs)
    assert np.array_equal(got, softmax_reference(scores, scale, mask=mask, out_dtype=out_dtype))
    masked = scores.astype(np.float64) + (0 if mask is None else mask.astype(np.float64))
    plan = Softmax.plan(scale, out_dtype)
    return float(np.abs(got * plan.out_scale - float_softmax(masked * scale)).max())


@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("logit_std", [0.5, 2.0, 6.0, 15.0])
def test_attention_scores_error_within_bound(run_kernel, rng, out_dtype, logit_std: float) -> None:
    acc, scale = attention_scores(rng, logit_std)
    error = _check(run_kernel, acc, scale, out_dtype=out_dtype)
    print(f"softmax {np.dtype(out_dtype)} logit std {logit_std}: scale {scale:.3g}, "
          f"logit range +-{np.abs(acc).max() * scale:.1f}, max abs error {error:.5f}")
    assert error <= MAX_ABS_ERROR


@pytest.mark.parametrize("scale", [1e-7, 3.1e-5, 1e-3, 0.05, 0.7])
def test_any_input_scale_is_folded(run_kernel, rng, scale: float) -> None:
    logits = rng.normal(0, 4, (16, 97))  # odd row length
    scores = np.clip(np.round(logits / scale), INT32_MIN, INT32_MAX).astype(np.int32)
    assert _check(run_kernel, scores, scale) <= MAX_ABS_ERROR


def test_causal_and_padding_masks(run_kernel, rng) -> None:
    acc, scale = attention_scores(rng, 4.0, heads=2, seq=32)
    causal = np.where(np.tril(np.ones((32, 32), bool)), 0, INT32_MIN).astype(np.int32)  # finfo.min, saturated
    error = _check(run_kernel, acc, scale, causal[None])
    padding = np.zeros((2, 1, 32), np.int32)
    padding[:, :, 20:] = max(INT32_MIN, round(-10000.0 / scale))  # HF BERT's -10000 mask
    error = max(error, _check(run_kernel, acc, scale, padding))
    got = softmax_reference(acc, scale, mask=causal[None])
    assert np.all(got[:, np.triu_indices(32, 1)[0], np.triu_indices(32, 1)[1]] == 0)
    assert got[0, 0, 0] == 255  # the first query sees only itself: probability 1 saturates to 255/256
    print(f"softmax masked: max abs error {error:.5f}")
    assert error <= MAX_ABS_ERROR


def test_mask_already_applied_in_the_int32_scores(run_kernel, rng) -> None:
    acc, scale = attention_scores(rng, 2.0, heads=1, seq=16)
    causal = np.tril(np.ones((16, 16), bool))
    premasked = np.where(causal, acc, INT32_MIN).astype(np.int32)
    assert _check(run_kernel, premasked, scale) <= MAX_ABS_ERROR
    assert np.array_equal(softmax_reference(premasked, scale), softmax_reference(acc, scale, mask=np.where(
        causal, 0, INT32_MIN).astype(np.int32)))


@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8])
def test_edge_rows(run_kernel, out_dtype) -> None:
    rows = np.array([
        [INT32_MAX, INT32_MIN, 0, 0, 0, 0, 0, 0],           # widest possible spread
        [INT32_MIN] * 8,                                    # fully masked: uniform
        [INT32_MAX] * 8,                                    # all equal at the top
        [7] * 8,                                            # all equal
        [0, 1, 2, 3, 4, 5, 6, 7],                           # tiny differences
        [INT32_MIN, INT32_MIN + 1, INT32_MIN, 5, 5, -5, INT32_MAX, INT32_MAX],
    ], np.int32)
    mask = np.array([[0, 0, 0, 0, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN]], np.int32)
    for scale in (1e-6, 1e-3, 0.3):
        assert _check(run_kernel, rows, scale, out_dtype=out_dtype) <= MAX_ABS_ERROR
        assert _check(run_kernel, rows, scale, mask, out_dtype=out_dtype) <= MAX_ABS_ERROR
    uniform = softmax_reference(rows, 1e-3, out_dtype=out_dtype)[1]
    assert np.all(uniform == uniform[0])


def test_single_element_and_long_rows(run_kernel, rng) -> None:
    assert _check(run_kernel, np.array([[5], [INT32_MIN]], np.int32), 1e-3) <= MAX_ABS_ERROR
    long_rows = rng.normal(0, 3000, (2, 4096)).astype(np.int32)
    assert _check(run_kernel, long_rows, 1e-3) <= MAX_ABS_ERROR


def test_int8_and_int16_score_inputs(run_kernel, rng) -> None:
    assert _check(run_kernel, rng.integers(-128, 128, (8, 33)).astype(np.int8), 2**-4) <= MAX_ABS_ERROR
    assert _check(run_kernel, rng.integers(-(2**15), 2**15, (8, 33)).astype(np.int16), 2**-11) <= MAX_ABS_ERROR


def test_exp_constants_follow_ibert_and_stay_narrow() -> None:
    for scale in (1e-7, 1e-4, 0.01, 1.0):
        exp = Softmax.plan(scale).exp
        assert 2**11 <= exp.ln2_steps < 2**12 + 1
        assert exp.one < 2**27 and abs(exp.one * exp.unit - 1.0) < 2e-3  # L(0) = 0.3585*1.353^2 + 0.344
