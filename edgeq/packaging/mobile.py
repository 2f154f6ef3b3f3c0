"""`edgeq package --platform android|ios`: what a mobile app needs to run a compiled model with
ONNX Runtime's mobile packages.

The folder holds:

- `model.ort`: the model in ONNX Runtime's mobile format, converted with
  `onnxruntime.tools.convert_onnx_models_to_ort` at the level the chosen provider needs
  (edgeq.packaging.ort_format: "basic" keeps every QDQ node unit for NNAPI/CoreML/XNNPACK/QNN,
  "all" bakes in the CPU provider's fused integer kernels). It is checked by loading it in ONNX
  Runtime (Python) and comparing its outputs with the `.onnx` it came from, run on the same
  provider at the same level with the same settings (`check.max_abs_diff`, expected 0), and
  with the `.onnx` as a default session runs it (`check.max_abs_diff_vs_default_session`).
- `required_operators_and_types.config`: the operators (and types) of a reduced ONNX Runtime
  build, checked against every op of the `.ort` graph.
- `mobile_usability.json`: which nodes each of the platform's providers would take
  (edgeq.packaging.mobile_providers), on the graph as packaged and, for dynamic inputs, with
  the input shapes the compile recorded fixed.
- `model_facts.json`: what the app's pre/post-processing needs: input/output names, dtypes,
  shapes (symbolic and as recorded), the quantization of graph inputs/outputs where a
  QuantizeLinear reads an input or a DequantizeLinear writes an output, the scheme and
  calibration the compile recorded, the tokenizer's special tokens.
- `tokenizer.json` + `tokenizer_config.json` (with --tokenizer).
- `model_ctx.onnx`: the EP-context model (the provider's compiled binary) where the target's
  execution writes one and the package is for that provider (qnn-htp on QNN).
- `README.md`: the Kotlin (OrtSession) and Swift (ORTSession) calls that load and run it, with
  the provider to add.

Nothing in the folder depends on the date or the paths given, except `model.ort`'s byte order
(ort_format's notes); the folder is written whole or not at all (edgeq.packaging.folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.metadata import (
    CALIBRATION_KEY,
    DEVICE_KEY,
    OPTIONS_KEY,
    PROVIDER_KEY,
    SCHEME_KEY,
    TARGET_KEY,
    VERSION_KEY,
    recorded_input_shapes,
)
from edgeq.packaging import ort_format
from edgeq.packaging import tokenizer as tokenizers
from edgeq.packaging.folder import Package, PackageError, package_folder
from edgeq.packaging.mobile_providers import (
    PLATFORMS,
    MobileProvider,
    ProviderUse,
    provider_named,
    providers_for,
    usability,
)

MODEL_FILE = "model.ort"
CONFIG_FILE = ort_format.CONFIG_FILE
FACTS_FILE = "model_facts.json"
USABILITY_FILE = "mobile_usability.json"
README_FILE = "README.md"
CONTEXT_FILE = "model_ctx.onnx"
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
           onnx.TensorProto.INT16: "int16", onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.BOOL: "bool",
           onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4"}


@dataclass(frozen=True)
class MobileOptions:
    """What `edgeq package --platform` is asked for."""

    platform: str                    # android | ios
    target: str | None = None        # the edgeq target it is packaged for (None: the one compiled for)
    provider: str | None = None      # the provider the app adds (None: the target's NPU where the
                                     # platform has it, else ONNX Runtime's CPU provider)
    static_shapes: bool = False      # fix the dynamic input dims to the shapes the compile recorded
    ep_context: bool | None = None   # the EP-context model (None: where the target's execution writes one)
    # Input shapes ((name, dims), ...) for the dynamic inputs, over those the compile recorded:
    # what --static-shapes fixes, the check feeds and the usability report's fixed-shape graph use.
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise PackageError(f"unknown platform {self.platform!r}", fix=f"use one of {', '.join(PLATFORMS)}")
        if self.provider is not None:
            provider = provider_named(self.provider.lower()) or provider_named(self.provider)
            if provider is None or self.platform not in provider.platforms:
                names = ", ".join(p.name for p in providers_for(self.platform))
                raise PackageError(f"{self.platform} apps have no provider {self.provider!r}",
                                   fix=f"use one of {names}")


def package_mobile(model: str | os.PathLike[str], output: str | os.PathLike[str], options: MobileOptions, *,
                   tokenizer: str | os.PathLike[str] | None = None) -> Package:
    """Write the mobile package of the compiled (or float) ONNX `model` to `output`."""
    from edgeq.runtime.ep_context import is_ep_context

    source = Path(model)
    if not source.is_file():
        raise PackageError(f"model '{source}' does not exist", fix="give the compiled .onnx file")
    try:
        header = onnx.load(str(source), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and others
        raise PackageError(f"'{source}' is not an ONNX model ({type(err).__name__})",
                           fix="give the compiled .onnx file") from err
    if is_ep_context(header):
        raise PackageError(f"'{source}' is already an EP-context model",
                           fix="package the compiled QDQ model; the EP-context model is written from it")
    metadata = {p.key: p.value for p in header.metadata_props}
    target, execution = _target(source, metadata, options.target)
    provider = _provider(options, execution)
    if tokenizer is not None:
        tokenizers.read_tokenizer(Path(tokenizer))  # a bad tokenizer fails before any work
    context = _wants_ep_context(options, execution, provider)
    recorded = {**recorded_input_shapes(metadata), **{name: list(dims) for name, dims in options.input_shapes}}
    unknown = sorted({name for name, _ in options.input_shapes} - {i.name for i in _graph_inputs(header)})
    if unknown:
        raise PackageError(f"the model has no input {', '.join(unknown)}",
                           fix=f"its inputs: {', '.join(i.name for i in _graph_inputs(header))}")
    # The destination is checked first (package_folder), before any conversion runs.
    with package_folder(output, overwrite=options.overwrite) as folder, \
            tempfile.TemporaryDirectory(prefix="edgeq-mobile.") as scratch_name:
        scratch = Path(scratch_name)
        packaged = _fixed_shapes(source, header, recorded, scratch / "static") if options.static_shapes else source
        converted = ort_format.convert(packaged, scratch, provider.level, ort_name=MODEL_FILE)
        ops = ort_format.check_op_config(converted.ort, converted.config)
        check = _compare(converted.ort, packaged, source, header, recorded, provider.level)
        on_provider = _on_provider(execution, provider)
        uses = _usability(packaged, converted, provider.level, options.platform, scratch / "as-packaged")
        static_uses = None
        dynamic = _dynamic_inputs(onnx.load(str(packaged), load_external_data=False))
        if dynamic and _covers(header, recorded):
            static_uses = _usability(_fixed_shapes(source, header, recorded, scratch / "fixed"), None, "basic",
                                     options.platform, scratch / "static-check")
        facts = _facts(source, header, metadata, packaged, converted, ops, check, options, provider, target, recorded)
        shutil.copyfile(converted.ort, folder / MODEL_FILE)
        shutil.copyfile(converted.config, folder / CONFIG_FILE)
        token_files: list[str] = []
        if tokenizer is not None:
            tokens = tokenizers.special_tokens(Path(tokenizer))
            token_files = tokenizers.write_tokenizer(Path(tokenizer), folder, tokens)
            facts["tokenizer"] = {"file": "tokenizer.json", "config": "tokenizer_config.json",
                                  "class": tokenizers.tokenizer_class(tokenizers.read_tokenizer(Path(tokenizer))),
                                  **dataclasses.asdict(tokens)}
        if context:
            from edgeq.runtime.ep_context import write_ep_context

            write_ep_context(packaged, execution, folder / CONTEXT_FILE)
            facts["ep_context"] = {"file": CONTEXT_FILE, "provider": execution.provider, "device": execution.device}
        if on_provider is not None:
            check["on_provider"] = _compare_on(on_provider, converted.ort, packaged, header, recorded,
                                               folder / CONTEXT_FILE if context else None)
        shapes = f"dynamic inputs {', '.join(dynamic)}" if dynamic else "static input shapes"
        report = {"platform": options.platform, "package_provider": provider.name,
                  "graph": "the .onnx as ONNX Runtime optimizes it at the basic level (what a package for a "
                           f"QDQ-lowering provider holds); {shapes}",
                  "providers": [u.to_dict() for u in uses]}
        if static_uses is not None:
            report["with_recorded_shapes_fixed"] = {"shapes": {k: recorded[k] for k in sorted(recorded)},
                                                    "providers": [u.to_dict() for u in static_uses]}
        _write_json(folder / USABILITY_FILE, report)
        _write_json(folder / FACTS_FILE, facts)
        (folder / README_FILE).write_text(readme(facts, provider, uses, static_uses, token_files, context),
                                          encoding="utf-8")
    package = Package(Path(output), f"{options.platform} (.ort)")
    package.add(MODEL_FILE, "model")
    package.add(CONFIG_FILE, "config")
    package.add(FACTS_FILE, "facts")
    package.add(USABILITY_FILE, "report")
    for name in token_files:
        package.add(name, "tokenizer")
    if context:
        package.add(CONTEXT_FILE, "ep-context")
    package.add(README_FILE, "readme")
    package.notes.append(f".ort at the {provider.level} level for {provider.ort_name}: outputs vs the .onnx on the "
                         f"same provider and level, max abs diff {check['max_abs_diff']:.3g}"
                         f" ({check['max_abs_diff_vs_default_session']:.3g} vs a default session)")
    package.notes += [u.to_line() for u in uses]
    if static_uses is not None:
        package.notes += [f"with the recorded shapes fixed (--static-shapes): {u.to_line()}" for u in static_uses
                          if u.provider != "cpu"]
    return package


# --- what the model is for ---------------------------------------------------------------

def _target(source: Path, metadata: dict[str, str], asked: str | None):
    """The target (None for a float model) and its execution the package is for. A target other
    than the recorded one must accept the model's Q/DQ (targets.base.validate)."""
    from edgeq.registry import get_target
    from edgeq.runtime.providers import for_device
    from edgeq.targets.base import validate

    recorded = metadata.get(TARGET_KEY)
    name = asked or recorded
    if name is None:
        return None, None
    target = get_target(name)
    if asked is not None and asked != recorded:
        from edgeq.ir import load

        problems = validate(load(source), target, raise_on_error=False)
        if problems:
            was = f"compiled for {recorded}" if recorded else "not compiled by edgeq"
            raise PackageError(f"'{source.name}' ({was}) breaks {len(problems)} rule(s) of target {name}; first: "
                               f"{problems[0].node}: {problems[0].problem}",
                               fix=f"compile it for {name} (edgeq compile --target {name}), or drop --target")
    execution = target.execution_named(metadata[PROVIDER_KEY]) if (name == recorded and metadata.get(PROVIDER_KEY)) \
        else target.executions[0]
    device = metadata.get(DEVICE_KEY) if name == recorded else None
    return target, for_device(execution, device if execution.devices else None)


