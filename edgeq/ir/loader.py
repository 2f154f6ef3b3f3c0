"""Load ONNX into the IR without copying weights, and check what a load must refuse.

Loading memory-maps the file and walks the protobuf wire format once (`edgeq.ir.wire`) to find
each top-level initializer's `raw_data` bytes; the model is parsed from a *skeleton* without
those bytes, and every weight becomes a zero-copy view of the map. External data files are
mapped once each (`edgeq.ir.files`).

What a load checks (each failure is an `edgeq.errors` subclass with a one-line message):
the file exists and is a complete ONNX protobuf (`ModelLoadError`), every initializer's bytes
match its type and shape and external data files exist and are long enough
(`ExternalDataError`), the opset is one the installed onnxruntime runs
(`UnsupportedOpsetError`), and the graph is well formed: one producer per value, no dangling
input, no cycle, in every nested graph too (`GraphError`). `edgeq.ir.verify` states the full
set of invariants.
"""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
import onnx
from google.protobuf.message import DecodeError

from edgeq.errors import EdgeqError, ModelLoadError
from edgeq.ir.files import map_file
from edgeq.ir.from_proto import graph_from_proto, model_info_from_proto
from edgeq.ir.graph import Graph
from edgeq.ir.runtime_support import check_runtime_support
from edgeq.ir.wire import FileReader, WireError, looks_like_onnx, split_raw_data


def load(source: str | os.PathLike | onnx.ModelProto, *, check_runtime: bool = True) -> Graph:
    """Load an ONNX model (path or ModelProto) into a Graph. The source is never modified.

    `check_runtime`: refuse a model whose opset the installed onnxruntime does not run.
    """
    if isinstance(source, onnx.ModelProto):
        model, ranges, file_map, model_file, base_dir, where = source, None, None, None, None, "model"
    else:
        path = Path(source)
        model, ranges, file_map, model_file = _read_file(path)
        base_dir, where = path.parent, str(path)
    try:
        _check_model_header(model)
        info = model_info_from_proto(model)
        if check_runtime:
            check_runtime_support(info)
        graph = graph_from_proto(model.graph, model=info, raw=(file_map, ranges, model_file), base_dir=base_dir,
                                 _owned=base_dir is not None)
        check_structure(graph)
    except EdgeqError as err:
        raise type(err)(f"{where}: {err.problem}", fix=err.fix) from None
    return graph


def read_skeleton(path: str | os.PathLike) -> onnx.ModelProto:
    """The model proto of the file at `path` without its initializers' bytes (names, dtypes and
    dims stay): graph inputs, outputs and nodes for the cost of the file's structure, not its
    weights (onnx.load reads inline weights even with load_external_data=False)."""
    path = Path(path)
    size = _model_file_size(path)
    with open(path, "rb") as model_file:
        model, _ = _parse_skeleton(path, FileReader(model_file.fileno(), size))
    return model


def _model_file_size(path: Path) -> int:
    """The size of the model file at `path`, or a ModelLoadError saying why it is none."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", fix="check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX file", fix="pass the .onnx file inside it")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty, not an ONNX model")
    return size


def _read_file(path: Path):
    size = _model_file_size(path)
    # The file stays open as long as its tensors live: saves copy their bytes from this very
    # inode (file to file, in the kernel), even after the path is replaced.
    model_file = open(path, "rb")  # noqa: SIM115 (closed when its tensors are gone)
    try:
        model, ranges = _parse_skeleton(path, FileReader(model_file.fileno(), size))
        file_map = map_file(model_file)
    except BaseException:
        model_file.close()
        raise
    return model, ranges, file_map, model_file


def _parse_skeleton(path: Path, reader: FileReader) -> tuple[onnx.ModelProto, list]:
    try:
        skeleton, ranges = split_raw_data(reader, reader.size)
        model = onnx.ModelProto()
        model.ParseFromString(skeleton)
    except WireError as err:
        if err.truncated and looks_like_onnx(reader):
            raise ModelLoadError(f"{path} is truncated ({err})", fix="re-download or re-export the model") from None
        raise ModelLoadError(f"{path} is not an ONNX model ({err})", fix="pass a .onnx file") from None
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{path} is not an ONNX model ({_one_line(err)})", fix="pass a .onnx file") from None
    return model, ranges


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _check_model_header(model: onnx.ModelProto) -> None:
    if model.ir_version <= 0:
        raise ModelLoadError("not an ONNX model (it has no IR version)", fix="pass a .onnx file")
    if not model.HasField("graph"):
        raise ModelLoadError("the model has no graph (the file is truncated or is not an ONNX model)",
                             fix="re-download or re-export the model")
    if model.ir_version >= 3 and not len(model.opset_import):
        raise ModelLoadError("the model has no opset_import (the file is truncated or incomplete)",
                             fix="re-download or re-export the model")


def check_structure(graph: Graph) -> None:
    """Raise GraphError if the graph or any nested graph has a cycle (captures included)."""
    if not nx.is_directed_acyclic_graph(graph._g):
        graph.topo_order()  # raises GraphError naming the ops on the cycle
    for op in graph.ops():
        for sub in op.subgraphs.values():
            for body in sub if isinstance(sub, list) else [sub]:
                check_structure(body)
