"""Exact-match accuracy on a multi-hop test set, per hop count and (RDT) per loop count.

The test queries come from a task directory (``python -m mythos.tasks``): each has
``prompt_ids`` (``<s>`` + prompt) and ``answer_ids``. The model greedily decodes
``len(answer)`` tokens after the prompt; a query is correct iff they equal the answer exactly
(:func:`mythos.tasks.exact_match`). Queries are batched by prompt/answer length, so no padding
ever enters a prompt (batching cannot change a prediction), longest prompts first. The RDT runs
every loop count in ``loops`` (more loops than it was trained with = more test-time depth) and,
for each ``c`` in ``hops_offsets``, every query at its own ``T = hops + c`` (key ``"hops+c"``: how
a model trained with ``loops.schedule=hops`` is meant to run); a dense model has one depth,
reported under the key ``"default"``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from mythos.model.base import CausalLM
from mythos.tasks.generators import exact_match

DEFAULT = "default"


@torch.no_grad()
def evaluate_multihop(
    model: CausalLM,
    examples: Sequence[dict[str, Any]],
    loops: Sequence[int] = (),
    *,
    hops_offsets: Sequence[int] = (),
    batch_size: int = 256,
    device: str | torch.device | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """``{"accuracy": {loops_key: {hops: acc}}, "count": {hops: n}, "train_hops": ...}``.

    ``loops_key`` is ``str(T)`` for each RDT loop count (``"default"`` for a dense model, or an
    RDT evaluated at its configured depth when ``loops`` is empty). Hop counts are string keys
    (JSON). Prompts go to ``device`` (default: the model's); ``quiet=False`` prints progress."""
    from mythos.eval.device import Progress

    if not examples:
        raise ValueError("no multi-hop test examples")
    vocab = model.cfg.vocab_size
    longest = max(len(e["prompt_ids"]) + len(e["answer_ids"]) for e in examples)
    if longest > model.cfg.max_seq_len:
        raise ValueError(f"test queries need {longest} positions but model.max_seq_len={model.cfg.max_seq_len}")
    if max(max(e["prompt_ids"] + e["answer_ids"]) for e in examples) >= vocab:
        raise ValueError(f"test queries use token ids >= model.vocab_size={vocab} (a different tokenizer?)")
    groups: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for e in examples:
        groups[len(e["prompt_ids"]), len(e["answer_ids"])].append(e)
    is_rdt = model.cfg.kind == "rdt"
    # (key, fixed T or None, per-query offset or None)
    settings: list[tuple[str, int | None, int | None]] = (
        [(str(t), int(t), None) for t in loops] + [(f"hops+{c}", None, int(c)) for c in hops_offsets]
        if is_rdt and (loops or hops_offsets) else [(DEFAULT, None, None)]
    )
    count: dict[str, int] = defaultdict(int)
    for e in examples:
        count[str(e["hops"])] += 1
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # longest prompts first: the first batch is the biggest, so an OOM shows up at once
    batches = [(n_answer, group[lo : lo + batch_size])
               for (_, n_answer), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))
               for lo in range(0, len(group), batch_size)]
    model.eval()
    accuracy: dict[str, dict[str, float]] = {}
    for key, fixed, offset in settings:
        correct: dict[str, int] = defaultdict(int)
        prog = Progress("multihop" if key == DEFAULT else f"multihop T={key}", len(batches), quiet=quiet)
        for i, (n_answer, chunk) in enumerate(batches):
            prompt = torch.tensor([e["prompt_ids"] for e in chunk], dtype=torch.long, device=device)
            kwargs: dict[str, Any] = {}
            if fixed is not None:
                kwargs["num_loops"] = fixed
            elif offset is not None:  # CPU tensor: the loop counts steer Python control flow
                kwargs["loop_counts"] = torch.tensor([max(e["hops"] + offset, 1) for e in chunk], dtype=torch.long)
            out = model.generate(prompt, n_answer, **kwargs)[:, prompt.shape[1]:].tolist()
            for e, pred in zip(chunk, out):
                correct[str(e["hops"])] += exact_match(pred, e["answer_ids"])
            prog.update(i + 1)
        accuracy[key] = {h: correct[h] / count[h] for h in sorted(count, key=int)}
    return {"accuracy": accuracy, "count": dict(sorted(count.items(), key=lambda kv: int(kv[0])))}
