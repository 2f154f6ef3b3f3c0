"""ONNX Runtime's own quantizers on MiniLM and SmolLM2, measured in the edgeq harness.

    python tools/ort_baselines.py [--models minilm,smollm2] [--out DIR] [--threads N]

Methods (ORT defaults otherwise; int8 ones after ORT's recommended `quant_pre_process`):
- dynamic int8: `quantize_dynamic`, per-channel int8 weights;
- static QDQ: `quantize_static`, U8S8, MinMax, per-channel, calibrated on SmolLM2 windows
  1000-1015 / MiniLM paragraphs 256-271 (disjoint from evaluation); MiniLM both all ops and
  MatMul only;
- int4: `MatMulNBitsQuantizer`, symmetric, block 128 (MatMulNBits, weight-only).
Prints a markdown table (model, method, metric, size, time, peak memory) with the float rows.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quant_pre_process, quantize_dynamic,
                                      quantize_static)
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_SHARED, load_line, markdown_table, run_header  # noqa: E402

from edgeq.models import evaluation  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.models.evaluation import EvalResult, Feeds  # noqa: E402
from edgeq.models import catalog  # noqa: E402

CALIBRATION_SAMPLES = 16
Quantizer = Callable[[Path, Path, Path], None]  # (float model, preprocessed model, output)


class FeedsReader(CalibrationDataReader):
    """ORT's calibration protocol over a list of feeds."""

    def __init__(self, feeds: list[Feeds]):
        self._feeds = feeds
        self._iter: Iterator[Feeds] = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def dynamic_int8(_: Path, preprocessed: Path, out: Path) -> None:
    quantize_dynamic(preprocessed, out, per_channel=True, weight_type=QuantType.QInt8)


def static_qdq(calibration: list[Feeds], op_types: list[str] | None) -> Quantizer:
    def run(_: Path, preprocessed: Path, out: Path) -> None:
        quantize_static(preprocessed, out, FeedsReader(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=op_types, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return run


def int4_matmulnbits(float_model: Path, _: Path, out: Path) -> None:
    quantizer = MatMulNBitsQuantizer(onnx.load(str(float_model)), bits=4, block_size=128,
                                     is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def methods(model: str, shared: Path) -> dict[str, Quantizer]:
    if model == "smollm2":
        calibration = evaluation.smollm2_calibration_feeds(shared, CALIBRATION_SAMPLES)
        return {"ORT dynamic int8 (per-channel)": dynamic_int8,
                "ORT static QDQ U8S8 MinMax (per-channel)": static_qdq(calibration, None),
                "ORT MatMulNBits int4 sym block 128": int4_matmulnbits}
    calibration = evaluation.minilm_calibration_feeds(shared, CALIBRATION_SAMPLES)
    return {"ORT dynamic int8 (per-channel)": dynamic_int8,
            "ORT static QDQ U8S8 MinMax (per-channel), all ops": static_qdq(calibration, None),
            "ORT static QDQ U8S8 MinMax (per-channel), MatMul only": static_qdq(calibration, ["MatMul"]),
            "ORT MatMulNBits int4 sym block 128": int4_matmulnbits}


def evaluate(model: str, path: Path, shared: Path, threads: int,
             reference: EvalResult | None) -> EvalResult:
    if model == "smollm2":
        return evaluation.evaluate_smollm2(path, shared, threads)
    return evaluation.evaluate_minilm(path, shared, reference.outputs if reference else None, threads)


def baseline_rows(model: str, out_dir: Path, shared: Path,
                  threads: int) -> Iterator[tuple[str, str, EvalResult]]:
    float_path = catalog.cached(model)
    click.echo(f"[{model}] float: {float_path}", err=True)
    reference = evaluate(model, float_path, shared, threads, None)
    yield model, "float32 (edgeq build)", reference
    preprocessed = out_dir / f"{model}-preprocessed.onnx"
    # auto_merge: BERT's sliced position_ids give a Min(512, sequence) dim that symbolic shape
    # inference cannot otherwise equate with `sequence` (as for torch.onnx exports of BERT).
    quant_pre_process(float_path, preprocessed, auto_merge=True)
    for index, (method, quantize) in enumerate(methods(model, shared).items()):
        click.echo(f"[{model}] {method}", err=True)
        out = out_dir / f"{model}-ort-{index}.onnx"
        quantize(float_path, preprocessed, out)
        yield model, method, evaluate(model, out, shared, threads, reference)


@click.command()
@click.option("--models", default="minilm,smollm2", show_default=True,
              help="Comma-separated: minilm, smollm2.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the quantized models here (default: a temporary folder).")
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=DEFAULT_SHARED, show_default=True)
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: its default).")
def main(models: str, out: Path | None, shared: Path, threads: int) -> None:
    """ONNX Runtime's quantizers on the real models, as a markdown table beside float."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = set(names) - {"minilm", "smollm2"}
    if unknown:
        raise click.BadParameter(f"unknown models: {', '.join(sorted(unknown))}", param_hint="--models")
    header = run_header()
    with tempfile.TemporaryDirectory(prefix="edgeq-ort-") as tmp:
        out_dir = out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            rows = [row for name in names for row in baseline_rows(name, out_dir, shared, threads)]
        except EdgeqError as err:
            raise click.ClickException(str(err)) from err
    click.echo("\n".join([*header, load_line("at end")]) + "\n")
    click.echo(markdown_table(rows))


if __name__ == "__main__":
    main()
