"""Peak memory of load + save: edgeq against onnx, on a ~650 MB single-file transformer model.

Every measured run is a fresh child process; its peak resident set size comes from the kernel
(`os.wait4` rusage ru_maxrss of that child) and is cross-checked against the child's own
VmHWM. The model is built once (a transformer-shaped stack: token embedding, then per layer
Q/K/V/O and MLP up/down MatMul weights, hidden 1024, MLP 4096) and written with onnx.

    python tools/bench_io_memory.py                 # ~650 MB model in a temporary folder
    python tools/bench_io_memory.py --layers 4      # smaller, for a quick look

Prints a markdown table (file size, peak RSS, peak / file size, and the same above the
interpreter's baseline with the same imports) and checks edgeq's bounds: inline save <= 2x the
file size, external-data save near 1x (<= 1.2x).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, FFN, VOCAB = 1024, 4096, 32000

BUILD = r"""
import sys, numpy as np, onnx
from onnx import TensorProto as T, helper, numpy_helper
path, layers, hidden, ffn, vocab = sys.argv[1], *map(int, sys.argv[2:6])
rng = np.random.default_rng(0)
inits, nodes = [], []
def weight(name, *shape):
    inits.append(numpy_helper.from_array((rng.standard_normal(shape, dtype=np.float32) * 0.02), name))
    return name
def node(op, *inputs, name):
    nodes.append(helper.make_node(op, list(inputs), [name], name=name))
    return name
x = node("Gather", weight("embed.weight", vocab, hidden), "input_ids", name="embed")
for i in range(layers):
    p = f"layers.{i}"
    q = node("MatMul", x, weight(f"{p}.attn.q.weight", hidden, hidden), name=f"{p}.q")
    k = node("MatMul", x, weight(f"{p}.attn.k.weight", hidden, hidden), name=f"{p}.k")
    v = node("MatMul", x, weight(f"{p}.attn.v.weight", hidden, hidden), name=f"{p}.v")
    mix = node("Add", node("Mul", q, k, name=f"{p}.qk"), v, name=f"{p}.mix")
    x = node("Add", x, node("MatMul", mix, weight(f"{p}.attn.o.weight", hidden, hidden), name=f"{p}.o"), name=f"{p}.res1")
    up = node("Relu", node("MatMul", x, weight(f"{p}.mlp.up.weight", hidden, ffn), name=f"{p}.up"), name=f"{p}.act")
    x = node("Add", x, node("MatMul", up, weight(f"{p}.mlp.down.weight", ffn, hidden), name=f"{p}.down"), name=f"{p}.res2")
graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("input_ids", T.INT64, ["n"])],
                          [helper.make_tensor_value_info(x, T.FLOAT, ["n", hidden])], inits)
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
"""

# Each run: imports first (the baseline row does only these), then the work.
PRELUDE = "import sys, numpy, onnx, onnxruntime, edgeq\nsrc, out = sys.argv[1], sys.argv[2]\n"
RUNS = [
    ("baseline: python + imports only", "pass"),
    ("onnx.load + onnx.save", "m = onnx.load(src)\nonnx.save(m, out)"),
    ("edgeq.load + edgeq.save", "g = edgeq.load(src)\nedgeq.save(g, out)"),
    ("onnx.load + onnx.save, external data",
     ("m = onnx.load(src)\nonnx.save(m, out, save_as_external_data=True, all_tensors_to_one_file=True, "
      "location=out.rsplit('/', 1)[-1] + '.data')")),
    ("edgeq.load + edgeq.save, external data", "g = edgeq.load(src)\nedgeq.save(g, out, external_data=True)"),
    ("edgeq.load, read every weight, edgeq.save",
     "g = edgeq.load(src)\n_ = [v.const.numpy().sum() for v in g.initializers]\nedgeq.save(g, out)"),
]
EPILOGUE = ("\nfor line in open('/proc/self/status'):\n"
            "    if line.startswith('VmHWM:'):\n        print('VMHWM_KB', int(line.split()[1]))\n")


def measure(code: str, src: Path, out: Path) -> tuple[int, int, float]:
    """(peak RSS from the kernel, the child's own VmHWM, wall seconds), both in bytes."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + code + EPILOGUE, str(src), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{code}\n{stderr}")
    hwm = next(int(line.split()[1]) for line in stdout.splitlines() if line.startswith("VMHWM_KB"))
    return usage.ru_maxrss * 1024, hwm * 1024, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=11, help="transformer layers (11: ~659 MB)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the model files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-", dir=args.workdir))
    try:
        src = work / "model.onnx"
        subprocess.run([sys.executable, "-c", BUILD, str(src), str(args.layers), str(HIDDEN), str(FFN), str(VOCAB)],
                       check=True)
        size = src.stat().st_size
        rows = []
        baseline = None
        for label, code in RUNS:
            out = work / "out" / "model.onnx"
            out.parent.mkdir(exist_ok=True)
            peak, hwm, wall = measure(code, src, out)
            if baseline is None:
                baseline = peak
            rows.append((label, peak, hwm, wall))
            shutil.rmtree(out.parent)

        import numpy
        import onnx
        import onnxruntime

        import edgeq

        print(f"date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
        print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
        print(f"machine: {platform.platform()}, {os.cpu_count()} cpus; python {platform.python_version()}, "
              f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, "
              f"edgeq {edgeq.__version__}")
        print(f"model: {args.layers} layers, hidden {HIDDEN}, MLP {FFN}, vocab {VOCAB}, float32, one file "
              f"of {size / 2**20:.1f} MiB\n")
        print("| run | file size | peak RSS | peak / file | (peak - baseline) / file | VmHWM | wall |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, peak, hwm, wall in rows:
            print(f"| {label} | {size / 2**20:.0f} MiB | {peak / 2**20:.0f} MiB | {peak / size:.2f}x | "
                  f"{(peak - baseline) / size:.2f}x | {hwm / 2**20:.0f} MiB | {wall:.1f} s |")
        by_label = {label: peak for label, peak, _, _ in rows}
        inline = by_label["edgeq.load + edgeq.save"] / size
        external = by_label["edgeq.load + edgeq.save, external data"] / size
        ok = inline <= 2.0 and external <= 1.2
        print(f"\nedgeq bounds (peak / file): inline {inline:.2f}x <= 2x, external {external:.2f}x <= 1.2x: "
              f"{'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
