"""Write the small torch.onnx exports with a KV cache that the front-end and compile tests read
(tests/frontend/data/llama_kv_{torchscript,dynamo}.onnx + *_io.npz): a 2-layer Hugging Face Llama
(width 32, 4 heads, 2 KV heads, SwiGLU, RMSNorm, rotary, tied embeddings, vocabulary 128, random
weights, seed 0) wrapped so that its cache is plain tensors: inputs input_ids [batch, sequence],
attention_mask [batch, past + sequence], past_key_values.N.key/value [batch, 2, past, 8]; outputs
logits and present.N.key/value.

Needs torch and transformers (not edgeq's dependencies):

    python tools/export_kv_fixtures.py tests/frontend/data

The TorchScript exporter (opset 17) names the dims as given; the dynamo exporter (`Dim.AUTO`)
names each input's dims on its own (s0, s1, ...), so the batch has several names and the total
length is a symbol of its own, as real dynamo exports of decoders with a cache have them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

LAYERS = 2


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    return config, LlamaForCausalLM(config).eval()


class _Wrapped(torch.nn.Module):
    """The cache as tensors in, tensors out."""

    def __init__(self, config, model):
        super().__init__()
        self.config, self.model = config, model

    def forward(self, input_ids, attention_mask, *past):
        cache = DynamicCache(config=self.config)
        for i in range(LAYERS):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers[:LAYERS]:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def _strip_debug_info(path: Path) -> None:
    """Drop the exporters' per-node stack traces and names of source lines (most of the bytes)."""
    import onnx

    model = onnx.load(path)
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    onnx.save(model, path)


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config, model = _model()
    wrapped = _Wrapped(config, model)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 3))
    mask = torch.ones(1, 8, dtype=torch.int64)
    past = [torch.randn(1, 2, 5, 8) for _ in range(2 * LAYERS)]
    inputs = ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    with torch.no_grad():
        reference = wrapped(ids, mask, *past)
    for kind in ("torchscript", "dynamo"):
        path = folder / f"llama_kv_{kind}.onnx"
        if kind == "torchscript":
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                    "logits": {0: "batch", 1: "sequence"}}
            axes |= {n: {0: "batch", 2: "past_sequence"} for n in inputs[2:]}
            axes |= {n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]}
            torch.onnx.export(wrapped, (ids, mask, *past), path, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        else:
            auto = torch.export.Dim.AUTO
            shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
            program = torch.onnx.export(wrapped, (ids, mask, *past), input_names=inputs, output_names=outputs,
                                        dynamic_shapes=shapes, dynamo=True)
            program.save(str(path))  # weights inline: the file is small
        _strip_debug_info(path)
        np.savez(folder / f"llama_kv_{kind}_io.npz",
                 **{n: t.numpy() for n, t in zip(inputs, (ids, mask, *past))},
                 **{n: t.numpy() for n, t in zip(outputs, reference)})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
