"""x86 CPU targets, executed by ONNX Runtime's CPU provider (MLAS integer GEMMs).

- x86-vnni: AVX-512 VNNI / AVX-VNNI (vpdpbusd: u8 x s8 -> s32 without saturation), U8S8.
- x86-avx2: no VNNI; vpmaddubsw adds two u8*s8 products into s16 and saturates
  (255*127*2 = 64770 > 32767), so weights keep 7 bits (-64..63), as ORT's `reduce_range` does.
- x86-amx: Sapphire Rapids AMX-INT8 tiles for the integer matmuls (MLAS dispatches U8S8 GEMMs to
  AMX when the CPU has it); BF16 is the declared high precision of the ops kept high.
"""

from __future__ import annotations

from edgeq.registry import register_target
from edgeq.targets.base import CostModel, Execution, Granularity, OpRule, QSpec, Target

ACT_U8 = QSpec("uint8", symmetric=False)                    # activations: asymmetric uint8
W_S8_CHANNEL = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL)
W_S7_CHANNEL = W_S8_CHANNEL.replace(qrange=(-64, 63))
EMBEDDING = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL)


def _ops(weight: QSpec) -> dict[str, OpRule]:
    return {
        # Linear layers and activation x activation matmuls (attention scores, context). The
        # second activation is uint8 too: it is usually a projection's output, whose quantizer
        # ORT fuses into the projection's QGemm only when input and output types agree.
        "MatMul": OpRule(activations=(ACT_U8, ACT_U8), weight=weight, weight_slots=(1,)),
        "Gemm": OpRule(activations=(ACT_U8,), weight=weight, weight_slots=(1,),
                       bias=QSpec("int32", symmetric=True)),
        "Conv": OpRule(activations=(ACT_U8,), weight=weight, weight_slots=(1,),
                       bias=QSpec("int32", symmetric=True)),
        # Embedding tables: int8 rows, gathered, then dequantized.
        "Gather": OpRule(activations=(), weight=EMBEDDING, weight_slots=(0,)),
    }


# Work-count prices from the MLAS kernels' peak per-core throughput (ops per cycle per core):
# AVX-512 VNNI vpdpbusd: 64 u8*s8 MACs per instruction; FP32 FMA: 16 MACs per instruction (AVX-512).
_VNNI_COST = CostModel(
    unit="cycles per core (peak)",
    prices={"op_mac_uint8_int8": 1 / 64, "op_mac_float32_float32": 1 / 16,
            "op_mac_int8_int8": 1 / 64, "op_mac_uint8_uint8": 1 / 64},
    source="Intel SDM: AVX512_VNNI VPDPBUSD (64 int8 MAC/instr/port), AVX-512 FMA (16 fp32 MAC)")

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
    """The x86 targets differ in their weight spec, cost model and high dtype; the rest is shared."""
    return register_target(Target(
        name=name, description=description, ops=_ops(weight), activation=ACT_U8, weight=weight,
        weight_dtypes=frozenset({"int8", "int4"}), activation_dtypes=frozenset({"uint8", "int8", "int16", "uint16"}),
        default_pipeline=_PTQ, rotate_weights=_ROTATE_WEIGHTS, signed_weight_scales=True, cost_model=cost_model,
        **fields))


X86_VNNI = _x86_target(
    "x86-vnni", "x86 CPU with AVX-512 VNNI or AVX-VNNI: U8S8, symmetric per-channel int8 weights",
    W_S8_CHANNEL, _VNNI_COST)

X86_AVX2 = _x86_target(
    "x86-avx2", "x86 CPU with AVX2 but no VNNI: U8S8 with 7-bit weights against vpmaddubsw saturation",
    W_S7_CHANNEL, CostModel(
        unit="cycles per core (peak)",
        prices={"op_mac_uint8_int8": 1 / 32, "op_mac_float32_float32": 1 / 16,
                "op_mac_int8_int8": 1 / 32, "op_mac_uint8_uint8": 1 / 32},
        source="Intel SDM: AVX2 VPMADDUBSW+VPMADDWD (32 int8 MAC/instr pair), 2x FMA256 (16 fp32 MAC)"))

X86_AMX = _x86_target(
    "x86-amx",
    "x86 CPU with AMX-INT8/BF16 (Sapphire Rapids and later): int8 matmuls on AMX tiles, BF16 high precision",
    W_S8_CHANNEL, CostModel(
        unit="cycles per core (peak)",
        prices={"op_mac_uint8_int8": 1 / 1024, "op_mac_float32_float32": 1 / 32,
                "op_mac_int8_int8": 1 / 1024, "op_mac_uint8_uint8": 1 / 1024, "op_mac_bfloat16_bfloat16": 1 / 512},
        source="Intel AMX: TDPBUSD 16x64x16 int8 tile op (1024 MAC/cycle/core), TDPBF16PS (512 MAC/cycle/core)"),
    high_dtype="bfloat16",
    notes=("ONNX Runtime's CPU provider has no BF16 kernels for LayerNorm/Softmax/Add; ops kept high "
           "therefore run in float32 under ORT, and BF16 applies where a BF16-capable runtime executes them.",))