def _provider(options: MobileOptions, execution) -> MobileProvider:
    if options.provider is not None:
        return provider_named(options.provider.lower()) or provider_named(options.provider)
    compiled_for = provider_named(execution.provider) if execution is not None else None
    if compiled_for is not None and compiled_for.name != "cpu":
        if options.platform not in compiled_for.platforms:
            raise PackageError(f"the model was compiled for {compiled_for.ort_name}, which {options.platform} apps "
                               f"do not have", fix=f"package for --platform {compiled_for.platforms[0]}, or give "
                                                   f"--provider cpu")
        return compiled_for
    return provider_named("cpu")


def _wants_ep_context(options: MobileOptions, execution, provider: MobileProvider) -> bool:
    writes = execution is not None and bool(execution.context_settings) and execution.provider == provider.ort_name
    if options.ep_context is None:
        return writes
    if options.ep_context and not writes:
        what = ("no target" if execution is None
                else f"the {execution.provider} execution with --provider {provider.name}")
        raise PackageError(f"there is no EP-context model for {what}",
                           fix="drop --ep-context (only an NPU target's own provider writes one)")
    return options.ep_context


# --- shapes and feeds --------------------------------------------------------------------

def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def _initializer_names(header: onnx.ModelProto) -> set[str]:
    return {t.name for t in header.graph.initializer}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    weights = _initializer_names(model)
    return [i for i in model.graph.input if i.name not in weights]


