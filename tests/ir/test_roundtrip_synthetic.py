"""Exact round-trip of small synthetic models: opsets 11/13/17/21, every proto feature, control
flow with outer-scope captures, every storage form of a weight, external data."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgeq
from edgeq.ir import clone_graph, to_model_proto
from tests.ir import synthetic
from tests.ir.helpers import assert_bit_identical, run, write_model
from tests.ir.protodiff import first_difference

RUNNABLE = {
    "opset11": lambda: synthetic.opset_model(11),
    "opset13": lambda: synthetic.opset_model(13),
    "opset17": lambda: synthetic.opset_model(17),
    "opset21": lambda: synthetic.opset_model(21),
    "features": synthetic.feature_model,
    "control_flow": synthetic.control_flow_model,
    "storage": synthetic.storage_model,
    "sparse": synthetic.sparse_model,
}


@pytest.fixture(params=sorted(RUNNABLE))
def built(request, tmp_path: Path) -> tuple[onnx.ModelProto, dict, Path]:
    model, feeds = RUNNABLE[request.param]()
    return model, feeds, write_model(model, tmp_path / f"{request.param}.onnx")


def test_ort_outputs_bit_identical(built, tmp_path: Path):
    _, feeds, src = built
    saved = edgeq.save(edgeq.load(src), tmp_path / "saved.onnx")
    assert_bit_identical(run(src, feeds), run(saved, feeds), src.name)


def test_ort_outputs_bit_identical_from_in_memory_proto(built, tmp_path: Path):
    model, feeds, src = built
    saved = edgeq.save(edgeq.load(model), tmp_path / "saved.onnx")
    assert_bit_identical(run(src, feeds), run(saved, feeds), src.name)


def test_proto_identical(built, tmp_path: Path):
    model, _, src = built
    assert first_difference(model, to_model_proto(edgeq.load(src))) is None
    assert first_difference(model, to_model_proto(edgeq.load(model))) is None
    saved = edgeq.save(edgeq.load(src), tmp_path / "saved.onnx")
    assert first_difference(model, onnx.load(str(saved))) is None


def test_save_is_deterministic_and_a_fixed_point(built, tmp_path: Path):
    _, _, src = built
    graph = edgeq.load(src)
    first = edgeq.save(graph, tmp_path / "a.onnx").read_bytes()
    assert edgeq.save(graph, tmp_path / "b.onnx").read_bytes() == first
    assert edgeq.save(edgeq.load(tmp_path / "a.onnx"), tmp_path / "c.onnx").read_bytes() == first


def test_external_data_roundtrip(built, tmp_path: Path):
    """Saved with external data (tensors of 64 bytes or more; ORT's shape inference needs
    the small shape tensors inline): same outputs, same model once the data is read back, and
    back to a single file identical to the first save."""
    model, feeds, src = built
    ext = edgeq.save(edgeq.load(src), tmp_path / "ext" / "m.onnx", external_data=True, external_threshold=64)
    assert (tmp_path / "ext" / "m.onnx.data").is_file()
    assert_bit_identical(run(src, feeds), run(ext, feeds), src.name)
    reloaded = edgeq.load(ext)
    assert first_difference(model, to_model_proto(reloaded)) is None
    inline = edgeq.save(reloaded, tmp_path / "inline.onnx").read_bytes()
    assert inline == edgeq.save(edgeq.load(src), tmp_path / "direct.onnx").read_bytes()


def test_opset_models_pass_the_full_onnx_checker_after_roundtrip(tmp_path: Path):
    for opset in (11, 13, 17, 21):
        model, _ = synthetic.opset_model(opset)
        saved = edgeq.save(edgeq.load(model), tmp_path / f"o{opset}.onnx")
        onnx.checker.check_model(str(saved), full_check=True)
        assert {o.domain: o.version for o in onnx.load(str(saved)).opset_import} == {"": opset}


# ---- models ORT cannot run or that the IR normalizes --------------------------------------


def test_custom_domain_op_proto_identical(tmp_path: Path):
    model = synthetic.custom_domain_model()
    src = write_model(model, tmp_path / "custom.onnx")
    graph = edgeq.load(src)
    (fancy,) = [op for op in graph.ops() if op.domain == "com.example"]
    assert fancy.kind == "com.example::FancyOp" and set(fancy.subgraphs) == {"body"}
    assert [v.name if v else None for v in graph.inputs_of(fancy)] == ["x", None, "w"]
    assert first_difference(model, to_model_proto(graph)) is None
    saved = edgeq.save(graph, tmp_path / "saved.onnx")
    assert first_difference(model, onnx.load(str(saved))) is None
    assert edgeq.save(edgeq.load(saved), tmp_path / "again.onnx").read_bytes() == saved.read_bytes()


def test_unsorted_nodes_are_saved_in_topological_order(tmp_path: Path):
    model, feeds = synthetic.unsorted_model()
    src = write_model(model, tmp_path / "unsorted.onnx")
    saved = edgeq.save(edgeq.load(src), tmp_path / "saved.onnx")
    onnx.checker.check_model(str(saved))  # requires topological order
    names = [n.name for n in onnx.load(str(saved)).graph.node]
    assert names.index("first") < names.index("middle") < names.index("last")
    assert sorted(names) == sorted(n.name for n in model.graph.node)
    assert_bit_identical(run(src, feeds), run(saved, feeds), "unsorted")


def test_outer_scope_captures_are_edges(tmp_path: Path):
    model, _ = synthetic.control_flow_model()
    graph = edgeq.load(model)
    loop, scan = graph.ops_of_type("Loop")[0], graph.ops_of_type("Scan")[0]
    assert {v.name for v in graph.implicit_inputs(loop)} == {"k", "w", "flag"}
    assert {v.name for v in graph.implicit_inputs(scan)} == {"w", "offset"}
    body = loop.subgraphs["body"]
    (if_op,) = body.ops_of_type("If")
    assert {v.name for v in body.implicit_inputs(if_op)} == {"acc_in", "w", "k_row"}
    assert body.value("w").outer and not body.value("acc_in").outer
    relu = graph.producer(graph.value("k"))
    assert graph.topo_order().index(relu) < graph.topo_order().index(loop)


# ---- weights: zero-copy views with the right values ---------------------------------------


def _base_buffer(array: np.ndarray):
    """The object that finally owns an array's memory (an mmap for zero-copy weights)."""
    base = array
    while True:
        if isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        elif isinstance(base, memoryview):
            base = base.obj
        else:
            return base


