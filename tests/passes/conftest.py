"""Fixtures of the pass tests: fresh graphs of the synthetic models and their feeds."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgeq
from edgeq.ir import Graph
from edgeq.models import synthetic


@pytest.fixture
def bert_graph(synthetic_bert: Path) -> Graph:
    """A fresh Graph of the synthetic BERT (each test may mutate its own)."""
    return edgeq.load(synthetic_bert)


@pytest.fixture
def llama_graph(synthetic_llama: Path) -> Graph:
    return edgeq.load(synthetic_llama)


@pytest.fixture(scope="session")
def bert_feeds() -> list[dict]:
    """Six calibration/evaluation samples for the synthetic BERT (padding in some rows)."""
    return [synthetic.bert_feeds(batch=2, seq=16, seed=i) for i in range(6)]


@pytest.fixture(scope="session")
def llama_feeds() -> list[dict]:
    return [synthetic.llama_feeds(batch=1, seq=16, seed=i) for i in range(6)]
