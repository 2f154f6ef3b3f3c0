"""The ARM targets' output on a real aarch64 ONNX Runtime: the PyPI manylinux aarch64 wheel under
QEMU user-mode emulation (tools/aarch64_ort.py; `setup` from nothing needs Debian's apt-get and
PyPI, no root), compared with the x86 run of the same file.

One emulated CPU per MLAS kernel family (the instructions each ran are checked too):
cortex-a53 (no dot product: the SMULL/SMLAL NEON kernels), cortex-a76 (SDOT/UDOT), neoverse-n2
(SMMLA/UMMLA, KleidiAI i8mm); each target runs on its family's CPU.

What agrees and what does not, measured (synthetic BERT and Llama, 2 held-out samples):
- integer kernels: MatMulInteger U8S8, S8S8 and U8U8 give bit-identical int32 on every CPU,
  except MLAS's NEON kernel on cortex-a53 with a -128 weight next to a -128 (s8) activation:
  two products of 16384 wrap in its 16-bit lane (off by 2^16 per pair), which is why arm-neon
  weights keep -127..127;
- W8A8: Llama's logits are bit-identical to x86; BERT differs by float rounding only, in the
  float ops around the integer kernels (LayerNorm, GELU, Softmax, the requantization scales:
  NEON vs AVX-512 code), max |diff| 2.4e-4 (3.6e-7 of the largest output);
- W4A16 (MatMulNBits, accuracy level 4): on cortex-a76 and neoverse-n2 the activation is
  quantized per block of 32 as on x86, max relative diff 6e-6; cortex-a53 has no CompInt8
  kernel and computes in fp32, so it is compared with x86 at accuracy level 1 (fp32 too): 1.2e-6.
  Against x86's default level 4 it differs by the activation's int8 rounding: Llama cosine
  0.967 (its planted activation outliers), BERT 0.9999999.

The slow tests take about 45 s on this 2-core machine when it is quiet, 75 s under load (+25-40 s
to set the emulation up the first time, cached in $EDGEQ_CACHE/aarch64). It skips, saying why, only when the emulation cannot
be set up (no apt-get/dpkg-deb, not Debian, no network).
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.compiler import compile
from edgeq.models import synthetic
from edgeq.options import CompileOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_OF = {"arm-neon": "cortex-a53", "arm-dotprod": "cortex-a76", "arm-i8mm": "neoverse-n2"}
SCHEMES = {"W8A8": {}, "W4A16": {"weights": "int4", "activations": "float", "rotate": False}}
LEVEL_1 = {"session.qdq_matmulnbits_accuracy_level": "1"}   # MatMulNBits in fp32 (CompFp32)


@cache
def _tool():
    spec = importlib.util.spec_from_file_location("aarch64_ort", REPO_ROOT / "tools" / "aarch64_ort.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["aarch64_ort"] = module
    spec.loader.exec_module(module)
    return module


# ---- the tool's own logic (no emulation) ------------------------------------------------------

def test_trace_decoder_names_the_kernel_instructions_qemu_prints_as_bytes(tmp_path):
    """QEMU's disassembler prints Armv8.2+ instructions as `.byte`; the encodings name them."""
    trace = tmp_path / "trace.log"
    trace.write_text("\n".join([
        "IN: ",
        "0x0000ffff0000:  4e829420  .byte    0x20, 0x94, 0x82, 0x4e",      # sdot v0.4s, v1.16b, v2.16b
        "0x0000ffff0004:  6e829420  .byte    0x20, 0x94, 0x82, 0x6e",      # udot
        "0x0000ffff0008:  6f87e87d  .byte    0x7d, 0xe8, 0x87, 0x6f",      # udot by element
        "0x0000ffff000c:  4e84a410  .byte    0x10, 0xa4, 0x84, 0x4e",      # smmla v16.4s, v0.16b, v4.16b
        "0x0000ffff0010:  6e84a410  .byte    0x10, 0xa4, 0x84, 0x6e",      # ummla
        "0x0000ffff0014:  0e24c00c  smull    v12.8h, v0.8b, v4.8b",
        "0x0000ffff0018:  4e21cc00  fmla     v0.4s, v0.4s, v1.4s",
        "0x0000ffff001c:  91000400  add      x0, x0, #1",
    ]))
    assert _tool().count_instructions(trace) == {"sdot": 1, "udot": 2, "smmla": 1, "ummla": 1, "smull": 1,
                                                 "fmla.4s": 1}


