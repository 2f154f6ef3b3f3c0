"""ARM64 CPU targets, executed by ONNX Runtime's CPU provider (MLAS, with KleidiAI micro-kernels
in the PyPI aarch64 wheel), one per family of integer kernels MLAS dispatches to:

- arm-neon: Armv8.0 Advanced SIMD, no dot product (Cortex-A53, A72/A73). MLAS's U8S8 and S8S8
  GEMM is the X8S8 NEON kernel: SMULL + SMLAL add two int8 x int8 products into a 16-bit lane
  before SADALP widens them, so (-128)(-128) + (-128)(-128) = 32768 wraps. Weights keep
  -127..127 (the symmetric narrow range), which bounds a lane at 2 x 128 x 127 = 32512.
- arm-dotprod: Armv8.2 dot product, SDOT/UDOT (Cortex-A55, A76/A77/A78, X1, Neoverse N1).
- arm-i8mm: Armv8.6 int8 matrix multiply, SMMLA/UMMLA/USMMLA (Cortex-A710/A715, X2/X3, Neoverse
  N2/V1/V2): 2x8 by 8x2 int8 blocks, twice the MACs of SDOT per instruction.

The facts below come from onnxruntime/core/mlas/lib (main branch as stored; the wheel run is
onnxruntime 1.32.0) and were checked on the wheel under QEMU (tools/aarch64_ort.py: `probe`
lists the instructions a run executed; BENCHMARKS.md, "ARM64"):

- platform.cpp, MLAS_PLATFORM(), MLAS_TARGET_ARM64: GemmU8U8Dispatch = U8X8 NEON kernel,
  GemmU8S8Dispatch and GemmS8S8Dispatch = MlasGemmX8S8DispatchNeon; with
  HasArmNeonDot (HWCAP_ASIMDDP): U8U8/U8S8 -> MlasGemmU8X8DispatchUdot, S8S8 ->
  MlasGemmS8S8DispatchSdot; with HasArmNeon_I8MM (HWCAP2_I8MM, Linux): U8U8/U8S8 ->
  MlasGemmU8X8DispatchUmmla, S8S8 -> MlasGemmS8S8DispatchSmmla. Measured: cortex-a53 runs SMULL/
  SMLAL/SADALP, cortex-a76 UDOT (U8S8) and SDOT (S8S8), neoverse-n2 UMMLA and SMMLA.
- qgemm.h, MlasGemmQuantGetDispatch, MLAS_TARGET_ARM64: B signed -> the S8S8 or U8S8 dispatch,
  A and B unsigned -> U8U8; A signed with B unsigned (S8U8) gets MlasGemmQuantDispatchDefault,
  the portable C loop. So activations are u8 or s8 and weights s8: both are full-rate kernels
  on every family (U8S8 flips B to u8 for UDOT/UMMLA: qgemm_kernel_udot.cpp, _ummla.cpp).
- qdq_selector_action_transformer.h, QDQIsInt8Allowed(): true on MLAS_TARGET_ARM_ANY, so int8
  activations stay int8 in ORT's QDQ fusions (on x86 they are converted to u8).
- qnbitgemm_kernel_neon.cpp, GetMlasQNBitGemmDispatchNeon(dot, i8mm): MatMulNBits at accuracy
  level 4 (CompInt8: the activation quantized to int8 per block) needs the dot product; without
  it (arm-neon) only CompFp32 exists: the 4-bit weights are dequantized for the fp32 SGEMM.
  8-bit weights: UDOT with a u8 activation on dot-product cores, USDOT with s8 on i8mm cores
  (platform.cpp: ArmNeonIsQuantActivationsUnsigned = !HasI8MM).
- kai_ukernel_interface.cpp (KleidiAI in MLAS): 4-bit MatMulNBits CompInt8 runs KleidiAI
  kernels when BlkLen % 32 == 0, K % BlkLen == 0 and the CPU has the dot product (qnbitgemm
  UseKleidiAI): without zero points matmul_clamp_f32_qai8dxp_qsi4c32p (the activation quantized
  per row, bf16 block scales), with zero points qsi8d32p_qai4c32p (per block of 32, as MLAS does
  on x86); GEMM on SMMLA where I8MM (4x8 i8mm kernels), else SDOT; the M=1 GEMV on SDOT either
  way. Measured on the 1.32 wheel: edgeq's int4 DequantizeLinear carries an explicit zero point
  0, ORT keeps it on MatMulNBits, and the run uses SDOT on cortex-a76 and SMMLA on neoverse-n2
  with outputs within 3e-7 of x86's; the same weights without the zero point differ from x86 by
  0.9% (per-row activation quantization). So int4 weights are symmetric, in blocks of 32 by
  default (any K that is a multiple of 32 qualifies; blocks of 128 leave SmolLM2's K = 576 off
  KleidiAI).
- MatMulNBits needs a power-of-two block >= 16 (qdq_selectors.cc, as on x86: MATMULNBITS_BLOCKS).

Cost models price one reference core per family (cycles at peak issue rate) from the MACs per
instruction and the instructions per cycle of the kernel's inner loop; the issue rates are
LLVM's scheduling models of each core, which follow Arm's Software Optimization Guides
(llvm/lib/Target/AArch64/AArch64Sched*.td, cited per core in CORE_RATES).
"""

