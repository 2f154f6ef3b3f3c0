"""x86 CPU targets, executed by ONNX Runtime's CPU provider (MLAS integer GEMMs).

- x86-vnni: AVX-512 VNNI / AVX-VNNI (vpdpbusd: u8 x s8 -> s32 without saturation), U8S8.
- x86-avx2: no VNNI; vpmaddubsw adds two u8*s8 products into s16 and saturates
  (255*127*2 = 64770 > 32767), so weights keep 7 bits (-64..63), as ORT's `reduce_range` does.
- x86-amx: Sapphire Rapids AMX-INT8 tiles for the integer matmuls (MLAS dispatches U8S8 GEMMs to
  AMX when the CPU has it).
"""

from __future__ import annotations

from edgeq.registry import register_target
from edgeq.targets.base import CostModel, Granularity, OpRule, QSpec, Target

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
             "op_mac_float32_int8": fp32_rate, "op_mac_float32_int4": fp32_rate, **extra_rates}
    return CostModel(unit="cycles on one core (peak)", prices={k: 1 / r for k, r in rates.items()},
                     source=source + "; pairs mapped to kernels per ONNX Runtime 1.32's optimized graphs",
                     assumptions=_ASSUMPTIONS)


_PREPROCESS = ("convert-opset", "identity-elimination", "constant-folding", "dead-code-elimination",
               "shape-inference")
_PTQ = _PREPROCESS + ("hadamard-rotation", "linear-to-gemm", "select-precision", "smooth-quant", "awq", "calibrate",
                      "gptq", "sensitivity", "insert-qdq", "fold-scalar-into-dequantize", "dead-code-elimination",
                      "topological-sort")
# int4 presets rotate: SmolLM2 W4A16 g128 GPTQ perplexity 47.39 with rotation, 54.21 without
# (BENCHMARKS.md, issue 5). W8A8 keeps rotation opt-in (--rotate): its online Hadamards cost
# run time, and encoders such as MiniLM meet their bounds without it.
_ROTATE_WEIGHTS = frozenset({"int4"})


def _x86_target(name: str, description: str, weight: QSpec, cost_model: CostModel, **fields) -> Target:
    """The x86 targets differ in their weight spec and cost model; the rest is shared."""
    return register_target(Target(
        name=name, description=description, ops=_ops(weight), activation=ACT_U8, weight=weight,
        weight_specs={"int4": W_S4_BLOCK}, activation_dtypes=frozenset({"uint8", "int8", "int16", "uint16"}),
        default_pipeline=_PTQ, rotate_weights=_ROTATE_WEIGHTS, signed_weight_scales=True, cost_model=cost_model,
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
    notes=("BF16: AMX runs BF16 matmuls (TDPBF16PS), but ONNX Runtime's CPU provider has no BF16 kernels for "
           "LayerNorm/Softmax/Add; ops kept high therefore run in float32 under ORT, and BF16 applies where a "
           "BF16-capable runtime executes them.",))
