"""`edgeq package --genai`: a folder that onnxruntime-genai's generation loop loads
(`onnxruntime_genai.Model(folder)`) and generates with.

The folder holds the compiled decoder as `model.onnx` (+ its external data), its inputs and
outputs under the names the loop feeds and reads (`edgeq.packaging.decoder`), laid out for ONNX
Runtime's kernels (`edgeq.packaging.ort_fusions`: RMSNorm and attention with its cache as the
fused ops onnxruntime-genai's own graphs use; `fuse=False` keeps the canonical forms), `genai_config.json`
(what onnxruntime-genai's own builder writes, `src/python/py/models/builder.py`: the decoder's
file, sizes and input/output names, token ids, search defaults, session options with the
provider) and, with a tokenizer, `tokenizer.json` + `tokenizer_config.json`.

Where every cache tensor is read and written only by fused `GroupQueryAttention` ops (a float
cache), the loop shares one past/present buffer of `context_length` tokens per tensor
(`past_present_share_buffer` true, as onnxruntime-genai's builder writes it): the op appends the
new tokens in place, where otherwise each step copies the whole cache into a new present tensor
(SmolLM2 W4A16: +11% decode tokens/s). Any other reader or writer (canonical attention with
`present = Concat(past, new)`, a quantized cache) keeps the cache growing by concatenation, without
a shared buffer. The provider is the one the
model was compiled for (recorded in its metadata) unless `GenaiOptions.provider` names another;
`PROVIDERS` maps ONNX Runtime's provider names to the loop's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgeq.ir import Graph, load, save
from edgeq.ir.to_proto import graph_to_proto, model_header
from edgeq.metadata import PROVIDER_KEY
from edgeq.packaging import decoder as decoder_io
from edgeq.packaging import tokenizer as tokenizers
from edgeq.packaging.folder import Package, PackageError, package_folder
from edgeq.packaging.ort_fusions import fuse_for_onnxruntime

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
# ONNX Runtime provider -> (onnxruntime-genai's provider name, its options); CPU needs no entry.
PROVIDERS: dict[str, tuple[str, dict[str, str]] | None] = {
    "CPUExecutionProvider": None,
    "OpenVINOExecutionProvider": ("OpenVINO", {"device_type": "CPU"}),
    "QNNExecutionProvider": ("QNN", {"backend_path": "QnnHtp.dll"}),
    "CUDAExecutionProvider": ("cuda", {}),
    "DmlExecutionProvider": ("dml", {}),
    "WebGpuExecutionProvider": ("WebGPU", {}),
}
# Short names a user may give (--provider) for the ONNX Runtime provider.
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "openvino": "OpenVINOExecutionProvider",
                    "qnn": "QNNExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider",
                    "webgpu": "WebGpuExecutionProvider"}


@dataclass(frozen=True)
class GenaiOptions:
    """What genai_config.json says beyond what the model's inputs and outputs tell."""

    context_length: int = 2048           # the longest sequence the loop runs (search.max_length)
    model_type: str = "llama"            # onnxruntime-genai's model type: a decoder-only LLM
    provider: str | None = None          # ONNX Runtime provider or alias; None: the compiled one
    bos_token_id: int | None = None      # None: from the tokenizer (or 0 without one)
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    num_attention_heads: int | None = None  # None: from the head split in the graph
    fuse: bool = True                    # canonical forms -> ONNX Runtime's fused kernels (ort_fusions)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise PackageError(f"context length {self.context_length} is too short", fix="give 2 or more")


