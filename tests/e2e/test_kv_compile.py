"""Decoders with a KV cache compile for x86 (issue 15): edgeq's own cache graph and torch.onnx
exports with a cache (TorchScript and dynamo), calibrated on prefill and decode steps. The cache
path stays right: decoding token by token through the compiled model's cache gives the logits
of the same compiled model run on the whole window, and the linears quantized are those of the
model without a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeq.calibration.sources import TokenWindows
from edgeq.compiler import compile
from edgeq.models import synthetic
from edgeq.options import CompileOptions

DATA = Path(__file__).parents[1] / "frontend" / "data"
SCHEMES = {"W8A8": CompileOptions(), "W4A16": CompileOptions(weights="int4", group=16, activations="float", rotate=False)}


def _past(session):
    return {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32) for i in session.get_inputs()
            if i.name.startswith("past")}


def _decode(session, window, prefill):
    names = [o.name for o in session.get_outputs()]
    past, chunks, start = _past(session), [], 0
    for end in [prefill, *range(prefill + 1, len(window) + 1)]:
        out = dict(zip(names, session.run(names, {"input_ids": window[None, start:end],
                                                  "attention_mask": np.ones((1, end), np.int64), **past})))
        chunks.append(out["logits"][0])
        past = {n.replace("present", "past_key_values", 1): v for n, v in out.items() if n.startswith("present")}
        start = end
    return np.concatenate(chunks)


def _full(session, window):
    return session.run(["logits"], {"input_ids": window[None], "attention_mask": np.ones((1, len(window)), np.int64),
                                    **_past(session)})[0][0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv")
    return {"edgeq": (synthetic.build_llama_file(folder / "llama_kv.onnx", kv_cache=True), synthetic.TINY_LLAMA.vocab_size),
            "torchscript": (DATA / "llama_kv_torchscript.onnx", 128), "dynamo": (DATA / "llama_kv_dynamo.onnx", 128)}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("graph", ["edgeq", "torchscript", "dynamo"])
def test_cache_graphs_compile_and_decode_through_the_cache(models, graph, scheme, tmp_path):
    path, vocab = models[graph]
    ids = np.random.default_rng(1).integers(0, vocab, 3000)
    compiled = compile(path, "x86-vnni", SCHEMES[scheme], calibration=TokenWindows(ids, 24, 6, decode_steps=3))
    report = compiled.report
    # The two held-out windows, each a prefill and 3 decode steps: verification ran the cache path.
    assert report.verification.samples == 2 * (1 + 3) and not report.verification.synthetic_inputs
    logits = next(o for o in report.verification.outputs if o.name == "logits")
    # int4 g16 without rotation on edgeq's random-weight tiny Llama, 4 calibration windows: the
    # full-sequence graph compiled the same way verifies at cosine 0.654 too (prefills included).
    assert logits.cosine_mean > (0.6 if graph == "edgeq" and scheme == "W4A16" else 0.9)
    linears = report.quantized_ops.get("MatMul", 0) + report.quantized_ops.get("Gemm", 0)
    # 7 linears a layer + the LM head, and under W8A8 the two attention MatMuls of each layer
    assert linears == (19 if scheme == "W8A8" else 15)
    shapes = next(r for r in report.passes if r.name == "canonicalize-shapes").stats
    assert "left_probe_failed" not in shapes
    out = compiled.save(tmp_path / "compiled.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    window = ids[2500:2520]
    np.testing.assert_allclose(_decode(session, window, 5), _full(session, window), atol=1e-3, rtol=1e-3)
