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

**Adaptive exit** (RDT only, no oracle: the model decides per query how many loops to run).
:func:`adaptive_answer` runs the core one iteration at a time, up to ``max_loops``, reading the
answer position's distribution after every iteration (what the model would predict at that T).
A query exits at the first iteration ``t >= 2`` whose distribution is within ``exit_kl`` of the
previous one (``KL(p_t || p_t-1) < exit_kl``, key ``"exit-kl<thr>"``) or, for an ACT model with
``act=True``, at the first iteration where every position of the query has halted (key
``"exit-act"``); a query that never converges exits at ``max_loops``. An exited query leaves the
batch, so it stops costing compute and its answer can no longer change. ``exit_loops`` reports the
mean T chosen per hop count: the depth the model picked, to read against the hop count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mythos.model.base import CausalLM
from mythos.tasks.generators import exact_match

DEFAULT = "default"
EXIT_ACT = "exit-act"


def exit_kl_key(threshold: float) -> str:
    """The results key of the KL-convergence exit at ``threshold`` (e.g. ``"exit-kl0.001"``)."""
    return f"exit-kl{threshold:g}"


@torch.no_grad()
def adaptive_answer(
    model: CausalLM, prompt: Tensor, *, exit_kl: float = 0.0, act: bool = False, max_loops: int = 32
) -> tuple[Tensor, Tensor]:
    """Per query, the next-token logits at the iteration where it exits, and that iteration.

    ``prompt [B, S]`` (no padding: every row's last position predicts its answer). Returns
    ``(logits [B, vocab] fp32, loops [B] int64 in [1, max_loops])``. Row i's logits equal the
    model's at ``num_loops = loops[i]`` (eval mode, no cache): the iterations are the trunk's own
    (zero initial state, LTI step, core blocks; ACT positions freeze once halted and the state
    read out at iteration t is the one the trunk outputs when t is its last iteration).

    Exit rule: ``exit_kl > 0``: the first ``t >= 2`` with ``KL(p_t || p_{t-1}) < exit_kl``
    (``exit_kl = 0``: never, so every row runs ``max_loops`` = fixed T); ``act``: also as soon as
    every position of the row has halted (needs an ACT model). Exited rows leave the batch."""
    cfg = model.cfg
    if cfg.kind != "rdt":
        raise ValueError("adaptive exit needs an RDT (a dense model has one depth)")
    if max_loops < 1:
        raise ValueError(f"max_loops must be >= 1, got {max_loops}")
    if exit_kl < 0:
        raise ValueError(f"exit_kl must be >= 0, got {exit_kl}")
    if act and model.halt is None:
        raise ValueError(f"{cfg.name} has no ACT halting unit (model.act.enabled=false): use the KL exit")
    # the model's own per-row exit (RDT._trunk_adaptive): exited rows leave the active set
    out = model(prompt, num_loops=max_loops, exit_kl=exit_kl, exit_act=act)
    loops = out.aux["exit_loops"] if "exit_loops" in out.aux else torch.full((len(prompt),), max_loops)
    return out.logits[:, -1].float(), loops.to(torch.long)


@torch.no_grad()
def evaluate_multihop(
    model: CausalLM,
    examples: Sequence[dict[str, Any]],
    loops: Sequence[int] = (),
    *,
    hops_offsets: Sequence[int] = (),
    exit_kl: Sequence[float] = (),
    exit_act: bool = False,
    exit_max_loops: int = 32,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """``{"accuracy": {loops_key: {hops: acc}}, "count": {hops: n}}`` (+ ``"exit_loops"``,
    ``"exit_max_loops"`` with an adaptive exit).

    ``loops_key`` is ``str(T)`` for each RDT loop count (``"default"`` for a dense model, or an
    RDT evaluated at its configured depth when ``loops`` is empty), ``"hops+c"`` per query at
    ``T = hops + c`` (the oracle), and for an RDT :func:`exit_kl_key` per ``exit_kl`` threshold
    and ``"exit-act"`` with ``exit_act`` (adaptive exits up to ``exit_max_loops``; their
    ``exit_loops[key][hops]`` is the mean T chosen). Hop counts are string keys (JSON). Prompts go
    to ``device`` (default: the model's); ``quiet=False`` prints progress."""
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
    if any(thr <= 0 for thr in exit_kl):
        raise ValueError(f"exit-kl thresholds must be > 0, got {list(exit_kl)}")
    if exit_act and not (is_rdt and getattr(model, "halt", None) is not None):
        raise ValueError(f"--exit-act: {model.cfg.name} has no ACT halting (model.act.enabled=false)")
    # (key, fixed T or None, per-query offset or None)
    settings: list[tuple[str, int | None, int | None]] = (
        [(str(t), int(t), None) for t in loops] + [(f"hops+{c}", None, int(c)) for c in hops_offsets]
        if is_rdt and (loops or hops_offsets) else [(DEFAULT, None, None)]
    )
    # adaptive exits: (key, KL threshold, ACT)
    exits = [(exit_kl_key(float(thr)), float(thr), False) for thr in exit_kl] + (
        [(EXIT_ACT, 0.0, True)] if exit_act else []) if is_rdt else []
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
    exit_loops: dict[str, dict[str, float]] = {}
    for key, thr, act in exits:
        correct, chosen = defaultdict(int), defaultdict(int)
        prog = Progress(f"multihop {key}", len(batches), quiet=quiet)
        for i, (n_answer, chunk) in enumerate(batches):
            prompt = torch.tensor([e["prompt_ids"] for e in chunk], dtype=torch.long, device=device)
            logits, t_row = adaptive_answer(model, prompt, exit_kl=thr, act=act, max_loops=exit_max_loops)
            preds = logits.argmax(-1)[:, None].tolist()
            if n_answer > 1:  # later answer tokens: decode the query at the depth it chose
                for t in sorted(set(t_row.tolist())):
                    sel = (t_row == t).nonzero().flatten()
                    out = model.generate(prompt[sel.to(prompt.device)], n_answer, num_loops=t)
                    for j, row in zip(sel.tolist(), out[:, prompt.shape[1]:].tolist()):
                        preds[j] = row
            for e, pred, t in zip(chunk, preds, t_row.tolist()):
                correct[str(e["hops"])] += exact_match(pred, e["answer_ids"])
                chosen[str(e["hops"])] += t
            prog.update(i + 1)
        accuracy[key] = {h: correct[h] / count[h] for h in sorted(count, key=int)}
        exit_loops[key] = {h: chosen[h] / count[h] for h in sorted(count, key=int)}
    out: dict[str, Any] = {"accuracy": accuracy, "count": dict(sorted(count.items(), key=lambda kv: int(kv[0])))}
    if exits:
        out["exit_loops"] = exit_loops
        out["exit_max_loops"] = exit_max_loops
    return out
