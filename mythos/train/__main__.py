"""``python -m mythos.train``: the training entry point (see :mod:`mythos.train.cli`); also what
``deepspeed --module mythos.train`` and ``torchrun -m mythos.train`` run."""

import sys

from mythos.train.cli import run

sys.exit(run())
