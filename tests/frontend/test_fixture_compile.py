"""x86-vnni compiles of the real exporter fixtures through the whole front end: each verifies
against its float model (BERTs at cosine >= 0.9999, calibrated on their `*_io.npz` inputs), records
the shapes an estimate assumes, and `inspect` lists the same blocks and mask on the compiled model
as on its float model (the BERT fixtures and the synthetic Llama)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgeq
from edgeq.frontend.inspect import summarize
from edgeq.metadata import INPUT_SHAPES_KEY, recorded_input_shapes
from tests.frontend.test_fixture_shapes import FIXTURES, fixture_inputs

BERTS = tuple(name for name in FIXTURES if name.startswith("bert"))


def calibration_dir(directory: Path, feeds: dict[str, np.ndarray], count: int = 8) -> Path:
    """`count` samples from one fixture input: its token ids rolled along the sequence."""
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        np.savez(directory / f"{k:03d}.npz",
                 **{n: np.roll(a, 5 * k, axis=1) if n == "input_ids" else a for n, a in feeds.items()})
    return directory


@pytest.fixture(scope="module")
def compiled(shared_dir, tmp_path_factory):
    """name -> (float path, compiled path, Compiled), compiled once per name."""
    cache: dict[str, tuple] = {}

    def get(name: str, path: Path | None = None, calib: Path | None = None):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            path = path or shared_dir / "fixtures" / "exports" / f"{name}.onnx"
            calib = calib or calibration_dir(root / "calib", fixture_inputs(shared_dir, name))
            result = edgeq.compile(path, "x86-vnni", calibration=calib)
            out = result.save(root / "compiled.onnx")
            cache[name] = (path, out, result)
        return cache[name]

    return get


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_compiles_for_x86_vnni_and_verifies(name, compiled, shared_dir):
    _, out, result = compiled(name)
    cosine = min(o.cosine_min for o in result.report.verification.outputs)
    assert result.report.verification.samples == 2 and not result.report.verification.synthetic_inputs
    assert cosine >= (0.9999 if name in BERTS else 0.98), cosine
    stats = {p.name: p.stats for p in result.report.passes}
    assert stats["canonicalize-shapes"]["reshapes_to_constant"] >= 8
    feeds = fixture_inputs(shared_dir, name)
    props = dict(result.graph.model.metadata_props)
    assert INPUT_SHAPES_KEY == "edgeq.input_shapes"
    assert recorded_input_shapes(props) == {k: list(v.shape) for k, v in feeds.items()}


@pytest.mark.parametrize("name", BERTS + ("synthetic_llama",))
def test_inspect_lists_the_same_blocks_on_float_and_compiled(name, compiled, synthetic_llama, tmp_path,
                                                             llama_samples):
    if name == "synthetic_llama":
        calib = tmp_path / "calib"
        calib.mkdir()
        for i, feed in enumerate(llama_samples):
            np.savez(calib / f"{i:02d}.npz", **feed)
        path, out, _ = compiled(name, synthetic_llama, calib)
    else:
        path, out, _ = compiled(name)
    float_view, compiled_view = summarize(edgeq.load(path)), summarize(edgeq.load(out))
    assert compiled_view["front_end"]["compiled_model"] and not float_view["front_end"]["compiled_model"]
    blocks = float_view["recognised_blocks"]
    assert compiled_view["recognised_blocks"] == blocks
    assert blocks["Linear"] >= 12 and blocks["Attention"] == 2 and "AttentionMatMul" in blocks
    assert compiled_view["mask"] == float_view["mask"]
    assert float_view["mask"] == ({"causal+padding": 2} if "llama" in name else {"key-padding": 2})
