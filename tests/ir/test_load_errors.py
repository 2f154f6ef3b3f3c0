"""Every way a model file can be wrong raises the right `edgeq.errors` subclass with a one-line
message that names the problem (and the file)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import edgeq
from edgeq.errors import (
    EdgeqError,
    ExternalDataError,
    GraphError,
    ModelLoadError,
    OptionError,
    UnsupportedOpsetError,
)
from tests.ir import synthetic
from tests.ir.helpers import write_model


def _raises(exc_type: type[EdgeqError], source, *words: str) -> EdgeqError:
    """edgeq.load(source) raises exactly `exc_type`, one line, containing every word."""
    with pytest.raises(EdgeqError) as info:
        edgeq.load(source)
    err = info.value
    assert type(err) is exc_type, f"{type(err).__name__}: {err}"
    message = str(err)
    assert "\n" not in message and len(message) < 400, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return err


def _model(nodes, inputs=("x",), outputs=("y",), inits=(), opset=17, name="g") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(n, T.FLOAT, [2]) for n in inputs],
        [helper.make_tensor_value_info(n, T.FLOAT, [2]) for n in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


# ---- the file itself -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    _raises(ModelLoadError, tmp_path / "nope.onnx", "not found", "nope.onnx")


def test_directory_and_empty_file(tmp_path: Path):
    _raises(ModelLoadError, tmp_path, "directory")
    (tmp_path / "empty.onnx").write_bytes(b"")
    _raises(ModelLoadError, tmp_path / "empty.onnx", "empty")


def test_text_file(tmp_path: Path):
    path = tmp_path / "readme.onnx"
    path.write_text("This is not a model, just a README that someone renamed.\n" * 20)
    _raises(ModelLoadError, path, "not an ONNX model", "readme.onnx")


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes(tmp_path: Path, seed: int):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises(ModelLoadError, path, "not an ONNX model")


def _png(width: int = 8, height: int = 8) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + bytes(range(width * 3)) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_png_file(tmp_path: Path):
    path = tmp_path / "picture.onnx"
    path.write_bytes(_png())
    _raises(ModelLoadError, path, "not an ONNX model")


def _cut_points(data: bytes) -> list[int]:
    """Inside the header, at 10%..90%, right after the graph field and one byte short."""
    model = onnx.ModelProto()
    model.ParseFromString(data)
    graph_end = data.index(model.opset_import[0].SerializeToString()) - 2  # tag + length of opset_import[0]
    return sorted({3, *(len(data) * k // 10 for k in range(1, 10)), graph_end, len(data) - 1})


def _check_truncations(path: Path, tmp_path: Path) -> None:
    data = path.read_bytes()
    for cut in _cut_points(data):
        cut_path = tmp_path / f"cut{cut}.onnx"
        cut_path.write_bytes(data[:cut])
        _raises(ModelLoadError, cut_path, "truncated", f"cut{cut}.onnx")
        cut_path.unlink()


def test_truncated_synthetic_model(tmp_path: Path):
    model, _ = synthetic.opset_model(17)
    _check_truncations(write_model(model, tmp_path / "m.onnx"), tmp_path)


@pytest.mark.slow
def test_truncated_real_model(tmp_path: Path, rapidocr_models, silero_models):
    _check_truncations(rapidocr_models["ch_ppocr_mobile_v2.0_cls_infer.onnx"], tmp_path)
    _check_truncations(silero_models["silero_vad.onnx"], tmp_path)  # weights in If branches


def test_truncated_edgeq_saved_model(tmp_path: Path):
    """edgeq writes the header before the graph: cuts fall in the graph or drop it whole."""
    model, _ = synthetic.opset_model(17)
    data = edgeq.save(edgeq.load(model), tmp_path / "m.onnx").read_bytes()
    for cut in (len(data) // 4, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.onnx").write_bytes(data[:cut])
        _raises(ModelLoadError, tmp_path / "cut.onnx", "truncated")


def test_initializer_bytes_do_not_match_its_shape(tmp_path: Path):
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[numpy_helper.from_array(np.ones(2, np.float32), "w")])
    model.graph.initializer[0].raw_data = b"\0" * 7
    _raises(ModelLoadError, write_model(model, tmp_path / "m.onnx"), "'w'", "7 bytes", "needs 8")


def test_initializer_with_an_invalid_data_type(tmp_path: Path):
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[numpy_helper.from_array(np.ones(2, np.float32), "w")])
    model.graph.initializer[0].data_type = 999
    _raises(ModelLoadError, write_model(model, tmp_path / "m.onnx"), "'w'", "invalid data type")


# ---- external data -------------------------------------------------------------------------


def _external_model(tmp_path: Path) -> Path:
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])],
                   inits=[numpy_helper.from_array(np.arange(512, dtype=np.float32).reshape(256, 2)[:1].ravel(), "w")])
    big = numpy_helper.from_array(np.arange(4096, dtype=np.float32), "big")
    model.graph.initializer.append(big)
    model.graph.node.append(helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("s", T.FLOAT, []))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=1024)
    return path


def test_external_data_file_missing(tmp_path: Path):
    path = _external_model(tmp_path)
    edgeq.load(path)  # sound as written
    (tmp_path / "ext.onnx.data").unlink()
    _raises(ExternalDataError, path, "external data file missing", "ext.onnx.data", "'big'")


def test_external_data_too_short(tmp_path: Path):
    path = _external_model(tmp_path)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    _raises(ExternalDataError, path, "too short", "'big'")


def test_external_data_location_outside_the_folder(tmp_path: Path):
    path = _external_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[-1].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere.data"
    onnx.save_model(model, str(path))
    _raises(ExternalDataError, path, "outside the model's folder")


def test_external_data_length_does_not_match_shape(tmp_path: Path):
    path = _external_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[-1].external_data:
        if entry.key == "length":
            entry.value = "100"
    onnx.save_model(model, str(path))
    _raises(ExternalDataError, path, "'big'", "length 100")


def test_external_data_in_an_in_memory_model(tmp_path: Path):
    model = onnx.load(str(_external_model(tmp_path)), load_external_data=False)
    _raises(ExternalDataError, model, "in memory")


# ---- opset --------------------------------------------------------------------------------


def test_opset_newer_than_onnxruntime(tmp_path: Path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], opset=40)
    err = _raises(UnsupportedOpsetError, write_model(model, tmp_path / "m.onnx"), "opset 40", "onnxruntime")
    assert err.fix and "upgrade onnxruntime" in err.fix
    edgeq.load(tmp_path / "m.onnx", check_runtime=False)  # the IR itself has no opset limit


def test_missing_opset_import(tmp_path: Path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])])
    del model.opset_import[:]
    _raises(ModelLoadError, model, "no opset_import")


# ---- graph structure -----------------------------------------------------------------------


def test_cycle(tmp_path: Path):
    model = _model([helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
                    helper.make_node("Relu", ["a"], ["b"], name="n2"),
                    helper.make_node("Identity", ["a"], ["y"], name="n3")])
    _raises(GraphError, write_model(model, tmp_path / "m.onnx"), "cycle", "n1", "n2")


def test_cycle_through_a_subgraph_capture():
    """An If whose branch reads the If's own output is a cycle only the captures reveal."""
    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["o"])], "branch", [],
                               [helper.make_tensor_value_info("o", T.FLOAT, [2])])
    model = _model([helper.make_node("Cast", ["x"], ["c"], to=T.BOOL),
                    helper.make_node("If", ["c"], ["y"], name="the_if", then_branch=branch, else_branch=branch)])
    _raises(GraphError, model, "cycle", "the_if")