def test_weights_are_read_only_views_of_the_file_with_correct_values(tmp_path: Path):
    model, _ = synthetic.storage_model()
    src = write_model(model, tmp_path / "storage.onnx")
    graph = edgeq.load(src)
    for proto in model.graph.initializer:
        tensor = graph.value(proto.name).const
        expected = numpy_helper.to_array(proto)
        got = tensor.numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape, proto.name
        if expected.dtype == object:
            assert np.array_equal(got, expected), proto.name
        else:
            assert got.tobytes() == expected.tobytes(), proto.name
        if proto.HasField("raw_data") and tensor.elem_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            assert isinstance(_base_buffer(got), mmap.mmap), f"{proto.name} was copied"
            assert not got.flags.writeable
            assert got.size == 0 or np.shares_memory(got, tensor.numpy())


def test_external_data_is_mapped_once_per_file(tmp_path: Path):
    model, _ = synthetic.opset_model(17)
    src = edgeq.save(edgeq.load(model), tmp_path / "m.onnx", external_data=True, external_threshold=1)
    graph = edgeq.load(src)
    bases = {id(_base_buffer(v.const.numpy())) for v in graph.initializers}
    assert len(bases) == 1 and isinstance(_base_buffer(graph.initializers[0].const.numpy()), mmap.mmap)


