"""Small ONNX models built with onnx.helper that exercise what a round-trip must keep.

Each builder returns (ModelProto, feeds): the feeds run it in ONNX Runtime (None where ORT
cannot run the model, e.g. a custom-domain op). Data are seeded, so every build is identical.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

IR_FOR_OPSET = {11: 6, 13: 7, 17: 8, 21: 10}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _const(name: str, value, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _meta(proto, **props: str) -> None:
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


# ---- one small model per opset ------------------------------------------------------------


def opset_model(opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """MLP-ish model using ops whose signatures changed between opsets 11, 13, 17 and 21
    (Split/ReduceSum/Squeeze axes as attributes or inputs, LayerNormalization, blocked int4 DQ)."""
    rng = _rng(opset)
    inits = [numpy_helper.from_array(_f32(rng, 8, 16), "W"), numpy_helper.from_array(_f32(rng, 16), "b")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h0"], name="mm"),
        helper.make_node("Add", ["h0", "b"], ["h1"], name="add"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
    ]
    if opset < 13:
        nodes += [
            helper.make_node("Split", ["h"], ["a", "c"], name="split", axis=1, split=[8, 8]),
            helper.make_node("ReduceSum", ["a"], ["ra"], name="rsum", axes=[1], keepdims=1),
            helper.make_node("Unsqueeze", ["ra"], ["ua"], name="unsq", axes=[0]),
            helper.make_node("Squeeze", ["ua"], ["sa"], name="sq", axes=[0]),
        ]
    else:
        inits += [_const("split_sizes", [8, 8]), _const("axes1", [1]), _const("axes0", [0])]
        nodes += [
            helper.make_node("Split", ["h", "split_sizes"], ["a", "c"], name="split", axis=1),
            helper.make_node("ReduceSum", ["a", "axes1"], ["ra"], name="rsum", keepdims=1),
            helper.make_node("Unsqueeze", ["ra", "axes0"], ["ua"], name="unsq"),
            helper.make_node("Squeeze", ["ua", "axes0"], ["sa"], name="sq"),
        ]
    inits += [_const("lo", -0.5, np.float32), _const("hi", 0.75, np.float32)]
    nodes += [
        helper.make_node("Softmax", ["c"], ["sm"], name="softmax", axis=1),
        helper.make_node("Clip", ["sm", "lo", "hi"], ["cl"], name="clip"),
        helper.make_node("Mul", ["cl", "sa"], ["m"], name="mul"),
    ]
    last = "m"
    if opset >= 17:
        inits += [numpy_helper.from_array(_f32(rng, 8), "ln_scale"), numpy_helper.from_array(_f32(rng, 8), "ln_bias")]
        nodes.append(helper.make_node("LayerNormalization", ["m", "ln_scale", "ln_bias"], ["ln"], name="ln",
                                      axis=-1, epsilon=1e-5))
        last = "ln"
    if opset >= 21:
        # Blocked int4 weight (odd number of blocks' worth of nibbles handled by packing).
        q = rng.integers(-8, 8, size=(8, 5)).astype(ml_dtypes.int4)
        inits += [numpy_helper.from_array(q, "W4"),
                  numpy_helper.from_array(rng.uniform(0.01, 0.1, size=(2, 5)).astype(np.float32), "W4_scale")]
        nodes += [
            helper.make_node("DequantizeLinear", ["W4", "W4_scale"], ["W4f"], name="dq", axis=0, block_size=4),
            helper.make_node("MatMul", [last, "W4f"], ["q_out"], name="mm4"),
        ]
        last = "q_out"
        width = 5
    else:
        width = 8
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, f"opset{opset}",
        [helper.make_tensor_value_info("x", T.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["batch", width]),
         helper.make_tensor_value_info("sm", T.FLOAT, ["batch", 8])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=IR_FOR_OPSET[opset], producer_name="edgeq-tests")
    return model, {"x": _f32(_rng(100 + opset), 3, 8)}


# ---- everything a ModelProto can carry that ORT still runs --------------------------------


def feature_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Constant nodes, a local function, metadata and doc strings everywhere, value_info,
    an initializer that is also a graph input, omitted optional inputs and outputs, typed
    float16/bfloat16 storage, packed int4/uint4, string tensors and a quantization annotation;
    opset 21, IR 10."""
    rng = _rng(1)
    # Local function local.AddMul(X, Y) = (X + Y) * (X + Y), with an attribute reference.
    leaky = helper.make_node("LeakyRelu", ["t2"], ["Z"])
    leaky.attribute.append(helper.make_attribute_ref("alpha", T.FLOAT))
    fn = helper.make_function(
        "local", "AddMul", ["X", "Y"], ["Z"],
        [helper.make_node("Add", ["X", "Y"], ["t"]), helper.make_node("Mul", ["t", "t"], ["t2"]), leaky],
        [helper.make_opsetid("", 21)], attributes=["alpha"], doc_string="function doc")

    fp16_typed = helper.make_tensor("h16", T.FLOAT16, [4], rng.standard_normal(4).astype(np.float16))
    bf16_typed = helper.make_tensor("hbf", T.BFLOAT16, [4], [0.5, -1.25, 3.0, 7.5])
    fp16_raw = numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "h16raw")
    bf16_raw = numpy_helper.from_array(np.array([1.5, 2.0, -0.375, 8.0], dtype=ml_dtypes.bfloat16), "hbfraw")
    int4 = numpy_helper.from_array(np.array([1, -2, 3, -4, 5, 6, -7], dtype=ml_dtypes.int4), "q4")  # odd count
    uint4 = helper.make_tensor("u4", T.UINT4, [5], [0, 3, 15, 8, 1])  # typed int32_data storage
    strings = numpy_helper.from_array(np.array([b"alpha", "βeta".encode(), b""], dtype=object), "labels")
    bias = numpy_helper.from_array(_f32(rng, 4), "bias_in")  # also a graph input (overridable)
    bias.doc_string = "initializer doc"
    _meta(bias, origin="test")
    inits = [fp16_typed, bf16_typed, fp16_raw, bf16_raw, int4, uint4, strings, bias,
             _const("pads", [0, 1, 0, 1]), _const("pad_axes", [0, 1]),
             _const("q4_scale", 0.25, np.float32), _const("u4_scale", 0.5, np.float32),
             numpy_helper.from_array(_f32(rng, 4, 4), "w44")]

    call = helper.make_node("AddMul", ["x", "bias_in"], ["y1"], name="call_addmul", domain="local", alpha=0.1)
    call.doc_string = "node doc"
    _meta(call, **{"pkg.test.origin": "feature", "empty": ""})
    nodes = [
        helper.make_node("Constant", [], ["c_vec"], name="c_vec", value=numpy_helper.from_array(_f32(rng, 4), "cv")),
        helper.make_node("Constant", [], ["c_max"], name="c_max", value_float=0.5),
        helper.make_node("Constant", [], ["c_shape"], name="c_shape", value_ints=[2, 2]),
        call,
        # omitted optional inputs: Clip min (a hole), Pad constant_value (a hole before axes)
        helper.make_node("Clip", ["y1", "", "c_max"], ["y2"], name="clip_max_only"),
        helper.make_node("Pad", ["y2", "pads", "", "pad_axes"], ["y3"], name="pad", mode="reflect"),
        # omitted optional outputs: Dropout mask (trailing), LayerNormalization mean (a hole)
        helper.make_node("Dropout", ["y2"], ["y4", ""], name="dropout"),
        helper.make_node("LayerNormalization", ["y4", "c_vec"], ["y5", "", "inv_std"], name="ln", axis=-1),
        helper.make_node("Cast", ["h16"], ["h16f"], name="cast16", to=T.FLOAT),
        helper.make_node("Cast", ["hbf"], ["hbff"], name="castbf", to=T.FLOAT),
        helper.make_node("Cast", ["h16raw"], ["h16rf"], name="cast16r", to=T.FLOAT),
        helper.make_node("Cast", ["hbfraw"], ["hbfrf"], name="castbfr", to=T.FLOAT),
        helper.make_node("Sum", ["y5", "h16f", "hbff", "h16rf", "hbfrf"], ["y6"], name="sum"),
        helper.make_node("DequantizeLinear", ["q4", "q4_scale"], ["q4f"], name="dq4"),
        helper.make_node("DequantizeLinear", ["u4", "u4_scale"], ["u4f"], name="du4"),
        helper.make_node("Identity", ["labels"], ["labels_out"], name="labels_id"),
        helper.make_node("Identity", ["s"], ["s_out"], name="s_id"),
        helper.make_node("MatMul", ["y6", "w44"], ["y7"], name="mm"),
        helper.make_node("Reshape", ["c_vec", "c_shape"], ["c_mat"], name="reshape"),
    ]
    y1_info = helper.make_tensor_value_info("y1", T.FLOAT, ["n", 4], doc_string="value_info doc")
    _meta(y1_info, note="after the function call")
    x_info = helper.make_tensor_value_info("x", T.FLOAT, ["n", 4], doc_string="input doc")
    _meta(x_info, **{"pkg.torch.export.graph_signature.InputSpec.kind": "USER_INPUT"})
    outputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in [
        ("y7", T.FLOAT, ["n", 4]), ("y3", T.FLOAT, ["n", 6]), ("inv_std", T.FLOAT, ["n", 1]),
        ("q4f", T.FLOAT, [7]), ("u4f", T.FLOAT, [5]), ("labels_out", T.STRING, [3]), ("s_out", T.STRING, [2]),
        ("c_mat", T.FLOAT, [2, 2])]]
    outputs[0].doc_string = "output doc"
    _meta(outputs[0], kind="USER_OUTPUT")
    graph = helper.make_graph(
        nodes, "features",
        [x_info, helper.make_tensor_value_info("bias_in", T.FLOAT, [4]),
         helper.make_tensor_value_info("s", T.STRING, [2])],
        outputs, inits, doc_string="graph doc", value_info=[y1_info])
    _meta(graph, graph_key="graph value")
    annotation = graph.quantization_annotation.add()
    annotation.tensor_name = "y1"
    entry = annotation.quant_parameter_tensor_names.add()
    entry.key, entry.value = "SCALE_TENSOR", "q4_scale"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("local", 1)],
                              ir_version=10, functions=[fn], producer_name="edgeq-tests", producer_version="1.0",
                              doc_string="model doc", domain="ai.edgeq.tests", model_version=3)
    helper.set_model_props(model, {"author": "edgeq", "license": "Apache-2.0", "empty": ""})
    feeds = {"x": _f32(_rng(11), 3, 4), "s": np.array(["a", "ü"], dtype=object)}
    return model, feeds


