"""lm-evaluation-harness adapter: our checkpoints as the registered model ``mythos``.

    python -m mythos.eval.lm_eval_adapter --run runs/demo/rdt-tiny --tasks hellaswag [--loops 4,16] \\
        [--include-path my_tasks/] [--limit 100] [--out DIR] [--batch-size 8] \\
        [--device cuda|cpu] [--dtype bfloat16|float32] [--quiet]

``--loops`` is a comma list like everywhere else: the model is loaded once and every loop count is
evaluated in turn. Results go to ``lm_eval.json`` in ``--out DIR`` (default ``RUN/eval``; a ``.json``
path names the file itself): ``{"results", "model_args"}`` for one loop count (or none),
``{"by_loops": {"T": {"results", "model_args"}}}`` for several.

or from Python (importing this module registers the model name)::

    import lm_eval, mythos.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="mythos", model_args="run=runs/demo/rdt-tiny,loops=16", tasks=[...])

Model args: ``run`` (run directory, required), ``checkpoint`` (tag, ``latest`` or an exported
model dir), ``loops`` (RDT test-time loop count; default the model's eval depth), ``batch_size``,
``max_length`` (default ``model.max_seq_len``), ``device`` (default ``cuda`` if available, else
``cpu``), ``dtype`` (``float32``/``bfloat16``; default bf16 on cuda, fp32 on cpu), ``tokenizer`` (a
``tokenizer.model``; default: the one the run's shards were built with, found and sha256-checked
via the manifest), ``quiet`` (no progress lines on stderr).

Conventions: training data joins documents as ``doc EOS doc`` with no BOS, so the end-of-text
token (EOS) is both ``eot_token_id`` and the prefix for empty contexts. Requests longer than
``max_length`` keep their *last* tokens (left truncation), as the HF backend does. Batches are
right-padded: with causal attention a pad after the real tokens cannot change their logits.
Log-likelihood requests (rolling windows included) are scored longest first -- batches pad
little and the first one shows an OOM at once -- and returned in the original order.
"""

from __future__ import annotations

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

