"""Shared data fixtures: a real ~1 MB Shakespeare corpus, tokenizer and shards, built once per
test session. Import the fixture into a test module with
````pytest_plugins = ["data_fixtures"]````."""

from __future__ import annotations

import pytest

from data_prep.demo_corpus import SmallCorpus, build_test_corpus


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory: pytest.TempPathFactory) -> SmallCorpus:
    """~1 MB of Shakespeare -> BPE vocab 1024 -> seq_len 64 shards (7 train + 1 val)."""
    return build_test_corpus(tmp_path_factory.mktemp("data_corpus"))
