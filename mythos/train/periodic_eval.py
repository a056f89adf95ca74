"""The training-time validation pass as a component that owns its cadence.

:class:`PeriodicEval` decides when a pass is due (``train.eval_interval``, and always at the last
step), runs :func:`mythos.train.evaluate.evaluate` on the run's val split (the whole split with
``train.eval_batches: 0``, the only setting whose result does not depend on the world size),
logs the scalars and prints one console line. It never logs a fake number: an empty val split is
skipped with one warning, and a missing tokenizer leaves ``val/bpb`` out with one warning.
"""

from __future__ import annotations

from typing import Any

import torch

from mythos.train.config import RunConfig
from mythos.train.evaluate import TokenBytes, evaluate
from mythos.train.metrics import MetricsLogger


class PeriodicEval:
    def __init__(self, cfg: RunConfig, val_loader: Any, device: torch.device, logger: MetricsLogger) -> None:
        self.cfg, self.val_loader, self.device, self.logger = cfg, val_loader, device, logger
        self._said_no_val = False
        self._token_bytes: TokenBytes | None | str = "unresolved"  # found on the first pass

    def due(self, step: int, last: bool) -> bool:
        t = self.cfg.train
        return last or bool(t.eval_interval and step % t.eval_interval == 0)

    def maybe(self, engine: Any, step: int, last: bool = False) -> dict[str, float]:
        """Run a pass at ``step`` if one is due; returns its scalars (empty when none ran)."""
        if not self.due(step, last):
            return {}
        if self.val_loader.num_samples == 0:  # never log a fake 0.0 loss / 1.0 ppl; say it once
            if not self._said_no_val:
                self._said_no_val = True
                self.logger.print(f"warning: the val split of {self.cfg.data.shards} is empty: no val loss is "
                                  "logged (re-shard with --val-fraction > 0, or set train.eval_interval=0)")
            return {}
        if self._token_bytes == "unresolved":  # bits per byte need the tokenizer; None when not found
            self._token_bytes = TokenBytes.for_shards(self.cfg.data.shards)
            if self._token_bytes is None:  # say so once, rather than leaving val/bpb silently out
                self.logger.print(f"warning: the tokenizer of {self.cfg.data.shards} was not found: val/bpb is not "
                                  "logged (python -m mythos.eval --tokenizer PATH computes it later)")
        t = self.cfg.train
        engine.eval()
        try:
            res = evaluate(engine, lambda: iter(self.val_loader), self.cfg.model, self.device,
                           loops=t.eval_loops, max_batches=t.eval_batches, token_bytes=self._token_bytes)
        finally:
            engine.train()
        self.logger.log(step, res)
        self.logger.print(f"eval step {step}: " + " | ".join(f"{k.removeprefix('val/')} {v:.4f}"
                                                             for k, v in res.items() if k.startswith("val/loss")))
        return res
