"""`edgeq package --genai`: a folder onnxruntime-genai loads and generates with. The generated
tokens must be the greedy tokens of the same model run on the whole sequence each step (the
cache path through the generation loop is right), for the float and compiled synthetic decoders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeq.calibration.sources import TokenWindows
from edgeq.cli import main
from edgeq.compiler import compile
from edgeq.ir import load, save
from edgeq.models import synthetic
from edgeq.options import CompileOptions
from edgeq.packaging.decoder import decoder_layout
from edgeq.packaging.folder import PackageError
from edgeq.packaging.genai import GenaiOptions, package_genai
from edgeq.packaging.tokenizer import special_tokens
from edgeq.pipeline import PassContext, PassManager
from edgeq.pipeline.artifacts import CALIBRATION_DATA
from edgeq.registry import get_pass, get_target

og = pytest.importorskip("onnxruntime_genai", reason="the genai extra is not installed: pip install -e '.[genai]'")

VOCAB = synthetic.TINY_LLAMA.vocab_size
PROMPT = np.random.default_rng(3).integers(1, VOCAB, 8)
NEW = 12


@pytest.fixture(scope="module")
def llama_kv(tmp_path_factory) -> Path:
    return synthetic.build_llama_file(tmp_path_factory.mktemp("genai") / "llama_kv.onnx", kv_cache=True)


@pytest.fixture(scope="module")
def compiled_w8a8(llama_kv, tmp_path_factory) -> Path:
    ids = np.random.default_rng(1).integers(0, VOCAB, 2000)
    compiled = compile(llama_kv, "x86-vnni", CompileOptions(), calibration=TokenWindows(ids, 24, 4, decode_steps=2))
    return compiled.save(tmp_path_factory.mktemp("genai") / "llama_kv.w8a8.onnx")


def _full_sequence_greedy(path: Path, prompt: np.ndarray, count: int) -> list[int]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
    past = {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], types[i.type]) for i in session.get_inputs()
            if i.name.startswith("past")}
    sequence, out = list(prompt), []
    for _ in range(count):
        feeds = {"input_ids": np.array([sequence]), "attention_mask": np.ones((1, len(sequence)), np.int64), **past}
        out.append(int(session.run(["logits"], feeds)[0][0, -1].argmax()))
        sequence.append(out[-1])
    return out


def _genai_greedy(folder: Path, prompt: np.ndarray, count: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + count, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("which", ["float", "compiled"])
def test_genai_generates_the_full_sequence_greedy_tokens(which, llama_kv, compiled_w8a8, tmp_path):
    model = llama_kv if which == "float" else compiled_w8a8
    package = package_genai(model, tmp_path / "pkg", GenaiOptions(eos_token_id=0, context_length=64))
    assert {f.name for f in package.files} == {"model.onnx", "genai_config.json"}
    generated = _genai_greedy(tmp_path / "pkg", PROMPT, NEW)
    assert generated == _full_sequence_greedy(model, PROMPT, NEW)
    assert len(set(generated)) > 1  # a stuck sequence would agree by accident


def test_config_says_what_the_graph_has(llama_kv, tmp_path):
    package_genai(llama_kv, tmp_path / "pkg", GenaiOptions(eos_token_id=3))
    config = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    cfg = synthetic.TINY_LLAMA
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["num_attention_heads"],
            decoder["head_size"]) == (cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert config["model"]["vocab_size"] == cfg.vocab_size
    # The export's attention stays as it is (its mask is not the canonical one until a compile
    # rewrites it): present = Concat(past, new), so no shared past/present buffer.
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["eos_token_id"] == 3


def test_other_names_are_renamed_to_the_loops(llama_kv, tmp_path):
    from edgeq.packaging.decoder import rename

    graph = load(llama_kv)
    rename(graph, {"past_key_values.0.key": "past.0.k", "past_key_values.0.value": "past.0.v",
                   "past_key_values.1.key": "past.1.k", "past_key_values.1.value": "past.1.v",
                   "present.0.key": "present_0_k", "present.0.value": "present_0_v",
                   "present.1.key": "present_1_k", "present.1.value": "present_1_v"})
    odd = save(graph, tmp_path / "odd.onnx")
    assert {i.name for i in onnx.load(odd).graph.input} >= {"past.1.v"}
    package_genai(odd, tmp_path / "pkg", GenaiOptions(eos_token_id=0))
    packaged = onnx.load(tmp_path / "pkg" / "model.onnx")
    assert {i.name for i in packaged.graph.input} >= {"past_key_values.1.value", "input_ids", "attention_mask"}
    assert _genai_greedy(tmp_path / "pkg", PROMPT, 6) == _full_sequence_greedy(llama_kv, PROMPT, 6)


def test_tokenizer_files_load_in_genai(llama_kv, shared_dir, tmp_path):
    tokenizer = shared_dir / "reference" / "smollm2_tokenizer.json"
    package = package_genai(llama_kv, tmp_path / "pkg", GenaiOptions(), tokenizer=tokenizer)
    assert {f.role for f in package.files} == {"model", "config", "tokenizer"}
    tokens = special_tokens(tokenizer)
    assert (tokens.bos_token_id, tokens.eos_token_id) == (1, 2)  # <|im_start|>, <|im_end|>
    config = json.loads((tmp_path / "pkg" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer"
    text = "The Roman Empire, in 27 BC."
    tok = og.Tokenizer(og.Model(str(tmp_path / "pkg")))
    from tokenizers import Tokenizer

    assert list(tok.encode(text)) == Tokenizer.from_file(str(tokenizer)).encode(text).ids
    assert tok.decode(tok.encode(text)) == text


def test_int8_cache_with_channel_scales_generates(llama_kv, tmp_path):
    """A cache quantized with static scales only (int8 codes in, int8 codes out) runs in the loop."""
    ids = np.random.default_rng(1).integers(0, VOCAB, 2000)
    from edgeq.calibration.sources import open_source

    ctx = PassContext(target=get_target("x86-vnni"))
    ctx.artifacts[CALIBRATION_DATA] = open_source(TokenWindows(ids, 16, 2, decode_steps=2), str(llama_kv))
    graph = PassManager([get_pass("quantize-kv-cache")(bits=8, values="channel")])(load(llama_kv), ctx).graph
    save(graph, tmp_path / "q.onnx")
    package_genai(tmp_path / "q.onnx", tmp_path / "pkg", GenaiOptions(eos_token_id=0))
    assert _genai_greedy(tmp_path / "pkg", PROMPT, NEW) == _full_sequence_greedy(tmp_path / "q.onnx", PROMPT, NEW)


def test_refusals(llama_kv, synthetic_llama, tmp_path):
    with pytest.raises(PackageError, match="no KV cache"):
        package_genai(synthetic_llama, tmp_path / "a", GenaiOptions(eos_token_id=1))
    with pytest.raises(PackageError, match="end-of-sequence"):
        package_genai(llama_kv, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "other.txt").write_text("x")
    with pytest.raises(PackageError, match="not empty"):
        package_genai(llama_kv, tmp_path / "c", GenaiOptions(eos_token_id=1))
    assert (tmp_path / "c" / "other.txt").exists() and not (tmp_path / "b").exists()


def test_per_token_scales_are_refused_with_the_fix(llama_kv):
    model = onnx.load(llama_kv)
    from onnx import TensorProto, helper

    model.graph.input.append(helper.make_tensor_value_info("past_key_values.0.value_scale", TensorProto.FLOAT16,
                                                           ["batch", 2, "past_sequence", 1]))
    model.graph.output.append(helper.make_tensor_value_info("present.0.value_scale", TensorProto.FLOAT16,
                                                            ["batch", 2, "total", 1]))
    with pytest.raises(PackageError, match="per-channel value scales"):
        decoder_layout(model)


def test_cli(llama_kv, tmp_path, capsys):
    assert main(["package", str(llama_kv), "-o", str(tmp_path / "pkg")]) == 2
    assert "--genai" in capsys.readouterr().err
    assert main(["package", str(llama_kv), "-o", str(tmp_path / "pkg"), "--genai", "--eos-token-id", "5",
                 "--context-length", "128", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["mode"] == "genai" and {f["name"] for f in listed["files"]} == {"model.onnx", "genai_config.json"}
    config = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())
    assert config["model"]["context_length"] == 128 and config["model"]["eos_token_id"] == 5
    assert main(["package", str(llama_kv), "-o", str(tmp_path / "pkg"), "--genai", "--eos-token-id", "5"]) == 2
    assert main(["package", str(llama_kv), "-o", str(tmp_path / "pkg"), "--genai", "--eos-token-id", "5",
                 "--overwrite"]) == 0


def test_token_ids_outside_the_vocabulary_are_refused(llama_kv, tmp_path):
    with pytest.raises(PackageError, match="outside the vocabulary"):
        package_genai(llama_kv, tmp_path / "pkg", GenaiOptions(eos_token_id=VOCAB))


@pytest.fixture(scope="module")
def compiled_w4a16_rotated(llama_kv, tmp_path_factory) -> Path:
    """Weight-only int4 with the Hadamard rotation: float attention in canonical form, online
    Hadamards as Einsum: everything the ONNX Runtime layout fuses."""
    ids = np.random.default_rng(1).integers(0, VOCAB, 2000)
    options = CompileOptions(weights="int4", group=16, activations="float", rotate=True)
    compiled = compile(llama_kv, "x86-vnni", options, calibration=TokenWindows(ids, 24, 4, decode_steps=2))
    return compiled.save(tmp_path_factory.mktemp("genai") / "llama_kv.w4a16.onnx")


def test_fused_layout_generates_what_the_compiled_model_computes(compiled_w4a16_rotated, tmp_path):
    package = package_genai(compiled_w4a16_rotated, tmp_path / "pkg", GenaiOptions(eos_token_id=0, context_length=64))
    fused = " ".join(package.notes)
    assert "2 attention -> GroupQueryAttention" in fused and "5 RMSNorm -> SimplifiedLayerNormalization" in fused
    assert "Einsum -> MatMul" in fused and "rotation chain -> one MatMul" in fused
    model = onnx.load(tmp_path / "pkg" / "model.onnx")
    kinds = {n.op_type for n in model.graph.node}
    assert {"GroupQueryAttention", "SimplifiedLayerNormalization"} <= kinds and not kinds & {"Softmax", "Einsum"}
    # onnxruntime-genai's builder layout: q, k, v in one packed projection, residual Adds in the norms.
    assert "2 q, k, v projections -> one packed MatMul" in fused and "2 value rotations moved past" in fused
    assert "4 residual Add + RMSNorm -> SkipSimplifiedLayerNormalization" in fused
    # gate and up (one input, one weight format) as one MatMul and a Split: one MatMulNBits a layer
    assert "2 MatMuls of one input (gate, up) -> one packed MatMul + Split" in fused
    producers = {o: n for n in model.graph.node for o in n.output}
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(splits) == 2 and all(producers[n.input[0]].op_type == "MatMul" for n in splits)
    assert all(producers[producers[n.input[0]].input[1]].op_type == "DequantizeLinear" for n in splits)
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(list(n.input[1:3]) == ["", ""] for n in attention)
    assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in model.graph.node) == 4
    assert sum(n.op_type == "Add" for n in model.graph.node) == 0
    # Every cache tensor is GroupQueryAttention's alone: the loop shares one buffer per tensor (the
    # generation below runs so).
    config = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert "shares one past/present buffer" in fused + " ".join(package.notes)
    # The loop reproduces the packaged graph run on the whole sequence (its cache path), and that
    # graph computes what the compiled one does (float rounding apart).
    generated = _genai_greedy(tmp_path / "pkg", PROMPT, NEW)
    assert generated == _full_sequence_greedy(tmp_path / "pkg" / "model.onnx", PROMPT, NEW)
    window = np.concatenate([PROMPT, generated])[None, :]
    logits = []
    # MatMulNBits' default int8 activations (accuracy level 4) round differently where float
    # rounding moves an input across a step; level 0 compares the graphs' own arithmetic.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    for path in (compiled_w4a16_rotated, tmp_path / "pkg" / "model.onnx"):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        past = {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32) for i in session.get_inputs()
                if i.name.startswith("past")}
        logits.append(session.run(["logits"], {"input_ids": window, "attention_mask": np.ones_like(window),
                                               **past})[0])
    error = np.linalg.norm(logits[0] - logits[1]) / np.linalg.norm(logits[0])
    assert error < 1e-3, error


def test_folded_rotation_packages_without_any_online_rotation(llama_kv, tmp_path):
    """--no-online-rotations with zero points (the decode-speed layout): the residual stream and the
    per-head V/O fold are in the weights; the fold's rotation and its inverse around the cache
    cancel in the package, so every MatMul left is a quantized linear."""
    ids = np.random.default_rng(1).integers(0, VOCAB, 2000)
    options = CompileOptions(weights="int4", group=16, activations="float", rotate=True, online_rotations=False,
                             weight_zero_points=True, head_weights="int4")
    compiled = compile(llama_kv, "x86-vnni", options, calibration=TokenWindows(ids, 24, 4, decode_steps=2))
    path = compiled.save(tmp_path / "folded.onnx")
    assert "zero points" in compiled.report.scheme
    package = package_genai(path, tmp_path / "pkg", GenaiOptions(eos_token_id=0, context_length=64))
    notes = " ".join(package.notes)
    assert "2 attention -> GroupQueryAttention" in notes and "2 a rotation and its inverse -> nothing" in notes
    model = onnx.load(tmp_path / "pkg" / "model.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in matmuls)
    assert not any(n.op_type in ("Einsum", "Reshape", "Transpose") for n in model.graph.node)
    assert json.loads((tmp_path / "pkg" / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    generated = _genai_greedy(tmp_path / "pkg", PROMPT, NEW)
    assert generated == _full_sequence_greedy(path, PROMPT, NEW)


def test_unfused_layout_keeps_the_canonical_forms(compiled_w4a16_rotated, tmp_path):
    package = package_genai(compiled_w4a16_rotated, tmp_path / "pkg", GenaiOptions(eos_token_id=0, fuse=False))
    assert not any("fused" in note for note in package.notes)
    kinds = {n.op_type for n in onnx.load(tmp_path / "pkg" / "model.onnx").graph.node}
    assert "Softmax" in kinds and "GroupQueryAttention" not in kinds
    # present = Concat(past, new): the cache grows, no shared past/present buffer
    config = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert _genai_greedy(tmp_path / "pkg", PROMPT, NEW) == _full_sequence_greedy(compiled_w4a16_rotated, PROMPT, NEW)
