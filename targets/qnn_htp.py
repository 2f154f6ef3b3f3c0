"""Qualcomm Hexagon NPU (HTP) through ONNX Runtime's QNN execution provider: the whole graph
runs quantized on the NPU, nothing in float, CPU fallback disabled.

The provider is a plugin library in the `onnxruntime-qnn` wheel (edgeq[qnn]); on x86-64 Linux it
ships the HTP backend as a simulator, which the compile's verification and placement check run
on. It lowers ONNX's QDQ "node units" op by op (DequantizeLinear on every float input ->
op -> QuantizeLinear on every float output), so the target quantizes every tensor
(`whole_graph`). What the HTP takes, measured on the simulator (onnxruntime-qnn 2.7, QNN SDK
2.51, ONNX Runtime 1.32; tests/runtime/test_qnn_htp.py and tools/bench_qnn.py):

- node units: ONNX Runtime hands the provider a DQ -> op -> Q group as one integer op only when
  the op's inputs and output share a dtype (a linear op's or a norm's input 0 and output; a
  MatMul's second operand may differ); otherwise the op is validated alone and the HTP computes
  it in float, with fallback disabled and no error. The placement check reads the provider's
  log and fails naming any such op; the mixed 8/16-bit plan narrows whole node-unit groups.
- activations: uint16 asymmetric per tensor by default (A16); uint8 asymmetric with
  --activations int8 (or where the mixed plan narrows a group); a tensor read at another width
  passes a DQ -> Q conversion (QNN Convert).
- weights of MatMul/Gemm/Conv: int8 symmetric per output channel (QNN takes per-channel
  weights on MatMul too); int4 per channel for --weights int4, or in blocks of 32/64/128 along
  K with --group (block-quantized MatMul, all on the HTP). 16-bit weights are rejected.
  ConvTranspose weights per tensor (QNN takes per-channel ones only along axis 1).
  BatchNormalization is folded first (fold-batch-norm): the HTP takes none with quantized
  statistics.
- Gemm/Conv biases: int32, scale s_x * s_w.
- LayerNormalization/RMSNormalization: QNN's LayerNorm rejects a 16-bit gamma (error 3110) and
  ONNX Runtime groups a LayerNorm only with an int32 beta; an 8-bit gamma of real values costs
  18x the error. split-norm-affine runs the norm with unit gamma (uint8, exact) and no beta,
  then gamma and beta as 16-bit Mul and Add node units. RMSNorm runs as one RMSNormalization op
  (opset 23; fuse-rms-norm writes it from the canonical form): the decomposed form quantizes
  x^2 and 1/sqrt on their own grids, and the HTP computes a 16-bit Reciprocal wrongly (Llama
  fixture cosine 0.39).
- fixed output quantization: 16-bit Sigmoid (1/65536, 0) and Tanh (1/32768, 32768) are computed
  with these whatever the QDQ model says (the simulator ignores other output parameters), so
  the model must carry them; Softmax takes any, edgeq fixes (1/65536, 0), its full range.
- data movement (Reshape, Transpose, Squeeze/Unsqueeze, Flatten, Slice, Split, Gather,
  Expand, Tile, Pad, depth/space) and max pooling move stored integers: input and output share
  their scale and zero point. Concat requantizes its inputs (inputs of different ranges keep
  their own scales).
- not taken at 16 bits (each fails the session with fallback disabled, so they have no rule and
  validate names them): Erf (GELU runs as the Gelu op), PRelu with a 16-bit slope,
  InstanceNormalization, BatchNormalization with quantized statistics.
- int64 graph inputs (token ids, attention masks) and int64 index ops run as the provider
  converts them; the mask's Cast to float is quantized at its output.
- batch > 1: the HTP computes a norm wrongly when its input is an Add/Mul of a constant that
  broadcasts over the batch axis but varies along another (BERT's position embeddings [1, S, H]
  on [2, S, H]: second row off by up to 18,114 LSB); tile-norm-input-constants gives such ops
  the constant at the full static shape.
- Conv/ConvTranspose: an output channel whose weights are all but zero (PP-OCRv4 det's SE convs:
  scales 1e-31 of the largest) comes out 0 on the HTP whatever its bias: channel scales have a
  floor (QSpec.channel_scale_floor); a ConvTranspose's bias Add is fused into a ConvTranspose
  bias the HTP computes wrongly (det head: up to 386 LSB): constant-first-after-conv-transpose
  keeps them apart. Per-channel Mul/Add after a Conv fold into it (fold-conv-affine).
- weights: int8 rounding shifts the mean of every Conv/Gemm output channel, which adds up through
  a CNN; bias-correction moves the shift into the bias (PP-OCRv4 det on the HTP 0.99684 -> 0.99933,
  rec 0.99756 -> 0.99915).
- int4 presets rotate (hadamard-rotation, QuaRot), and int8 ones where a pre-norm residual stream
  folds it (decoders; SmolLM2 W8A16 +2.72% -> -0.11% on the HTP): the stream's rotation folds into the
  weights; the online Hadamards are MatMuls by their Kronecker factors (Target.online_rotation_op),
  quantized like the linears (+-1/sqrt(n) entries: exact per channel). A block-quantized MatMul
  fails to finalize on a batch of matrices (a factor reading [1, S, 12, 128]: QNN_COMMON_ERROR_MEM_ALLOC),
  so those factors keep per-channel weights under --group (OpRule.blocks_need_one_matrix).
- htp_arch must be set: without it the simulator targets v68, which loses accuracy (MiniLM
  A16W8 0.9965 against 0.9989 at v73, issue 13). --device picks the generation or SoC.
"""