def test_samples_round_trip_one_or_several(tmp_path):
    tool = _tool()
    one = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3)}]
    several = [{"ids": np.full((1, i + 2), i, np.int64), "mask": np.ones((1, i + 2), np.int64)} for i in range(3)]
    for samples in (one, several):
        tool.save_samples(tmp_path / "s.npz", samples)
        back = tool.load_samples(tmp_path / "s.npz")
        assert len(back) == len(samples)
        for a, b in zip(back, samples):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- on the emulated aarch64 ONNX Runtime -----------------------------------------------------

@pytest.fixture(scope="module")
def emulator():
    tool = _tool()
    try:
        return tool.setup(log=lambda message: None)
    except tool.SetupError as err:
        pytest.skip(f"the aarch64 emulation cannot be set up here: {err}")


def _integer_models(directory: Path) -> dict[str, tuple[Path, dict]]:
    """MatMulInteger probes: random U8S8 / S8S8 / U8U8 with zero points, and the wrap case."""
    rng = np.random.default_rng(0)
    m, k, n = 24, 96, 40
    cases = {}
    for a_type, b_type in (("u8", "s8"), ("s8", "s8"), ("u8", "u8")):
        a_np, b_np = (np.uint8 if t == "u8" else np.int8 for t in (a_type, b_type))
        lo_a, lo_b = (0 if t == "u8" else -128 for t in (a_type, b_type))
        cases[f"{a_type}{b_type}"] = (rng.integers(lo_a, lo_a + 256, (m, k)).astype(a_np),
                                      rng.integers(lo_b, lo_b + 256, (k, n)).astype(b_np), np.array(3, a_np))
    for weight in (-128, -127):        # s8 activations at -128 against two adjacent weights of `weight`
        cases[f"wrap{weight}"] = (np.full((m, k), -128, np.int8), np.full((k, n), weight, np.int8), None)
    out = {}
    for name, (a, b, zero) in cases.items():
        elem = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}
        inputs = ["a", "b"] + (["za"] if zero is not None else [])
        inits = [numpy_helper.from_array(b, "b")] + ([numpy_helper.from_array(zero, "za")] if zero is not None else [])
        graph = helper.make_graph([helper.make_node("MatMulInteger", inputs, ["y"])], name,
                                  [helper.make_tensor_value_info("a", elem[a.dtype], list(a.shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])], inits)
        path = directory / f"mmi_{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
        out[name] = (path, {"a": a})
    return out


def _x86(path: Path, samples: list[dict], config: dict | None = None) -> list[dict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, feed))) for feed in samples]


@pytest.fixture(scope="module")
def runs(emulator, tmp_path_factory):
    """Every model compiled, then run in one emulated process per CPU:
    runs[(cpu, key)] = (aarch64 outputs, x86 outputs of the same file)."""
    tool = _tool()
    directory = tmp_path_factory.mktemp("arm")
    sources = {"bert": (synthetic.build_bert_file(directory / "bert.onnx", seed=0),
                        [synthetic.bert_feeds(batch=1, seq=16, seed=i) for i in range(8)],
                        [synthetic.bert_feeds(batch=2, seq=16, seed=100 + i) for i in range(2)]),
               "llama": (synthetic.build_llama_file(directory / "llama.onnx", seed=0),
                         [synthetic.llama_feeds(batch=1, seq=16, seed=i) for i in range(8)],
                         [synthetic.llama_feeds(batch=1, seq=16, seed=100 + i) for i in range(2)])}
    jobs: dict[str, list] = {cpu: [] for cpu in CPU_OF.values()}
    for model, (path, calibration, held_out) in sources.items():
        for target, cpu in CPU_OF.items():
            for scheme, options in SCHEMES.items():
                compiled = directory / f"{model}.{target}.{scheme}.onnx"
                compile(path, target, CompileOptions(verify=False, **options), calibration=calibration).save(compiled)
                # no CompInt8 kernel without the dot product: x86 computes MatMulNBits in fp32 too
                config = LEVEL_1 if scheme == "W4A16" and cpu == "cortex-a53" else None
                jobs[cpu].append(((model, target, scheme), compiled, held_out, _x86(compiled, held_out, config)))
    for name, (path, feed) in _integer_models(directory).items():
        for cpu in jobs:
            jobs[cpu].append((("int", name), path, [feed], _x86(path, [feed])))
    results = {}
    for cpu, entries in jobs.items():
        specs = []
        for i, (key, path, samples, _) in enumerate(entries):
            inputs = directory / f"{cpu}-{i}-in.npz"
            tool.save_samples(inputs, samples)
            specs.append({"model": str(path), "inputs": str(inputs), "outputs": str(directory / f"{cpu}-{i}-out.npz"),
                          "threads": 1})
        metas = emulator.run(cpu, specs, timeout=900)
        assert {m["machine"] for m in metas} == {"aarch64"}
        for (key, _, _, x86), spec in zip(entries, specs):
            results[(cpu, key)] = (tool.load_samples(Path(spec["outputs"])), x86)
    return results


