"""Tiny BERT- and Llama-shaped models with planted outliers, built in milliseconds from a seed.

They are the fixtures for fast tests of passes: the graphs come from the same builders as the
real models (`edgeq.models.bert`, `edgeq.models.llama`), so a pass that works on them meets
the same patterns on MiniLM and SmolLM2. Two kinds of outliers are planted, as in real LLMs:

- activation outlier channels: a few hidden channels whose gain in every norm (LayerNorm /
  RMSNorm weight) is multiplied by 50-100, so the inputs of the Q/K/V, MLP and (Llama) lm_head
  MatMuls carry those channels 50-100x larger than the rest — the SmoothQuant case;
- weight outliers: a few entries of every linear weight set to 50-100x the weights' std.

Where they are is stored in the model's metadata (`edgeq.synthetic.outliers`, JSON) and read
back with `outliers(model)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from edgeq.models.bert import BertConfig, build_bert
from edgeq.models.llama import LlamaConfig, build_llama

TINY_BERT = BertConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                       intermediate_size=256, max_positions=128)
TINY_LLAMA = LlamaConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=192, rope_theta=10000.0)

WEIGHT_STD = 0.02  # HF's initializer_range
OUTLIER_SCALE = (50.0, 100.0)
METADATA_KEY = "edgeq.synthetic.outliers"


@dataclass(frozen=True)
class Outliers:
    """Where outliers were planted. `weights` maps a MatMul weight initializer to the
    [in, out] positions (ONNX layout) of its outlier entries."""
    activation_channels: list[int]
    activation_scales: list[float]
    weights: dict[str, list[tuple[int, int]]]


def bert(seed: int = 0, config: BertConfig = TINY_BERT, *, outlier_channels: int = 2,
         weight_outliers: int = 2) -> onnx.ModelProto:
    """A random BERT encoder (same inputs/outputs as MiniLM) with planted outliers."""
    rng = np.random.default_rng(seed)
    weights = _bert_weights(config, rng)
    planted = _plant(weights, config.hidden_size, rng, outlier_channels, weight_outliers)
    return build_bert(config, weights, name=f"synthetic-bert-{seed}", metadata=_metadata(planted, seed))


def llama(seed: int = 0, config: LlamaConfig = TINY_LLAMA, *, kv_cache: bool = False,
          outlier_channels: int = 2, weight_outliers: int = 2) -> onnx.ModelProto:
    """A random Llama decoder (same inputs/outputs as SmolLM2) with planted outliers."""
    rng = np.random.default_rng(seed)
    weights = _llama_weights(config, rng)
    planted = _plant(weights, config.hidden_size, rng, outlier_channels, weight_outliers)
    return build_llama(config, weights, kv_cache=kv_cache, name=f"synthetic-llama-{seed}",
                       metadata=_metadata(planted, seed))


def build_bert_file(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    onnx.save(bert(seed), path)
    return path


def build_llama_file(path: str | Path, seed: int = 0, kv_cache: bool = False) -> Path:
    path = Path(path)
    onnx.save(llama(seed, kv_cache=kv_cache), path)
    return path


def outliers(model: onnx.ModelProto) -> Outliers:
    """The outliers planted in a synthetic model, from its metadata."""
    props = {p.key: p.value for p in model.metadata_props}
    raw = json.loads(props[METADATA_KEY])
    return Outliers(activation_channels=raw["activation_channels"],
                    activation_scales=raw["activation_scales"],
                    weights={k: [tuple(p) for p in v] for k, v in raw["weights"].items()})


def bert_feeds(batch: int = 2, seq: int = 16, seed: int = 0,
               config: BertConfig = TINY_BERT) -> dict[str, np.ndarray]:
    """Random token ids; rows after the first end in padding, the second half is segment 1."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, config.vocab_size, size=(batch, seq), dtype=np.int64)
    lengths = np.maximum(seq - np.arange(batch) * (seq // 4), 1)
    attention_mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    token_type_ids = np.zeros((batch, seq), dtype=np.int64)
    token_type_ids[:, seq // 2:] = 1
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask,
            "token_type_ids": token_type_ids}


def llama_feeds(batch: int = 1, seq: int = 16, seed: int = 0, config: LlamaConfig = TINY_LLAMA,
                *, kv_cache: bool = False) -> dict[str, np.ndarray]:
    """Random token ids, a full mask and, for the KV-cache graph, an empty cache."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, config.vocab_size, size=(batch, seq), dtype=np.int64),
             "attention_mask": np.ones((batch, seq), dtype=np.int64)}
    if kv_cache:
        feeds |= empty_past(config, batch)
    return feeds


def empty_past(config: LlamaConfig, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past_key_values for the first step of a KV-cache graph."""
    shape = (batch, config.num_kv_heads, 0, config.head_dim)
    return {f"past_key_values.{i}.{kind}": np.zeros(shape, dtype=np.float32)
            for i in range(config.num_layers) for kind in ("key", "value")}


def _bert_weights(c: BertConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    w = {"embeddings.word_embeddings.weight": _normal(rng, c.vocab_size, c.hidden_size),
         "embeddings.position_embeddings.weight": _normal(rng, c.max_positions, c.hidden_size),
         "embeddings.token_type_embeddings.weight": _normal(rng, c.type_vocab_size, c.hidden_size)}
    w |= _norm_weights(rng, "embeddings.LayerNorm", c.hidden_size, bias=True)
    linears = {"attention.self.query": (c.hidden_size, c.hidden_size),
               "attention.self.key": (c.hidden_size, c.hidden_size),
               "attention.self.value": (c.hidden_size, c.hidden_size),
               "attention.output.dense": (c.hidden_size, c.hidden_size),
               "intermediate.dense": (c.intermediate_size, c.hidden_size),
               "output.dense": (c.hidden_size, c.intermediate_size)}
    for i in range(c.num_layers):
        prefix = f"encoder.layer.{i}"
        for path, shape in linears.items():
            w[f"{prefix}.{path}.weight"] = _normal(rng, *shape)
            w[f"{prefix}.{path}.bias"] = _normal(rng, shape[0])
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w |= _norm_weights(rng, f"{prefix}.{norm}", c.hidden_size, bias=True)
    return w


def _llama_weights(c: LlamaConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    kv_width = c.num_kv_heads * c.head_dim
    w = {"model.embed_tokens.weight": _normal(rng, c.vocab_size, c.hidden_size)}
    w |= _norm_weights(rng, "model.norm", c.hidden_size, bias=False)
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = _normal(rng, c.vocab_size, c.hidden_size)
    linears = {"self_attn.q_proj": (c.hidden_size, c.hidden_size),
               "self_attn.k_proj": (kv_width, c.hidden_size),
               "self_attn.v_proj": (kv_width, c.hidden_size),
               "self_attn.o_proj": (c.hidden_size, c.hidden_size),
               "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
               "mlp.up_proj": (c.intermediate_size, c.hidden_size),
               "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
    for i in range(c.num_layers):
        prefix = f"model.layers.{i}"
        for path, shape in linears.items():
            w[f"{prefix}.{path}.weight"] = _normal(rng, *shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w |= _norm_weights(rng, f"{prefix}.{norm}", c.hidden_size, bias=False)
    return w


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_STD)


def _norm_weights(rng: np.random.Generator, module: str, width: int, *, bias: bool) -> dict[str, np.ndarray]:
    # Gains near 1, not exactly 1, so passes that fold them see distinct values.
    out = {f"{module}.weight": 1.0 + 0.1 * rng.standard_normal(width, dtype=np.float32)}
    if bias:
        out[f"{module}.bias"] = _normal(rng, width)
    return out


def _plant(weights: dict[str, np.ndarray], hidden: int, rng: np.random.Generator,
           n_channels: int, n_weight_outliers: int) -> Outliers:
    """Scale the outlier channels of every norm gain; set a few entries of every linear weight."""
    channels = sorted(rng.choice(hidden, size=n_channels, replace=False).tolist())
    scales = rng.uniform(*OUTLIER_SCALE, size=n_channels).astype(np.float32)
    for name, w in weights.items():
        if w.ndim == 1 and name.endswith(".weight"):  # a LayerNorm / RMSNorm gain
            w[channels] *= scales
    planted: dict[str, list[tuple[int, int]]] = {}
    for name, w in weights.items():
        if w.ndim != 2 or "embed" in name:  # linear weights only, not embedding tables
            continue
        rows = rng.integers(0, w.shape[0], size=n_weight_outliers)
        cols = rng.integers(0, w.shape[1], size=n_weight_outliers)
        signs = rng.choice([-1.0, 1.0], size=n_weight_outliers)
        w[rows, cols] = signs * rng.uniform(*OUTLIER_SCALE, size=n_weight_outliers) * WEIGHT_STD
        # Builders store linear weights transposed ([in, out]); record positions that way.
        planted[name] = [(int(c), int(r)) for r, c in zip(rows, cols)]
    return Outliers(activation_channels=channels, activation_scales=[float(s) for s in scales],
                    weights=planted)


def _metadata(planted: Outliers, seed: int) -> dict[str, str]:
    return {METADATA_KEY: json.dumps(asdict(planted)), "edgeq.synthetic.seed": str(seed)}
