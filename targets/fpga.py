"""The FPGA target: an integer-only datapath from the first QuantizeLinear to the last
DequantizeLinear, whose ONNX Runtime execution is the bit-exact functional model of the design.

- activations int8, symmetric, one power-of-two scale per tensor; wider integers only where the
  datapath naturally has them: int32 accumulators, an int16 residual stream (LayerNorm outputs)
  and int32 LayerNorm/GELU inputs, uint16 softmax probabilities (scale 2^-16) multiplied with V as
  two 8-bit digits; a linear layer's wide input passes an online integer Walsh-Hadamard
  transform (adds/subtracts, rotation folded into the weights) before its int8 requantization,
  so every multiplier input is 8 bits wide with one scale; the embedding sum enters rotated
  (tables stored pre-rotated on the host) and is rotated back by the first integer step;
- weights int8 (or narrower: int4, int2 values stored in int8 for MatMulInteger), symmetric,
  per output channel or per tensor, power-of-two scales;
- requantization is shift-only (scales are powers of two, so every ratio is a shift);
- softmax, LayerNorm, RMSNorm, GELU and SiLU run as integer kernels (edgeq.backends.fpga.integer: I-BERT
  i-exp/i-erf, exact isqrt); the embedding lookup before the first norm (and a decoder's rotary
  cos/sin, which depend on the positions only) runs on the host and is listed in the model's
  `edgeq.host_ops` metadata; a decoder's causal mask is computed from positions in integers;
- resources and latency come from edgeq.backends.fpga (dataflow / overlay templates) on a named device:
  the cost model (edgeq.backends.fpga.cost) is declared below; this module holds only data.
"""

from __future__ import annotations

from edgeq.backends.fpga.cost import FpgaCostModel
from edgeq.registry import register_target
from edgeq.targets.base import Granularity, OpRule, QSpec, Target

ACTIVATION = QSpec("int8", symmetric=True, scale_pow2=True)
WEIGHT = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL, axis=-1, scale_pow2=True)
# --weights int4: 4-bit values, stored in int8 for MatMulInteger (it takes 8-bit inputs only).
WEIGHT_INT4 = WEIGHT.replace(qrange=(-8, 7))
WEIGHT_INT2 = WEIGHT.replace(qrange=(-2, 1))

_PREPROCESS = ("convert-opset", "identity-elimination", "constant-folding", "canonicalize",
               "canonicalize-shapes", "dead-code-elimination", "shape-inference")
# No `calibrate` pass: lower-to-integer calibrates every tensor it quantizes itself, in one run,
# with the per-channel statistics its channel scales need (the calibrate pass keeps none).
_PIPELINE = _PREPROCESS + ("select-precision", "lower-to-integer", "dead-code-elimination", "topological-sort")


FPGA = register_target(Target(
    name="fpga",
    description="FPGA integer datapath: int8 symmetric power-of-two scales, shift-only requantization, "
                "integer softmax/LayerNorm/RMSNorm/GELU/SiLU, causal mask from positions; embedding (and "
                "rotary cos/sin) on the host",
    ops={"MatMul": OpRule(activations=(ACTIVATION, ACTIVATION), weight=WEIGHT, weight_slots=(1,))},
    activation=ACTIVATION,
    weight=WEIGHT,
    weight_specs={"int4": WEIGHT_INT4, "int2": WEIGHT_INT2},
    activation_dtypes=frozenset({"int8"}),
    keep_high=frozenset(),
    default_pipeline=_PIPELINE,
    integer_only=True,
    cost_model=FpgaCostModel(
        unit="LUT/FF/BRAM18/URAM/DSP and cycles on a named device",
        prices={},
        source="edgeq.backends.fpga: dataflow template (FINN MVAU formulas) or overlay template; device catalog "
               "edgeq.backends.fpga.devices"),
    notes=("integer-only between the first QuantizeLinear and the last DequantizeLinear; host ops (embedding "
           "lookup; a decoder's rotary cos/sin, computed from the positions) are listed in the model metadata "
           "'edgeq.host_ops'",
           "softmax, LayerNorm, GELU and residual adds run as integer kernels (edgeq.backends.fpga.integer, emitted by "
           "the lower-to-integer pass), not as Q/DQ rules; MatMul is the only op kind above",
           "Llama-style decoders in the front end's canonical forms: RMSNorm as the integer RMSNorm on the int32 "
           "pre-norm residual sums (gamma folded into the reading linears' weights), SiLU as i-exp sigmoid, SwiGLU's "
           "and rotary's products as exact integer products (16-bit SwiGLU operands), rotate_half and the GQA "
           "repeat as integer data movement, the causal (+ padding) mask as integer compares of positions (dynamic "
           "batch and sequence), a tied LM head as a linear layer on the table's transpose; logits leave as int8",
           "activation scales: one power of two per tensor (every MatMulInteger input 8-bit); LayerNorm outputs "
           "(residual stream) int16; a linear layer's wide input (LayerNorm or GELU output, P.V product) passes an "
           "online integer Walsh-Hadamard transform before the int8 shift (rotation folded into the weights); the "
           "embedding tables are stored rotated and the datapath's first step rotates back; the earlier per-channel "
           "power-of-two factors are an explicit Python option, LowerToInteger(equalization=1.0, rotate=False, "
           "residual_bits=8), outside this rule: validate reports its channel-scaled edges (for comparison only)",
           "ONNX Runtime's execution is bit-identical to the numpy reference of the datapath "
           "(edgeq.backends.fpga.integer.program, stored in the model metadata 'edgeq.integer.program')"),
))