def _dynamic_inputs(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in _graph_inputs(model) if any(not isinstance(d, int) or d <= 0 for d in _dims(i))]


def _covers(header: onnx.ModelProto, recorded: dict[str, list[int]]) -> bool:
    return all(name in recorded for name in _dynamic_inputs(header))


def _fixed_shapes(source: Path, header: onnx.ModelProto, recorded: dict[str, list[int]], folder: Path) -> Path:
    """A copy of `source` whose dynamic input dims are the recorded shapes (outputs re-inferred)."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    missing = [name for name in _dynamic_inputs(header) if name not in recorded]
    if missing:
        raise PackageError(f"no recorded shape for the dynamic input(s) {', '.join(missing)}",
                           fix="compile with --input-shape NAME=DIMS, or drop --static-shapes")
    model = onnx.load(str(source))
    for name in _dynamic_inputs(header):
        make_input_shape_fixed(model.graph, name, list(recorded[name]))
    fix_output_shapes(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    large = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
    onnx.save(model, str(path), save_as_external_data=large, location="model.onnx.data" if large else None)
    return path


def feeds(header: onnx.ModelProto, recorded: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the recorded shapes (else static dims, dynamic ones 1 first then 16): N(0,1)
    floats; integer inputs that index a constant table (Gather) drawn below its row count, other
    integer and boolean inputs ones."""
    rng = np.random.default_rng(seed)
    tables = {t.name: int(t.dims[0]) for t in header.graph.initializer if t.dims}
    rows: dict[str, int] = {}
    for node in header.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in tables:
            rows[node.input[1]] = min(rows.get(node.input[1], tables[node.input[0]]), tables[node.input[0]])
    out = {}
    for value in _graph_inputs(header):
        dims = _dims(value)
        shape = recorded.get(value.name) or [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 16)
                                             for i, d in enumerate(dims)]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        if np.issubdtype(dtype, np.floating):
            out[value.name] = rng.standard_normal(shape).astype(dtype)
        elif value.name in rows and np.issubdtype(dtype, np.integer):
            out[value.name] = rng.integers(0, rows[value.name], shape).astype(dtype)
        else:
            out[value.name] = np.ones(shape, dtype)
    return out