from __future__ import annotations

from edgeq.registry import register_target
from edgeq.targets.base import (Execution, ExecutionDevice, Granularity, OpRule, PluginLibrary, QSpec,
                                Target)

ACT16 = QSpec("uint16", symmetric=False)
ACT8 = QSpec("uint8", symmetric=False)
# Channel scales floored at 2^-12 of the largest: the HTP computes an output channel whose weight
# scale is below ~2^-16 of it as 0 (2^-14 measured right; QSpec.channel_scale_floor).
_FLOOR = 2.0**-12
W8 = QSpec("int8", symmetric=True, granularity=Granularity.CHANNEL, channel_scale_floor=_FLOOR)
# --group: int4 blocks along K (DequantizeLinear block_size), which the provider lowers as a
# block-quantized MatMul inside the HTP graph (16-bit input and output, 4-bit blocks a multiple
# of 8; onnxruntime-qnn PR 476: the HTP computes that MatMul in fp16). Per channel by default.
W4 = QSpec("int4", symmetric=True, granularity=Granularity.CHANNEL, block_sizes=(32, 64, 128),
           channel_scale_floor=_FLOOR)
W8_TENSOR = QSpec("int8", symmetric=True, granularity=Granularity.TENSOR)
BIAS = QSpec("int32", symmetric=True, granularity=Granularity.CHANNEL, axis=0)

# Output quantization the HTP imposes (QNN op definitions; ONNX Runtime's get_qnn_qdq_config
# sets the same for Sigmoid and Tanh), per activation dtype.
SIGMOID_OUT = (ACT16.replace(fixed=(1 / 65536, 0)), ACT8.replace(fixed=(1 / 256, 0)))
TANH_OUT = (ACT16.replace(fixed=(1 / 32768, 32768)), ACT8.replace(fixed=(1 / 128, 128)))
SOFTMAX_OUT = (ACT16.replace(fixed=(1 / 65536, 0)), ACT8.replace(fixed=(1 / 256, 0)))

A = ACT16


def _unary(**fields) -> OpRule:
    return OpRule(activations=(A,), weight_slots=(), **fields)


def _binary() -> OpRule:
    return OpRule(activations=(A, A), weight_slots=())


def _moving(slots: int = 1) -> OpRule:
    """Data movement: the stored integers move, input and output share their quantization. Only
    the data input is quantized (shapes, indices and pads are integer inputs)."""
    return OpRule(activations=(A,) + (None,) * (slots - 1), weight_slots=(), shared=True)


