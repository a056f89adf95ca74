"""Validation loss / perplexity / bits per byte on the held-out shards, for the RDT at several
loop counts. The one implementation behind training's periodic eval (``mythos.train.periodic_eval.PeriodicEval``) and
``python -m mythos.eval``.

Every rank walks its share of the val split (the same number of batches on every rank, so the
collectives ZeRO-3 runs inside a forward stay matched) and token sums are all-reduced: the
result is the exact token-weighted loss over the whole split, independent of world size.

**Bits per byte** = ``sum CE (nats) / ln 2 / sum bytes`` over the same label tokens, with each
label's exact UTF-8 byte count from the tokenizer (:class:`TokenBytes`; EOS counts 0 bytes but
its loss counts). It does not depend on the vocabulary, so it compares models with different
tokenizers, and it equals the manifest's mean only on average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from mythos import dist
from mythos.model.config import ModelConfig
from mythos.model.loops import sample_loop_counts


class TokenBytes:
    """Exact UTF-8 bytes covered by label tokens (see :mod:`mythos.data.tokenizer`).

    ``table [vocab]`` holds each id's byte length; with ``dummy_prefix`` a label whose input token
    is EOS (a document start in ``doc EOS doc`` packing) counts one byte less. Ignored labels
    (``< 0``) count nothing."""

    def __init__(self, table: torch.Tensor, eos_id: int, dummy_prefix: bool) -> None:
        self.table = table.long()
        self.eos_id = eos_id
        self.dummy_prefix = dummy_prefix

    @classmethod
    def for_shards(cls, shards: str | Path) -> TokenBytes | None:
        """From the tokenizer recorded in ``shards``' manifest; None when it is not available."""
        from mythos.data.format import load_manifest
        from mythos.data.tokenizer import find_tokenizer

        manifest = load_manifest(shards)
        tok = find_tokenizer(manifest.raw, manifest.directory)
        if tok is None:
            return None
        table, dummy = tok.byte_lengths()
        return cls(torch.from_numpy(table), tok.eos_id, dummy)

    def count(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Total bytes (int64 scalar) of the valid labels in ``labels [B, S]`` (inputs ``[B, S]``)."""
        valid = labels >= 0
        table = self.table.to(labels.device)
        n = table[labels.clamp(min=0)]
        if self.dummy_prefix:
            n = n - (input_ids == self.eos_id).long()
        return (n.clamp(min=0) * valid).sum()


def default_eval_loops(cfg: ModelConfig) -> int | str:
    """The RDT's default eval depth: ``loops.eval_loops`` or ``round(loops.mean)``; for a model
    trained with ``loops.schedule=hops`` the per-sample ``"hops+c"`` (each sample at its own hop
    count + offset, as in training)."""
    if cfg.loops.schedule == "hops" and not cfg.loops.eval_loops:
        return f"hops+{cfg.loops.hops_offset}"
    return int(cfg.loops.eval_loops or round(cfg.loops.mean))


def eval_loop_counts(cfg: ModelConfig, extra: Sequence[int]) -> list[int | str | None]:
    """The passes :func:`evaluate` makes, in order: ``[None]`` for a dense model; for the RDT its
    default depth (:func:`default_eval_loops`) and ``extra``, integers sorted (a per-sample
    ``"hops+c"`` default comes first)."""
    if cfg.kind == "dense":
        return [None]
    default = default_eval_loops(cfg)
    if isinstance(default, str):
        return [default, *sorted(set(extra))]
    return sorted({default, *extra})


def _loop_kwargs(t: int | str | None, batch: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, object]:
    if t is None:
        return {}
    if isinstance(t, int):
        return {"num_loops": t}
    if "hops" not in batch:  # shards without hop counts: the schedule's planning mean instead
        return {"num_loops": max(1, round(cfg.loops.mean))}
    hops = batch["hops"]
    return {"loop_counts": sample_loop_counts(cfg.loops, 0, 0, len(hops), hops)}  # the training rule


@torch.no_grad()
def evaluate(
    forward: Callable[..., object],
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    model_cfg: ModelConfig,
    device: torch.device,
    *,
    loops: Sequence[int] = (),
    max_batches: int = 0,
    token_bytes: TokenBytes | None = None,
) -> dict[str, float]:
    """Returns ``{"val/loss", "val/ppl", "val/tokens"}`` (+ ``"val/bpb", "val/bytes"`` with
    ``token_bytes``) at the default depth (:func:`default_eval_loops`; per sample ``hops + c`` for
    the ``hops`` schedule, from the val batches' ``hops``) and, for the RDT, ``val/loss@T`` /
    ``val/ppl@T`` / ``val/bpb@T`` for each integer loop count. ``forward`` is the engine or module (already in eval
    mode); ``batches()`` yields a fresh pass over this rank's val batches."""
    out: dict[str, float] = {}
    counts = eval_loop_counts(model_cfg, loops)
    default = counts[0] if model_cfg.kind == "dense" else default_eval_loops(model_cfg)
    for t in counts:
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # ce nats, tokens, bytes
        for i, batch in enumerate(batches()):
            if max_batches and i >= max_batches:
                break
            kwargs = _loop_kwargs(t, batch, model_cfg)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            res = forward(ids, labels=labels, **kwargs)
            sums[0] += res.ce_sum.double()
            sums[1] += res.n_tokens.double()
            if token_bytes is not None:
                sums[2] += token_bytes.count(ids, labels).double()
        dist.all_reduce_sum(sums)
        if sums[1].item() == 0:  # an empty split has no loss: 0 nats over 0 tokens is not 0.0
            raise ValueError("no val tokens to evaluate (the val split is empty or max_batches cut every batch)")
        loss = (sums[0] / sums[1]).item()
        ppl = math.exp(min(loss, 50.0))
        bpb = (sums[0] / math.log(2) / sums[2]).item() if token_bytes is not None and sums[2] > 0 else None
        if isinstance(t, int):
            out[f"val/loss@{t}"], out[f"val/ppl@{t}"] = loss, ppl
            if bpb is not None:
                out[f"val/bpb@{t}"] = bpb
        if t == default:
            out["val/loss"], out["val/ppl"] = loss, ppl
            if bpb is not None:
                out["val/bpb"] = bpb
        out["val/tokens"] = sums[1].item()
        if bpb is not None:
            out["val/bytes"] = sums[2].item()
    return out