from mythos.cli_common import ArgumentParser, add_run_arguments, fail, out_file, parse_loops, resolve_checkpoint
from mythos.config import ConfigError
from mythos.data.format import load_manifest
from mythos.data.tokenizer import Tokenizer, find_tokenizer
from mythos.eval.device import Progress, add_device_args, dtype_name, resolve
from mythos.eval.loading import load_run, load_run_config_from_dir
from mythos.io import atomic_write_text


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
        device: str | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        quiet: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()

        self._device, self.dtype, self.kind = self.check_args(run, checkpoint, loops, device, dtype, batch_size)
        self.run = load_run(run, checkpoint, device=self._device, dtype=self.dtype)
        self.model = self.run.model
        self.loops = int(loops) if loops is not None else None
        self.quiet = quiet in (True, "True", "true", "1")  # from a model_args string it is text
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

    @staticmethod
    def check_args(
        run: str, checkpoint: str | None, loops: int | None, device: str | None, dtype: str | None,
        batch_size: int | str = 8,
    ) -> tuple[torch.device, torch.dtype, str]:
        """``(device, dtype, model kind)``; every check that needs no weights, so bad input fails
        fast with a :class:`ConfigError` (one line) before anything is loaded."""
        dev, dt = resolve(device, dtype)
        kind = load_run_config_from_dir(run).model.kind
        if loops is not None and kind != "rdt":
            raise ConfigError(f"loops={loops} given but {run} is a {kind} model (loops are for the RDT)")
        if loops is not None and int(loops) < 1:
            raise ConfigError(f"loops must be >= 1, got {loops}")
        if str(batch_size) != "auto" and int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1 (or 'auto'), got {batch_size}")
        resolve_checkpoint(Path(run), checkpoint)
        return dev, dt, kind

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
        """``[B, max_len, V]`` float32 log-probs of right-padded ``seqs``, on the model's device."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        out = self.model(ids.to(self._device), **self._forward_kwargs())
        return F.log_softmax(out.logits.float(), dim=-1)

    # ---- scoring --------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives the continuation,
        in the order of ``requests`` (scored longest first)."""
        seqs, spans = [], []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("lm-eval request with an empty continuation")
            whole = (ctx + cont)[-(self.max_length + 1):]  # left-truncate; the last token is only a target
            inp = whole[:-1]
            seqs.append(inp)
            spans.append((len(inp) - len(cont), cont))
        # longest first (stable, so equal lengths keep their order): little padding per batch, and
        # the first batch is the biggest, so an out-of-memory shows up at once
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        results: list[tuple[float, bool] | None] = [None] * len(seqs)
        n_batches = -(-len(order) // self.batch_size)
        prog = Progress("lm-eval loglikelihood", n_batches, quiet=self.quiet or disable_tqdm)
        for b, lo in enumerate(range(0, len(order), self.batch_size)):
            idx = order[lo : lo + self.batch_size]
            logp = self._logits([seqs[i] for i in idx])
            for row, i in enumerate(idx):
                start, cont = spans[i]
                lp = logp[row, start : start + len(cont)]  # position j predicts token j + 1
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                total = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
            prog.update(b + 1)
        return results  # type: ignore[return-value]  # every slot is filled above

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in disjoint windows of ``max_length`` (lm-eval's rule).
        The windows of all strings are scored together, so they batch across strings."""
        windows: list[tuple[tuple[str, str], list[int], list[int]]] = []
        owner: list[int] = []
        for k, (string,) in enumerate(r.args for r in requests):
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            ):
                ctx, cont = lm_utils.make_disjoint_window(w)
                windows.append((("", ""), ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        out = [0.0] * len(requests)
        for k, (s, _) in zip(owner, scores):
            out[k] += s  # windows of one string are added in their original order, as before
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


LM_EVAL_FILE = "lm_eval.json"


def build_parser() -> ArgumentParser:
    """The ``python -m mythos.eval.lm_eval_adapter`` argument parser."""
    p = ArgumentParser(prog="python -m mythos.eval.lm_eval_adapter", description=__doc__)
    add_run_arguments(p)
    p.add_argument("--loops", default=None, metavar="N[,N...]",
                   help="comma-separated RDT test-time loop counts, each evaluated in turn (default: the model's "
                        "eval depth)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="directory of extra task YAMLs (default: none, lm-eval's own tasks only)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction if < 1; default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"results directory, writes {LM_EVAL_FILE} there (default: RUN/eval); a .json path names "
                        "the file itself")
    add_device_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    import lm_eval
    from lm_eval.tasks import TaskManager

    args: dict[str, Any] = {"run": a.run, "batch_size": a.batch_size}
    if a.checkpoint:
        args["checkpoint"] = a.checkpoint
    tasks = [t for t in a.tasks.split(",") if t.strip()]
    try:
        loops: list[int | None] = list(parse_loops(a.loops)) if a.loops is not None else [None]
        # all input is checked before any weights load (their loader prints progress), and the
        # model is built here rather than by simple_evaluate: bad input is one error line, not
        # a traceback from inside lm-eval
        for t in loops:
            MythosLM.check_args(a.run, a.checkpoint, t, a.device, a.dtype, a.batch_size)
        manager = TaskManager(include_path=a.include_path)  # indexing every lm-eval task takes seconds
        unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file() and not
                   manager.match_tasks([t])]
        if unknown or not tasks:
            raise ConfigError(f"unknown lm-eval task(s) {unknown or a.tasks!r} (see `lm_eval ls tasks`; local YAMLs "
                              "need --include-path DIR)")
        lm = MythosLM(**args, loops=loops[0], device=a.device, dtype=a.dtype, quiet=a.quiet)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    args.update(device=str(lm.device), dtype=dtype_name(lm.dtype))
    by_loops: dict[str, Any] = {}
    for t in loops:
        lm.loops = t  # one model, one pass per loop count
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=a.limit, task_manager=manager, log_samples=False)
        by_loops[str(t)] = {"results": res["results"], "model_args": {**args, **({"loops": t} if t else {})}}
    body = next(iter(by_loops.values())) if len(by_loops) == 1 else {"by_loops": by_loops}
    out = out_file(a.out, Path(a.run) / "eval", LM_EVAL_FILE)
    atomic_write_text(out, json.dumps(body, indent=2, default=str) + "\n")
    print(json.dumps(body["results"] if len(by_loops) == 1 else
                     {t: v["results"] for t, v in by_loops.items()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