def _level(name: str):
    import onnxruntime as ort

    return {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[name]


def _run(path: Path, inputs: dict[str, np.ndarray], level: str | None, settings=()) -> list[np.ndarray]:
    from edgeq.runtime.sessions import make_session

    kwargs = {} if level is None else {"level": _level(level)}
    session = make_session(str(path), config=settings, **kwargs)
    return session.run(None, inputs)


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst


def _compare(ort_path: Path, packaged: Path, source: Path, header: onnx.ModelProto, recorded, level: str) -> dict:
    """The .ort's outputs against the .onnx's on ONNX Runtime's CPU provider: at the same level
    with the converter's settings (the same provider as converted), and as a default session."""
    inputs = feeds(header, recorded)
    settings = list(ort_format.ARM_SETTINGS)
    try:
        from_ort = _run(ort_path, inputs, None, settings)
    except Exception as err:  # noqa: BLE001 - ONNX Runtime raises its own types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PackageError(f"ONNX Runtime cannot run the .ort model it wrote: {first}",
                           fix="report this with the model; try another --provider") from err
    same = _run(packaged, inputs, level, settings)
    default = _run(source, inputs, None)
    diff = _max_diff(from_ort, same)
    return {"provider": "CPUExecutionProvider", "level": level, "session_config": dict(settings),
            "feeds": {k: list(v.shape) for k, v in inputs.items()}, "seed": 0,
            "max_abs_diff": diff, "identical": diff == 0.0,
            "max_abs_diff_vs_default_session": _max_diff(from_ort, default)}


