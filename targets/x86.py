"""x86 CPU targets, executed by OpenVINO's CPU plugin through ONNX Runtime's OpenVINO provider
where edgeq[openvino] is installed and its plugin lists the CPU (Intel), else by ONNX Runtime's
CPU provider (MLAS integer GEMMs); `--provider openvino|cpu` picks one. Each runtime gets the QDQ
layout its kernels take (see "where the x86 targets run" below).

- x86-vnni: AVX-512 VNNI / AVX-VNNI (vpdpbusd: u8 x s8 -> s32 without saturation), U8S8.
- x86-avx2: no VNNI; vpmaddubsw adds two u8*s8 products into s16 and saturates
  (255*127*2 = 64770 > 32767), so weights keep 7 bits (-64..63), as ORT's `reduce_range` does.
- x86-amx: Sapphire Rapids AMX-INT8 tiles for the integer matmuls (MLAS dispatches U8S8 GEMMs to
  AMX when the CPU has it).
"""

from __future__ import annotations

from edgeq.registry import register_target
from dataclasses import replace

from edgeq.targets.base import (ActivationPlacement, CostModel, DeviceConfig, Execution, Granularity, OpRule,
                                PluginLibrary, QSpec, Target)

# Block sizes of block-wise weights (--group): ONNX Runtime fuses DequantizeLinear(blocked
# along axis 0) -> MatMul into MatMulNBits only for a power of two >= 16 (qdq_selectors.cc,
# DQMatMulNodeGroupSelector; MatMulNBits' schema asks the same).
MATMULNBITS_BLOCKS = tuple(2**k for k in range(4, 16))

ACT_U8 = QSpec("uint8", symmetric=False)                    # activations: asymmetric uint8
W_S8_CHANNEL = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL, block_sizes=MATMULNBITS_BLOCKS)
W_S7_CHANNEL = W_S8_CHANNEL.replace(qrange=(-64, 63))
# int4 weights: block-wise along K, group 128 unless --group says otherwise (MatMulNBits).
W_S4_BLOCK = QSpec("int4", symmetric=True, granularity=Granularity.BLOCK, axis=0, block_size=128,
                   block_sizes=MATMULNBITS_BLOCKS)
# NF4 weights (--weights nf4): 4-bit NormalFloat codes with one absmax per block of K, group 64
# unless --group says otherwise, run by ONNX Runtime's com.microsoft MatMulBnb4 (CPU kernel:
# dequantize to fp32, then SGEMM; weight-only). Block sizes: powers of two 16..256 (its kernel's).
BNB4_BLOCKS = (16, 32, 64, 128, 256)
W_NF4_BLOCK = QSpec("nf4", symmetric=True, granularity=Granularity.BLOCK, axis=0, block_size=64,
                    block_sizes=BNB4_BLOCKS)
# FP8 E4M3FN (--weights fp8 [--activations fp8]): float8 QuantizeLinear/DequantizeLinear, weights
# per output channel, activations per tensor, scale amax / 448. No x86 CPU has FP8 arithmetic and
# ONNX Runtime fuses no float8 QDQ into a kernel: an accuracy study (float compute).
W_FP8_CHANNEL = QSpec("float8e4m3fn", symmetric=True, granularity=Granularity.CHANNEL)
EMBEDDING = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL)
# Gemm/Conv bias: int32 with scale s_x * s_w, one per output channel (axis 0 of the bias).
BIAS = QSpec("int32", symmetric=True, granularity=Granularity.CHANNEL, axis=0)


def _ops(weight: QSpec) -> dict[str, OpRule]:
    return {
        # Linear layers and activation x activation matmuls (attention scores, context). The
        # second activation is uint8 too: it is usually a projection's output, whose quantizer
        # ORT fuses into the projection's QGemm only when input and output types agree.
        "MatMul": OpRule(activations=(ACT_U8, ACT_U8), weight=weight, weight_slots=(1,)),
        "Gemm": OpRule(activations=(ACT_U8,), weight=weight, weight_slots=(1,), bias=BIAS),
        "Conv": OpRule(activations=(ACT_U8,), weight=weight, weight_slots=(1,), bias=BIAS),
        # Embedding tables: int8 rows, gathered, then dequantized.
        "Gather": OpRule(activations=(), weight=EMBEDDING, weight_slots=(0,)),
    }