# ---- control flow: Loop / Scan / If bodies that read outer-scope values -------------------


def control_flow_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A Loop whose body reads an outer initializer and an outer node output and holds an If
    whose branches read a top-level input (a capture two levels up); a Scan whose body reads
    outer values and has its own initializer; opset 17."""
    rng = _rng(2)
    w = numpy_helper.from_array(_f32(rng, 4), "w")
    # If branches inside the Loop body: read top-level `w` and `k`, and the body's `acc_in`.
    then_g = helper.make_graph([helper.make_node("Add", ["acc_in", "w"], ["then_out"])], "then",
                               [], [helper.make_tensor_value_info("then_out", T.FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Sub", ["acc_in", "k_row"], ["else_out"])], "else",
                               [], [helper.make_tensor_value_info("else_out", T.FLOAT, [4])])
    body_scale = numpy_helper.from_array(np.array(0.5, np.float32), "body_scale")  # a subgraph initializer
    loop_body = helper.make_graph(
        [
            helper.make_node("Gather", ["k", "i"], ["k_row"], axis=0),     # outer node output `k`
            helper.make_node("Mul", ["k_row", "body_scale"], ["k_half"]),
            helper.make_node("If", ["flag"], ["branch"], then_branch=then_g, else_branch=else_g),  # outer input
            helper.make_node("Add", ["branch", "k_half"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["acc_out", "w"], ["per_iter"]),       # outer initializer `w`
        ],
        "loop_body",
        [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("cond_in", T.BOOL, []),
         helper.make_tensor_value_info("acc_in", T.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", T.BOOL, []), helper.make_tensor_value_info("acc_out", T.FLOAT, [4]),
         helper.make_tensor_value_info("per_iter", T.FLOAT, [4])],
        [body_scale])
    scan_body = helper.make_graph(
        [
            helper.make_node("Mul", ["row", "w"], ["rw"]),
            helper.make_node("Add", ["state_in", "rw"], ["state_out"]),
            helper.make_node("Sub", ["row", "offset"], ["scan_out"]),    # outer initializer `offset`
        ],
        "scan_body",
        [helper.make_tensor_value_info("state_in", T.FLOAT, [4]), helper.make_tensor_value_info("row", T.FLOAT, [4])],
        [helper.make_tensor_value_info("state_out", T.FLOAT, [4]), helper.make_tensor_value_info("scan_out", T.FLOAT, [4])])
    nodes = [
        helper.make_node("Relu", ["x"], ["k"], name="relu"),
        helper.make_node("Loop", ["n", "", "acc0"], ["acc_final", "per_iter_all"], name="loop", body=loop_body),
        helper.make_node("Scan", ["acc0", "x"], ["state_final", "scan_all"], name="scan", body=scan_body,
                         num_scan_inputs=1),
    ]
    graph = helper.make_graph(
        nodes, "control_flow",
        [helper.make_tensor_value_info("x", T.FLOAT, [3, 4]), helper.make_tensor_value_info("n", T.INT64, []),
         helper.make_tensor_value_info("flag", T.BOOL, []), helper.make_tensor_value_info("acc0", T.FLOAT, [4])],
        [helper.make_tensor_value_info("acc_final", T.FLOAT, [4]),
         helper.make_tensor_value_info("per_iter_all", T.FLOAT, [None, 4]),
         helper.make_tensor_value_info("state_final", T.FLOAT, [4]),
         helper.make_tensor_value_info("scan_all", T.FLOAT, [3, 4])],
        [w, numpy_helper.from_array(_f32(rng, 4), "offset")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": _f32(_rng(12), 3, 4), "n": np.array(3, np.int64), "flag": np.array(True),
             "acc0": _f32(_rng(13), 4)}
    return model, feeds


# ---- a custom-domain op ORT cannot run (compared as protos) -------------------------------


def custom_domain_model() -> onnx.ModelProto:
    """A node of domain com.example with attributes of every kind, an overload, a subgraph
    attribute and an opset import for its domain."""
    rng = _rng(3)
    sub = helper.make_graph([helper.make_node("Neg", ["x"], ["nx"])], "attr_graph", [],
                            [helper.make_tensor_value_info("nx", T.FLOAT, None)])
    attrs = {
        "f": 1.5, "i": -3, "s": b"text", "t": numpy_helper.from_array(_f32(rng, 2, 2), "attr_t"),
        "floats": [1.0, float("nan"), -0.0], "ints": [1, 2, 3], "strings": [b"a", b"b"],
        "tensors": [numpy_helper.from_array(np.arange(3, dtype=np.int32), "t0")],
        "tp": helper.make_tensor_type_proto(T.FLOAT16, [2, "n"]),
    }
    node = helper.make_node("FancyOp", ["x", "", "w"], ["y", "", "z"], name="fancy", domain="com.example", **attrs)
    node.attribute.append(helper.make_attribute("body", sub))
    node.overload = "v2"
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["y"], ["r"], name="relu")], "custom",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("r", T.FLOAT, [2, 2]), helper.make_tensor_value_info("z", T.FLOAT, None)],
        [numpy_helper.from_array(_f32(rng, 2, 2), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 2)],
                             ir_version=10)


# ---- every storage form of an initializer --------------------------------------------------


def storage_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One initializer per element type and storage form (raw_data or typed proto fields),
    each exposed through Identity."""
    rng = _rng(4)
    tensors = []
    for dtype in (np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                  np.int64, np.uint64, np.bool_, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                  ml_dtypes.float8_e5m2):
        array = (rng.standard_normal((4, 8)) * 10).astype(dtype)
        name = f"raw_{np.dtype(dtype).name}"
        tensors.append(numpy_helper.from_array(array, name))
    tensors += [
        helper.make_tensor("typed_f32", T.FLOAT, [3], [1.0, float("nan"), -0.0]),
        helper.make_tensor("typed_i64", T.INT64, [2], [-(2**40), 7]),
        helper.make_tensor("typed_f16", T.FLOAT16, [3], np.array([0.1, -2.0, 65504], np.float16)),
        helper.make_tensor("typed_bf16", T.BFLOAT16, [2], [0.1, -3.0]),
        helper.make_tensor("typed_f64", T.DOUBLE, [2], [1e-300, -2.5]),
        helper.make_tensor("typed_u8", T.UINT8, [3], [0, 128, 255]),
        helper.make_tensor("typed_bool", T.BOOL, [2], [True, False]),
        numpy_helper.from_array(np.array([3, -8, 7], dtype=ml_dtypes.int4), "raw_int4"),
        numpy_helper.from_array(np.array([15, 0, 9, 1, 2], dtype=ml_dtypes.uint4), "raw_uint4"),
        helper.make_tensor("typed_int4", T.INT4, [3], [-1, 2, -3]),
        numpy_helper.from_array(np.array([[b"x", b"yz"], [b"", "ü".encode()]], dtype=object), "strings"),
        numpy_helper.from_array(np.zeros((0, 3), np.float32), "empty"),
        numpy_helper.from_array(np.array(42, np.int64), "scalar"),
    ]
    # ORT's Identity has no 4-bit kernels: those go through DequantizeLinear (scale 1); ORT's
    # Python API returns no bfloat16/float8 arrays: those are cast to float32 (exactly).
    packed = {T.INT4, T.UINT4}
    to_float = {T.BFLOAT16, T.FLOAT8E4M3FN, T.FLOAT8E5M2}
    nodes, outputs = [], []
    for t in tensors:
        if t.data_type in to_float:
            nodes.append(helper.make_node("Cast", [t.name], [f"{t.name}_out"], name=f"cast_{t.name}", to=T.FLOAT))
            outputs.append(helper.make_tensor_value_info(f"{t.name}_out", T.FLOAT, list(t.dims)))
        elif t.data_type in packed:
            nodes.append(helper.make_node("DequantizeLinear", [t.name, "one"], [f"{t.name}_out"], name=f"dq_{t.name}"))
            outputs.append(helper.make_tensor_value_info(f"{t.name}_out", T.FLOAT, list(t.dims)))
        else:
            nodes.append(helper.make_node("Identity", [t.name], [f"{t.name}_out"], name=f"id_{t.name}"))
            outputs.append(helper.make_tensor_value_info(f"{t.name}_out", t.data_type, list(t.dims)))
    tensors.append(_const("one", 1.0, np.float32))
    graph = helper.make_graph(nodes, "storage", [], outputs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return model, {}


# ---- nodes out of topological order (ORT accepts them; the IR sorts) ----------------------


def unsorted_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = _rng(5)
    nodes = [
        helper.make_node("Add", ["b", "c"], ["y"], name="last"),
        helper.make_node("Mul", ["a", "w"], ["b"], name="middle"),
        helper.make_node("Relu", ["a"], ["c"], name="middle2"),
        helper.make_node("Neg", ["x"], ["a"], name="first"),
    ]
    graph = helper.make_graph(nodes, "unsorted", [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])],
                              [numpy_helper.from_array(_f32(rng, 3), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, {"x": _f32(_rng(15), 2, 3)}


# ---- a sparse initializer (ORT densifies it at load) ---------------------------------------


def sparse_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, -2.0, 3.0], np.float32), "sp"),
        numpy_helper.from_array(np.array([0, 5, 15], np.int64), "sp_idx"), [4, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "sp"], ["y"], name="mm")], "sparse",
                              [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, {"x": _f32(_rng(16), 2, 4)}