def _on_provider(execution, provider: MobileProvider):
    """The package's provider as an edgeq execution that runs here (the QNN HTP simulator for a
    qnn-htp model), for the check on that provider; None for the CPU provider or one absent here."""
    from edgeq.runtime.providers import availability

    if execution is None or provider.name == "cpu" or execution.provider != provider.ort_name:
        return None
    return execution if availability(execution).via == "onnxruntime" else None


def _compare_on(execution, ort_path: Path, packaged: Path, header: onnx.ModelProto, recorded,
                context: Path | None) -> dict:
    """The .ort (and the EP-context model) against the .onnx on the package's own provider."""
    from edgeq.runtime.sessions import make_session

    inputs = feeds(header, recorded)
    onnx_out = make_session(str(packaged), execution=execution).run(None, inputs)
    result = {"provider": execution.provider, "device": execution.device,
              "max_abs_diff": _max_diff(make_session(str(ort_path), execution=execution).run(None, inputs), onnx_out)}
    if context is not None:
        result["ep_context_max_abs_diff"] = _max_diff(make_session(str(context), execution=execution).run(None, inputs),
                                                      onnx_out)
    return result


def _usability(packaged: Path, converted, level: str, platform: str, folder: Path) -> list[ProviderUse]:
    """What each provider takes of the basic-level graph of `packaged` (the converted one's
    optimized model when it was converted at that level)."""
    from edgeq.runtime.sessions import make_session

    if converted is not None and level == "basic":
        path = converted.optimized
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "basic.onnx"
        make_session(str(packaged), level=_level("basic"), optimized_path=str(path),
                     config=list(ort_format.ARM_SETTINGS))
    return usability(onnx.load(str(path)), path, platform)


# --- facts -------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _constant(header: onnx.ModelProto, name: str):
    for tensor in header.graph.initializer:
        if tensor.name == name:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(tensor)
    return None