def package_genai(model: str | os.PathLike[str], output: str | os.PathLike[str], options: GenaiOptions = GenaiOptions(),
                  *, tokenizer: str | os.PathLike[str] | None = None) -> Package:
    """Write the onnxruntime-genai folder of the compiled decoder `model` to `output`."""
    source = Path(model)
    if not source.is_file():
        raise PackageError(f"model '{source}' does not exist", fix="give the compiled .onnx file")
    graph = load(source)
    skeleton = _skeleton(graph)
    layout = decoder_io.decoder_layout(skeleton)  # checks the decoder before any rewrite
    tokens = _special_tokens(tokenizer, options)
    for what, token in (("bos", tokens.bos_token_id), ("eos", tokens.eos_token_id), ("pad", tokens.pad_token_id)):
        if not 0 <= token < layout.vocab_size:
            raise PackageError(f"{what} token id {token} is outside the vocabulary (0..{layout.vocab_size - 1})",
                               fix=f"give --{what}-token-id below {layout.vocab_size}, or the model's tokenizer")
    heads = options.num_attention_heads or decoder_io.attention_heads(graph, layout.head_size, layout.kv_heads)
    if heads is None:
        raise PackageError("cannot tell the number of attention heads from the graph",
                           fix="give --num-attention-heads")
    provider = _provider(skeleton, options.provider)
    fusion = fuse_for_onnxruntime(graph, options.context_length) if options.fuse else None
    share_buffer = _cache_in_place(graph, layout)
    decoder_io.rename(graph, layout.standard_names())
    config = genai_config(layout, options, tokens, heads, provider, share_buffer=share_buffer)
    with package_folder(output, overwrite=options.overwrite) as folder:
        save(graph, folder / MODEL_FILE)
        weights = sorted(p.name for p in folder.iterdir() if p.name != MODEL_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        token_files = tokenizers.write_tokenizer(Path(tokenizer), folder, tokens) if tokenizer else []
    package = Package(Path(output), "genai")
    package.add(MODEL_FILE, "model")
    for name in weights:
        package.add(name, "weights")
    package.add(CONFIG_FILE, "config")
    for name in token_files:
        package.add(name, "tokenizer")
    if fusion is not None:
        package.notes += fusion.notes()
    package.notes.append("the loop shares one past/present buffer per cache tensor (GroupQueryAttention appends in place)"
                         if share_buffer else "the cache grows by concatenation (no shared past/present buffer)")
    if not tokenizer:
        package.notes.append("no tokenizer: the folder generates from token ids (give --tokenizer for text)")
    if provider != "CPUExecutionProvider":
        package.notes.append(f"session options name {provider}; onnxruntime-genai falls back to the CPU where "
                             "its build lacks that provider")
    return package


def _skeleton(graph: Graph) -> onnx.ModelProto:
    """The graph's ModelProto without weights (what the layout checks read)."""
    model = model_header(graph)
    model.graph.CopyFrom(graph_to_proto(graph, with_data=False))
    return model


def _cache_in_place(graph: Graph, layout: decoder_io.DecoderLayout) -> bool:
    """Whether each past tensor is read only as a GroupQueryAttention's past input and each present
    one is that op's present output (what a shared past/present buffer needs: the op writes the new
    tokens at their positions in a buffer of the context length)."""
    slots = {"key": (3, 1), "value": (4, 2)}  # GroupQueryAttention: past_key/past_value in, present out
    for layer in layout.layers:
        for kind, entry in (("key", layer.key), ("value", layer.value)):
            past_slot, present_slot = slots[kind]
            past, present = graph.value(entry.past), graph.value(entry.present)
            consumers = graph.consumers(past)
            producer = graph.producer(present)
            if not consumers or producer is None or any(not _is_gqa(op) for op in (*consumers, producer)):
                return False
            if any(graph.inputs_of(op)[past_slot] is not past for op in consumers):
                return False
            if graph.outputs_of(producer)[present_slot] is not present or consumers != [producer]:
                return False
            if graph.consumers(present):  # it would read the whole buffer, unwritten tokens too
                return False
    return bool(layout.layers)


def _is_gqa(op) -> bool:
    return op.op_type == "GroupQueryAttention" and op.domain == "com.microsoft"


def genai_config(layout: decoder_io.DecoderLayout, options: GenaiOptions, tokens: tokenizers.SpecialTokens,
                 heads: int, provider: str, *, share_buffer: bool = False) -> dict:
    """genai_config.json as onnxruntime-genai's builder writes it for a decoder-only model;
    `share_buffer`: the graph appends to its cache in place (see `_cache_in_place`)."""
    inputs = {"input_ids": "input_ids",
              "past_key_names": decoder_io.PAST.format(layer="%d", kind="key"),
              "past_value_names": decoder_io.PAST.format(layer="%d", kind="value")}
    if layout.attention_mask:
        inputs["attention_mask"] = "attention_mask"
    if layout.position_ids:
        inputs["position_ids"] = "position_ids"
    outputs = {"logits": "logits",
               "present_key_names": decoder_io.PRESENT.format(layer="%d", kind="key"),
               "present_value_names": decoder_io.PRESENT.format(layer="%d", kind="value")}
    mapped = PROVIDERS.get(provider)
    provider_options = [{mapped[0]: dict(mapped[1])}] if mapped else []
    return {
        "model": {
            "bos_token_id": tokens.bos_token_id,
            "context_length": options.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": MODEL_FILE,
                "head_size": layout.head_size,
                "hidden_size": heads * layout.head_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": len(layout.layers),
                "num_key_value_heads": layout.kv_heads,
            },
            "eos_token_id": tokens.eos_token_id,
            "pad_token_id": tokens.pad_token_id,
            "type": options.model_type,
            "vocab_size": layout.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": options.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }


def _special_tokens(tokenizer, options: GenaiOptions) -> tokenizers.SpecialTokens:
    found = tokenizers.special_tokens(Path(tokenizer)) if tokenizer else tokenizers.SpecialTokens(None, None, None)
    bos = options.bos_token_id if options.bos_token_id is not None else found.bos_token_id
    eos = options.eos_token_id if options.eos_token_id is not None else found.eos_token_id
    pad = options.pad_token_id if options.pad_token_id is not None else found.pad_token_id
    if eos is None:
        raise PackageError("no end-of-sequence token id: the tokenizer names none" if tokenizer else
                           "no end-of-sequence token id without a tokenizer",
                           fix="give --eos-token-id (and --tokenizer for text)")
    return tokenizers.SpecialTokens(bos if bos is not None else eos, eos, pad if pad is not None else eos)


def _provider(model: onnx.ModelProto, asked: str | None) -> str:
    if asked is not None:
        name = PROVIDER_ALIASES.get(asked.lower(), asked)
        if name not in PROVIDERS:
            raise PackageError(f"onnxruntime-genai has no provider for '{asked}'",
                               fix=f"use one of {', '.join(PROVIDER_ALIASES)}")
        return name
    recorded = {p.key: p.value for p in model.metadata_props}.get(PROVIDER_KEY)
    return PROVIDER_ALIASES.get((recorded or "cpu").lower(), "CPUExecutionProvider")
