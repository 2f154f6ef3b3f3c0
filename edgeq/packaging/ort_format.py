"""ONNX Runtime's mobile model format (`.ort`): converting a model with
`onnxruntime.tools.convert_onnx_models_to_ort`, reading the graph an `.ort` file holds, and the
operator config of a reduced ONNX Runtime build (`required_operators_and_types.config`) checked
against every op of that graph.

The optimization level decides what a mobile provider can take (measured on the BERT fixture
compiled for x86-vnni and qnn-htp, onnxruntime 1.32; tests/packaging/test_mobile.py):

- "basic" keeps every QuantizeLinear/DequantizeLinear (constant folding, identity and
  redundant-node removal only; shared DQs are duplicated so that each QDQ node unit owns its
  own): NNAPI, CoreML, XNNPACK and QNN lower QDQ node units themselves.
- "extended"/"all" fuse the QDQ groups into the CPU provider's own kernels (com.microsoft QGemm,
  MatMulIntegerToFloat, MatMulNBits, QLinear*): every DQ of the x86-vnni BERT goes, and no mobile
  provider takes those ops. This is ONNX Runtime's 'Fixed' style for the CPU provider.
- int4 weights: the .ort schema has no int4 tensor type (onnxruntime 1.32), so a W4 model cannot
  keep its int4 DequantizeLinear nodes (the "basic" level): ONNX Runtime writes the file but
  refuses to load it ("Unsupported tensor data type"). At "all" they become MatMulNBits (uint8
  packed, 4-bit) and the file loads; a basic-level package of a W4 model is refused.
- The 'Runtime' style (basic graph + QDQ fusions saved to replay on the CPU provider's nodes)
  fails to load with the replay enabled in onnxruntime 1.32's full build ("Not enough produced
  nodes in the runtime optimization record"), so it is not offered.

An `.ort` file loaded by the full Python build is not optimized again: its outputs are those of
the `.onnx` run at the same level with the same session settings (measured: identical). Its
bytes are not stable from one conversion to the next (ONNX Runtime writes the flatbuffer tables
in an order that changes between processes); the graph it holds is (`ort_graph_signature`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgeq.packaging.folder import PackageError

LEVELS = ("basic", "extended", "all")
# The session setting ONNX Runtime's converter sets for `--target_platform arm`: int8 activations
# stay int8 in QDQ fusions (MLAS's ARM kernels take S8S8 and U8S8; on x86 they become u8).
ARM_SETTINGS = (("session.qdqisint8allowed", "1"),)
CONFIG_FILE = "required_operators_and_types.config"
_LEVEL_ENV = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"
_ENV_LOCK = threading.Lock()


@dataclass(frozen=True)
class Converted:
    ort: Path            # the .ort model
    config: Path         # its required_operators_and_types.config (paths in it made relative)
    optimized: Path      # the ONNX model ONNX Runtime optimized at the same level (what the .ort holds)


def convert(model: Path, work: Path, level: str, *, ort_name: str = "model.ort") -> Converted:
    """Convert `model` at `level` for an ARM device into `work` (a fresh folder) with
    onnxruntime.tools.convert_onnx_models_to_ort ('Fixed' style, type reduction on)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if level not in LEVELS:
        raise PackageError(f"unknown optimization level {level!r}", fix=f"use one of {', '.join(LEVELS)}")
    if level == "basic":
        packed = _int4_weights(Path(model))
        if packed:
            raise PackageError(f"'{Path(model).name}' has {len(packed)} int4 weight(s) (e.g. {packed[0]}), which ONNX "
                               "Runtime's .ort format cannot hold unfused (its schema has no int4 type): only the "
                               "CPU provider's MatMulNBits keeps them 4-bit",
                               fix="package with --provider cpu")
    out = work / "convert"
    out.mkdir()
    chatter = io.StringIO()
    log = logging.getLogger("ort_format_model.utils")  # logs the config's path at INFO
    with _ENV_LOCK:
        log_level = log.level
        log.setLevel(logging.WARNING)
        before = os.environ.get(_LEVEL_ENV)
        os.environ[_LEVEL_ENV] = level
        try:
            with contextlib.redirect_stdout(chatter), _int4_type_names():
                convert_onnx_models_to_ort(Path(model), output_dir=out, optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform="arm", save_optimized_onnx_model=True,
                                           enable_type_reduction=True)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime raises its own types
            first = (str(err).strip().splitlines() or [""])[0]
            raise PackageError(f"ONNX Runtime cannot convert '{model.name}' to the .ort format: "
                               f"{type(err).__name__}: {first}",
                               fix="check that ONNX Runtime runs the model (edgeq eval)") from err
        finally:
            log.setLevel(log_level)
            if before is None:
                os.environ.pop(_LEVEL_ENV, None)
            else:
                os.environ[_LEVEL_ENV] = before
    orts = sorted(out.glob("*.ort"))
    configs = sorted(out.glob("*.config"))
    optimized = sorted(out.glob("*.optimized.onnx"))
    if len(orts) != 1 or len(configs) != 1 or len(optimized) != 1:
        raise PackageError(f"the .ort conversion wrote {[p.name for p in out.iterdir()]}",
                           fix="report this: one .ort, one .config and one optimized model were expected")
    ort_path = orts[0].rename(work / ort_name)
    config = work / CONFIG_FILE
    config.write_text(_relative_config(configs[0].read_text(encoding="utf-8"), ort_name), encoding="utf-8")
    return Converted(ort_path, config, optimized[0])


