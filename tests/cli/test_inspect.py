"""edgeq.cli.inspect: `edgeq inspect` reports what the model holds."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx


def test_inspect_json_matches_the_model(run_cli, synthetic_bert):
    code, out, _ = run_cli("inspect", "--json", synthetic_bert)
    assert code == 0
    summary = json.loads(out)
    proto = onnx.load(str(synthetic_bert))
    assert summary["nodes"] == len(proto.graph.node)
    assert summary["ops"] == dict(Counter(n.op_type for n in proto.graph.node))
    assert summary["opsets"] == {"": 17}
    assert [i["name"] for i in summary["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert summary["outputs"] == [{"name": "last_hidden_state", "dtype": "float",
                                   "shape": ["batch", "sequence", 64]}]
    assert summary["parameters_total"] == sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


def test_inspect_text_lists_ops_and_io(run_cli, synthetic_bert):
    code, out, _ = run_cli("inspect", synthetic_bert)
    proto = onnx.load(str(synthetic_bert))
    assert code == 0 and out.startswith(f"{synthetic_bert}  (IR ")
    assert "opsets:   ai.onnx=17" in out
    for op_type, count in Counter(n.op_type for n in proto.graph.node).items():
        assert any(line.split() == [op_type, str(count)] for line in out.splitlines())
    assert "  input_ids: " in out and "  last_hidden_state: float" in out


def test_inspect_reports_what_the_front_end_recognised(run_cli, synthetic_bert):
    code, out, _ = run_cli("inspect", "--json", synthetic_bert)
    assert code == 0
    summary = json.loads(out)
    assert summary["dynamic_axes"] == {name: {"0": "batch", "1": "sequence"}
                                       for name in ("input_ids", "attention_mask", "token_type_ids")}
    blocks = summary["recognised_blocks"]
    assert blocks["LayerNorm"] == 5 and blocks["GELU"] == 2 and blocks["Linear"] == 12 and blocks["Attention"] == 2
    assert summary["mask"] == {"key-padding": 2}
    assert summary["custom_ops"] == {} and summary["front_end"]["compiled_model"] is False
    assert summary["front_end"]["passes"][:3] == ["convert-opset", "identity-elimination", "constant-folding"]
    code, text, _ = run_cli("inspect", synthetic_bert)
    assert code == 0
    assert "dynamic axes: input_ids 0=batch, 1=sequence;" in text
    assert "  recognised blocks: LayerNorm 5, " in text and "  attention mask: key-padding (2 attentions)" in text


def test_inspect_names_custom_domain_ops(run_cli, shared_dir):
    code, out, _ = run_cli("inspect", "--json", shared_dir / "fixtures" / "exports" / "bert_tiny_ort_fused.onnx")
    assert code == 0
    summary = json.loads(out)
    assert summary["custom_ops"] == {"com.microsoft::BiasGelu": 2, "com.microsoft::SkipLayerNormalization": 4}
    code, text, _ = run_cli("inspect", shared_dir / "fixtures" / "exports" / "bert_tiny_ort_fused.onnx")
    assert "custom-domain ops: com.microsoft::BiasGelu 2, com.microsoft::SkipLayerNormalization 4" in text