def test_external_constant_node_tensors_are_inlined(tmp_path: Path):
    """onnx's convert_attribute=True puts Constant-node tensors in the data file too; a model
    saved elsewhere must not point back into the source's data file."""
    model, feeds = synthetic.feature_model()
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    expected = run(write_model(model, tmp_path / "orig.onnx"), feeds)
    onnx.save_model(model, str(src_dir / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0, convert_attribute=True)
    assert any(a.t.data_location == onnx.TensorProto.EXTERNAL
               for n in onnx.load(str(src_dir / "m.onnx"), load_external_data=False).graph.node for a in n.attribute
               if a.HasField("t"))
    saved = edgeq.save(edgeq.load(src_dir / "m.onnx"), tmp_path / "out" / "m.onnx")
    (src_dir / "weights.bin").unlink()
    assert_bit_identical(expected, run(saved, feeds))


def test_overwriting_the_loaded_file_in_place(tmp_path: Path):
    """Saving onto the path a graph was loaded from (its weights map that file) is safe."""
    model, feeds = synthetic.opset_model(21)
    path = write_model(model, tmp_path / "m.onnx")
    expected = run(path, feeds)
    edgeq.save(edgeq.load(path), path)
    edgeq.save(edgeq.load(path), path, external_data=True, external_threshold=64)
    edgeq.save(edgeq.load(path), path, external_data=True, external_threshold=64)  # rewrites its own data file
    assert_bit_identical(expected, run(path, feeds))
    edgeq.save(edgeq.load(path), path)
    assert first_difference(model, onnx.load(str(path))) is None


def test_saved_files_get_the_usual_permissions(tmp_path: Path):
    model, _ = synthetic.opset_model(13)
    old = os.umask(0o022)
    try:
        saved = edgeq.save(edgeq.load(model), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o644


def test_passes_changes_survive_a_save(tmp_path: Path):
    """Values built by a pass (new constant, string tensor, new op) are written and read back."""
    model, feeds = synthetic.opset_model(17)
    graph = edgeq.load(model)
    y = graph.value("y")
    scale = graph.add_constant("scale", np.float32(2.0))
    labels = graph.add_constant("labels", np.array(["a", "bc"], dtype=object))
    op = graph.add_op("Mul", [graph.producer(y) and graph.inputs_of(graph.producer(y))[0], scale], ["y_scaled"])
    graph.outputs.append(graph.outputs_of(op)[0])
    graph.outputs_of(op)[0].set_type(onnx.TensorProto.FLOAT, ["batch", 8])
    graph.outputs.append(labels)
    labels.set_type(onnx.TensorProto.STRING, [2])
    saved = edgeq.save(graph, tmp_path / "m.onnx")
    out = run(saved, feeds)
    base = run(write_model(model, tmp_path / "orig.onnx"), feeds)
    assert_bit_identical(base, out[:2])
    assert np.array_equal(out[2], base[0] * np.float32(2.0))
    assert list(out[3]) == ["a", "bc"]


def test_clone_shares_weights_and_saves_identically(built, tmp_path: Path):
    """clone_graph goes through graph_to_proto/graph_from_proto: same model, same Tensors."""
    _, _, src = built
    graph = edgeq.load(src)
    twin = clone_graph(graph)
    for value in graph.initializers:
        assert twin.value(value.name).const is value.const
    from edgeq.ir.verify import verify

    verify(twin)
    assert edgeq.save(twin, tmp_path / "twin.onnx").read_bytes() == edgeq.save(graph, tmp_path / "g.onnx").read_bytes()


def test_initializer_that_is_also_an_input_stays_overridable(tmp_path: Path):
    model, feeds = synthetic.feature_model()
    src = write_model(model, tmp_path / "f.onnx")
    saved = edgeq.save(edgeq.load(src), tmp_path / "saved.onnx")
    override = dict(feeds, bias_in=np.full(4, 3.0, np.float32))
    expected = run(src, override)
    assert not np.array_equal(expected[0], run(src, feeds)[0])  # the override matters
    assert_bit_identical(expected, run(saved, override))
