"""Build a task directory: tokenizer, loss-masked train/val shards, the test set and a task card.

    python -m mythos.tasks --config configs/tasks/multihop-khop.yaml --out data/multihop/khop [key=value ...]

Layout of ``--out``::

    tokenizer/tokenizer.model   word-level sentencepiece model (mythos.tasks.vocab)
    shards/                     manifest.json (loss_mask: true) + train/val tars: train with these
    test.jsonl                  {"hops", "prompt_ids", "answer_ids", "text"} per test query
    task.json                   the resolved TaskConfig, vocabulary, split counts, data hash, test sha256

Re-running with the same config rewrites byte-identical files (everything is seeded).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mythos.cli_common import ArgumentParser, fail
from mythos.config import ConfigError, from_dict, load_config, to_dict
from mythos.data.shard_writer import write_example_shards
from mythos.io import atomic_write_bytes, atomic_write_json, sha256_bytes
from mythos.tasks.generators import TaskConfig, generate

TASK_FILE = "task.json"
TEST_FILE = "test.jsonl"


def build_task(cfg: TaskConfig, out_dir: str | Path) -> dict[str, Any]:
    """Generate ``cfg``'s task and write it to ``out_dir``; returns the task card (``task.json``)."""
    data = generate(cfg)
    out = Path(out_dir)
    tok_dir = out / "tokenizer"
    atomic_write_bytes(tok_dir / "tokenizer.model", data.vocab.sentencepiece_model())
    rows = {s: [ex.sample(data.vocab) for ex in data.splits[s]] for s in ("train", "val")}
    test_rows = [ex.sample(data.vocab) for ex in data.splits["test"]]
    max_len = max(len(t) for t, _ in [*rows["train"], *rows["val"], *test_rows])
    manifest = write_example_shards(
        out / "shards",
        tok_dir,
        rows,
        extra={"kind": cfg.kind, "config": to_dict(cfg)},
        hops={s: [ex.hops for ex in data.splits[s]] for s in ("train", "val")},
    )
    lines = []
    for ex in data.splits["test"]:
        prompt, answer = ex.ids(data.vocab)
        lines.append(
            json.dumps(
                {
                    "hops": ex.hops,
                    "prompt_ids": prompt,
                    "answer_ids": answer,
                    "text": " ".join((*ex.prompt, *ex.answer)),
                }
            )
        )
    test_bytes = ("\n".join(lines) + "\n").encode()
    atomic_write_bytes(out / TEST_FILE, test_bytes)
    card = {
        "task": cfg.kind,
        "config": to_dict(cfg),
        "vocab_size": len(data.vocab),
        "words": list(data.vocab.words),
        "seq_len": manifest["seq_len"],
        "max_test_len": max_len,
        "train_hops": list(range(1, cfg.train_max_hops + 1)),
        "test_hops": sorted(set(cfg.test_hops)),
        "splits": {s: len(v) for s, v in data.splits.items()},
        "data_hash": manifest["data_hash"],
        # the data hash covers the train/val shards; this the test queries (a run's eval records it)
        "test_sha256": sha256_bytes(test_bytes),
        "structure": data.structure,
    }
    atomic_write_json(out / TASK_FILE, card)
    return card


def load_task_card(task_dir: str | Path) -> dict[str, Any]:
    path = Path(task_dir) / TASK_FILE
    if not path.is_file():
        raise ConfigError(f"no {TASK_FILE} in {task_dir} (build it with `python -m mythos.tasks --out {task_dir}`)")
    card = json.loads(path.read_text())
    from_dict(TaskConfig, card["config"], source=path)  # validates the stored config
    return card


def load_test_examples(task_dir: str | Path) -> list[dict[str, Any]]:
    """The test queries of a task directory: ``[{"hops", "prompt_ids", "answer_ids", "text"}]``."""
    path = Path(task_dir) / TEST_FILE
    if not path.is_file():
        raise ConfigError(f"no {TEST_FILE} in {task_dir} (build it with `python -m mythos.tasks --out {task_dir}`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_parser() -> ArgumentParser:
    """The ``python -m mythos.tasks`` argument parser."""
    p = ArgumentParser(prog="python -m mythos.tasks", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="task YAML (TaskConfig); default: khop with the defaults")
    p.add_argument("--out", required=True, metavar="DIR", help="output task directory")
    p.add_argument("overrides", nargs="*", help="TaskConfig overrides, e.g. seed=1 n_entities=64")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.config:
            cfg = load_config(TaskConfig, a.config, a.overrides)
        else:
            from mythos.config import apply_overrides

            cfg = from_dict(TaskConfig, apply_overrides({}, a.overrides))
        card = build_task(cfg, a.out)
    except (ConfigError, ValueError) as exc:
        return fail(exc)
    print(
        f"{a.out}: {card['task']} task, vocab {card['vocab_size']}, seq_len {card['seq_len']}, "
        f"splits {card['splits']}, data {card['data_hash'][:12]}"
    )
    return 0