from __future__ import annotations

from edgeq.registry import register_target
from edgeq.targets.base import CostModel, Granularity, OpRule, QSpec, Target
from edgeq.targets.x86 import ACT_U8, BIAS, EMBEDDING, MATMULNBITS_BLOCKS, X86_VNNI

# int8 weights, symmetric per output channel (any of MatMulNBits' blocks with --group).
W_S8_CHANNEL = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL, block_sizes=MATMULNBITS_BLOCKS)
# arm-neon: -127..127, against the 16-bit pair sum of MLAS's X8S8 NEON kernel (module docstring).
W_S8_NARROW = W_S8_CHANNEL.replace(qrange=(-127, 127))
# int4 weights: symmetric (no zero point: KleidiAI's qsi4c32p kernels), blocks of 32 along K.
KLEIDIAI_BLOCK = 32
W_S4_BLOCK = QSpec("int4", symmetric=True, granularity=Granularity.BLOCK, axis=0, block_size=KLEIDIAI_BLOCK,
                   block_sizes=MATMULNBITS_BLOCKS)


def _ops(weight: QSpec) -> dict[str, OpRule]:
    """The x86 rule shapes (U8 activations, also for activation x activation MatMuls: U8U8 is a
    full-rate kernel on every family), with the family's weight spec."""
    return {
        "MatMul": OpRule(activations=(ACT_U8, ACT_U8), weight=weight, weight_slots=(1,)),
        "Gemm": OpRule(activations=(ACT_U8,), weight=weight, weight_slots=(1,), bias=BIAS),
        "Conv": OpRule(activations=(ACT_U8,), weight=weight, weight_slots=(1,), bias=BIAS),
        "Gather": OpRule(activations=(), weight=EMBEDDING, weight_slots=(0,)),
    }


