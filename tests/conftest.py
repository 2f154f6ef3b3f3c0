"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.ir import Graph
from edgeq.models import synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
# The same provider on every machine: x86 targets would default to OpenVINO where its plugin
# finds an Intel CPU. Tests that exercise another provider name it.
os.environ.setdefault("EDGEQ_PROVIDER", "cpu")
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's read-only material (`../shared` beside the project root)."""
    if not SHARED.is_dir():
        pytest.fail(f"shared material not found at {SHARED}")
    return SHARED


# --- models (tests/models): real models built once and cached on disk, synthetic ones per run ---

@pytest.fixture(scope="session")
def minilm_onnx() -> Path:
    """all-MiniLM-L6-v2 as float32 ONNX, from the edgeq cache (built on first use)."""
    from edgeq.models import catalog

    return catalog.cached("minilm")


@pytest.fixture(scope="session")
def smollm2_onnx() -> Path:
    """SmolLM2-135M-Instruct (full sequence: input_ids, attention_mask -> logits), cached."""
    from edgeq.models import catalog

    return catalog.cached("smollm2")


@pytest.fixture(scope="session")
def smollm2_kv_onnx() -> Path:
    """SmolLM2-135M-Instruct with past_key_values inputs and present outputs, cached."""
    from edgeq.models import catalog

    return catalog.cached("smollm2-kv")


@pytest.fixture(scope="session")
def synthetic_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BERT (seed 0) with planted outliers; `edgeq.models.synthetic.outliers` says where."""
    from edgeq.models import synthetic

    return synthetic.build_bert_file(tmp_path_factory.mktemp("synthetic") / "bert.onnx", seed=0)


@pytest.fixture(scope="session")
def synthetic_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Llama (seed 0, no KV cache) with planted outliers."""
    from edgeq.models import synthetic

    return synthetic.build_llama_file(tmp_path_factory.mktemp("synthetic") / "llama.onnx", seed=0)


# ---- real ONNX models shipped in PyPI wheels (fetched once into $EDGEQ_CACHE) ---------------
# Versions are pinned so every machine tests the same files.
REAL_MODEL_WHEELS = {"rapidocr-onnxruntime": "1.4.4", "silero-vad": "6.2.3", "nudenet": "3.4.2"}
RAPIDOCR_MODELS = ("ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
SILERO_MODELS = ("silero_vad.onnx", "silero_vad_16k_op15.onnx", "silero_vad_16k_sequence.onnx",
                 "silero_vad_half.onnx", "silero_vad_op18_ifless.onnx", "silero_vad_openvino_16k.onnx")


@pytest.fixture(scope="session")
def wheel_model():
    """wheel_model(package, member) -> Path of a file inside the pinned wheel of `package`."""
    from edgeq.models.wheels import wheel_file

    def get(package: str, member: str) -> Path:
        return wheel_file(package, member, REAL_MODEL_WHEELS.get(package))

    return get


@pytest.fixture(scope="session")
def rapidocr_models(wheel_model) -> dict[str, Path]:
    """The three PP-OCR models of rapidocr-onnxruntime, by file name."""
    return {name: wheel_model("rapidocr-onnxruntime", f"rapidocr_onnxruntime/models/{name}") for name in RAPIDOCR_MODELS}


@pytest.fixture(scope="session")
def silero_models(wheel_model) -> dict[str, Path]:
    """Every ONNX file of silero-vad, by file name."""
    return {name: wheel_model("silero-vad", f"silero_vad/data/{name}") for name in SILERO_MODELS}


@pytest.fixture(scope="session")
def nudenet_model(wheel_model) -> Path:
    """NudeNet's YOLOv8n detector (320n.onnx)."""
    return wheel_model("nudenet", "nudenet/320n.onnx")


# --- synthetic graphs and their feeds (pass tests) ---

@pytest.fixture
def bert_graph(synthetic_bert: Path) -> Graph:
    """A fresh Graph of the synthetic BERT (each test may mutate its own)."""
    return edgeq.load(synthetic_bert)


@pytest.fixture
def llama_graph(synthetic_llama: Path) -> Graph:
    return edgeq.load(synthetic_llama)


@pytest.fixture(scope="session")
def bert_feeds() -> list[dict]:
    """Six calibration/evaluation samples for the synthetic BERT (padding in some rows)."""
    return [synthetic.bert_feeds(batch=2, seq=16, seed=i) for i in range(6)]


@pytest.fixture(scope="session")
def llama_feeds() -> list[dict]:
    return [synthetic.llama_feeds(batch=1, seq=16, seed=i) for i in range(6)]


# --- calibration data on disk (end-to-end and CLI tests) ---

SAMPLES = 8  # 6 calibrate, 2 are held out to verify the compiled model


@pytest.fixture(scope="session")
def bert_samples() -> list[dict[str, np.ndarray]]:
    return [synthetic.bert_feeds(batch=1, seq=16, seed=i) for i in range(SAMPLES)]


@pytest.fixture(scope="session")
def llama_samples() -> list[dict[str, np.ndarray]]:
    return [synthetic.llama_feeds(batch=1, seq=16, seed=i) for i in range(SAMPLES)]


@pytest.fixture(scope="session")
def bert_calib_dir(tmp_path_factory, bert_samples) -> Path:
    """A directory of .npz files, one sample each (the CLI's --calib DIR)."""
    directory = tmp_path_factory.mktemp("bert_calib")
    for i, feed in enumerate(bert_samples):
        np.savez(directory / f"sample_{i:02d}.npz", **feed)
    return directory


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory) -> Path:
    """x [batch, 16] float -> MatMul -> Relu -> MatMul -> y."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")])
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path