def _qparams(header: onnx.ModelProto, node: onnx.NodeProto, value_dtype_from: int) -> dict | None:
    scale = _constant(header, node.input[1]) if len(node.input) > 1 else None
    if scale is None or scale.size != 1:
        return None
    zero = _constant(header, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    dtype = _DTYPES.get(value_dtype_from, str(zero.dtype) if zero is not None else "uint8")
    return {"scale": float(scale.reshape(())), "zero_point": int(zero.reshape(())) if zero is not None else 0,
            "dtype": dtype}


def _io_facts(header: onnx.ModelProto, recorded: dict[str, list[int]]) -> tuple[list[dict], list[dict]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers = {o: n for n in header.graph.node for o in n.output}
    for node in header.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    zero_types = {t.name: t.data_type for t in header.graph.initializer}
    inputs = []
    for value in _graph_inputs(header):
        entry = {"name": value.name, "dtype": _DTYPES.get(value.type.tensor_type.elem_type, "other"),
                 "shape": _dims(value)}
        if value.name in recorded:
            entry["recorded_shape"] = list(recorded[value.name])
        readers = consumers.get(value.name, [])
        if readers and all(r.op_type == "QuantizeLinear" for r in readers):
            q = readers[0]
            params = _qparams(header, q, zero_types.get(q.input[2], onnx.TensorProto.UINT8) if len(q.input) > 2 else
                              onnx.TensorProto.UINT8)
            if params:
                entry["quantized_as"] = params
        inputs.append(entry)
    outputs = []
    for value in header.graph.output:
        entry = {"name": value.name, "dtype": _DTYPES.get(value.type.tensor_type.elem_type, "other"),
                 "shape": _dims(value)}
        producer = producers.get(value.name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            params = _qparams(header, producer, zero_types.get(producer.input[2], onnx.TensorProto.UINT8)
                              if len(producer.input) > 2 else onnx.TensorProto.UINT8)
            if params:
                entry["dequantized_from"] = params
        outputs.append(entry)
    return inputs, outputs


def _quantization(header: onnx.ModelProto, metadata: dict[str, str]) -> dict:
    weights = {t.name: t.data_type for t in header.graph.initializer}
    stored: dict[str, int] = {}
    activations: dict[str, int] = {}
    for node in header.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in weights:
            key = _DTYPES.get(weights[node.input[0]], "other")
            stored[key] = stored.get(key, 0) + 1
        elif node.op_type == "QuantizeLinear":
            key = _DTYPES.get(weights.get(node.input[2], onnx.TensorProto.UINT8), "other") if len(node.input) > 2 \
                else "uint8"
            activations[key] = activations.get(key, 0) + 1
    facts = {"scheme": metadata.get(SCHEME_KEY), "weight_dequantize_by_dtype": dict(sorted(stored.items())),
             "activation_quantize_by_dtype": dict(sorted(activations.items()))}
    for key, name in ((CALIBRATION_KEY, "calibration"), (OPTIONS_KEY, "options")):
        if key in metadata:
            try:
                facts[name] = json.loads(metadata[key])
            except ValueError:
                facts[name] = metadata[key]
    return facts


def _facts(source: Path, header: onnx.ModelProto, metadata: dict[str, str], packaged: Path, converted, ops: list[str],
           check: dict, options: MobileOptions, provider: MobileProvider, target, recorded) -> dict:
    import onnxruntime as ort

    inputs, outputs = _io_facts(onnx.load(str(packaged), load_external_data=False), recorded)
    packaged_ops = ort_format.ort_ops(converted.ort)
    types = ort_format.op_types(packaged_ops)
    source_types: dict[str, int] = {}
    for node in header.graph.node:
        source_types[node.op_type] = source_types.get(node.op_type, 0) + 1
    return {
        "model": MODEL_FILE,
        "source": {"file": source.name, "sha256": _sha256(source), "nodes": len(header.graph.node),
                   "edgeq_version": metadata.get(VERSION_KEY)},
        "platform": options.platform,
        "provider": {"name": provider.name, "onnxruntime": provider.ort_name},
        "target": target.name if target is not None else None,
        "device": metadata.get(DEVICE_KEY) if target is not None and target.name == metadata.get(TARGET_KEY) else None,
        "static_shapes": options.static_shapes,
        "ort_format": {"onnxruntime": ort.__version__, "optimization_level": provider.level, "style": "Fixed",
                       "target_platform": "arm", "nodes": sum(packaged_ops.values()), "ops": types,
                       "qdq": {"onnx": {k: source_types.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear")},
                               "ort": {k: types.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear")}}},
        "operator_config": {"file": CONFIG_FILE, "entries": ort_format.config_entries(converted.config),
                            "model_ops_checked": len(ops)},
        "inputs": inputs,
        "outputs": outputs,
        "quantization": _quantization(header, metadata),
        "check": check,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# --- the package's README -------------------------------------------------------------------

_KOTLIN_TENSORS = {"int64": ("LongBuffer", "LongArray"), "float32": ("FloatBuffer", "FloatArray"),
                   "int32": ("IntBuffer", "IntArray"), "uint8": ("ByteBuffer", "ByteArray"),
                   "int8": ("ByteBuffer", "ByteArray"), "float16": ("ShortBuffer", "ShortArray")}
_SWIFT_TYPES = {"int64": ".int64", "float32": ".float", "int32": ".int32", "uint8": ".uInt8", "int8": ".int8",
                "float16": ".float16"}


def _shape(entry: dict) -> list:
    return entry.get("recorded_shape") or [d if isinstance(d, int) and d > 0 else 1 for d in entry["shape"]]


def _kotlin(facts: dict, provider: MobileProvider, context: bool) -> str:
    model = CONTEXT_FILE if context else MODEL_FILE
    lines = ["import ai.onnxruntime.*", "import java.nio.*", "",
             "val env = OrtEnvironment.getEnvironment()",
             "val options = OrtSession.SessionOptions()"]
    lines.append(provider.kotlin if provider.kotlin else "// ONNX Runtime's CPU provider: nothing to add")
    lines.append(f'val session = env.createSession(assets.open("{model}").readBytes(), options)')
    names = []
    for entry in facts["inputs"]:
        buffer, array = _KOTLIN_TENSORS.get(entry["dtype"], ("FloatBuffer", "FloatArray"))
        shape = ", ".join(f"{d}L" for d in _shape(entry))
        var = _identifier(entry["name"])
        names.append(f'"{entry["name"]}" to {var}')
        size = int(np.prod(_shape(entry)))
        lines.append(f"val {var} = OnnxTensor.createTensor(env, {buffer}.wrap({array}({size}) /* your data */), "
                     f"longArrayOf({shape}))")
    lines.append(f"session.run(mapOf({', '.join(names)})).use {{ result ->")
    for index, entry in enumerate(facts["outputs"]):
        lines.append(f'    val {_identifier(entry["name"])} = result.get({index}).value  // {entry["dtype"]} '
                     f'{_dims_text(entry["shape"])}')
    lines.append("}")
    return "\n".join(lines)


def _swift(facts: dict, provider: MobileProvider, context: bool) -> str:
    model = CONTEXT_FILE if context else MODEL_FILE
    stem, ext = model.rsplit(".", 1)
    lines = ["import onnxruntime_objc", "",
             "let env = try ORTEnv(loggingLevel: .warning)",
             "let options = try ORTSessionOptions()"]
    lines.append(provider.swift if provider.swift else "// ONNX Runtime's CPU provider: nothing to add")
    lines.append(f'let path = Bundle.main.path(forResource: "{stem}", ofType: "{ext}")!')
    lines.append("let session = try ORTSession(env: env, modelPath: path, sessionOptions: options)")
    names = []
    for entry in facts["inputs"]:
        var = _identifier(entry["name"])
        names.append(f'"{entry["name"]}": {var}')
        shape = ", ".join(str(d) for d in _shape(entry))
        lines.append(f"let {var} = try ORTValue(tensorData: NSMutableData(data: {var}Data /* your data */), "
                     f"elementType: {_SWIFT_TYPES.get(entry['dtype'], '.float')}, shape: [{shape}])")
    outputs = ", ".join(f'"{e["name"]}"' for e in facts["outputs"])
    lines.append(f"let outputs = try session.run(withInputs: [{', '.join(names)}], outputNames: [{outputs}], "
                 "runOptions: nil)")
    lines.append(f'let first = try outputs["{facts["outputs"][0]["name"]}"]!.tensorData()  // '
                 f'{facts["outputs"][0]["dtype"]}')
    return "\n".join(lines)


def _dims_text(dims: list) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _identifier(name: str) -> str:
    parts = [p for p in "".join(c if c.isalnum() else " " for c in name).split() if p]
    text = parts[0].lower() + "".join(p[:1].upper() + p[1:] for p in parts[1:]) if parts else "value"
    return text if not text[0].isdigit() else "v" + text


def readme(facts: dict, provider: MobileProvider, uses: list[ProviderUse], static_uses: list[ProviderUse] | None,
           token_files: list[str], context: bool) -> str:
    """The package's README.md: the files, the provider, the Kotlin and Swift calls."""
    platform = facts["platform"]
    check = facts["check"]
    what = f"compiled for {facts['target']}" if facts["target"] else "float (not compiled by edgeq)"
    lines = [f"# {facts['source']['file']} for {'Android' if platform == 'android' else 'iOS'}", "",
             f"The model ({what}) in ONNX Runtime's mobile format, for the {provider.ort_name} "
             f"({provider.description}). Written by `edgeq package --platform {platform}`.", "",
             "| file | what |", "|---|---|",
             f"| `{MODEL_FILE}` | the model, ONNX Runtime format, optimized at the `{provider.level}` level |",
             f"| `{CONFIG_FILE}` | operators and types for a reduced ONNX Runtime build |",
             f"| `{FACTS_FILE}` | inputs, outputs, shapes, dtypes, quantization, the check of the .ort |",
             f"| `{USABILITY_FILE}` | which nodes each mobile provider would take |"]
    if token_files:
        lines.append("| `tokenizer.json`, `tokenizer_config.json` | the tokenizer (Hugging Face format) |")
    if context:
        lines.append(f"| `{CONTEXT_FILE}` | the EP-context model: {facts['ep_context']['provider']}'s compiled binary "
                     f"for {facts['ep_context']['device'] or 'its default device'} (loads without compiling on the "
                     "device) |")
    lines += ["", "## Inputs and outputs", "", "| name | dtype | shape | as recorded |", "|---|---|---|---|"]
    for entry in facts["inputs"]:
        recorded = _dims_text(entry["recorded_shape"]) if "recorded_shape" in entry else ""
        lines.append(f"| in `{entry['name']}` | {entry['dtype']} | {_dims_text(entry['shape'])} | {recorded} |")
    for entry in facts["outputs"]:
        lines.append(f"| out `{entry['name']}` | {entry['dtype']} | {_dims_text(entry['shape'])} | |")
    if "tokenizer" in facts:
        tok = facts["tokenizer"]
        lines += ["", f"Tokenizer: {tok['class']}; bos {tok['bos_token_id']}, eos {tok['eos_token_id']}, "
                      f"pad {tok['pad_token_id']}."]
    lines += ["", f"Checked: the .ort's outputs against the .onnx on ONNX Runtime's CPU provider at the same level: "
                  f"max abs diff {check['max_abs_diff']:.3g} "
                  f"({check['max_abs_diff_vs_default_session']:.3g} against a default-level session of the .onnx)."]
    if "on_provider" in check:
        on = check["on_provider"]
        lines[-1] += (f" On {on['provider']} ({on['device'] or 'default device'}, here): .ort vs .onnx max abs diff "
                      f"{on['max_abs_diff']:.3g}" + (f", EP-context model vs .onnx {on['ep_context_max_abs_diff']:.3g}"
                                                     if "ep_context_max_abs_diff" in on else "") + ".")
    if platform == "android":
        artifact = "onnxruntime-android-qnn" if provider.name == "qnn" else "onnxruntime-android"
        version = facts["ort_format"]["onnxruntime"]
        gradle = f'Gradle: `implementation("com.microsoft.onnxruntime:{artifact}:{version}")`'
        lines += ["", "## Android (Kotlin)", "", f"{gradle}; the model in `src/main/assets/`.", "",
                  "```kotlin", _kotlin(facts, provider, context), "```"]
    else:
        lines += ["", "## iOS (Swift)", "",
                  "CocoaPods: `pod 'onnxruntime-objc'`; the model in the app bundle.", "",
                  "```swift", _swift(facts, provider, context), "```"]
    lines += ["", "## Providers", "",
              "What each provider would take (nodes of the graph at the basic level; "
              f"`{USABILITY_FILE}` has the details):", ""]
    lines += [f"- {u.to_line()}" for u in uses]
    if static_uses is not None:
        lines += ["", "With the recorded input shapes fixed (`--static-shapes`):", ""]
        lines += [f"- {u.to_line()}" for u in static_uses if u.provider != "cpu"]
    build = (f"./build.sh --{platform} --minimal_build extended --include_ops_by_config {CONFIG_FILE} "
             "--enable_reduced_operator_type_support")
    lines += ["", "## A reduced ONNX Runtime build", "",
              "Only the operators (and types) this model uses, from ONNX Runtime's sources with the platform's SDK "
              "options added (`--minimal_build extended` keeps the providers that compile graphs: NNAPI, CoreML, "
              "XNNPACK, QNN):", "", f"    {build}", ""]
    return "\n".join(lines)
