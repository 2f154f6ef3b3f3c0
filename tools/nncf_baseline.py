"""NNCF, Intel's quantizer for OpenVINO, on the same models and calibration data as edgeq.

NNCF is not a dependency of edgeq: run this in a scratch virtual environment, never in the
project's (its pins differ, e.g. numpy):

    python3 -m venv /tmp/nncf-venv
    /tmp/nncf-venv/bin/pip install -e '.[models,openvino]' nncf
    /tmp/nncf-venv/bin/python tools/nncf_baseline.py --models minilm,smollm2 --out build/bench-openvino

then measure its outputs beside edgeq's, in the project's environment:

    python tools/bench_openvino.py --nncf-minilm build/bench-openvino/minilm.nncf.onnx \
        --nncf-smollm2 build/bench-openvino/smollm2.nncf.onnx --threads 2,16

`nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER)` on the ONNX model (ONNX
backend: the output is QDQ ONNX, run by the same ONNX Runtime providers as edgeq's), with
NNCF's defaults otherwise (SmoothQuant on for transformers, MinMax ranges, symmetric int8
weights per channel); calibrated on the samples edgeq's MiniLM and SmolLM2 benchmarks use
(16 MiniLM paragraphs / 18 SmolLM2 windows, disjoint from the evaluation data). Also prints the
accuracy of each output on ORT's CPU provider (MiniLM cosine, SmolLM2 perplexity).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, run_header  # noqa: E402


def quantize(model: str, out: Path, shared: Path) -> Path:
    import nncf
    import onnx

    from edgeq.models import catalog, evaluation

    float_path = catalog.cached(model)
    if model == "minilm":
        samples = evaluation.minilm_calibration_feeds(shared, 16)
    else:
        samples = evaluation.smollm2_calibration_feeds(shared, 18)
    proto = onnx.load(str(float_path))
    start = time.perf_counter()
    quantized = nncf.quantize(proto, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(samples))
    path = out / f"{model}.nncf.onnx"
    onnx.save(quantized, str(path), save_as_external_data=quantized.ByteSize() > 2**31 - 2**20)
    print(f"[{model}] NNCF quantize {time.perf_counter() - start:.0f} s -> {path}", file=sys.stderr)
    return path


def accuracy(model: str, path: Path, shared: Path, threads: int) -> dict[str, float]:
    from edgeq.models import catalog, evaluation

    if model == "minilm":
        reference = evaluation.evaluate_minilm(catalog.cached(model), shared, threads=threads).outputs
        return evaluation.evaluate_minilm(path, shared, reference, threads).metrics
    return evaluation.evaluate_smollm2(path, shared, threads).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm")
    parser.add_argument("--out", type=Path, default=Path("build/bench-openvino"))
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import nncf

    for line in run_header() + [f"nncf {nncf.__version__}"]:
        print(line)
    for model in args.models.split(","):
        path = quantize(model, args.out, args.shared)
        print(f"{model}: {path} {accuracy(model, path, args.shared, args.threads)}")


if __name__ == "__main__":
    main()
