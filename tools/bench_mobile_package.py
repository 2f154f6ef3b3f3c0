"""`edgeq package --platform android|ios` on the real models (issue 14): MiniLM W8A8 compiled for
x86-vnni and arm-dotprod, SmolLM2 W4A16 for arm-dotprod, and their float models, each packaged
for Android and iOS; prints the .ort check (outputs against the .onnx), the package sizes (model,
operator config, tokenizer) and the share of nodes each mobile provider would take, float vs
compiled.

    python tools/bench_mobile_package.py [--out /tmp/edgeq-mobile] [--no-smollm2]

Compiled files are cached in --out (delete them to recompile). MiniLM is calibrated on 16
WikiText paragraphs (tools/bench_arm.py's samples); SmolLM2 W4A16 on 4 windows of 128 WikiText
tokens with round-to-nearest weights (the package holds the same graph whatever the rounding).
Each model gets three packages: Android and iOS for the CPU provider (.ort at the "all" level) and
Android for NNAPI ("basic": every QDQ node unit kept; refused for int4 weights, which the .ort
schema cannot hold unfused); the float models get the
compiled model's recorded input shapes (--input-shape) so that both report the same fixed-shape
graph.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("EDGEQ_PROVIDER", "cpu")  # the same provider on any x86 machine

from _common import DEFAULT_SHARED, run_header  # noqa: E402
from edgeq.models import catalog, evaluation, minilm  # noqa: E402

from edgeq.calibration.sources import TokenWindows  # noqa: E402
from edgeq.compiler import compile as edgeq_compile  # noqa: E402
from edgeq.metadata import recorded_input_shapes  # noqa: E402
from edgeq.options import CompileOptions  # noqa: E402
from edgeq.packaging.folder import PackageError
from edgeq.packaging.mobile import MobileOptions, package_mobile  # noqa: E402

# The .ort at the basic level is the same for every QDQ-lowering provider and platform; the
# usability report (the same whatever the package's provider) comes from the CPU packages.
PACKAGES = (("android", "cpu"), ("android", "nnapi"), ("ios", "cpu"))


def _compile(out: Path, name: str, source: Path, target: str, options: CompileOptions, calibration) -> Path:
    path = out / name
    if not path.exists():
        start = time.perf_counter()
        compiled = edgeq_compile(source, target, options, calibration=calibration)
        compiled.save(path)
        print(f"compiled {name} in {time.perf_counter() - start:.0f} s: "
              + "; ".join(compiled.report.summary_lines()[:2]), flush=True)
    return path


def _shapes(path: Path) -> dict[str, list[int]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return recorded_input_shapes({p.key: p.value for p in model.metadata_props})


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/edgeq-mobile"))
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_SHARED)
@click.option("--smollm2/--no-smollm2", default=True, show_default=True)
def main(out: Path, shared: Path, smollm2: bool) -> None:
    print("\n".join(run_header()))
    out.mkdir(parents=True, exist_ok=True)
    minilm_float = catalog.cached("minilm")
    minilm_calibration = evaluation.minilm_calibration_feeds(shared, 16)
    minilm_tokenizer = minilm.tokenizer_path()
    models = []  # (label, path, tokenizer, input shapes for a float model)
    compiled_minilm = {t: _compile(out, f"minilm.{t}.w8a8.onnx", minilm_float, t, CompileOptions(), minilm_calibration)
                       for t in ("x86-vnni", "arm-dotprod")}
    shapes = _shapes(compiled_minilm["x86-vnni"])
    models.append(("MiniLM float", minilm_float, minilm_tokenizer, shapes))
    models += [(f"MiniLM W8A8 {t}", p, minilm_tokenizer, {}) for t, p in compiled_minilm.items()]
    if smollm2:
        smollm2_float = catalog.cached("smollm2")
        windows = TokenWindows(shared / "reference" / "wikitext2_test_smollm2_ids.npy", 128, 4)
        w4a16 = _compile(out, "smollm2.arm-dotprod.w4a16.onnx", smollm2_float, "arm-dotprod",
                         CompileOptions(weights="int4", activations="float", weight_rounding="rtn"), windows)
        smollm2_tokenizer = shared / "reference" / "smollm2_tokenizer.json"
        models.append(("SmolLM2 float", smollm2_float, smollm2_tokenizer, _shapes(w4a16)))
        models.append(("SmolLM2 W4A16 arm-dotprod", w4a16, smollm2_tokenizer, {}))

    checks, sizes, shares, refused = [], [], [], []
    for label, path, tokenizer, float_shapes in models:
        onnx_bytes = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
        for platform, provider in PACKAGES:
            folder = out / "packages" / f"{label.replace(' ', '_')}.{platform}.{provider}"
            start = time.perf_counter()
            options = MobileOptions(platform, provider=provider, overwrite=True,
                                    input_shapes=tuple((k, tuple(v)) for k, v in float_shapes.items()))
            try:
                package = package_mobile(path, folder, options, tokenizer=tokenizer)
            except PackageError as err:
                refused.append((label, platform, provider, str(err)))
                print(f"refused {label} for {platform}/{provider}: {err}", flush=True)
                continue
            seconds = time.perf_counter() - start
            facts = json.loads((folder / "model_facts.json").read_text())
            usability = json.loads((folder / "mobile_usability.json").read_text())
            check, fmt = facts["check"], facts["ort_format"]
            checks.append((label, platform, provider, fmt["optimization_level"], check["max_abs_diff"],
                           check["max_abs_diff_vs_default_session"], fmt["qdq"], facts["source"]["nodes"], fmt["nodes"],
                           seconds))
            roles = package.bytes_by_role()
            sizes.append((label, platform, provider, fmt["optimization_level"], onnx_bytes, roles.get("model", 0),
                          roles.get("config", 0), roles.get("tokenizer", 0), package.total_bytes))
            fixed = {p["provider"]: p for p in usability.get("with_recorded_shapes_fixed", {}).get("providers", [])}
            if provider == "cpu":  # the usability report is the same in every package of a model and platform
                for use in usability["providers"]:
                    shares.append((label, platform, use, fixed.get(use["provider"])))
            print(f"packaged {label} for {platform}/{provider} in {seconds:.0f} s", flush=True)

    print("\n.ort check: the .ort loaded in ONNX Runtime (Python, CPU provider) against the .onnx it came from, "
          "same level and settings; and against a default session of the .onnx\n")
    print("| model | platform / provider | .ort level | max abs diff, same level | max abs diff vs default session "
          "| Q / DQ nodes .onnx -> .ort | nodes .onnx -> .ort | package s |")
    print("|---|---|---|---:|---:|---|---|---:|")
    for label, platform, provider, level, diff, default, qdq, n_onnx, n_ort, seconds in checks:
        print(f"| {label} | {platform} / {provider} | {level} | {diff:.3g} | {default:.3g} | "
              f"{qdq['onnx']['QuantizeLinear']} / {qdq['onnx']['DequantizeLinear']} -> "
              f"{qdq['ort']['QuantizeLinear']} / {qdq['ort']['DequantizeLinear']} | {n_onnx} -> {n_ort} | {seconds:.0f} |")

    for label, platform, provider, message in refused:
        print(f"| {label} | {platform} / {provider} | refused: {message} |")

    print("\nPackage sizes (bytes)\n")
    print("| model | platform / provider | .ort level | .onnx (+data) | model.ort | operator config | tokenizer "
          "| package total |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for label, platform, provider, level, onnx_bytes, model_bytes, config, tok, total in sizes:
        print(f"| {label} | {platform} / {provider} | {level} | {onnx_bytes:,} | {model_bytes:,} | {config:,} | "
              f"{tok:,} | {total:,} |")

    print("\nShare of nodes each mobile provider would take (graph at the basic level; dynamic [batch, seq] inputs "
          "as exported, and with the recorded input shapes fixed)\n")
    print("| model | provider | nodes taken, dynamic shapes | partitions | nodes taken, shapes fixed | partitions "
          "| suitability (fixed) | ops not taken (fixed) |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    seen = set()
    for label, platform, use, fixed in shares:
        key = (label, use["provider"])
        if key in seen:
            continue
        seen.add(key)

        def cell(u):
            if u is None:
                return "-", "-"
            if u["taken"] is None:
                return f"not checked ({u['not_checked']})", "-"
            return f"{u['taken']}/{u['nodes']} ({100 * u['share']:.1f}%)", str(u["partitions"])

        dyn, dyn_parts = cell(use)
        fix, fix_parts = cell(fixed)
        notes = fixed if fixed is not None else use
        failed = [c for c in (notes or {}).get("caveats", []) if c.startswith("the QNN session failed")]
        ops = ", ".join(o.removeprefix("ai.onnx:") for o in (notes or {}).get("ops_not_taken", []))
        print(f"| {label} | {use['provider']} | {dyn} | {dyn_parts} | {fix} | {fix_parts} | "
              f"{(notes or {}).get('suitability')} | {ops}{'; ' + failed[0] if failed else ''} |")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
