"""Whether the installed ONNX Runtime can run a model's opset: the newest default-domain opset
it accepts (probed once per process) and the check `edgeq.load` makes against it."""

from __future__ import annotations

import functools

import onnx
import onnxruntime as ort
from onnx import helper

from edgeq.errors import UnsupportedOpsetError
from edgeq.ir.graph import ModelInfo
from edgeq.runtime.sessions import make_session


@functools.cache
def runtime_max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime accepts (probed once)."""

    def accepts(version: int) -> bool:
        node = helper.make_node("Identity", ["x"], ["y"])
        vi = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
        model = helper.make_model(helper.make_graph([node], "probe", vi[:1], vi[1:]),
                                  opset_imports=[helper.make_opsetid("", version)], ir_version=8)
        try:
            make_session(model.SerializeToString())
            return True
        except Exception:  # noqa: BLE001 (ORT's pybind errors share no base class)
            return False

    low, high = 13, 64
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if accepts(mid) else (low, mid - 1)
    return low


def check_runtime_support(info: ModelInfo) -> None:
    """Raise UnsupportedOpsetError if the model's opset is newer than onnxruntime runs."""
    version = max((v for d, v in info.opset_imports.items() if d in ("", "ai.onnx")), default=0)
    if version > runtime_max_opset():
        raise UnsupportedOpsetError(
            f"the model uses ONNX opset {version}, newer than onnxruntime {ort.__version__} runs "
            f"(at most {runtime_max_opset()})", fix="upgrade onnxruntime or re-export at a lower opset")
