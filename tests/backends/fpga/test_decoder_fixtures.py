"""The two real Llama exports (../shared/fixtures/exports: TorchScript and dynamo `torch.onnx`, 2
layers, width 192, 6 heads / 2 KV heads, tied embeddings) compiled for the fpga target through
the whole pipeline (the front end's canonicalize passes, then lower-to-integer): integer-only
between the first QuantizeLinear and the logits' DequantizeLinear, ONNX Runtime bit-identical to
the numpy reference (also for a padded batch), logits close to PyTorch's, and an estimate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.backends.fpga.integer.program import check_against_onnxruntime
from edgeq.backends.fpga.metadata import HOST_OPS_KEY
from edgeq.ir import to_model_proto
from edgeq.registry import get_target
from edgeq.targets.base import validate

from tests.backends.fpga.test_lower_decoder import FLOAT_COMPUTE, HOST_KINDS, region
from tests.passes.helpers import session

LLAMAS = ("llama_tiny_torchscript", "llama_tiny_dynamo")
FPGA = get_target("fpga")
# Measured on the fixtures' 1 x 48 inputs, calibrated on 8 rolls of them: logits cosine vs
# PyTorch mean 0.9985 (TorchScript) / 0.9986 (dynamo), min 0.9955 / 0.9962.
COSINE_MEAN_FLOOR = 0.995
COSINE_MIN_FLOOR = 0.98


def _calibration(io: dict[str, np.ndarray], count: int = 8) -> list[dict[str, np.ndarray]]:
    """`count` samples from the fixture's input: its token ids rolled along the sequence."""
    return [{"input_ids": np.roll(io["input_ids"], 5 * k, axis=1), "attention_mask": io["attention_mask"]}
            for k in range(count)]


@pytest.fixture(scope="module", params=LLAMAS)
def compiled_llama(request, shared_dir, tmp_path_factory):
    exports = shared_dir / "fixtures" / "exports"
    io = dict(np.load(exports / "llama_tiny_io.npz"))
    result = edgeq.compile(exports / f"{request.param}.onnx", "fpga", calibration=_calibration(io))
    out = result.save(tmp_path_factory.mktemp(request.param) / "fpga.onnx")
    return request.param, io, result, out


def test_the_export_lowers_to_an_integer_datapath(compiled_llama) -> None:
    _, _, result, _ = compiled_llama
    graph = result.graph
    assert validate(graph, FPGA) == []
    kinds = [op.op_type for op in graph.topo_order()]
    assert kinds.count("DequantizeLinear") == 1 and "MatMul" not in kinds and kinds.count("MatMulInteger") == 21
    assert not {op.op_type for op in region(graph)} & FLOAT_COMPUTE
    host = json.loads(dict(graph.model.metadata_props)[HOST_OPS_KEY])
    assert {entry["op_type"] for entry in host} <= HOST_KINDS | {"Slice", "Squeeze"}
    assert {"Cos", "Sin"} <= {entry["op_type"] for entry in host}


def test_logits_match_pytorch(compiled_llama) -> None:
    name, io, result, out = compiled_llama
    logits = session(out).run(["logits"], {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]})[0]
    a, b = io["logits"].reshape(-1, io["logits"].shape[-1]), logits.reshape(-1, io["logits"].shape[-1])
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    verify = min(o.cosine_min for o in result.report.verification.outputs)
    print(f"{name} fpga: logits cosine vs PyTorch mean {cosine.mean():.5f} min {cosine.min():.5f}; "
          f"compile's verify min {verify:.5f}")
    assert cosine.mean() >= COSINE_MEAN_FLOOR and cosine.min() >= COSINE_MIN_FLOOR


def test_onnxruntime_is_bit_identical_also_for_a_padded_batch(compiled_llama) -> None:
    _, io, result, _ = compiled_llama
    model = to_model_proto(result.graph)
    feeds = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    assert check_against_onnxruntime(model, feeds).bit_exact
    batch = {k: np.concatenate([v, v[:, ::-1]]) for k, v in feeds.items()}
    batch["attention_mask"][1, :7] = 0   # left padding in the second row
    check = check_against_onnxruntime(model, batch)
    assert check.bit_exact, check.mismatched


def test_the_estimate_works_with_no_flag(compiled_llama) -> None:
    _, _, _, out = compiled_llama
    report = FPGA.cost_model.estimate(onnx.load(out), device="zcu102")   # shapes recorded by the compile
    assert report.latency_cycles > 0 and report.totals.dsp > 0
    assert any("input shapes input_ids=[1, 48]" in a for a in report.assumptions)
