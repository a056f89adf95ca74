"""Training: run config, DeepSpeed glue, optimiser/schedule, checkpoints, signals, metrics, eval,
and the trainer loop that ties them together (entry point: :mod:`mythos.train.cli`, run as
``python -m mythos.train``, ``deepspeed --module mythos.train`` or ``launch/pretrain.py``)."""