# ---- cost: MACs per cycle per core of each kernel's inner loop --------------------------------
# Keys: "qgemm_u8s8" (and s8s8: same kernel family), "qgemm_u8u8", "nbits" (MatMulNBits), "fp32"
# (MLAS SGEMM, FMLA .4s), "fp16" (FMLA .8h; a note: ORT's CPU provider runs edgeq's float ops in
# fp32). Each with the instruction mix it comes from.
CORE_RATES: dict[str, dict] = {
    "cortex-a53": {
        "family": "arm-neon",
        # AArch64SchedA53.td: one FP/ASIMD ALU pipe and one FP multiply pipe; "the ASIMD datapath
        # is 64 bits wide: 128-bit (Q-form) operations occupy the FP/ASIMD pipe for two cycles";
        # Q-form FMLA occupies the MAC pipe for two cycles (A53WriteFMACQ).
        "qgemm_u8s8": 16 / 6,  # QgemmS8S8KernelNeon.S: SMULL+SMLAL (.8h, 8 MACs each) + SADALP, all Q-form
        "qgemm_u8u8": 4 / 2,   # QgemmU8X8KernelNeon.S: UMLAL/UMLAL2 .4s by element (4 MACs), Q-form
        "nbits": 4 / 2,        # no CompInt8 without the dot product: dequantize + fp32 SGEMM
        "fp32": 4 / 2,         # FMLA .4s: 4 MACs per 2 cycles
        "fp16": None,          # Armv8.0: no FP16 arithmetic (QEMU cortex-a53 lists no fphp/asimdhp)
        "source": "LLVM AArch64SchedA53.td (Cortex-A53 Software Optimisation Specification): 64-bit ASIMD "
                  "datapath, Q-form ops 2 cycles; MLAS QgemmS8S8KernelNeon.S / QgemmU8X8KernelNeon.S mixes",
    },
    "cortex-a76": {
        "family": "arm-dotprod",
        # Neoverse N1 is Arm's infrastructure version of the Cortex-A76 core: two 128-bit FP/ASIMD
        # pipes V0/V1. AArch64SchedNeoverseN1.td: FMLA = N1Write_4c_1V (either pipe: 2/cycle);
        # SDOT/UDOT take the ASIMD default WriteVq = N1Write_2c_1V (2/cycle).
        "qgemm_u8s8": 2 * 16,  # UDOT/SDOT .4s, 16 MACs, 2 per cycle
        "qgemm_u8u8": 2 * 16,
        "nbits": 2 * 16,       # KleidiAI qai8dxp x qsi4c32p dotprod kernels / MLAS CompInt8 SDOT
        "fp32": 2 * 4,         # FMLA .4s
        "fp16": 2 * 8,         # FMLA .8h (FEAT_FP16)
        "source": "LLVM AArch64SchedNeoverseN1.td (Neoverse N1 Software Optimization Guide; N1 is the "
                  "Cortex-A76 microarchitecture): SDOT/UDOT and FMLA on either of V0/V1",
    },
    "neoverse-n2": {
        "family": "arm-i8mm",
        # AArch64SchedNeoverseN2.td: N2Wr_VDOT, N2Wr_VMMA (SMMLA/UMMLA/USMMLA) and N2Wr_VFMA all on
        # N2UnitV = V0|V1: 2 per cycle.
        "qgemm_u8s8": 2 * 32,  # UMMLA/SMMLA: 2x8 by 8x2 block, 32 MACs, 2 per cycle
        "qgemm_u8u8": 2 * 32,
        "nbits": 2 * 32,       # KleidiAI 4x8 i8mm GEMM kernel (prefill; the M=1 GEMV is dotprod: 2*16)
        "nbits_int8": 2 * 16,  # 8-bit weight-only: USDOT (qnbitgemm_kernel_neon.cpp), also S8S8 QGEMM (bound)
        "fp32": 2 * 4,
        "fp16": 2 * 8,
        "source": "LLVM AArch64SchedNeoverseN2.td (Arm Neoverse N2 Software Optimization Guide): SDOT, "
                  "SMMLA/UMMLA and FMLA on either of V0/V1",
    },
}

_ASSUMPTIONS = ("peak rates: every MAC issues at its kernel's peak throughput on one core (no memory bound, no "
                "threading, no cost of quantize/dequantize, packing or unpacking steps)",
                "pairs priced as ONNX Runtime's CPU provider runs them on this core family (see the source)",
                "bytes of weights and activations are counted, not priced: LLM decode on mobile cores is "
                "memory-bound, which these cycles do not show")


def cost_model(core: str) -> CostModel:
    """The cost model of one core in CORE_RATES, priced as ONNX Runtime runs each dtype pair:
    uint8 x int8/uint8: MLAS QGEMM (QLinearMatMul, MatMulIntegerToFloat, QGemm); int8 x int4/int8
    and uint16 x int8: MatMulNBits at accuracy level 4 (CompInt8, or CompFp32 on arm-neon); the
    pairs without an integer kernel (uint8 x int4, uint16 x uint16, float32 x int8/int4) and
    float32: the fp32 SGEMM. A two-digit residual (int8 x int8) takes the 8-bit MatMulNBits rate."""
    rates = CORE_RATES[core]
    nbits, fp32 = rates["nbits"], rates["fp32"]
    per_mac = {"op_mac_uint8_int8": rates["qgemm_u8s8"], "op_mac_uint8_uint8": rates["qgemm_u8u8"],
               "op_mac_int8_int4": nbits, "op_mac_int8_int8": rates.get("nbits_int8", nbits),
               "op_mac_uint16_int8": rates.get("nbits_int8", nbits),
               "op_mac_float32_float32": fp32, "op_mac_uint8_int4": fp32, "op_mac_uint16_uint16": fp32,
               "op_mac_float32_int8": fp32, "op_mac_float32_int4": fp32,
               # MatMulBnb4 (--weights nf4): the weight dequantized, an fp32 GEMM
               "op_mac_float32_nf4": fp32, "op_mac_float32_fp4": fp32,
               # float8 QDQ (an x86-compiled accuracy study): no float8 kernel, dequantized to fp32
               **{f"op_mac_{a}_{w}": fp32 for a, w in (("float8e4m3fn", "float8e4m3fn"), ("float8e4m3fn", "float32"),
                                                       ("float32", "float8e4m3fn"), ("uint8", "float8e4m3fn"))}}
    if rates["fp16"]:
        per_mac["op_mac_float16_float16"] = rates["fp16"]
    return CostModel(unit=f"cycles on one {core} core (peak)", prices={k: 1 / r for k, r in per_mac.items()},
                     source=rates["source"] + "; pairs mapped to kernels per MLAS's ARM64 dispatch (targets/arm.py)",
                     assumptions=_ASSUMPTIONS)