# Work-count prices: cycles per MAC on one core at the kernel's peak rate (1 / MACs per cycle
# per core). Pairs are the stored dtypes (edgeq.cost.count_work: a weight-only linear counts its
# activation as int8, as MatMulNBits computes it); each is priced at the kernel ONNX Runtime
# 1.32's CPU provider runs it with, as its optimized graphs of compiled W8A8, W8A16, W4A16,
# W4A8 and int8 --group models show:
#   uint8 x int8, uint8 x uint8: MatMulIntegerToFloat / QLinearMatMul / QGemm on MLAS's U8S8
#     QGEMM (AMX tiles where the CPU has them);
#   int8 x int8 and int8 x int4 (weight-only linears, int8 or int4, per channel or block-wise) and
#     uint16 x int8 (W8A16, its activation dequantized first): MatMulNBits at accuracy level 4,
#     which quantizes the activation to int8 for MLAS's QNBitGemm CompInt8 kernels, dispatched
#     for AVX2, AVX2-VNNI, AVX-512 and AVX-512-VNNI only (no AMX); 4-bit weights are unpacked
#     first (not priced). A two-digit residual (int8 x int8 too) runs on ORT's U8S8 path after
#     its S8-to-U8 QDQ transform: priced here at the MatMulNBits rate, which is the same rate
#     except on AMX, where it is an upper bound;
#   uint8 x int4 (W4A8), uint16 x uint16 (W8A16 attention), float32 x int8/int4 (weights of a
#     transposed Gemm or a Conv, which MatMulNBits does not cover): no integer kernel; both sides
#     dequantized, an fp32 product.
_ASSUMPTIONS = ("peak rates: every MAC issues at its kernel's peak throughput on one core (no memory bound, no "
                "threading, no cost of quantize/dequantize, layout or unpacking steps)",
                "pairs priced as ONNX Runtime's CPU provider runs them (see the source)",
                "bytes of weights and activations are counted, not priced")


def _cost_model(qgemm_rate: float, nbits_rate: float, fp32_rate: float, source: str,
                **extra_rates: float) -> CostModel:
    """Prices from the kernels' peak MACs per cycle per core: MLAS QGEMM (quantized
    activations), MLAS QNBitGemm CompInt8 (MatMulNBits) and the fp32 SGEMM."""
    rates = {"op_mac_uint8_int8": qgemm_rate, "op_mac_uint8_uint8": qgemm_rate,
             "op_mac_int8_int8": nbits_rate, "op_mac_int8_int4": nbits_rate, "op_mac_uint16_int8": nbits_rate,
             "op_mac_float32_float32": fp32_rate, "op_mac_uint8_int4": fp32_rate, "op_mac_uint16_uint16": fp32_rate,
             "op_mac_float32_int8": fp32_rate, "op_mac_float32_int4": fp32_rate,
             # MatMulBnb4 (--weights nf4): the CPU kernel dequantizes the weight and runs an fp32 GEMM
             "op_mac_float32_nf4": fp32_rate, "op_mac_float32_fp4": fp32_rate,
             # float8 (--weights/--activations fp8): no x86 float8 kernel, both sides dequantized to fp32
             **{f"op_mac_{a}_{w}": fp32_rate for a, w in (("float8e4m3fn", "float8e4m3fn"), ("float8e4m3fn", "float32"),
                                                          ("float32", "float8e4m3fn"), ("uint8", "float8e4m3fn"))},
             **extra_rates}
    return CostModel(unit="cycles on one core (peak)", prices={k: 1 / r for k, r in rates.items()},
                     source=source + "; pairs mapped to kernels per ONNX Runtime 1.32's optimized graphs",
                     assumptions=_ASSUMPTIONS)


