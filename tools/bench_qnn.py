"""Issue 13's numbers for the Hexagon NPU (qnn-htp) on the HTP simulator that the onnxruntime-qnn
wheel ships for x86-64 Linux: edgeq's compile against ONNX Runtime's own QNN flow on the same
data, every session with CPU fallback disabled.

    python tools/bench_qnn.py --out build/bench-qnn
    python tools/bench_qnn.py --models edgeq,torchscript --paragraphs 8 --skip-ort
    python tools/bench_qnn.py --models ppocr-det,ppocr-rec --images 4
    python tools/bench_qnn.py --models smollm2 --windows 1 --smollm2-weights int8,int4 --skip-ort

What it does, per model (MiniLM: edgeq's build `edgeq models build minilm`, and the torch.onnx
exports named with --exports DIR, `minilm_{torchscript,dynamo,ort_fused}.onnx`, where present):
1. edgeq: `edgeq.compile(model, "qnn-htp")` at 1 x 128 (A16W8, htp_arch --arch), calibration
   from the 16 WikiText paragraphs after the evaluation ones (models/evaluation.py), then the
   placement check on the HTP (every node on QNNExecutionProvider, every quantized op in a QDQ
   node unit; a failure is the row's one-line error) and, for the first MiniLM, the EP-context
   model: its load time and whether its outputs equal the QDQ model's on the HTP.
2. ONNX Runtime's flow as its documentation gives it: shapes fixed to 1 x 128
   (make_dim_param_fixed), `qnn_preprocess_model`, `get_qnn_qdq_config` (uint16 activations,
   uint8 weights, per channel) and `quantize`, on the same calibration feeds; the step that
   fails is the row's error.
3. Accuracy on the HTP: MiniLM sentence-embedding cosine (mean pooling over the mask, L2
   normalised) of the first --paragraphs WikiText paragraphs against the float model on ORT's
   CPU provider; PP-OCR (rapidocr-onnxruntime's det/rec, fixed shapes 1x3x640x640 and
   1x3x48x320): output cosine against float on synthetic text pages (`text_image`: glyph-like
   strokes in lines; calibration seeds 0.., evaluation seeds 100..). Seconds per sample on the
   simulator.
4. SmolLM2-135M (`--models smollm2`): prefill at 1 x 256 compiled with --smollm2-weights
   (int8: W8A16, int4: W4A16), perplexity of the first --windows standard windows on the HTP
   against float, seconds per window on the simulator.
Writes OUT/results.json and OUT/results.md and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, run_header  # noqa: E402

MINILM = ("edgeq", "torchscript", "dynamo", "ort_fused")
PPOCR = {"ppocr-det": ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 640, 640)),
         "ppocr-rec": ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320))}
SEQ = 128


def text_image(h: int, w: int, seed: int, lines: int | None = None, rec: bool = False) -> np.ndarray:
    """A light page with dark glyph-like strokes in lines of words (no font, no imaging library),
    normalized as PP-OCR normalizes its input (det: ImageNet mean/std; rec: (x - 0.5) / 0.5). The
    float det model finds text in it (10% of the pixels above 0.3 at 640 x 640), the rec model
    reads it with a mean top probability of 0.79; random noise gives det outputs below 3e-5."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235.0) + rng.normal(0, 6, (h, w, 3))
    line_h = max(12, h // 12) if lines is None else h // lines
    y = rng.integers(2, max(3, line_h // 2))
    while y + line_h <= h:
        x = rng.integers(2, max(3, w // 10))
        while x < w - line_h:
            word = rng.integers(2, 8)
            for _ in range(word):
                gw = int(line_h * rng.uniform(0.35, 0.7)); th = max(1, line_h // 8)
                ink = rng.uniform(10, 60)
                x0, y0 = x, y + line_h // 6; y1 = y + line_h - line_h // 6
                img[y0:y1, x0:x0 + th] = ink                      # left stem
                img[y0:y0 + th, x0:x0 + gw] = ink                 # top bar
                if rng.random() < 0.6: img[y1 - th:y1, x0:x0 + gw] = ink
                if rng.random() < 0.5: img[y0:y1, x0 + gw - th:x0 + gw] = ink
                if rng.random() < 0.4: img[(y0 + y1) // 2:(y0 + y1) // 2 + th, x0:x0 + gw] = ink
                x += gw + max(2, line_h // 6)
                if x >= w - line_h: break
            x += line_h
        y += int(line_h * 1.6)
    img = np.clip(img, 0, 255) / 255.0
    mean, std = (0.5, 0.5) if rec else (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
    img = (img - mean) / std
    return img.transpose(2, 0, 1)[None].astype(np.float32)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def minilm_path(name: str, exports: Path) -> Path | None:
    if name == "edgeq":
        from edgeq.models import catalog

        return catalog.cached("minilm")
    path = exports / f"minilm_{name}.onnx"
    return path if path.exists() else None


def ppocr_path(name: str) -> Path:
    from edgeq.models.wheels import wheel_file

    return wheel_file("rapidocr-onnxruntime", f"rapidocr_onnxruntime/models/{PPOCR[name][0]}", "1.4.4")


def flush_subnormals(source: Path, output: Path) -> tuple[Path, int]:
    """The model with float32 subnormal weights (0 < |w| < 1.18e-38) set to 0, and how many. A
    channel of them gets a subnormal per-channel scale whose int32 bias scale (s_x * s_w)
    underflows to 0, which the HTP rejects (PP-OCRv4 rec has four such Conv channels)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    flushed = 0
    tiny = np.finfo(np.float32).tiny
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    for tensor in tensors:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        mask = (array != 0) & (np.abs(array) < tiny)
        if mask.any():
            flushed += int(mask.sum())
            tensor.CopyFrom(numpy_helper.from_array(np.where(mask, 0, array).astype(np.float32), tensor.name))
    if not flushed:
        return source, 0
    onnx.save(model, str(output))
    return output, flushed


def fix_shapes(source: Path, output: Path, shape: tuple[int, ...]) -> Path:
    """The model with its dynamic input dims fixed (ONNX Runtime's make_dim_param_fixed), as a
    user of ORT's flow fixes them; external data kept alongside."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed, make_input_shape_fixed

    model = onnx.load(str(source))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if dim.dim_param:
                make_dim_param_fixed(model.graph, dim.dim_param, shape[i] if i < len(shape) else 1)
        if any(d.dim_value <= 0 for d in value.type.tensor_type.shape.dim):
            make_input_shape_fixed(model.graph, value.name, list(shape))
    onnx.save(model, str(output), save_as_external_data=model.ByteSize() > 1.8e9)
    return output


def float_outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    from edgeq.runtime.sessions import make_session

    session = make_session(path)
    return [session.run(None, feed)[0] for feed in feeds]


def htp_outputs(path: Path, execution, feeds: list[dict]) -> tuple[list[np.ndarray], float, float]:
    """Outputs on the HTP (fallback disabled), session load seconds, seconds per sample."""
    from edgeq.runtime.sessions import make_session

    start = time.perf_counter()
    session = make_session(path, execution=execution)
    loaded = time.perf_counter() - start
    outputs = []
    start = time.perf_counter()
    for feed in feeds:
        outputs.append(session.run(None, feed)[0])
    return outputs, loaded, (time.perf_counter() - start) / max(len(feeds), 1)


def embedding_cosines(reference: list[np.ndarray], got: list[np.ndarray], feeds: list[dict]) -> np.ndarray:
    from edgeq.models.evaluation import cosine_rows, mean_pool_normalize

    return np.concatenate([cosine_rows(mean_pool_normalize(r, f["attention_mask"]),
                                       mean_pool_normalize(g, f["attention_mask"]))
                           for r, g, f in zip(reference, got, feeds)])


def output_cosines(reference: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray:
    from edgeq.models.evaluation import cosine_rows

    return np.array([float(cosine_rows(r.reshape(1, -1), g.reshape(1, -1))[0]) for r, g in zip(reference, got)])


def edgeq_row(path: Path, shape_args, calibration, execution, eval_feeds, reference, kind, tmp: Path,
              ep_context: bool) -> dict:
    import edgeq
    from edgeq.options import CompileOptions
    from edgeq.runtime.placement import check_placement

    row: dict = {"flow": "edgeq"}
    try:
        start = time.perf_counter()
        compiled = edgeq.compile(path, "qnn-htp", CompileOptions(verify=False, input_shapes=shape_args),
                                 calibration=calibration, device=execution.device)
        row["compile_s"] = round(time.perf_counter() - start, 1)
        out = compiled.save(tmp / f"{path.stem}.qnn-htp.onnx")
        row["scheme"] = compiled.report.scheme
        placement = check_placement(out, compiled.target.execution)
        row["placement"] = (f"{sum(placement.nodes_by_provider.values())} nodes, all on "
                            f"{', '.join(placement.nodes_by_provider)}; {placement.check.split('; ')[-1]}"
                            if not placement.unfused else f"left: {', '.join(placement.unfused)}")
    except Exception as err:  # noqa: BLE001 - the row says what failed
        row["error"] = one_line(err)
        return row
    return _measure(row, out, compiled.target.execution, eval_feeds, reference, kind, tmp, ep_context)


def htp_refusal(path: Path, execution) -> str:
    """Why a session on the HTP with fallback disabled fails ("" if it loads): ORT's message and
    the node types the provider's log lists as unsupported."""
    import re

    import onnxruntime as ort

    from edgeq.runtime.placement import _provider_log
    from edgeq.runtime.providers import ep_devices, provider_options
    from edgeq.runtime.sessions import session_options

    options = session_options(config=list(execution.session_config))
    options.log_severity_level = 1
    options.add_provider_for_devices(ep_devices(execution)[:1], provider_options(execution))
    with _provider_log() as log:
        try:
            ort.InferenceSession(str(path), options)
            failed = None
        except Exception as err:  # noqa: BLE001
            failed = err
    if failed is None:
        return ""
    types = sorted(set(re.findall(r"type: (\w+) \}", log.text)))
    return one_line(failed) + (f" (unsupported on QNN: {', '.join(types)})" if types else "")


def placement_text(path: Path, execution) -> str:
    """The placement check's verdict in a few words (its one-line error where it fails)."""
    from edgeq.runtime.placement import check_placement

    try:
        placement = check_placement(path, execution)
    except Exception as err:  # noqa: BLE001
        return one_line(err)
    return (f"{sum(placement.nodes_by_provider.values())} nodes, all on {', '.join(placement.nodes_by_provider)}; "
            f"{placement.check.split('; ')[-1]}" if not placement.unfused else f"left: {', '.join(placement.unfused)}")


def _measure(row, out, execution, eval_feeds, reference, kind, tmp, ep_context) -> dict:
    try:
        got, row["load_s"], row["s_per_sample"] = htp_outputs(out, execution, eval_feeds)
    except Exception as err:  # noqa: BLE001
        row["error"] = "on the HTP: " + one_line(err)
        return row
    cos = embedding_cosines(reference, got, eval_feeds) if kind == "minilm" else output_cosines(reference, got)
    row.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()), samples=len(cos))
    if ep_context:
        from edgeq.runtime.ep_context import write_ep_context

        try:
            context = write_ep_context(out, execution, tmp / "context.onnx")
            again, load, _ = htp_outputs(context, execution, eval_feeds[:2])
            row["ep_context"] = {"load_s": round(load, 2), "qdq_load_s": round(row["load_s"], 2),
                                 "identical": all(np.array_equal(a, b) for a, b in zip(again, got[:2]))}
        except Exception as err:  # noqa: BLE001
            row["ep_context"] = {"error": one_line(err)}
    return row


def ort_row(path: Path, shape: tuple[int, ...], calibration, execution, eval_feeds, reference, kind,
            tmp: Path) -> dict:
    """ONNX Runtime's QNN flow, step by step; the first step that fails ends the row."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    row: dict = {"flow": "onnxruntime"}
    start = time.perf_counter()
    step = "make_dim_param_fixed"
    try:
        fixed = fix_shapes(path, tmp / f"{path.stem}.fixed.onnx", shape)
        step = "qnn_preprocess_model"
        pre = tmp / f"{path.stem}.pre.onnx"
        try:
            model = pre if qnn_preprocess_model(str(fixed), str(pre)) else fixed
        except Exception as err:  # noqa: BLE001 - a user goes on without it; the row says so
            row["note"] = f"qnn_preprocess_model failed ({one_line(err)}); quantized without it"
            model = fixed
        step = "get_qnn_qdq_config"
        config = get_qnn_qdq_config(str(model), Reader(calibration), activation_type=QuantType.QUInt16,
                                    weight_type=QuantType.QUInt8, per_channel=True)
        step = "quantize"
        out = tmp / f"{path.stem}.ort-qnn.onnx"
        quantize(str(model), str(out), config)
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{step}: {one_line(err)}"
        return row
    row["compile_s"] = round(time.perf_counter() - start, 1)
    row["scheme"] = "A16W8 (uint16 / uint8 per channel)"
    refused = htp_refusal(out, execution)
    if refused:  # fails fast (the placement check's node-by-node account compiles every partition)
        row["error"] = "on the HTP: " + refused
        return row
    row["placement"] = placement_text(out, execution)
    return _measure(row, out, execution, eval_feeds, reference, kind, tmp, False)


def smollm2_rows(args, execution, tmp: Path) -> list[dict]:
    """SmolLM2-135M prefill at 1 x 256 (the standard windows, each alone): perplexity on the HTP
    against float over the first --windows windows, seconds per window on the simulator."""
    import edgeq
    from edgeq.models import catalog
    from edgeq.models.evaluation import next_token_nll, smollm2_calibration_feeds, smollm2_eval_windows
    from edgeq.options import CompileOptions

    path = catalog.cached("smollm2")
    windows = smollm2_eval_windows(args.shared)[:args.windows]
    feeds = [{"input_ids": w[None, :], "attention_mask": np.ones((1, w.size), np.int64)} for w in windows]
    reference = float_outputs(path, feeds)
    float_ppl = float(np.exp(np.mean([next_token_nll(r[0], w) for r, w in zip(reference, windows)])))
    rows = []
    for weights in args.smollm2_weights.split(","):
        row: dict = {"model": f"SmolLM2-135M ({len(windows)} windows)", "flow": f"edgeq {weights}",
                     "float_ppl": float_ppl}
        try:
            if args.smollm2_compiled:  # a model compiled before (same options), scored on more windows
                out = args.smollm2_compiled
                row["placement"] = placement_text(out, execution)
                got, row["load_s"], row["s_per_sample"] = htp_outputs(out, execution, feeds)
                cpu = float_outputs(out, feeds)
                row["ppl"] = float(np.exp(np.mean([next_token_nll(g[0], w) for g, w in zip(got, windows)])))
                row["ppl_vs_float"] = row["ppl"] / float_ppl - 1
                row["cpu_qdq_ppl"] = float(np.exp(np.mean([next_token_nll(c[0], w) for c, w in zip(cpu, windows)])))
                row["per_window"] = [[float(np.exp(next_token_nll(x[0], w))) for x in (r, g, c)]
                                     for r, g, c, w in zip(reference, got, cpu, windows)]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            start = time.perf_counter()
            shape = (1, windows.shape[1])
            compiled = edgeq.compile(path, "qnn-htp", CompileOptions(verify=False, weights=weights,
                                                                     input_shapes=(("input_ids", shape),)),
                                     calibration=smollm2_calibration_feeds(args.shared, args.calibration),
                                     device=execution.device)
            row["compile_s"] = round(time.perf_counter() - start, 1)
            row["scheme"] = compiled.report.scheme
            out = compiled.save(tmp / f"smollm2.{weights}.qnn-htp.onnx")
            row["placement"] = placement_text(out, compiled.target.execution)
            print(json.dumps(row), flush=True)
            got, row["load_s"], row["s_per_sample"] = htp_outputs(out, compiled.target.execution, feeds)
            nll = [next_token_nll(g[0], w) for g, w in zip(got, windows)]
            row["ppl"] = float(np.exp(np.mean(nll)))
            row["ppl_vs_float"] = row["ppl"] / float_ppl - 1
        except Exception as err:  # noqa: BLE001
            row["error"] = one_line(err)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="edgeq,torchscript,dynamo,ort_fused",
                        help="comma list of: edgeq, torchscript, dynamo, ort_fused (MiniLM), ppocr-det, ppocr-rec, "
                             "smollm2")
    parser.add_argument("--exports", type=Path, default=Path("/tmp/exports"),
                        help="folder of minilm_{torchscript,dynamo,ort_fused}.onnx")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--paragraphs", type=int, default=32, help="WikiText paragraphs to score (MiniLM)")
    parser.add_argument("--images", type=int, default=4, help="random images to score (PP-OCR)")
    parser.add_argument("--calibration", type=int, default=16, help="calibration samples")
    parser.add_argument("--device", default="v73", help="qnn-htp device (htp_arch 73: v73)")
    parser.add_argument("--skip-ort", action="store_true", help="edgeq only, no ONNX Runtime flow")
    parser.add_argument("--ort-only", action="store_true", help="ONNX Runtime's flow only, no edgeq compile")
    parser.add_argument("--windows", type=int, default=1, help="SmolLM2 windows of 256 tokens to score")
    parser.add_argument("--smollm2-weights", default="int8", help="comma list of int8, int4 (SmolLM2)")
    parser.add_argument("--smollm2-compiled", type=Path,
                        help="score this qnn-htp SmolLM2 model (compiled before, e.g. with --keep) instead of compiling")
    parser.add_argument("--out", type=Path, default=Path("build/bench-qnn"))
    parser.add_argument("--keep", action="store_true", help="keep the compiled models in OUT/models")
    args = parser.parse_args()

    from edgeq.models.evaluation import minilm_calibration_feeds, minilm_eval_paragraphs, minilm_tokenize
    from edgeq.registry import get_target
    from edgeq.runtime.providers import for_device

    execution = for_device(get_target("qnn-htp").executions[0], args.device)
    header = run_header()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    names = [n for n in args.models.split(",") if n]
    minilm_feeds = minilm_calib = None
    if any(n in MINILM for n in names):
        tokens = minilm_tokenize(minilm_eval_paragraphs(args.shared)[:args.paragraphs])
        minilm_feeds = [{k: v[i:i + 1] for k, v in tokens.items()} for i in range(args.paragraphs)]
        minilm_calib = minilm_calibration_feeds(args.shared, args.calibration)
    first_minilm = True
    with tempfile.TemporaryDirectory(prefix="bench-qnn-") as tmp_name:
        if args.keep:
            tmp_name = str(args.out / "models")
        for name in names:
            tmp = Path(tmp_name) / name
            tmp.mkdir(parents=True, exist_ok=True)
            if name == "smollm2":
                rows.extend(smollm2_rows(args, execution, tmp))
                continue
            if name in MINILM:
                path, kind = minilm_path(name, args.exports), "minilm"
                if path is None:
                    rows.append({"model": f"MiniLM {name}", "flow": "-", "error": "export not found"})
                    continue
                shape, feeds, calib = (1, SEQ), minilm_feeds, minilm_calib
                shape_args = (("input_ids", shape), ("attention_mask", shape), ("token_type_ids", shape))
                label = f"MiniLM ({'edgeq build' if name == 'edgeq' else name})"
            else:
                path, kind = ppocr_path(name), "ppocr"
                shape = PPOCR[name][1]
                import onnx

                input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
                rec = name == "ppocr-rec"
                page = {"lines": 1, "rec": True} if rec else {}
                calib = [{input_name: text_image(*shape[2:], seed=i, **page)} for i in range(args.calibration)]
                feeds = [{input_name: text_image(*shape[2:], seed=100 + i, **page)} for i in range(args.images)]
                shape_args = ((input_name, shape),)
                label = name
            print(f"[{time.strftime('%H:%M:%S')}] {label}: float reference", flush=True)
            reference = float_outputs(path, feeds)
            note = ""
            if kind == "ppocr":
                path, flushed = flush_subnormals(path, tmp / path.name)
                note = f"{flushed} subnormal weights set to 0 before both flows" if flushed else ""
            if not args.ort_only:
                print(f"[{time.strftime('%H:%M:%S')}] {label}: edgeq", flush=True)
                row = edgeq_row(path, shape_args, calib, execution, feeds, reference, kind, tmp,
                                ep_context=kind == "minilm" and first_minilm)
                first_minilm = first_minilm and kind != "minilm"
                rows.append({"model": label, **row, **({"input_note": note} if note else {})})
                print(json.dumps(rows[-1]), flush=True)
            if not args.skip_ort:
                print(f"[{time.strftime('%H:%M:%S')}] {label}: onnxruntime flow", flush=True)
                rows.append({"model": label, **ort_row(path, shape, calib, execution, feeds, reference, kind, tmp),
                             **({"input_note": note} if note else {})})
                print(json.dumps(rows[-1]), flush=True)
    header.append(load_line("at end"))
    lines = [*(f"- {h}" for h in header), "", f"HTP simulator, device {execution.device} "
             f"({dict(execution.provider_options).get('htp_arch')}), CPU fallback disabled", "",
             "| model | flow | compile (s) | placement | cosine mean / min (n) or perplexity "
             "| s / sample on the simulator | "
             "error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cos = f"{r['cos_mean']:.5f} / {r['cos_min']:.5f} ({r['samples']})" if "cos_mean" in r else "-"
        if "ppl" in r:
            cos = f"ppl {r['ppl']:.3f} (float {r['float_ppl']:.3f}, {100 * r['ppl_vs_float']:+.2f}%)"
        per = f"{r['s_per_sample']:.2f}" if "s_per_sample" in r else "-"
        error = "; ".join(x for x in (r.get("input_note", ""), r.get("note", ""), r.get("error", "")) if x)
        lines.append(f"| {r['model']} | {r['flow']} | {r.get('compile_s', '-')} | {r.get('placement', '-')} | {cos} "
                     f"| {per} | {error} |")
    for r in rows:
        if "ep_context" in r:
            lines.append("")
            lines.append(f"EP context ({r['model']}): {json.dumps(r['ep_context'])}")
    text = "\n".join(lines)
    (args.out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
