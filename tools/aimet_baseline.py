"""Issue 13's third-party baseline: Qualcomm's AIMET-ONNX quantizing MiniLM (all-MiniLM-L6-v2) at
1 x 128, A16W8, scored on the QNN HTP simulator exactly as tools/bench_qnn.py scores edgeq and
ONNX Runtime's own QNN flow (onnxruntime-qnn, htp_arch 73, CPU fallback disabled).

AIMET-ONNX pins its own torch/onnx/onnxruntime, so it lives in a venv of its own and never in the
project's; the script runs in three stages, two venvs:

    # 0. once: AIMET's venv (any torch; a CPU wheel saves the GBs of PyPI's CUDA build)
    python3.11 -m venv /tmp/aimet_venv
    /tmp/aimet_venv/bin/python -m pip install torch==2.13.0+cpu aimet-onnx==2.42.0 onnxruntime-qnn==2.7.0

    # 1. project venv: the model fixed to 1 x 128 (bench_qnn.fix_shapes, as its ORT row does) and
    #    the 16 calibration paragraphs bench_qnn.py uses, tokenized, into WORK/<model>/
    .venv/bin/python tools/aimet_baseline.py prepare --work /tmp/aimet_work --models torchscript
    # 2. AIMET's venv: the hand fixes, QuantizationSimModel (config htp_v73, param_type int8:
    #    per channel on MatMul/Gemm/Conv, activation_type int16, min_max), compute_encodings on the
    #    calibration feeds, to_onnx_qdq (activations exported as uint16) -> WORK/<model>/aimet.qdq.onnx
    /tmp/aimet_venv/bin/python tools/aimet_baseline.py quantize --work /tmp/aimet_work --models torchscript \
        --fix gelu --fix softmax-nan-guard --fix finite-mask --export-int32-bias
    # 3. project venv: the QDQ model on the HTP simulator (fallback disabled): bench_qnn's refusal
    #    check, placement check and embedding cosine against float over the first 32 WikiText
    #    paragraphs, seconds per sentence
    .venv/bin/python tools/aimet_baseline.py score --work /tmp/aimet_work --models torchscript

Stage 2 imports neither edgeq nor anything from the project (only numpy, onnx and aimet_onnx);
stages 1 and 3 reuse bench_qnn.py's own functions, so the scoring is the same code. Each stage
writes WORK/<model>/*.json; `score` writes WORK/results.json and WORK/results.md. One set of
fixes per WORK folder (link fixed.onnx and calibration.npz into another to try another set).

Hand fixes (`--fix NAME`, repeatable; FIXES edit the model before AIMET sees it, CONFIG_FIXES a
copy of AIMET's config), each recorded in the row; what each does and why is in its docstring or
comment. What the HTP needed (2026-12-07): the TorchScript export gelu, softmax-nan-guard and
finite-mask (and --export-int32-bias for every op in a node unit); the edgeq build gelu and
finite-mask (and --export-int32-bias plus quantize-cast-output); the dynamo export
softmax-nan-guard, finite-mask and gathernd-const-indices (and --export-int32-bias).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SEQ = 128
MODELS = ("torchscript", "edgeq", "dynamo", "ort_fused")
LABELS = {"edgeq": "edgeq build", "torchscript": "torch.onnx TorchScript export",
          "dynamo": "torch.onnx dynamo export", "ort_fused": "ORT-fused (transformer optimizer)"}


# --- stage 1 (project venv) ------------------------------------------------------------------

def prepare(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_qnn import fix_shapes, minilm_path
    from edgeq.models.evaluation import minilm_calibration_feeds

    calib = minilm_calibration_feeds(args.shared, args.calibration)
    for name in args.models:
        source = minilm_path(name, args.exports)
        folder = args.work / name
        folder.mkdir(parents=True, exist_ok=True)
        if source is None:
            (folder / "prepare.json").write_text(json.dumps({"error": "export not found"}))
            continue
        fix_shapes(source, folder / "fixed.onnx", (1, SEQ))
        np.savez(folder / "calibration.npz", **{f"{i}:{k}": v for i, feed in enumerate(calib) for k, v in feed.items()})
        (folder / "prepare.json").write_text(json.dumps({"source": str(source), "calibration": len(calib)}))
        print(f"{name}: {source} -> {folder / 'fixed.onnx'}", flush=True)


# --- stage 2 (AIMET's venv) ------------------------------------------------------------------

def _feeds(path: Path) -> list[dict]:
    data = np.load(path)
    feeds: dict[int, dict] = {}
    for key in data.files:
        index, name = key.split(":", 1)
        feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


def _fix_gelu(model) -> int:
    """Erf GELU (Div by sqrt 2 -> Erf -> Add 1 -> Mul x -> Mul 0.5, as torch.onnx writes
    BERT's gelu) -> one ONNX Gelu op (opset 20): QNN's provider takes no Erf ("Operators of type
    `Erf` are not supported by QNN EP"), and AIMET quantizes the five ops apart."""
    import onnx
    from onnx import helper

    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {o: n for n in graph.node for o in n.output}

    def only(name, op_type):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    dropped, added = set(), []
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        div = producers.get(erf.input[0])
        add = only(erf.output[0], "Add")
        mul = add and only(add.output[0], "Mul")
        half = mul and only(mul.output[0], "Mul")
        if div is None or div.op_type != "Div" or half is None or div.input[0] not in mul.input:
            continue
        dropped.update(id(n) for n in (div, erf, add, mul, half))
        added.append((half, helper.make_node("Gelu", [div.input[0]], [half.output[0]], name=erf.name + "/Gelu")))
    if not added:
        return 0
    position = {id(n): i for i, n in enumerate(graph.node)}
    keep = [n for n in graph.node if id(n) not in dropped]
    for anchor, gelu in added:  # where the last Mul stood, so the order stays topological
        keep.append(gelu)
        position[id(gelu)] = position[id(anchor)]
    keep.sort(key=lambda n: position[id(n)])
    used = {name for n in keep for name in n.input} | {o.name for o in graph.output}
    keep = [n for n in keep if n.op_type != "Constant" or n.output[0] in used]  # sqrt 2, 1, 0.5
    del graph.node[:]
    graph.node.extend(keep)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 20:
            opset.version = 20
    onnx.checker.check_model(model)
    return len(added)


def _fix_nan_guard(model) -> int:
    """`Where(IsNaN(p), 0, p)` after each Softmax (torch's SDPA export guards rows whose every key
    is masked) -> p: the HTP fails to finalize the graph with it (QNN_COMMON_ERROR_MEM_ALLOC, the
    first failing prefix of AIMET's model ends at this Where). With a finite mask (finite-mask)
    no row is NaN."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    renamed, dropped = {}, set()
    for where in [n for n in graph.node if n.op_type == "Where"]:
        isnan = producers.get(where.input[0])
        if isnan is None or isnan.op_type != "IsNaN" or isnan.input[0] != where.input[2]:
            continue
        renamed[where.output[0]] = where.input[2]
        dropped.update((id(where), id(isnan)))
    keep = [n for n in graph.node if id(n) not in dropped]
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    used = {name for n in keep for name in n.input}
    keep = [n for n in keep if n.op_type != "Constant" or n.output[0] in used]  # the 0 fills
    del graph.node[:]
    graph.node.extend(keep)
    return len(renamed)


MASK_FILL = -100.0


def _fix_mask(model) -> int:
    """The attention mask's fill (-inf in torch's SDPA export: the Where choosing between 0 and
    -inf; -10000 in the edgeq build's Mul) -> MASK_FILL, every float constant at or below -1e4:
    min/max calibration of -inf makes the mask's and the masked scores' 16-bit scale 5e33 (every
    score rounds to the same step), of -1e4 a step of 0.15. -100: exp(-100) is 0 in float32 and
    the scores' range stays ~110."""
    from onnx import numpy_helper

    changed = 0
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    for tensor in tensors:
        if tensor.data_type != 1:  # FLOAT
            continue
        array = numpy_helper.to_array(tensor)
        low = array <= -1e4  # -inf, float32's min, BERT's -10000
        if low.any():
            changed += int(low.sum())
            tensor.CopyFrom(numpy_helper.from_array(np.where(low, MASK_FILL, array).astype(np.float32), tensor.name))
    return changed


def _fix_gathernd(model) -> int:
    """A GatherND whose indices are fixed at the fixed shape (the dynamo export's padding mask:
    GatherND(bool mask [1, 128], an index grid of (0, k))) -> a Reshape of its data when the
    indices read it in order, else a Gather of the flattened data at constant flat indices: the
    QNN provider takes no GatherND. The indices are computed with ONNX Runtime on two different
    feeds; a GatherND whose indices differ between them is left."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = [n for n in graph.node if n.op_type == "GatherND" and not any(
        a.name == "batch_dims" and a.i for a in n.attribute)]
    if not nodes:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [n.input[1] for n in nodes]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    feeds = [{k: np.full(v, fill, np.int64) for k, v in shapes.items()} for fill in (1, 0)]
    first, second = (session.run(names, feed) for feed in feeds)
    data_shapes = {}
    for value in [*graph.value_info, *graph.input]:
        data_shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in inferred.graph.value_info:
        data_shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    changed = 0
    for node, a, b in zip(nodes, first, second):
        shape = data_shapes.get(node.input[0])
        if not np.array_equal(a, b) or not shape or min(shape) <= 0:
            continue
        strides = np.cumprod([1, *shape[::-1]])[:-1][::-1][:a.shape[-1]]
        inner = int(np.prod(shape[a.shape[-1]:]))  # GatherND reads whole slices past the index depth
        flat = (a * strides).sum(-1) // inner
        out_shape = list(a.shape[:-1]) + list(shape[a.shape[-1]:])
        prefix = node.name or node.output[0]
        if np.array_equal(flat.ravel(), np.arange(flat.size)) and flat.size * inner == int(np.prod(shape)):
            graph.initializer.append(numpy_helper.from_array(np.array(out_shape, np.int64), prefix + "/shape"))
            new = [helper.make_node("Reshape", [node.input[0], prefix + "/shape"], [node.output[0]],
                                    name=prefix + "/Reshape")]
        else:
            rows = [-1] + list(shape[a.shape[-1]:])
            graph.initializer.append(numpy_helper.from_array(np.array(rows, np.int64), prefix + "/rows"))
            graph.initializer.append(numpy_helper.from_array(flat.astype(np.int64), prefix + "/flat"))
            new = [helper.make_node("Reshape", [node.input[0], prefix + "/rows"], [prefix + "/rows_out"],
                                    name=prefix + "/Reshape"),
                   helper.make_node("Gather", [prefix + "/rows_out", prefix + "/flat"], [node.output[0]],
                                    axis=0, name=prefix + "/Gather")]
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, op in enumerate(new):
            graph.node.insert(index + offset, op)
        changed += 1
    _drop_dead(graph)
    onnx.checker.check_model(model)
    return changed


def _drop_dead(graph) -> None:
    """Nodes none of whose outputs is read (the index grids' subgraphs), repeatedly."""
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


FIXES = {"gelu": _fix_gelu, "softmax-nan-guard": _fix_nan_guard, "finite-mask": _fix_mask,
         "gathernd-const-indices": _fix_gathernd}


CONFIG_FIXES = {
    # htp_v73 leaves every Cast output unquantized; the edgeq build's mask `Sub(1, Cast(mask))`
    # then reads a float input and the provider lowers the Sub alone, in float on the HTP.
    "quantize-cast-output": lambda config: config["op_type"].get("Cast", {}).pop("is_output_quantized", None),
}


def _config(args, folder: Path) -> str:
    """AIMET's config (alias or path), or a copy of it with the config hand fixes applied."""
    edits = [f for f in args.fix if f in CONFIG_FIXES]
    if not edits:
        return args.config
    from aimet_onnx.common.quantsim_config import quantsim_config

    source = Path(args.config)
    if not source.exists():
        source = Path(quantsim_config.__file__).parent / quantsim_config._config_file_aliases[args.config]
    config = json.loads(source.read_text())
    for edit in edits:
        CONFIG_FIXES[edit](config)
    out = folder / "aimet_config.json"
    out.write_text(json.dumps(config, indent=1))
    return str(out)


def quantize(args) -> None:
    import aimet_onnx
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    for name in args.models:
        folder = args.work / name
        if not (folder / "fixed.onnx").exists():
            continue
        row: dict = {"aimet_onnx": aimet_onnx.__version__, "config_file": args.config, "param_type": "int8",
                     "activation_type": "int16", "quant_scheme": args.quant_scheme, "fixes": args.fix,
                     "export_int32_bias": args.export_int32_bias}
        step = "load"
        try:
            model = onnx.load(str(folder / "fixed.onnx"))
            calib = _feeds(folder / "calibration.npz")
            step = "hand fixes"
            row["fixed"] = {fix: FIXES[fix](model) for fix in args.fix if fix in FIXES}
            start = time.perf_counter()
            config = _config(args, folder)
            step = "QuantizationSimModel"
            sim = QuantizationSimModel(model, param_type="int8", activation_type="int16",
                                       quant_scheme=args.quant_scheme, config_file=config,
                                       path=str(folder / "sim"))
            step = "compute_encodings"
            sim.compute_encodings(calib)
            step = "to_onnx_qdq"
            qdq = sim.to_onnx_qdq(export_int32_bias=args.export_int32_bias)
            row["quantize_s"] = round(time.perf_counter() - start, 1)
            step = "save"
            onnx.save(qdq, str(folder / "aimet.qdq.onnx"))
        except Exception as err:  # noqa: BLE001 - the row says which step failed
            text = str(err).strip().splitlines()
            row["error"] = f"{step}: {type(err).__name__}: {text[0] if text else ''}"[:300]
        (folder / "quantize.json").write_text(json.dumps(row, indent=1))
        print(f"{name}: {json.dumps(row)}", flush=True)


# --- stage 3 (project venv) ------------------------------------------------------------------

def score(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import load_line, run_header
    from bench_qnn import (
        _measure,
        float_outputs,
        htp_refusal,
        minilm_path,
        placement_text,
    )
    from edgeq.models.evaluation import minilm_eval_paragraphs, minilm_tokenize

    from edgeq.registry import get_target
    from edgeq.runtime.providers import for_device

    execution = for_device(get_target("qnn-htp").executions[0], args.device)
    header = run_header()
    tokens = minilm_tokenize(minilm_eval_paragraphs(args.shared)[:args.paragraphs])
    feeds = [{k: v[i:i + 1] for k, v in tokens.items()} for i in range(args.paragraphs)]
    rows = []
    for name in args.models:
        folder = args.work / name
        quantized = json.loads((folder / "quantize.json").read_text()) if (folder / "quantize.json").exists() else {}
        row: dict = {"model": f"MiniLM ({LABELS[name]})", "flow": f"AIMET-ONNX {quantized.get('aimet_onnx', '')}".strip(),
                     "compile_s": quantized.get("quantize_s", "-"), "fixes": quantized.get("fixes", [])}
        out = folder / "aimet.qdq.onnx"
        if "error" in quantized or not out.exists():
            row["error"] = quantized.get("error", "not quantized")
            rows.append(row)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}: float reference", flush=True)
        reference = float_outputs(minilm_path(name, args.exports), feeds)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: on the HTP", flush=True)
        refused = htp_refusal(out, execution)
        if refused:
            row["error"] = "on the HTP: " + refused
        else:
            row["placement"] = placement_text(out, execution)
            row = _measure(row, out, execution, feeds, reference, "minilm", folder, False)
        rows.append(row)
        print(json.dumps(row), flush=True)
    header.append(load_line("at end"))
    lines = [*(f"- {h}" for h in header), "",
             (f"HTP simulator, device {execution.device} ({dict(execution.provider_options).get('htp_arch')}), "
              "CPU fallback disabled"), "",
             ("| model | flow | compile (s) | placement on the HTP | embedding cosine mean / min (n) "
              "| s / sentence on the simulator | error |"), "|---|---|---:|---|---|---:|---|"]
    for r in rows:
        cos = f"{r['cos_mean']:.5f} / {r['cos_min']:.5f} ({r['samples']})" if "cos_mean" in r else "-"
        per = f"{r['s_per_sample']:.2f}" if "s_per_sample" in r else "-"
        lines.append(f"| {r['model']} | {r['flow']} | {r['compile_s']} | {r.get('placement', '-')} | {cos} | {per} "
                     f"| {r.get('error', '')} |")
    text = "\n".join(lines)
    (args.work / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (args.work / "results.md").write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("prepare", "quantize", "score"))
    parser.add_argument("--work", type=Path, default=Path("build/aimet-baseline"))
    parser.add_argument("--models", default="torchscript", help=f"comma list of: {', '.join(MODELS)}")
    parser.add_argument("--exports", type=Path, default=Path("/tmp/exports"),
                        help="folder of minilm_{torchscript,dynamo,ort_fused}.onnx")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--calibration", type=int, default=16, help="calibration paragraphs")
    parser.add_argument("--paragraphs", type=int, default=32, help="WikiText paragraphs to score")
    parser.add_argument("--device", default="v73", help="qnn-htp device (htp_arch 73: v73)")
    parser.add_argument("--config", default="htp_v73", help="AIMET quantsim config (alias or JSON path)")
    parser.add_argument("--quant-scheme", default="min_max", help="AIMET quant scheme (its default: min_max)")
    parser.add_argument("--export-int32-bias", action="store_true",
                        help="to_onnx_qdq(export_int32_bias=True): int32 biases (AIMET's default is float)")
    parser.add_argument("--fix", action="append", default=[], choices=sorted({*FIXES, *CONFIG_FIXES}),
                        help="a hand fix applied before AIMET (repeatable)")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    args.work.mkdir(parents=True, exist_ok=True)
    {"prepare": prepare, "quantize": quantize, "score": score}[args.stage](args)


if __name__ == "__main__":
    main()