_PREPROCESS = ("convert-opset", "identity-elimination", "constant-folding", "canonicalize",
               "canonicalize-shapes", "dead-code-elimination", "shape-inference")
# decompose-outliers (only with --decompose-outliers) runs on the plan and before calibrate, so
# the int8 paths' activation ranges are calibrated without the outlier columns.
_PTQ = _PREPROCESS + ("hadamard-rotation", "linear-to-gemm", "select-precision", "decompose-outliers", "smooth-quant",
                      "awq", "calibrate", "gptq", "sensitivity", "insert-qdq", "fold-scalar-into-dequantize",
                      "dead-code-elimination", "topological-sort")
# int4 presets rotate: SmolLM2 W4A16 g128 GPTQ perplexity 47.39 with rotation, 54.21 without
# (BENCHMARKS.md, issue 5). W8A8 rotates where the graph has a pre-norm residual stream (decoder
# LLMs: the rotation folds into the weights, only the MLP/attention-output Hadamards run online):
# SmolLM2 W8A8, 16 calibration windows, 47.83 (+8.7%) without, 44.83 (+1.9%) with (BENCHMARKS.md,
# issue 16). Post-norm encoders (MiniLM) would need an online Hadamard before every linear group,
# which costs them their int8 speed-up on the CPU provider: rotation stays opt-in (--rotate) there.
_ROTATE_WEIGHTS = frozenset({"int4"})
_ROTATE_STREAM_WEIGHTS = frozenset({"int8"})


# ---- where the x86 targets run ------------------------------------------------------------
# OpenVINO's CPU plugin through ONNX Runtime's OpenVINO execution provider, a plugin library in
# the `onnxruntime-ep-openvino` wheel (edgeq[openvino]); its per-device settings go in the
# provider's `load_config` JSON. What its low-precision transformations (LPT) turn into int8
# kernels, read from the runtime precision of every layer (OpenVINO 2026.4, MiniLM, AVX-512 VNNI):
# - linears (Gemm/MatMul with a constant weight): DQ(u8 asymmetric) x DQ(s8 symmetric per
#   channel) -> FullyConnected u8 (brgemm int8), with a following Q fused as its output type;
# - activation x activation MatMuls (attention scores and context): int8 only when Q and DQ are
#   adjacent (ONNX Runtime's layout, Q -> Reshape/Transpose on integers -> DQ, leaves the DQ
#   outside the MHA subgraph, in f32) and neither input has a zero point: s8 symmetric, or u8
#   with zero point 0 for non-negative tensors (softmax probabilities; an s8 probability loses
#   half its levels: MiniLM cosine 0.9939 instead of 0.9965). Then the whole MHA (MatMul, mask
#   Add, Softmax, MatMul) is one int8 Subgraph kernel. Q -> DQ right after the producer (the
#   FakeQuantize fuses into the projection's FullyConnected as its int8 output; LPT moves the
#   dequantization through the head Reshape/Transpose) beats Q -> DQ before the MatMul, which
#   leaves 24 standalone FakeQuantize layers (MiniLM 16x128, 2 threads: about 20% faster);
# - s8 symmetric linear inputs (NNCF's choice) run no faster than u8 asymmetric here and cost
#   accuracy (MiniLM cosine mean/min 0.99478/0.98340 against 0.99659/0.99176): linears keep u8;
# - LayerNorm, Softmax, residual Adds, GELU stay in the precision hint (f32, or bf16 on AMX).
OPENVINO_PLUGIN = PluginLibrary(package="onnxruntime-ep-openvino", module="onnxruntime_ep_openvino", extra="openvino",
                                device_type="CPU", device_metadata=(("ov_device", "CPU"),), direct_runtime="openvino")
ACT_OPENVINO = QSpec("int8", symmetric=True, unsigned_when_nonnegative=True)


def _openvino_ops(weight: QSpec) -> dict[str, OpRule]:
    ops = _ops(weight)
    ops["MatMul"] = replace(ops["MatMul"], activations=(ACT_OPENVINO, ACT_OPENVINO))
    return ops