_FP16_NOTE = ("FP16: these cores have FEAT_FP16 (fphp/asimdhp) and ORT's ARM64 CPU provider has fp16 kernels "
              "(platform.cpp: MlasHGemmDispatchNeon, fp16 Softmax/Eltwise dispatches, GELU/Erf fp16 kernels; "
              "qnbitgemm_kernel_neon.cpp: HQ4BitGemm CompFp16), so fp16 is the natural precision of the ops kept "
              "high; edgeq still emits them in float32, which is what ORT runs (nothing reads this note yet).")


def _arm_target(name: str, description: str, weight: QSpec, core: str, notes: tuple[str, ...]) -> Target:
    return register_target(Target(
        name=name, description=description, ops=_ops(weight), activation=ACT_U8, weight=weight,
        weight_specs={"int4": W_S4_BLOCK}, activation_dtypes=frozenset({"uint8", "int8", "int16", "uint16"}),
        # The rotation choices of the x86 targets (the same MLAS kernels run the online Hadamards):
        # int4 presets rotate; W8A8 where the graph has a pre-norm residual stream to fold it into.
        default_pipeline=X86_VNNI.default_pipeline, rotate_weights=X86_VNNI.rotate_weights,
        rotate_stream_weights=X86_VNNI.rotate_stream_weights, signed_weight_scales=True,
        zero_point_weights=X86_VNNI.zero_point_weights, cost_model=cost_model(core), notes=notes))


ARM_NEON = _arm_target(
    "arm-neon", "ARM64 NEON without dot product (Cortex-A53/A72/A73): U8S8 with -127..127 weights against the "
                "16-bit pair sums of MLAS's NEON kernel",
    W_S8_NARROW, "cortex-a53",
    ("W4A16/W8 weight-only: MatMulNBits has no CompInt8 kernel without the dot product; the weights are "
     "dequantized for the fp32 SGEMM (memory saved, no integer speed-up). Cost model: Cortex-A53.",
     "Cortex-A55 is not this family: it has the dot product (arm-dotprod)."))

ARM_DOTPROD = _arm_target(
    "arm-dotprod", "ARM64 with the dot product, SDOT/UDOT (Cortex-A55/A76/A78/X1, Neoverse N1): U8S8, symmetric "
                   "per-channel int8 weights, int4 in KleidiAI's blocks of 32",
    W_S8_CHANNEL, "cortex-a76",
    (_FP16_NOTE, "Cost model: Cortex-A76 (= Neoverse N1 pipeline)."))

ARM_I8MM = _arm_target(
    "arm-i8mm", "ARM64 with int8 matrix multiply, SMMLA/UMMLA (Cortex-A710/X2, Neoverse N2/V1): U8S8 on UMMLA, "
                "symmetric per-channel int8 weights, int4 in KleidiAI's blocks of 32",
    W_S8_CHANNEL, "neoverse-n2",
    (_FP16_NOTE, "S8S8 (int8 activations) is as fast (SMMLA); S8U8 is not (MLAS's portable C loop). "
                 "Cost model: Neoverse N2.",
     "BF16: the cores have BFMMLA, which ORT's CPU provider uses only in KleidiAI's SME2 SBGEMM."))
