"""Pretrain from a checkout without installing: ``deepspeed --num_gpus 8 launch/pretrain.py --config ...``.

A thin wrapper: the entry point is :mod:`mythos.train.cli` (installed: ``python -m mythos.train``,
``deepspeed --module mythos.train``, ``torchrun -m mythos.train``); see its docstring for the forms,
``--dry-run`` and the exit codes. This file only makes the checkout importable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mythos.train.cli import fail, main, one_line, parse_args, run  # noqa: E402, F401 (re-exported)

if __name__ == "__main__":
    sys.exit(run())
