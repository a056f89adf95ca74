"""Training: run config, DeepSpeed glue, optimiser/schedule, checkpoints, signals, metrics, eval,
and the trainer loop that ties them together (``launch/pretrain.py`` is its entry point)."""
