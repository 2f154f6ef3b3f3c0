"""`edgeq models build`, the build cache and the missing-extra error."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from edgeq.errors import EdgeqError
from edgeq.models import catalog, minilm
from edgeq.models._onnx import BUILDER_VERSION
from edgeq.models._optional import MissingDependencyError
from edgeq.models.cli import models_group


@pytest.mark.slow
def test_build_minilm(tmp_path: Path) -> None:
    result = CliRunner().invoke(models_group, ["build", "minilm", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(tmp_path / "out" / "minilm.onnx"), load_external_data=False)
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    assert "minilm.onnx" in result.output


def test_unknown_model_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(models_group, ["build", "bert-large", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "minilm" in result.output


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgeq\[models\]'") as info:
        minilm.model()
    assert isinstance(info.value, EdgeqError) and "safetensors" in str(info.value)


def test_unknown_name_in_catalog() -> None:
    with pytest.raises(EdgeqError, match="unknown model"):
        catalog.cached("gpt2")


@pytest.mark.slow
def test_cache_is_keyed_by_builder_version_and_reused(minilm_onnx: Path) -> None:
    assert minilm_onnx.parent.name == f"v{BUILDER_VERSION}"
    before = minilm_onnx.stat().st_mtime_ns
    assert catalog.cached("minilm") == minilm_onnx
    assert minilm_onnx.stat().st_mtime_ns == before
    props = {p.key: p.value for p in onnx.load(str(minilm_onnx), load_external_data=False).metadata_props}
    assert props["edgeq.builder_version"] == BUILDER_VERSION