OPS: dict[str, OpRule] = {
    # Linear layers and activation x activation products (attention scores and context).
    # int4 blocks (--group) only on one matrix: a batch of them ([48, 4, 128] x int4 g32, an online
    # Hadamard's factor) fails to finalize (QNN_COMMON_ERROR_MEM_ALLOC); [1, 192, 128] runs.
    "MatMul": OpRule(activations=(A, A), weight=W8, weight_slots=(1,), blocks_need_one_matrix=True),
    "Gemm": OpRule(activations=(A,), weight=W8, weight_slots=(1,), bias=BIAS),
    "Conv": OpRule(activations=(A,), weight=W8, weight_slots=(1,), bias=BIAS),
    # Per tensor: QNN takes a ConvTranspose's per-channel weights only along axis 1 (its output
    # channels); edgeq quantizes them along axis 1 too, but per-channel ConvTranspose has not been
    # measured on the HTP (PP-OCR det, issue 13), so the target keeps the form that was.
    "ConvTranspose": OpRule(activations=(A,), weight=W8_TENSOR, weight_slots=(1,), bias=BIAS),
    # Elementwise (residual adds, mask bias, scales, gates); a constant operand is stored as an
    # activation of the same spec.
    **{kind: _binary() for kind in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow")},
    "Where": OpRule(activations=(None, A, A), weight_slots=()),
    # Normalization with unit gamma, 8-bit (exact), and no beta: split-norm-affine applies gamma and
    # beta as 16-bit Mul and Add (see the module notes).
    "LayerNormalization": OpRule(activations=(A, ACT8), weight_slots=()),
    "RMSNormalization": OpRule(activations=(A, ACT8), weight_slots=()),  # fuse-rms-norm writes it (opset 23)
    # Activations and reductions.
    "Softmax": _unary(output=SOFTMAX_OUT),
    "Sigmoid": _unary(output=SIGMOID_OUT),
    "Tanh": _unary(output=TANH_OUT),
    **{kind: _unary() for kind in ("Gelu", "Relu", "LeakyRelu", "Elu", "HardSigmoid", "HardSwish", "Exp",
                                  "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Sin", "Cos", "Clip", "Softplus",
                                  "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
                                  "GlobalAveragePool", "AveragePool", "Resize")},
    "Concat": OpRule(activations=(A,), weight_slots=(), variadic=True),
    "MaxPool": _moving(),
    "GlobalMaxPool": _moving(),
    **{kind: _moving(2) for kind in ("Reshape", "Expand", "Tile", "Squeeze", "Unsqueeze")},
    **{kind: _moving() for kind in ("Transpose", "Flatten", "DepthToSpace", "SpaceToDepth", "Identity")},
    "Slice": _moving(5),
    "Split": _moving(2),
    "Pad": _moving(4),
    # An embedding table (or any gathered constant) is a 16-bit constant; the gathered rows
    # share its quantization.
    "Gather": OpRule(activations=(A, None), weight_slots=(), shared=True),
}

# The plugin names its provider after the name it is registered under: QNNExecutionProvider, as
# ONNX Runtime's documentation registers it.
QNN_PLUGIN = PluginLibrary(package="onnxruntime-qnn", module="onnxruntime_qnn", extra="qnn", device_type="NPU|CPU",
                           registration_name="QNNExecutionProvider")

# --device: an HTP generation, or a SoC (its generation and QNN soc_model id). The first is the
# default: v73 (Snapdragon 8 Gen 2, X Elite), where the simulator's accuracy matches the devices'.
DEVICES = (
    ExecutionDevice("v73", "HTP v73 (Snapdragon 8 Gen 2, Snapdragon X Elite/Plus)", (("htp_arch", "73"),)),
    ExecutionDevice("v68", "HTP v68 (Snapdragon 888, QCS6490)", (("htp_arch", "68"),)),
    ExecutionDevice("v69", "HTP v69 (Snapdragon 8 Gen 1, 8+ Gen 1)", (("htp_arch", "69"),)),
    ExecutionDevice("v75", "HTP v75 (Snapdragon 8 Gen 3)", (("htp_arch", "75"),)),
    ExecutionDevice("v79", "HTP v79 (Snapdragon 8 Elite)", (("htp_arch", "79"),)),
    ExecutionDevice("sm8550", "Snapdragon 8 Gen 2 (HTP v73, QNN soc_model 43)", (("htp_arch", "73"), ("soc_model", "43"))),
    ExecutionDevice("sm8650", "Snapdragon 8 Gen 3 (HTP v75, QNN soc_model 57)", (("htp_arch", "75"), ("soc_model", "57"))),
    ExecutionDevice("sm8750", "Snapdragon 8 Elite (HTP v79, QNN soc_model 69)", (("htp_arch", "79"), ("soc_model", "69"))),
    ExecutionDevice("x1e", "Snapdragon X Elite (HTP v73, QNN soc_model 60)", (("htp_arch", "73"), ("soc_model", "60"))),
)

HTP = Execution(
    name="qnn", provider="QNNExecutionProvider", plugin=QNN_PLUGIN,
    description="the Hexagon NPU (HTP backend) through ONNX Runtime's QNN provider (the HTP simulator on x86-64), "
                "CPU fallback disabled",
    # The graph's input quantization and output dequantization run on the HTP too (by default the
    # provider hands them to the CPU where fallback is allowed).
    provider_options=(("backend_type", "htp"), ("offload_graph_io_quantization", "0")),
    # No CPU fallback: a node the HTP does not take fails the session (and the compile), it does not
    # run in float on the CPU.
    session_config=(("session.disable_cpu_ep_fallback", "1"),),
    placement_check="qnn-htp-nodes",
    reference_on_cpu=True,
    devices=DEVICES,
    context_settings=(("ep.context_enable", "1"), ("ep.context_embed_mode", "1")),
)

_PREPROCESS = ("convert-opset", "identity-elimination", "constant-folding", "canonicalize",
               "canonicalize-shapes", "dead-code-elimination", "shape-inference")
_PIPELINE = _PREPROCESS + ("hadamard-rotation", "fold-batch-norm", "fold-conv-affine", "fuse-rms-norm", "split-norm-affine",
                           "tile-norm-input-constants", "constant-first-after-conv-transpose",
                           "select-precision", "calibrate",
                           "gptq", "bias-correction", "mixed-precision", "insert-qdq", "dead-code-elimination",
                           "topological-sort")

QNN_HTP = register_target(Target(
    name="qnn-htp",
    description="Qualcomm Hexagon NPU (HTP) through ONNX Runtime's QNN provider: whole graph quantized, A16W8 "
                "(uint16 activations, int8 per-channel weights), fixed sigmoid/tanh/softmax outputs, static shapes",
    ops=OPS,
    activation=ACT16,
    weight=W8,
    weight_specs={"int4": W4},
    activation_dtypes=frozenset({"uint16", "uint8"}),
    keep_high=frozenset(),
    default_pipeline=_PIPELINE,
    executions=(HTP,),
    static_shapes=True,
    whole_graph=True,
    # With 16-bit activations the int8 weights' rounding is most of the error: GPTQ rounds them
    # (MiniLM embedding cosine on the CPU simulation 0.99925 -> 0.99951, BENCHMARKS.md).
    gptq_weights=frozenset({"int8"}),
    # int4 presets rotate (QuaRot): the stream rotation folds into the weights; the online
    # Hadamards (before the MLP down-projection and across the attention heads) are quantized
    # MatMuls by the Hadamard factors, exact in int8/int4, on the HTP like any linear.
    rotate_weights=frozenset({"int4"}),
    # int8 (W8A16) rotates where a pre-norm residual stream folds it (decoders): SmolLM2 on the
    # CPU simulation, windows 0-7, +2.08% -> -0.07% (BENCHMARKS.md); encoders and CNNs are left as they are.
    rotate_stream_weights=frozenset({"int8"}),
    online_rotation_op="MatMul",
    notes=("whole graph on the NPU: every op quantized (QDQ node units), CPU fallback disabled; the compile's "
           "verification and placement run on the HTP backend (the simulator on x86-64)",
           "--device picks the HTP generation or SoC (htp_arch, soc_model); default v73",),
))
