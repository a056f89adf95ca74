"""lm-evaluation-harness adapter: our checkpoints as the registered model ``mythos``.

    python -m mythos.eval.lm_eval_adapter --run runs/demo/rdt-tiny --tasks hellaswag [--loops 16] \\
        [--include-path my_tasks/] [--limit 100] [--out results.json]

or from Python (importing this module registers the model name)::

    import lm_eval, mythos.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="mythos", model_args="run=runs/demo/rdt-tiny,loops=16", tasks=[...])

Model args: ``run`` (run directory, required), ``checkpoint`` (tag, ``latest`` or an exported
model dir), ``loops`` (RDT test-time loop count; default the model's eval depth), ``batch_size``,
``max_length`` (default ``model.max_seq_len``), ``device``, ``tokenizer`` (a ``tokenizer.model``;
default: the one the run's shards were built with, found and sha256-checked via the manifest).

Conventions: training data joins documents as ``doc EOS doc`` with no BOS, so the end-of-text
token (EOS) is both ``eot_token_id`` and the prefix for empty contexts. Requests longer than
``max_length`` keep their *last* tokens (left truncation), as the HF backend does. Batches are
right-padded: with causal attention a pad after the real tokens cannot change their logits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from mythos.data.tokenizer import Tokenizer, find_tokenizer


@register_model("mythos")
class MythosLM(TemplateLM):
    """A mythos run (dense or RDT) behind lm-eval's ``LM`` interface."""

    def __init__(
        self,
        run: str,
        checkpoint: str | None = None,
        loops: int | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        device: str = "cpu",
        tokenizer: str | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        from mythos.data.format import load_manifest
        from mythos.eval.loading import load_run

        self.run = load_run(run, checkpoint, device=device)
        self.model = self.run.model
        self._device = torch.device(device)
        self.kind = self.run.cfg.model.kind
        if loops is not None and self.kind != "rdt":
            raise ValueError(f"loops={loops} given but {run} is a {self.kind} model (loops are for the RDT)")
        self.loops = int(loops) if loops is not None else None
        if tokenizer:
            self.tok = Tokenizer(tokenizer)
        else:
            manifest = load_manifest(self.run.cfg.data.shards)
            found = find_tokenizer(manifest.raw, manifest.directory)
            if found is None:
                raise FileNotFoundError(
                    f"tokenizer of {self.run.cfg.data.shards} not found (manifest path "
                    f"{manifest.raw['tokenizer'].get('path')}); pass tokenizer=PATH/tokenizer.model"
                )
            self.tok = found
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length or self.run.cfg.model.max_seq_len)

    # ---- lm-eval plumbing -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    def _forward_kwargs(self) -> dict[str, int]:
        return {"num_loops": self.loops} if self.loops is not None else {}

    @torch.no_grad()
    def _logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """``[B, max_len, V]`` float32 log-probs of right-padded ``seqs``."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        out = self.model(ids.to(self._device), **self._forward_kwargs())
        return F.log_softmax(out.logits.float(), dim=-1).cpu()

    # ---- scoring --------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives the continuation."""
        results: list[tuple[float, bool]] = []
        for lo in range(0, len(requests), self.batch_size):
            chunk = requests[lo : lo + self.batch_size]
            seqs, spans = [], []
            for _, ctx, cont in chunk:
                if not cont:
                    raise ValueError("lm-eval request with an empty continuation")
                whole = (ctx + cont)[-(self.max_length + 1):]  # left-truncate; the last token is only a target
                inp = whole[:-1]
                seqs.append(inp)
                spans.append((len(inp) - len(cont), cont))
            logp = self._logits(seqs)
            for row, (start, cont) in enumerate(spans):
                lp = logp[row, start : start + len(cont)]  # position j predicts token j + 1
                target = torch.tensor(cont, dtype=torch.long)
                total = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results.append((total, greedy))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in disjoint windows of ``max_length`` (lm-eval's rule)."""
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(("", ""), ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, EOS or ``max_gen_toks`` (sampling is not supported)."""
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.pop("max_gen_toks", 64))
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("mythos adapter: only greedy generation (do_sample=False, temperature=0)")
            ctx = (self.tok_encode(context) or [self.prefix_token_id])[-max(1, self.max_length - max_gen):]
            ids = torch.tensor([ctx], dtype=torch.long, device=self._device)
            max_new = max(0, min(max_gen, self.max_length - len(ctx)))
            gen = self.model.generate(ids, max_new, eos_id=self.eot_token_id, **self._forward_kwargs())
            new = [t for t in gen[0, len(ctx):].tolist()]
            if self.eot_token_id in new:
                new = new[: new.index(self.eot_token_id)]
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mythos.eval.lm_eval_adapter", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--loops", type=int, default=None)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON results file (default RUN/eval/lm_eval.json)")
    a = p.parse_args(argv)
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"run": a.run, "batch_size": a.batch_size}
    if a.checkpoint:
        args["checkpoint"] = a.checkpoint
    if a.loops is not None:
        args["loops"] = a.loops
    res = lm_eval.simple_evaluate(model="mythos", model_args=args, tasks=a.tasks.split(","), limit=a.limit,
                                  task_manager=TaskManager(include_path=a.include_path), log_samples=False)
    out = Path(a.out) if a.out else Path(a.run) / "eval" / "lm_eval.json"
    from mythos.io import atomic_write_text

    atomic_write_text(out, json.dumps({"results": res["results"], "model_args": args}, indent=2, default=str) + "\n")
    print(json.dumps(res["results"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
