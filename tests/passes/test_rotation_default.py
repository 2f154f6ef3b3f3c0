"""The rotation a target picks by itself (issue 16): on x86, W8A8 rotates a model whose residual
stream the rotation folds into (pre-norm decoders: little run time, SmolLM2 +8.7% -> +1.9%
perplexity) and leaves other graphs (post-norm encoders, where online Hadamards before every
linear would cost the int8 speed-up) as they are, saying so and what --rotate would do; SmoothQuant
runs exactly when the rotation did not."""

from __future__ import annotations

import pytest

from edgeq.compiler import compile as compile_model
from edgeq.options import SMOOTH_SEARCH_GRID, CompileOptions
from edgeq.passes.hadamard_rotation import HadamardRotation
from edgeq.passes.smooth_quant import SmoothQuant
from edgeq.quant.plan import rotates
from edgeq.registry import get_target
from tests.frontend.test_fixture_compile import calibration_dir
from tests.frontend.test_fixture_shapes import fixture_inputs


def test_the_x86_choice_per_preset():
    x86, fpga = get_target("x86-vnni"), get_target("fpga")
    assert rotates(CompileOptions(), x86) == "if-stream"
    assert rotates(CompileOptions(weights="int4"), x86) == "yes"
    assert rotates(CompileOptions(rotate=False), x86) == "no" and rotates(CompileOptions(rotate=True), x86) == "yes"
    assert rotates(CompileOptions(), fpga) == "no"
    w8a8 = HadamardRotation.from_options(CompileOptions(), x86)
    assert w8a8.enabled and w8a8.only_with_stream
    assert not HadamardRotation.from_options(CompileOptions(rotate=True), x86).only_with_stream
    smooth = SmoothQuant.from_options(CompileOptions(), x86)
    assert smooth.alpha_grid == SMOOTH_SEARCH_GRID and not smooth.after_rotation   # decided when it runs
    assert SmoothQuant.from_options(CompileOptions(rotate=False), x86).after_rotation


def _compile(path, calibration, **options):
    return compile_model(path, "x86-vnni", CompileOptions(verify=False, threads=1, **options),
                         calibration=calibration)


def test_w8a8_rotates_a_pre_norm_decoder_and_skips_smoothquant(synthetic_llama, llama_samples):
    result = _compile(synthetic_llama, llama_samples)
    settings = result.report.settings
    assert settings["Hadamard rotation"].startswith("stream: residual stream folded")
    assert "(the target's default)" in settings["Hadamard rotation"]
    assert settings["SmoothQuant"].startswith("off after the rotation")
    stats = {p.name: p.stats for p in result.report.passes}
    assert stats["hadamard-rotation"]["stream"] == 1
    assert stats["smooth-quant"] == {"groups": 0, "after_rotation": 1}
    assert result.graph.ops_of_type("Einsum")  # the online Hadamards before down_proj / o_proj
    assert any(line.startswith("rotation: stream") for line in result.report.summary_lines())


def test_w8a8_leaves_an_encoder_unrotated_and_says_what_rotate_would_cost(synthetic_bert, bert_samples):
    result = _compile(synthetic_bert, bert_samples)
    assert not result.graph.ops_of_type("Einsum")
    stats = {p.name: p.stats for p in result.report.passes}
    assert stats["hadamard-rotation"] == {"rotated": 0, "no_stream": 1}
    assert stats["smooth-quant"]["groups"] > 0  # SmoothQuant's search ran instead
    (note,) = [n for n in result.report.notes if n.startswith("not rotated")]
    assert "post-norm" in note and "--rotate" in note and "MiniLM" in note
    assert result.report.settings["Hadamard rotation"].startswith("not applied")
    # asked for: the online rotation runs
    rotated = _compile(synthetic_bert, bert_samples, rotate=True)
    assert rotated.graph.ops_of_type("Einsum")


def test_no_online_rotations_folds_the_stream_and_adds_no_op(synthetic_llama, synthetic_bert, llama_samples,
                                                            bert_samples):
    """--no-online-rotations: a decoder's stream (and per-head V/O) rotation folds into the weights and
    no Einsum is added; an encoder, which only online Hadamards would rotate, is left as it is."""
    options = dict(weights="int4", activations="float", weight_rounding="rtn", rotate=True, online_rotations=False)
    folded = _compile(synthetic_llama, llama_samples, **options)
    stats = {p.name: p.stats for p in folded.report.passes}
    assert stats["hadamard-rotation"]["stream"] == 1 and not folded.graph.ops_of_type("Einsum")
    assert folded.report.settings["Hadamard rotation"].startswith("stream")
    online = _compile(synthetic_llama, llama_samples, **{**options, "online_rotations": True})
    assert online.graph.ops_of_type("Einsum")  # the default: online Hadamards before o_proj/down_proj
    encoder = _compile(synthetic_bert, bert_samples, **options)
    assert {p.name: p.stats for p in encoder.report.passes}["hadamard-rotation"] == {"rotated": 0, "no_stream": 1}
    assert not encoder.graph.ops_of_type("Einsum")


@pytest.mark.parametrize("name", ["llama_tiny_torchscript", "llama_tiny_dynamo"])
def test_no_online_rotations_on_exports(name, shared_dir, tmp_path):
    """Where the per-head V/O fold is refused (the TorchScript export's value path), no online
    Hadamard takes its place under --no-online-rotations."""
    path = shared_dir / "fixtures" / "exports" / f"{name}.onnx"
    calib = calibration_dir(tmp_path / "calib", fixture_inputs(shared_dir, name))
    result = compile_model(path, "x86-vnni", CompileOptions(threads=1, weights="int4", group=32, activations="float",
                                                             online_rotations=False), calibration=calib)
    assert result.report.settings["Hadamard rotation"].startswith("stream")
    assert not result.graph.ops_of_type("Einsum")
    assert result.report.verification.worst_relative_l2 < 0.3


@pytest.mark.parametrize("name", ["llama_tiny_torchscript", "llama_tiny_dynamo"])
def test_torch_exports_rotate_too(name, shared_dir, tmp_path):
    """torch.onnx reads the embedding's shape for the mask (a Shape reader of the stream) and
    merges equal initializers (one all-ones RMSNorm gain for every layer): neither stops the
    stream from folding, and the rotation lowers the held-out error."""
    path = shared_dir / "fixtures" / "exports" / f"{name}.onnx"
    calib = calibration_dir(tmp_path / "calib", fixture_inputs(shared_dir, name))
    options = CompileOptions(threads=1)
    rotated = compile_model(path, "x86-vnni", options, calibration=calib)
    plain = compile_model(path, "x86-vnni", CompileOptions(threads=1, rotate=False), calibration=calib)
    assert rotated.report.settings["Hadamard rotation"].startswith("stream")
    error = {r: c.report.verification.worst_relative_l2 for r, c in (("rotated", rotated), ("plain", plain))}
    assert error["rotated"] < 0.8 * error["plain"], error
