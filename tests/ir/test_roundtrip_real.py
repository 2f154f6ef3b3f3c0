"""Exact round-trip of real models: ONNX Runtime outputs after edgeq.save(edgeq.load(m)) are
bit-identical to the original's; the protos are the same; saving is deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.ir import to_model_proto
from edgeq.models.wheels import wheel_members
from tests.conftest import RAPIDOCR_MODELS, REAL_MODEL_WHEELS, SILERO_MODELS
from tests.ir.helpers import assert_bit_identical, session
from tests.ir.protodiff import first_difference

pytestmark = pytest.mark.slow

MODELS = ([("rapidocr", name) for name in RAPIDOCR_MODELS] + [("silero", name) for name in SILERO_MODELS]
          + [("nudenet", "320n.onnx")])


@pytest.fixture(params=MODELS, ids=[name for _, name in MODELS])
def real_model(request, rapidocr_models, silero_models, nudenet_model) -> Path:
    family, name = request.param
    return {"rapidocr": rapidocr_models, "silero": silero_models}[family][name] if family != "nudenet" else nudenet_model


# ---- realistic inputs ----------------------------------------------------------------------


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A normalized RGB image batch (mean 0.5, std 0.5 as PP-OCR expects) with some structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(8 * xx), np.cos(5 * yy), xx * yy]) * 0.4 + 0.5
    img = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
    return ((img - 0.5) / 0.5).astype(np.float32)[None]


def _audio(samples: int, sr: int, seed: int) -> np.ndarray:
    """Speech-like audio: a few harmonics with vibrato plus noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sr
    f0 = 140 + 20 * np.sin(2 * np.pi * 3 * t)
    wave = sum(0.2 / k * np.sin(2 * np.pi * k * np.cumsum(f0) / sr) for k in range(1, 6))
    return (wave + rng.normal(0, 0.01, samples)).astype(np.float32)


def _run_scenario(model_path: Path, name: str) -> list[np.ndarray]:
    """Every output of every step of the model's realistic use (streaming models carry state)."""
    sess = session(model_path)
    if name.startswith("ch_PP-OCRv4_det"):
        return sess.run(None, {"x": _image(320, 320, 0)})
    if name.startswith("ch_PP-OCRv4_rec"):
        return sess.run(None, {"x": _image(48, 320, 1)})
    if name.startswith("ch_ppocr_mobile"):
        return sess.run(None, {"x": _image(48, 192, 2)})
    if name == "320n.onnx":
        return sess.run(None, {"images": (_image(320, 320, 3) * 0.5 + 0.5)})
    outputs: list[np.ndarray] = []
    inputs = {i.name for i in sess.get_inputs()}
    if name == "silero_vad_16k_sequence.onnx":
        # frames of 64 context + 512 new samples at 16 kHz, LSTM state (h, c) carried
        audio = _audio(64 + 512 * 6, 16000, 4)
        frames = np.stack([audio[i * 512:i * 512 + 576] for i in range(6)])
        h = c = np.zeros((1, 1, 128), np.float32)
        for chunk in (frames[:3], frames[3:]):
            probs, h, c = sess.run(None, {"input": chunk, "h": h, "c": c})
            outputs += [probs, h, c]
        return outputs
    rates = [(16000, 512)] if "16k" in name and "op15" not in name else [(16000, 512), (8000, 256)]
    for sr, chunk in rates:
        audio = _audio(chunk * 3, sr, 5)
        state = np.zeros((2, 1, 128), np.float32)
        for step in range(3):
            x = audio[step * chunk:(step + 1) * chunk][None]
            if "openvino" in name:  # fixed 64-sample context + 512 samples
                x = np.concatenate([np.zeros((1, 64), np.float32) if step == 0 else audio[None, step * chunk - 64:step * chunk], x], axis=1)
            feeds = {"input": x, "state": state}
            if "sr" in inputs:
                feeds["sr"] = np.array(sr, np.int64)
            prob, state = sess.run(None, feeds)
            outputs += [prob, state]
    return outputs


# ---- tests -----------------------------------------------------------------------------------


def test_ort_outputs_bit_identical_after_roundtrip(real_model: Path, tmp_path: Path):
    saved = edgeq.save(edgeq.load(real_model), tmp_path / real_model.name)
    assert_bit_identical(_run_scenario(real_model, real_model.name), _run_scenario(saved, real_model.name),
                         real_model.name)


def test_proto_identical(real_model: Path, tmp_path: Path):
    original = onnx.load(str(real_model))
    graph = edgeq.load(real_model)
    assert first_difference(original, to_model_proto(graph)) is None
    saved = edgeq.save(graph, tmp_path / "saved.onnx")
    assert first_difference(original, onnx.load(str(saved))) is None


def test_save_is_deterministic_and_a_fixed_point(real_model: Path, tmp_path: Path):
    graph = edgeq.load(real_model)
    first = edgeq.save(graph, tmp_path / "a.onnx").read_bytes()
    assert edgeq.save(graph, tmp_path / "b.onnx").read_bytes() == first
    again = edgeq.save(edgeq.load(tmp_path / "a.onnx"), tmp_path / "c.onnx").read_bytes()
    assert again == first


def test_every_model_file_of_the_wheels_is_covered():
    """A new model file in a pinned wheel must be added to the lists above."""
    silero = {Path(m).name for m in wheel_members("silero-vad", ".onnx", REAL_MODEL_WHEELS["silero-vad"])}
    assert silero == set(SILERO_MODELS)
    ocr = {Path(m).name for m in wheel_members("rapidocr-onnxruntime", ".onnx", REAL_MODEL_WHEELS["rapidocr-onnxruntime"])}
    assert ocr == set(RAPIDOCR_MODELS)
    assert "nudenet/320n.onnx" in wheel_members("nudenet", ".onnx", REAL_MODEL_WHEELS["nudenet"])


def test_external_data_save_gives_bit_identical_outputs(real_model: Path, tmp_path: Path):
    """Saved with external data (onnx's 1 KB threshold): same outputs, same model when read back."""
    saved = edgeq.save(edgeq.load(real_model), tmp_path / real_model.name, external_data=True)
    assert_bit_identical(_run_scenario(real_model, real_model.name), _run_scenario(saved, real_model.name),
                         real_model.name)
    assert first_difference(onnx.load(str(real_model)), to_model_proto(edgeq.load(saved))) is None
