"""Validation loss / perplexity on the held-out shards, for the RDT at several loop counts.

Every rank walks its share of the val split (the same number of batches on every rank, so the
collectives ZeRO-3 runs inside a forward stay matched) and token sums are all-reduced: the
result is the exact token-weighted loss over the whole split, independent of world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from mythos import dist
from mythos.model.config import ModelConfig


def eval_loop_counts(cfg: ModelConfig, extra: Sequence[int]) -> list[int | None]:
    """``[None]`` for a dense model; the RDT's default eval depth plus ``extra``, sorted."""
    if cfg.kind == "dense":
        return [None]
    default = int(cfg.loops.eval_loops or round(cfg.loops.mean))
    return sorted({default, *extra})


@torch.no_grad()
def evaluate(
    forward: Callable[..., object],
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    model_cfg: ModelConfig,
    device: torch.device,
    *,
    loops: Sequence[int] = (),
    max_batches: int = 0,
) -> dict[str, float]:
    """Returns ``{"val/loss": .., "val/ppl": ..}`` at the default depth and, for the RDT,
    ``val/loss@T`` / ``val/ppl@T`` for each loop count. ``forward`` is the engine or module
    (already in eval mode); ``batches()`` yields a fresh pass over this rank's val batches."""
    out: dict[str, float] = {}
    counts = eval_loop_counts(model_cfg, loops)
    default = counts[0] if model_cfg.kind == "dense" else int(model_cfg.loops.eval_loops or round(model_cfg.loops.mean))
    for t in counts:
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for i, batch in enumerate(batches()):
            if max_batches and i >= max_batches:
                break
            kwargs = {} if t is None else {"num_loops": t}
            res = forward(batch["input_ids"].to(device), labels=batch["labels"].to(device), **kwargs)
            sums[0] += res.ce_sum.double()
            sums[1] += res.n_tokens.double()
        dist.all_reduce_sum(sums)
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        ppl = math.exp(min(loss, 50.0))
        if t is not None:
            out[f"val/loss@{t}"], out[f"val/ppl@{t}"] = loss, ppl
        if t == default:
            out["val/loss"], out["val/ppl"] = loss, ppl
        out["val/tokens"] = sums[1].item()
    return out
