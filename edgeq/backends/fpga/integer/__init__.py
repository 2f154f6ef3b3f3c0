"""Integer-only kernels for the FPGA target (I-BERT style, Kim et al., 2021).

Each kernel appends standard opset-21 ONNX nodes to an `IntGraphBuilder` (integer in, integer
out, power-of-two output scales, integer multiplies and shifts only) and has a numpy reference
that is bit-identical to what ONNX Runtime computes for the emitted nodes:

    b = IntGraphBuilder(prefix="layer0")
    scores = QTensor("scores", np.int32, scale=s_q * s_k / math.sqrt(64))
    probs = emit_softmax(b, scores, out_dtype=np.uint8)          # QTensor, scale 1/256
    model = b.to_model([(scores, ["batch", 12, "seq", "seq"])], [probs])
    expected = softmax_reference(scores_int32, scores.scale)   # == ORT output, bit for bit

Each kernel is also a frozen plan (`Softmax.plan(...)`, `Gelu.plan(...)`, ...) whose
constants are computed once and shared by `emit` and `reference`.
"""

from edgeq.backends.fpga.integer.builder import IntGraphBuilder, QTensor, kernel_model
from edgeq.backends.fpga.integer.fixedpoint import DyadicAffine, Rounding, dyadic_affine
from edgeq.backends.fpga.integer.gelu import Gelu, emit_gelu, gelu_reference
from edgeq.backends.fpga.integer.iexp import IExp
from edgeq.backends.fpga.integer.isqrt import ISqrt, emit_isqrt, isqrt_reference
from edgeq.backends.fpga.integer.norm import (Normalization, emit_layernorm, emit_rmsnorm, layernorm_reference,
                                rmsnorm_reference)
from edgeq.backends.fpga.integer.requant import Requantize, emit_requantize, requantize_reference
from edgeq.backends.fpga.integer.sigmoid import Sigmoid, Silu, emit_sigmoid, emit_silu, sigmoid_reference, silu_reference
from edgeq.backends.fpga.integer.softmax import Softmax, emit_softmax, softmax_reference

__all__ = [
    "IntGraphBuilder", "QTensor", "kernel_model", "Rounding", "DyadicAffine", "dyadic_affine", "IExp",
    "Softmax", "emit_softmax", "softmax_reference",
    "Gelu", "emit_gelu", "gelu_reference",
    "Sigmoid", "Silu", "emit_sigmoid", "emit_silu", "sigmoid_reference", "silu_reference",
    "Normalization", "emit_layernorm", "emit_rmsnorm", "layernorm_reference", "rmsnorm_reference",
    "ISqrt", "emit_isqrt", "isqrt_reference",
    "Requantize", "emit_requantize", "requantize_reference",
]