@pytest.mark.slow
def test_the_emulated_cpus_expose_one_kernel_family_each(emulator):
    features = {cpu: set(emulator.features(cpu)["features"]) for cpu in CPU_OF.values()}
    assert "asimddp" not in features["cortex-a53"] and "fphp" not in features["cortex-a53"]
    assert {"asimddp", "fphp", "asimdhp"} <= features["cortex-a76"] and "i8mm" not in features["cortex-a76"]
    assert {"asimddp", "i8mm", "bf16"} <= features["neoverse-n2"]


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["u8s8", "s8s8", "u8u8"])
@pytest.mark.parametrize("cpu", list(CPU_OF.values()))
def test_integer_kernels_are_bit_identical_to_x86(runs, cpu, pair):
    (arm,), (x86,) = runs[(cpu, ("int", pair))]
    assert arm["y"].dtype == np.int32 and np.array_equal(arm["y"], x86["y"])


@pytest.mark.slow
def test_the_neon_kernel_wraps_minus_128_pairs_that_arm_neon_weights_never_store(runs):
    for cpu in CPU_OF.values():
        (arm,), (x86,) = runs[(cpu, ("int", "wrap-127"))]
        assert np.array_equal(arm["y"], x86["y"])                            # 2 x 128 x 127 fits 16 bits
        (arm,), (x86,) = runs[(cpu, ("int", "wrap-128"))]
        if cpu == "cortex-a53":   # 32768 wraps to -32768 in each of the K/2 pairs
            assert np.all(x86["y"] == 96 * 16384) and np.all(arm["y"] - x86["y"] == -48 * 65536)
        else:
            assert np.array_equal(arm["y"], x86["y"])


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("target", list(CPU_OF))
@pytest.mark.parametrize("model", ["bert", "llama"])
def test_compiled_model_matches_the_x86_run_of_the_same_file(runs, model, target, scheme):
    arm, x86 = runs[(CPU_OF[target], (model, target, scheme))]
    assert len(arm) == len(x86) == 2
    for ours, theirs in zip(arm, x86):
        assert ours.keys() == theirs.keys()
        for name in theirs:
            a, b = ours[name].astype(np.float64), theirs[name].astype(np.float64)
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            cosine = (a2 * b2).sum(1) / np.linalg.norm(a2, axis=1) / np.linalg.norm(b2, axis=1)
            assert cosine.min() >= 0.9999, (name, cosine)
            # float rounding only (measured <= 6e-6 of the largest output)
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), (name, np.abs(a - b).max())


@pytest.mark.slow
def test_neoverse_n2_runs_the_i8mm_kernel(emulator, tmp_path):
    """The kernel family is what the emulated CPU selects: neoverse-n2 runs UMMLA for U8S8."""
    tool = _tool()
    path, feed = _integer_models(tmp_path)["u8s8"]
    counts = tool.probe(emulator, "neoverse-n2", path, [feed])
    assert counts.get("ummla", 0) > 0 and counts.get("udot", 0) == 0 and counts.get("sdot", 0) == 0
