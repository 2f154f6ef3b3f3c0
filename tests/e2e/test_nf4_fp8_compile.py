"""`edgeq compile --weights nf4` and `--weights fp8 --activations fp8` on the shared TorchScript
Llama export: ONNX Runtime loads and verifies the result, and a second compile writes the same
bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgeq.cli import cli

FIXTURE = "fixtures/exports/llama_tiny_torchscript.onnx"


@pytest.fixture(scope="module")
def llama_export(shared_dir) -> Path:
    path = shared_dir / FIXTURE
    if not path.exists():
        pytest.skip(f"{path} is not there")
    return path


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama_export_calib")
    rng = np.random.default_rng(0)
    for i in range(4):
        np.savez(directory / f"sample{i}.npz", input_ids=rng.integers(0, 1000, (1, 48)).astype(np.int64),
                 attention_mask=np.ones((1, 48), np.int64))
    return directory


def _compile(model: Path, calib: Path, out: Path, *flags: str) -> str:
    result = CliRunner().invoke(cli, ["compile", str(model), "-t", "x86-vnni", *flags, "--calib", str(calib),
                                      "-o", str(out), "--report", str(out.with_suffix(".md"))])
    assert result.exit_code == 0, result.output
    return out.with_suffix(".md").read_text()


def test_nf4_g64_compiles_verifies_and_is_deterministic(llama_export, calib_dir, tmp_path):
    flags = ("--weights", "nf4", "--group", "64", "--activations", "float")
    report = _compile(llama_export, calib_dir, tmp_path / "a.onnx", *flags)
    assert "W4 weight-only g64 NF4" in report and "held-out sample" in report
    _compile(llama_export, calib_dir, tmp_path / "b.onnx", *flags)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    model = onnx.load(tmp_path / "a.onnx")
    onnx.checker.check_model(model)
    bnb = [n for n in model.graph.node if n.op_type == "MatMulBnb4"]
    # 14 decoder linears (q, k, v, o, gate, up, down x 2 layers); the LM head keeps int8 weights
    assert len(bnb) == 14
    for node in bnb:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["block_size"] == 64 and attrs["quant_type"] == 1
    assert {o.domain: o.version for o in model.opset_import}.get("com.microsoft") == 1
    # `edgeq estimate` counts the NF4 linears (shape inference does not know MatMulBnb4): K x N per token
    from edgeq.cost import count_work

    work = count_work(model)
    tokens = int(np.prod(work.input_shapes["input_ids"]))
    expected = tokens * sum(next(a.i for a in n.attribute if a.name == "K") * next(a.i for a in n.attribute if a.name == "N")
                            for n in bnb)
    assert work.counts["op_mac_float32_nf4"] == expected
    assert work.counts["weight_bytes_nf4"] == expected // tokens // 2  # two 4-bit codes a byte
    result = CliRunner().invoke(cli, ["estimate", str(tmp_path / "a.onnx"), "-t", "x86-vnni"])
    assert result.exit_code == 0 and "op_mac_float32_nf4" in result.output, result.output


def test_fp8_w8a8_compiles_and_verifies(llama_export, calib_dir, tmp_path):
    report = _compile(llama_export, calib_dir, tmp_path / "fp8.onnx", "--weights", "fp8", "--activations", "fp8")
    assert "W8A8 FP8 E4M3FN" in report and "held-out sample" in report
    model = onnx.load(tmp_path / "fp8.onnx")
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for node in qs:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("output_dtype") == TensorProto.FLOAT8E4M3FN
    float8 = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN]
    assert len(float8) >= 2 * 15   # codes and zero point of every linear's weight
