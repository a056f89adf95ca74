"""What the per-row adaptive exit saves and what it costs (issue 21, item 3).

    python bench/adaptive_exit.py                      # train two tiny RDTs (~2-4 min on 2 cores), print
    python bench/adaptive_exit.py --steps 400 --cap 12 # quicker, noisier

Trains, in this process, two tiny pure-loop RDTs like the experiment's ``rdt-chain`` arm (d 64,
one relu2 block looped, no prelude/coda, ``T ~ U{6..12}``, full backprop) on the demo's k-hop
task (``configs/tasks/multihop-khop.yaml``: 20 entities, 3 relations, trained on 1..5 hops,
tested on 1..12): one plain, one with ACT halting. No checkpoint of a trained multi-hop model is
shipped, and training these takes a few minutes on a CPU. Then, for every query of the test
split (exact match of the greedy answer token) and of the val split (cross-entropy of the answer
token, the task's val loss), each model is scored at

- fixed T = 1, 2, 4, 8, ``--cap`` (every query runs T iterations), and
- the model's own per-row exit with ``num_loops=--cap`` as the cap: ``exit_kl`` at each of
  ``--thresholds`` (KL between successive iterations' answer distributions) and, for the ACT
  model, ``exit_act`` (every position halted) alone and with each KL threshold.

Per setting it prints the mean loops used (core row-iterations per query, **counted** by the
model: ``aux["loops_executed"]``), the row-iterations saved against fixed T = cap, the FLOPs of
the whole forward counted by ``torch.utils.flop_counter`` (so the KL criterion's readouts are
paid for, not hidden) relative to fixed T = cap, val loss and exact match (in-distribution hops
1..5 and unseen hops 6..12). Nothing is timed. The numbers recorded in docs/benchmarks.md came
from this script with its defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import table  # noqa: E402
from mythos.model import build_model  # noqa: E402
from mythos.model.config import ACTConfig, LoopConfig, ModelConfig  # noqa: E402
from mythos.model.loss import IGNORE_INDEX  # noqa: E402
from mythos.tasks.generators import TaskConfig, generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "configs" / "tasks" / "multihop-khop.yaml"


def model_config(act: bool, vocab: int) -> ModelConfig:
    """The experiment's rdt-chain arm (configs/run/rdt-chain.yaml), at this task's vocabulary."""
    return ModelConfig(
        kind="rdt", name="rdt-act" if act else "rdt", vocab_size=vocab, d_model=64, n_heads=2, max_seq_len=32,
        mlp="relu2", qk_norm=False, value_embeds="none", n_prelude=0, n_core=1, n_coda=0, injection="lti",
        loops=LoopConfig(schedule="uniform", min_loops=6, max_loops=12, mean=9, eval_loops=12, bwd_depth=0),
        act=ACTConfig(enabled=act, halt_bias_init=-2.0),
    )


def train_rows(examples: list, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs [N, L], labels [N, L])``: ``<s> prompt answer </s>`` right-padded with 0, labels
    the next token on answer targets only (the task's loss mask), -100 elsewhere."""
    rows = [ex.sample(vocab) for ex in examples]
    width = max(len(t) for t, _ in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (tokens, mask) in enumerate(rows):
        t = torch.tensor(tokens)
        m = torch.tensor(mask[1:], dtype=torch.bool)
        x[i, : len(t) - 1] = t[:-1]
        y[i, : len(t) - 1] = torch.where(m, t[1:], torch.full_like(t[1:], IGNORE_INDEX))
    return x, y


def train(cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    model.loop_seed = seed
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)))))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        out = model(x[idx], labels=y[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(steps // 4, 1) == 0:
            print(f"  {cfg.name} step {step + 1}/{steps}: loss {out.loss.item():.3f}", flush=True)
    return model.eval()


def by_length(examples: list, vocab) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Queries grouped by prompt length (no padding): ``(prompts [n, S], answers [n], hops)``."""
    groups: dict[int, list] = defaultdict(list)
    for ex in examples:
        prompt, answer = ex.ids(vocab)
        assert len(answer) == 1  # k-hop answers are one entity
        groups[len(prompt)].append((prompt, answer[0], ex.hops))
    return [(torch.tensor([p for p, _, _ in g]), torch.tensor([a for _, a, _ in g]), [h for _, _, h in g])
            for _, g in sorted(groups.items())]


@torch.no_grad()
def score(model: torch.nn.Module, groups: list, kw: dict) -> dict[str, float]:
    """Over all queries of ``groups`` with forward options ``kw``: loops used per query (counted
    core row-iterations), FLOPs, answer cross-entropy, exact match (all / hops <= 5 / > 5)."""
    n = iters = flops = 0
    ce = 0.0
    hit: dict[str, list[int]] = {"in": [0, 0], "out": [0, 0]}
    for prompts, answers, hops in groups:
        with FlopCounterMode(display=False) as fc:
            out = model(prompts, **kw)
        flops += fc.get_total_flops()
        logits = out.logits[:, -1].float()
        ce += float(F.cross_entropy(logits, answers, reduction="sum"))
        iters += float(out.aux["loops_executed"]) * len(prompts)
        n += len(prompts)
        for ok, h in zip((logits.argmax(-1) == answers).tolist(), hops):
            part = hit["in" if h <= 5 else "out"]
            part[0] += ok
            part[1] += 1
    res = {"loops": iters / n, "flops": flops / n, "ce": ce / n}
    for key, (ok, total) in hit.items():
        res[f"em_{key}"] = ok / total if total else float("nan")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--cap", type=int, default=16, help="fixed-T reference and the exit's most loops")
    ap.add_argument("--thresholds", default="0.1,0.03,0.01,0.001,0.0001")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    thresholds = [float(v) for v in a.thresholds.split(",") if v.strip()]
    data = generate(TaskConfig(**yaml.safe_load(TASK.read_text())))
    vocab = data.vocab
    vocab_size = 8 * ((len(vocab) + 7) // 8 + 1)
    x, y = train_rows(data.splits["train"], vocab)
    test, val = by_length(data.splits["test"], vocab), by_length(data.splits["val"], vocab)
    print(f"task {TASK.name}: {len(x)} train rows, {len(data.splits['val'])} val, {len(data.splits['test'])} test "
          f"queries; {a.steps} steps x {a.batch}; exit cap T = {a.cap}")
    for act in (False, True):
        cfg = model_config(act, vocab_size)
        model = train(cfg, x, y, a.steps, a.batch, a.seed)
        settings: list[tuple[str, dict]] = [(f"fixed T={t}", {"num_loops": t}) for t in (1, 2, 4, 8, a.cap)]
        settings += [(f"exit KL<{thr:g}", {"num_loops": a.cap, "exit_kl": thr}) for thr in thresholds]
        if act:
            settings += [("exit ACT", {"num_loops": a.cap, "exit_act": True})]
            settings += [(f"exit ACT or KL<{thr:g}", {"num_loops": a.cap, "exit_act": True, "exit_kl": thr})
                         for thr in thresholds[1:3]]
        ref = score(model, test, {"num_loops": a.cap})
        rows = []
        for label, kw in settings:
            te, va = score(model, test, kw), score(model, val, kw)
            rows.append([label, f"{te['loops']:.2f}", f"{1 - te['loops'] / ref['loops']:+.0%}",
                         f"{te['flops'] / ref['flops']:.2f}", f"{va['ce']:.3f}", f"{te['em_in']:.3f}",
                         f"{te['em_out']:.3f}"])
        print(f"\n{cfg.name} ({model.num_params():,} params; trained T ~ U{{6..12}}"
              f"{', ACT' if act else ''}); test: {sum(len(g[0]) for g in test)} queries, val: "
              f"{sum(len(g[0]) for g in val)}")
        print(table(["setting", "loops/query", "row-iters saved vs T=cap", "FLOPs / T=cap", "val CE",
                     "EM hops<=5", "EM hops>5"], rows))
    print("\nloops/query: core row-iterations per query, counted (aux['loops_executed']); FLOPs: the whole forward "
          "(torch.utils.flop_counter), the KL criterion's readouts included")


if __name__ == "__main__":
    main()
