"""Synthetic multi-hop tasks for depth extrapolation: generators, shards, exact-match scoring.

    python -m mythos.tasks --config configs/tasks/multihop-khop.yaml --out data/multihop/khop

writes ``tokenizer/`` (a word-level sentencepiece model), ``shards/`` (train/val, loss on the
answer only), ``test.jsonl`` and ``task.json``; ``python -m mythos.eval --multihop DIR`` scores
a run on ``test.jsonl`` (accuracy per hop count and loop count).
"""

from mythos.tasks.build import TASK_FILE, TEST_FILE, build_task, load_test_examples
from mythos.tasks.generators import Example, TaskConfig, TaskData, exact_match, generate
from mythos.tasks.vocab import WordVocab

__all__ = [
    "TASK_FILE",
    "TEST_FILE",
    "Example",
    "TaskConfig",
    "TaskData",
    "WordVocab",
    "build_task",
    "exact_match",
    "generate",
    "load_test_examples",
]
