"""The float model in ONNX Runtime: values of any tensor, weights fed (memory-mapped when
external), only the nodes the requested tensors need."""

from __future__ import annotations

import mmap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from edgeq.calibration.collection import calibrate
from edgeq.calibration.float_model import FloatModel, float_activation_names, load_model, needed_nodes
from edgeq.errors import ExternalDataError
from tests.calibration.helpers import MLP_TENSORS, assert_same_stats, float_values, mlp_samples
from tests.calibration.models import mlp, tiny_lm


def test_activations_match_a_plain_onnx_runtime_session():
    """Weights fed as inputs take other MLAS kernels than constant (prepacked) ones: the values
    agree to float32 rounding, not bit for bit."""
    model, samples = mlp(), mlp_samples(12)
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.extend(onnx.ValueInfoProto(name=n) for n in ["h", "m"])
    session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
    plain = [dict(zip(["y", "h", "m"], session.run(["y", "h", "m"], s), strict=True)) for s in samples]
    ours = float_values(model, samples, ["h", "m", "y"])
    for name in ["h", "m", "y"]:
        expected = np.concatenate([run[name].ravel() for run in plain])
        np.testing.assert_allclose(ours[name], expected, rtol=1e-5, atol=1e-5)


def test_graph_input_and_identity_output_agree(gaussian_with_outliers):
    x, y = gaussian_with_outliers[0]["x"], gaussian_with_outliers[0]["y"]
    np.testing.assert_array_equal(x.histogram.counts, y.histogram.counts)


def test_float_activation_names():
    assert float_activation_names(mlp()) == MLP_TENSORS
    assert float_activation_names(tiny_lm()) == ["embedded", "mask_float", "mask_3d", "masked", "logits"]


def test_only_the_nodes_leading_to_the_outputs_run():
    graph = mlp().graph
    assert [n.output[0] for n in needed_nodes(graph, ["r"])] == ["h", "r"]
    assert len(needed_nodes(graph, ["y"])) == 4


# --- external data ----------------------------------------------------------------------------

def _with_external_w1(tmp_path, offset: int, location: str = "w1.bin"):
    """The mlp saved with w1 in a side file at byte `offset`, and its path."""
    model = mlp()
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    data = numpy_helper.to_array(w1).astype("<f4").tobytes()
    (tmp_path / "w1.bin").write_bytes(b"\0" * offset + data)
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": str(offset), "length": str(len(data))}.items():
        w1.external_data.add(key=key, value=value)
    onnx.save(model, tmp_path / "mlp.onnx")
    return tmp_path / "mlp.onnx"


def _is_mapped(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)


@pytest.mark.parametrize("offset", [0, 4096, 2])
def test_external_weights_are_mapped_and_aligned(tmp_path, offset):
    """Aligned external weights are fed as read-only views of a memory map; bytes at an offset
    that is no multiple of the item size are copied (ONNX Runtime wants aligned inputs). The
    statistics are those of the inline model."""
    path = _with_external_w1(tmp_path, offset)
    weights = FloatModel(*load_model(path), threads=1).weights
    assert _is_mapped(weights["w1"]) == (offset % 4 == 0)
    assert weights["w1"].flags.aligned and not weights["w1"].flags.writeable
    w1 = next(t for t in mlp().graph.initializer if t.name == "w1")
    np.testing.assert_array_equal(weights["w1"], numpy_helper.to_array(w1))
    samples = mlp_samples(4)
    assert_same_stats(calibrate(mlp(), samples, ["h", "y"]), calibrate(path, samples, ["h", "y"]))


def test_missing_external_data(tmp_path):
    onnx.save(mlp(), tmp_path / "mlp.onnx", save_as_external_data=True, location="mlp.data", size_threshold=0)
    (tmp_path / "mlp.data").unlink()
    with pytest.raises(ExternalDataError, match="w1"):
        calibrate(tmp_path / "mlp.onnx", mlp_samples(2), ["h"])


def test_external_data_outside_the_model_folder(tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    path = _with_external_w1(inner, 0, location="../w1.bin")
    (tmp_path / "w1.bin").write_bytes((inner / "w1.bin").read_bytes())
    with pytest.raises(ExternalDataError, match="outside the model"):
        calibrate(path, mlp_samples(2), ["h"])