def _openvino(weight: QSpec, precision_hint: str) -> Execution:
    return Execution(
        name="openvino", provider="OpenVINOExecutionProvider", plugin=OPENVINO_PLUGIN,
        description=f"OpenVINO's CPU plugin through ONNX Runtime's OpenVINO provider (float ops in {precision_hint})",
        device_config=DeviceConfig("CPU", precision_hint=precision_hint),
        # No CPU fallback: a node OpenVINO does not take is an error, not a silent float path. No
        # QDQ rewriting by ONNX Runtime: its CPU-oriented QDQ transforms are not OpenVINO's (and
        # its S8 activation rewrite fails on this layout: ORT 1.32, QuantizeLinear output_dtype
        # INT8 against a UINT8 zero point).
        session_config=(("session.disable_cpu_ep_fallback", "1"), ("session.disable_quant_qdq", "1")),
        high_precision={"bf16": "bfloat16", "f32": "float32"}[precision_hint],
        placement_check="openvino-runtime-precision", ops=_openvino_ops(weight),
        activation_placement=ActivationPlacement.SOURCE_QDQ)


CPU_PROVIDER = Execution()


def _x86_target(name: str, description: str, weight: QSpec, cost_model: CostModel, *,
                precision_hint: str = "f32", **fields) -> Target:
    """The x86 targets differ in their weight spec and cost model; the rest is shared. They run on
    OpenVINO where its provider is installed and lists this CPU, else on ORT's CPU provider."""
    return register_target(Target(
        executions=(_openvino(weight, precision_hint), CPU_PROVIDER),
        name=name, description=description, ops=_ops(weight), activation=ACT_U8, weight=weight,
        weight_specs={"int4": W_S4_BLOCK, "nf4": W_NF4_BLOCK, "float8e4m3fn": W_FP8_CHANNEL},
        activation_dtypes=frozenset({"uint8", "int8", "int16", "uint16", "float8e4m3fn"}),
        default_pipeline=_PTQ, rotate_weights=_ROTATE_WEIGHTS, rotate_stream_weights=_ROTATE_STREAM_WEIGHTS,
        signed_weight_scales=True, zero_point_weights=frozenset({"int4"}), cost_model=cost_model,
        **fields))


X86_VNNI = _x86_target(
    "x86-vnni", "x86 CPU with AVX-512 VNNI or AVX-VNNI: U8S8, symmetric per-channel int8 weights",
    W_S8_CHANNEL, _cost_model(
        64, 64, 16, "Intel SDM: AVX512_VNNI VPDPBUSD (64 int8 MAC/instr/port), AVX-512 FMA (16 fp32 MAC)"))

X86_AVX2 = _x86_target(
    "x86-avx2", "x86 CPU with AVX2 but no VNNI: U8S8 with 7-bit weights against vpmaddubsw saturation",
    W_S7_CHANNEL, _cost_model(
        32, 32, 16, "Intel SDM: AVX2 VPMADDUBSW+VPMADDWD (32 int8 MAC/instr pair), 2x FMA256 (16 fp32 MAC)"))

X86_AMX = _x86_target(
    "x86-amx",
    "x86 CPU with AMX-INT8/BF16 (Sapphire Rapids and later): int8 matmuls on AMX tiles",
    W_S8_CHANNEL, _cost_model(
        1024, 64, 32, "Intel AMX: TDPBUSD 16x64x16 int8 tile op (1024 MAC/cycle/core), TDPBF16PS "
                      "(512 MAC/cycle/core); AVX-512 VNNI VPDPBUSD (64 int8 MAC) for MatMulNBits; AVX-512 "
                      "2x FMA (32 fp32 MAC)", op_mac_bfloat16_bfloat16=512),
    precision_hint="bf16",
    notes=("BF16: on OpenVINO (the default where edgeq[openvino] is installed and its provider lists the CPU) "
           "the ops kept high run in bf16 (INFERENCE_PRECISION_HINT=bf16, AMX-BF16); ONNX Runtime's CPU provider "
           "has no BF16 kernels for LayerNorm/Softmax/Add, so under it they run in float32.",))
