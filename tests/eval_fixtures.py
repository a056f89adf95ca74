"""Two short real training runs (tiny RDT + tiny dense, 2 CPU ranks, identical data) shared by
the eval, compare and lm-eval tests. Use with ``pytest_plugins = ["data_fixtures", "eval_fixtures"]``."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_utils import run_training

RDT = "configs/run/rdt-tiny-cpu.yaml"
DENSE = "configs/run/dense-tiny-cpu.yaml"


@pytest.fixture(scope="session")
def short_runs(data_corpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"rdt": RUN_DIR, "dense": RUN_DIR}``: 4 steps each (checkpoint at step 4, a val pass at
    steps 2 and 4), ZeRO-2, the session's Shakespeare shards."""
    root = tmp_path_factory.mktemp("short_runs")
    runs = {}
    for name, config in (("rdt", RDT), ("dense", DENSE)):
        runs[name] = root / name
        run_training(config, runs[name], data_corpus.shards_dir,
                     ["train.max_steps=4", "train.save_interval=4", "train.eval_interval=2"])
    return runs
