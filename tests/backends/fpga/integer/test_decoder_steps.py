"""The decoder's integer program steps (edgeq.backends.fpga.integer.decoder): ONNX Runtime runs each
step's nodes bit-identically to its numpy `run`, on the edge cases that matter (-(-128), slices
past the end, a causal mask with past tokens)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgeq.backends.fpga.integer import IntGraphBuilder
from edgeq.backends.fpga.integer.decoder import (MASK_TERM, CausalMask, ConcatInt, ExpandInt, MulInt, NegInt,
                                                 RmsNormInt, SiluInt, SliceInt, UnsqueezeInt)
from edgeq.backends.fpga.integer.program import IntegerProgram, STEP_TYPES
from edgeq.backends.fpga.integer.norm import rmsnorm_reference


def run_step(run_model, step, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime's output, the step's numpy run) for `step` on `feeds`."""
    b = IntGraphBuilder()
    for name, array in feeds.items():
        b.declare_value(name, array.dtype)
    out = step.emit(b)
    graph = onnx.helper.make_graph(
        b.nodes, "step",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
         for n, a in feeds.items()],
        [onnx.helper.make_tensor_value_info(out, onnx.helper.np_dtype_to_tensor_dtype(b.dtype(out)), None)],
        b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    return run_model(model, feeds), step.run(feeds)


def test_negation_widens_so_minus_128_is_exact(run_model) -> None:
    x = np.array([[-128, -1, 0, 1, 127]], np.int8)
    got, expected = run_step(run_model, NegInt("x", "int16"), {"x": x})
    assert got.dtype == np.int16 and np.array_equal(got, expected) and got[0, 0] == 128


def test_products_never_saturate_in_their_dtype(run_model, rng) -> None:
    a = np.array([[-128, 127, -128, 5]], np.int8)
    b = np.array([[-128, -128, 127, -7]], np.int8)
    got, expected = run_step(run_model, MulInt("a", "b", "int16"), {"a": a, "b": b})
    assert np.array_equal(got, expected) and got.tolist() == [[16384, -16256, -16256, -35]]
    wide = rng.integers(-32768, 32768, (2, 3, 8)).astype(np.int16)
    cos = rng.integers(-128, 128, (3, 8)).astype(np.int8)   # broadcast over the batch
    got, expected = run_step(run_model, MulInt("x", "c", "int32"), {"x": wide, "c": cos})
    assert np.array_equal(got, expected)
    assert np.array_equal(got, wide.astype(np.int64) * cos)


def test_rotate_half_moves(run_model, rng) -> None:
    x = rng.integers(-128, 128, (2, 4, 5, 16)).astype(np.int8)
    big = np.iinfo(np.int64).max
    for step in (SliceInt("x", (8,), (big,), (-1,), (1,)), SliceInt("x", (0,), (8,), (-1,), (1,)),
                 UnsqueezeInt("x", (2,)), ExpandInt("x", (1, 1, 1, 1)), ExpandInt("x", (3, 1, 1, 1, 1))):
        got, expected = run_step(run_model, step, {"x": x})
        assert got.shape == expected.shape and np.array_equal(got, expected), step
    got, expected = run_step(run_model, ConcatInt(("h", "x"), -1, "int16"),
                             {"h": x[..., 8:].astype(np.int16), "x": x[..., :8]})
    assert got.dtype == np.int16 and np.array_equal(got, expected)


@pytest.mark.parametrize("past", [0, 3])
def test_causal_mask_from_positions(run_model, past: int) -> None:
    """Key j is visible to query i iff j <= past + i (and, with padding, mask[b, j] == 1); each
    masked term adds 2^30 below, as the float bias adds c per term."""
    new = 4
    mask = np.ones((2, past + new), np.int64)
    mask[1, 0] = 0   # left padding in the second row
    for padding in (False, True):
        got, expected = run_step(run_model, CausalMask("mask", "ids", padding),
                                 {"mask": mask, "ids": np.zeros((2, new), np.int64)})
        assert got.dtype == np.int32 and np.array_equal(got, expected)
        causal = np.arange(past + new)[None, :] > past + np.arange(new)[:, None]
        terms = causal[None, None].astype(np.int64)
        if padding:
            terms = terms + (1 - mask)[:, None, None, :]
        assert np.array_equal(got, terms * MASK_TERM)
        assert got.shape == ((2, 1, new, past + new) if padding else (1, 1, new, past + new))


def test_rmsnorm_and_silu_steps(run_model, rng) -> None:
    x = rng.integers(-(2**20), 2**20, (2, 5, 16)).astype(np.int32)
    gamma = rng.uniform(0.5, 2.0, 16)
    step = RmsNormInt("x", 2.0**-16, "int32", tuple(gamma), 1e-5, 2.0**-10, out_dtype="int16")
    got, expected = run_step(run_model, step, {"x": x})
    assert got.dtype == np.int16 and np.array_equal(got, expected)
    assert np.array_equal(rmsnorm_reference(x, 2.0**-16, gamma, out_scale=2.0**-10, eps=1e-5),
                          RmsNormInt("x", 2.0**-16, "int32", tuple(gamma), 1e-5, 2.0**-10).run({"x": x}))
    got, expected = run_step(run_model, SiluInt("x", 2.0**-16, 2.0**-10, out_dtype="int16"), {"x": x})
    assert got.dtype == np.int16 and np.array_equal(got, expected)


def test_the_new_steps_serialise() -> None:
    steps = [NegInt("x", "int16", out="n"), CausalMask("m", "ids", True, out="c"),
             ConcatInt(("a", "b"), -1, "int16", out="cat"), SliceInt("x", (0,), (8,), (-1,), (1,), out="s")]
    program = IntegerProgram(steps, ["x", "m", "ids", "a", "b"], [("n", "y")])
    assert IntegerProgram.from_json(program.to_json()).steps == steps
    assert {"RmsNormInt", "SiluInt", "MulInt", "NegInt", "SliceInt", "ConcatInt", "UnsqueezeInt", "ExpandInt",
            "CausalMask"} <= set(STEP_TYPES)