@contextlib.contextmanager
def _int4_type_names():
    """The C++ names of ONNX's int4/uint4 element types (onnxruntime/core/framework/int4.h: Int4x2,
    UInt4x2) in the config writer's type table, which lacks them in onnxruntime 1.32: a graph at
    the basic level keeps int4 DequantizeLinear nodes (W4A16 weights), and writing the config of a
    type-reduced build failed with KeyError 22 (INT4)."""
    import onnx
    from onnxruntime.tools.ort_format_model.types import FbsTypeInfo

    table = FbsTypeInfo.tensordatatype_to_string
    # The flatbuffer schema's TensorDataType numbers ONNX's element types (its Python enum stops at
    # FLOAT8E5M2FNUZ = 20).
    added = {code: text for code, text in ((onnx.TensorProto.INT4, "Int4x2"), (onnx.TensorProto.UINT4, "UInt4x2"))
             if code not in table}
    table.update(added)
    try:
        yield
    finally:
        for code in added:
            table.pop(code, None)


def _int4_weights(model: Path) -> list[str]:
    """The model's int4/uint4 initializers (the .ort schema of onnxruntime 1.32 stores no such type:
    a file holding one fails to load, "Unsupported tensor data type")."""
    import onnx

    header = onnx.load(str(model), load_external_data=False)
    return [t.name for t in header.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)]


def _relative_config(text: str, ort_name: str) -> str:
    """The config with the converter's absolute model paths replaced by the packaged name."""
    lines = [f"# - {ort_name}" if line.startswith("# - ") else line for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def _fbs():
    from onnxruntime.tools.ort_format_model import ort_flatbuffers_py  # noqa: F401 - puts the package on sys.path
    from ort_flatbuffers_py import fbs

    return fbs


def _root_graph(path: Path):
    fbs = _fbs()
    buffer = bytearray(Path(path).read_bytes())
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buffer, 0):
        raise PackageError(f"'{path}' is not an ORT format model", fix="give a file written by the converter")
    return fbs, fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buffer, 0).Model().Graph()


def _graphs(fbs, graph):
    """`graph` and every subgraph in it (If/Loop/Scan bodies)."""
    yield graph
    for i in range(graph.NodesLength()):
        node = graph.Nodes(i)
        for j in range(node.AttributesLength()):
            attr = node.Attributes(j)
            if attr.Type() == fbs.AttributeType.AttributeType.GRAPH:
                yield from _graphs(fbs, attr.G())
            elif attr.Type() == fbs.AttributeType.AttributeType.GRAPHS:
                for k in range(attr.GraphsLength()):
                    yield from _graphs(fbs, attr.Graphs(k))


def ort_ops(path: Path) -> Counter[tuple[str, int, str]]:
    """Every op of the .ort model (subgraphs included) as (domain, since-version, op type): count."""
    fbs, root = _root_graph(path)
    ops: Counter[tuple[str, int, str]] = Counter()
    for graph in _graphs(fbs, root):
        for i in range(graph.NodesLength()):
            node = graph.Nodes(i)
            ops[(node.Domain().decode() or "ai.onnx", node.SinceVersion(), node.OpType().decode())] += 1
    return ops


def op_types(ops: Counter[tuple[str, int, str]]) -> dict[str, int]:
    """Op counts by type (domain-qualified outside the ONNX domain), sorted."""
    counts: Counter[str] = Counter()
    for (domain, _, op), n in ops.items():
        counts[op if domain == "ai.onnx" else f"{domain}:{op}"] += n
    return dict(sorted(counts.items()))


def ort_graph_signature(path: Path) -> tuple:
    """What the .ort model computes, independent of the order its tables are written in: the
    nodes (op, domain, version, inputs, outputs) in order, the value names, the initializers."""
    _, graph = _root_graph(path)
    nodes = []
    for i in range(graph.NodesLength()):
        n = graph.Nodes(i)
        nodes.append((n.OpType(), n.Domain(), n.SinceVersion(), tuple(n.Inputs(j) for j in range(n.InputsLength())),
                      tuple(n.Outputs(j) for j in range(n.OutputsLength()))))
    values = sorted(graph.NodeArgs(j).Name() for j in range(graph.NodeArgsLength()))
    weights = sorted((graph.Initializers(j).Name(), graph.Initializers(j).RawDataAsNumpy().tobytes())
                     for j in range(graph.InitializersLength()))
    return tuple(nodes), tuple(values), tuple(weights)


def check_op_config(ort_path: Path, config: Path) -> list[str]:
    """Every op of the .ort model must be in the operator config (its domain, opset and type):
    a reduced build from the config runs the model. Returns the ops as 'domain;opset;Op', sorted."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(config), enable_type_reduction=True)
    listed = sorted(f"{domain};{version};{op}" for domain, version, op in ort_ops(ort_path))
    missing = [entry for entry in listed
               if entry.split(";")[2] not in required.get(entry.split(";")[0], {}).get(int(entry.split(";")[1]), set())]
    if missing:
        raise PackageError(f"the operator config lacks {len(missing)} op(s) of the model: {', '.join(missing[:6])}",
                           fix="report this: the converter's config should list every op")
    return listed


def config_entries(config: Path) -> int:
    """How many (domain, opset, op) entries the config lists."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(config), enable_type_reduction=True)
    return sum(len(ops) for versions in required.values() for ops in versions.values())


def temporary_folder(near: Path) -> tempfile.TemporaryDirectory:
    """A scratch folder beside `near` (same file system as the package being written)."""
    return tempfile.TemporaryDirectory(prefix=".edgeq-mobile.", dir=near)
