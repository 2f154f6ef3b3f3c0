"""`edgeq.runtime.benchmark`: rows per runtime, shapes, interleaved timing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from edgeq.errors import OptionError
from edgeq.registry import get_target
from edgeq.runtime.benchmark import ModelInfo, bench, plan_rows, resolve_shapes
from tests.runtime.models import affine


def test_bench_of_a_synthetic_model_gives_a_median_for_every_row(tmp_path: Path):
    result = bench([affine(tmp_path / "m.onnx", 2.0)], warmup=1, repeats=3, progress=False)
    assert [r.spec.precision for r in result.rows] == ["fp32"]
    assert all(len(r.seconds) == 3 and r.median > 0 for r in result.rows)
    data = result.to_dict()
    assert data["shapes"] == {"x": [1, 4]} and data["baseline"].startswith("m.onnx float")
    assert data["rows"][0]["vs_best_float"] == pytest.approx(1.0)
    assert "no target" in " ".join(result.notes)


def test_float_rows_cover_every_float_path_and_compiled_rows_their_execution(tmp_path: Path):
    target = get_target("x86-vnni")
    float_info = ModelInfo.read(affine(tmp_path / "f.onnx", 2.0))
    compiled = ModelInfo(Path("c.onnx"), float_info.inputs, "x86-vnni", "cpu", {})
    notes: list[str] = []
    rows = plan_rows([float_info, compiled], target, bf16=True, notes=notes)
    floats = [(r.execution.name, r.precision) for r in rows if r.kind == "float"]
    if importlib.util.find_spec("openvino") is not None:
        assert floats == [("openvino", "f32"), ("openvino", "bf16"), ("cpu", "fp32")]
    else:
        assert floats == [("cpu", "fp32")] and any(n.startswith("openvino: not measured") for n in notes)
    assert [(r.execution.name, r.kind) for r in rows if r.kind == "compiled"] == [("cpu", "compiled")]
    with pytest.raises(OptionError, match="no provider 'qnn'"):
        plan_rows([compiled], target, providers=["qnn"])


def test_text_models_default_to_one_by_128_tokens_unless_shapes_are_recorded_or_given(synthetic_bert):
    info = ModelInfo.read(synthetic_bert)
    shapes, source = resolve_shapes(info, {})
    assert shapes and all(v == [1, 128] for v in shapes.values())
    assert "default for text models" in source
    shapes, source = resolve_shapes(info, {}, {"input_ids": [4, 16], "attention_mask": [4, 16]})
    assert shapes["input_ids"] == [4, 16] and "recorded" in source
    shapes, source = resolve_shapes(info, {"input_ids": [16, 128]})
    assert all(v == [16, 128] for v in shapes.values()) and source == "--shape"  # the other inputs follow