def test_cycle_inside_a_subgraph():
    body = helper.make_graph([helper.make_node("Neg", ["q"], ["p"], name="inner1"),
                              helper.make_node("Neg", ["p"], ["q"], name="inner2")], "branch", [],
                             [helper.make_tensor_value_info("p", T.FLOAT, [2])])
    model = _model([helper.make_node("Cast", ["x"], ["c"], to=T.BOOL),
                    helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)])
    _raises(GraphError, model, "cycle", "inner1")


def test_dangling_input(tmp_path: Path):
    model = _model([helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")])
    _raises(GraphError, write_model(model, tmp_path / "m.onnx"), "dangling", "'ghost'", "adder")


def test_dangling_input_inside_a_subgraph():
    branch = helper.make_graph([helper.make_node("Identity", ["ghost"], ["o"], name="reader")], "branch", [],
                               [helper.make_tensor_value_info("o", T.FLOAT, [2])])
    model = _model([helper.make_node("Cast", ["x"], ["c"], to=T.BOOL),
                    helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)])
    _raises(GraphError, model, "dangling", "'ghost'", "reader")


def test_two_producers(tmp_path: Path):
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="first"),
                    helper.make_node("Neg", ["x"], ["y"], name="second")])
    _raises(GraphError, write_model(model, tmp_path / "m.onnx"), "two producers", "'y'", "first", "second")


def test_node_output_overwrites_an_initializer_or_an_input():
    init = numpy_helper.from_array(np.ones(2, np.float32), "w")
    _raises(GraphError, _model([helper.make_node("Relu", ["x"], ["w"], name="clobber"),
                                helper.make_node("Add", ["x", "w"], ["y"])], inits=[init]),
            "two producers", "'w'", "initializer", "clobber")
    _raises(GraphError, _model([helper.make_node("Relu", ["y"], ["x"], name="clobber"),
                                helper.make_node("Relu", ["x"], ["y"])]), "two producers", "graph input")


def test_graph_output_that_nothing_produces():
    _raises(GraphError, _model([helper.make_node("Relu", ["x"], ["y"])], outputs=("y", "nothing")),
            "graph output", "'nothing'")


def test_duplicate_initializer_and_duplicate_input():
    init = numpy_helper.from_array(np.ones(2, np.float32), "w")
    _raises(GraphError, _model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[init, init]),
            "'w'", "defined twice")
    _raises(GraphError, _model([helper.make_node("Relu", ["x"], ["y"])], inputs=("x", "x")), "'x'", "listed twice")


def test_saving_over_2gb_inline_is_refused(tmp_path: Path, monkeypatch):
    """external_data=False with a model over protobuf's limit: a clear error, no broken file."""
    from edgeq.ir import writer

    monkeypatch.setattr(writer, "_TWO_GB", 1000)
    model, _ = synthetic.opset_model(17)
    with pytest.raises(OptionError, match="2 GB"):
        edgeq.save(edgeq.load(model), tmp_path / "m.onnx", external_data=False)
    assert not list(tmp_path.iterdir())
