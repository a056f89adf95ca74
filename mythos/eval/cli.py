"""``python -m mythos.eval``: evaluate a trained run on its held-out split (and a multi-hop task).

    python -m mythos.eval --run runs/demo/rdt-tiny [--checkpoint step0000200] \\
        [--loops 1,2,4,8,12,16,24,32] [--multihop data/multihop/khop] [--out DIR] \\
        [--exit-kl 1e-3[,...]] [--exit-act] [--exit-max-loops 32] \\
        [--device cuda|cpu] [--dtype bfloat16|float32] [--quiet]

Computes, with the same function training's periodic eval uses (:func:`mythos.train.evaluate.evaluate`):
validation loss, perplexity and bits per byte over the *whole* val split of the run's data (exact
token-weighted sums; bpb from exact per-token byte counts), for an RDT at every ``--loops`` count
and at its default depth. ``--multihop DIR`` adds exact-match accuracy per hop count (and loop
count) on ``DIR/test.jsonl``; with ``--exit-kl`` / ``--exit-act`` an RDT also exits per query by
itself (KL convergence of the answer distribution, ACT halting; at most ``--exit-max-loops``
iterations) and the T it chose is reported per hop count (:mod:`mythos.eval.multihop`). Results
go to ``results.json`` in ``--out DIR`` (default ``RUN/eval``; a ``.json`` path names the file
itself) (atomically; sections of an earlier result for the *same* checkpoint that this call did not
recompute are kept).

Bits per byte need the tokenizer the shards were built with (found through the manifest, see
:func:`mythos.data.tokenizer.find_tokenizer`). When it has moved, the eval stops with one line
rather than quietly writing results without bpb: point at it with ``--tokenizer PATH`` (its sha256
must match the manifest's) or skip bpb explicitly with ``--no-bpb`` (``bpb_method`` then says so).

``--device`` / ``--dtype`` default to CUDA + bf16 when available, else CPU + fp32 (the latter
reproduces the CPU numbers exactly); loss sums are fp64 either way. Progress goes to stderr
(one line per loop count and phase; ``--quiet`` silences it). Bad input is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mythos.cli_common import (
    ArgumentParser,
    add_run_arguments,
    check_out_dir,
    fail,
    out_file,
    parse_float_list,
    parse_int_list,
    parse_loops,
)
from mythos.config import ConfigError
from mythos.eval.device import add_device_args
from mythos.io import atomic_write_text, sha256_file
from mythos.run_dir import EVAL_RESULTS

DEFAULT_LOOPS = (1, 2, 4, 8, 12, 16, 24, 32)
RESULTS = EVAL_RESULTS


BPB_EXACT = "exact per-token UTF-8 bytes from the tokenizer"
BPB_SKIPPED = "unavailable: skipped with --no-bpb"


def resolve_token_bytes(data_cfg: Any, tokenizer: str | Path | None = None, bpb: bool = True) -> Any:
    """The :class:`~mythos.train.evaluate.TokenBytes` of the run's shards, or None with ``bpb=False``.
    Raises a one-line :class:`ConfigError` when the shards' tokenizer cannot be found (or
    ``tokenizer`` is not it): bpb must never go missing silently."""
    if not bpb:
        return None
    from mythos.data.mixture import resolve_data
    from mythos.data.tokenizer import Tokenizer, find_tokenizer
    from mythos.train.evaluate import TokenBytes

    manifest = resolve_data(data_cfg).manifest  # a mixture's sources share one tokenizer (checked)
    want = manifest.raw.get("tokenizer", {})
    if tokenizer is not None:
        tok = Tokenizer(tokenizer)  # FileNotFoundError -> one line (main)
        if tok.sha256 != want.get("sha256"):
            raise ConfigError(f"--tokenizer {tokenizer} is not the tokenizer {manifest.directory} was built with "
                              f"(sha256 {tok.sha256[:12]}... != {str(want.get('sha256'))[:12]}...)")
    else:
        tok = find_tokenizer(manifest.raw, manifest.directory)
        if tok is None:
            raise ConfigError(
                f"tokenizer {want.get('path', '?')} (sha256 {str(want.get('sha256'))[:12]}...) that "
                f"{manifest.directory} was built with is not found; bits per byte need it: pass --tokenizer PATH, "
                f"or --no-bpb to skip bpb"
            )
    table, dummy = tok.byte_lengths()
    return TokenBytes(torch.from_numpy(table), tok.eos_id, dummy)


def evaluate_lm(
    run: Any,
    loops: Sequence[int],
    batch_size: int,
    max_batches: int = 0,
    *,
    device: str | torch.device | None = None,
    quiet: bool = True,
    token_bytes: Any = "auto",
) -> dict[str, Any]:
    """Val loss / ppl / bpb of a loaded run over its whole val split, per loop count, with the
    batches on ``device`` (default: where the model's parameters are). ``token_bytes``: ``"auto"``
    finds the tokenizer (:func:`resolve_token_bytes`), None skips bpb."""
    from mythos.data import build_val_loader
    from mythos.eval.device import Progress
    from mythos.train.evaluate import default_eval_loops, eval_loop_counts, evaluate

    cfg = run.cfg
    val = build_val_loader(cfg.data, batch_size)
    if val.num_samples == 0:
        raise ConfigError(f"data.shards={cfg.data.shards} has no val samples (re-shard with --val-fraction > 0)")
    if isinstance(token_bytes, str):
        token_bytes = resolve_token_bytes(cfg.data)
    dev = torch.device(device) if device is not None else next(run.model.parameters()).device
    n_batches = min(len(val), max_batches) if max_batches else len(val)
    # evaluate() makes one pass per loop count, in eval_loop_counts order: label each pass's progress
    counts = eval_loop_counts(cfg.model, loops)
    phases = iter(counts)
    ints = [t for t in counts if isinstance(t, int)]
    if not quiet and len(ints) > 1:  # the default sweep is ~99 loop iterations per batch: say so up front
        cost = sum(ints) / max(ints[0], 1)
        hint = "; on CPU pass e.g. --loops 1,4 for a quick look" if dev.type == "cpu" and cost > 8 else ""
        print(f"eval: {len(counts)} passes over {n_batches} batches at T={','.join(map(str, counts))}: "
              f"{sum(ints)} core iterations per batch ({cost:.0f}x the T={ints[0]} pass){hint}", file=sys.stderr)

    def batches() -> Any:
        t = next(phases, None)
        prog = Progress("eval" if t is None else f"eval T={t}", n_batches, quiet=quiet)
        for i, batch in enumerate(val):
            if i >= n_batches:  # the same cut evaluate(max_batches=...) makes
                return
            yield batch
            prog.update(i + 1)

    res = evaluate(run.model, batches, cfg.model, dev, loops=loops, max_batches=max_batches, token_bytes=token_bytes)
    out: dict[str, Any] = {
        "split": "val",
        "samples": val.num_samples if not max_batches else min(val.num_samples, max_batches * batch_size),
        "tokens": res["val/tokens"],
        "loss": res["val/loss"],
        "ppl": res["val/ppl"],
        "bpb": res.get("val/bpb"),
        "bytes": res.get("val/bytes"),
        "bpb_method": BPB_EXACT if token_bytes else BPB_SKIPPED,
    }
    if cfg.model.kind == "rdt":
        out["default_loops"] = default_eval_loops(cfg.model)
        out["by_loops"] = {
            k.split("@")[1]: {"loss": v, "ppl": res[f"val/ppl@{k.split('@')[1]}"],
                              "bpb": res.get(f"val/bpb@{k.split('@')[1]}")}
            for k, v in sorted(res.items(), key=lambda kv: int(kv[0].split("@")[1]) if "@" in kv[0] else -1)
            if k.startswith("val/loss@")
        }
    return out


def run_eval(
    run_dir: str | Path,
    *,
    checkpoint: str | None = None,
    loops: Sequence[int] = DEFAULT_LOOPS,
    multihop: str | Path | None = None,
    hops_offsets: Sequence[int] | None = None,
    exit_kl: Sequence[float] = (),
    exit_act: bool = False,
    exit_max_loops: int = 32,
    out: str | Path | None = None,
    lm: bool = True,
    batch_size: int = 0,
    max_batches: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quiet: bool = True,
    tokenizer: str | Path | None = None,
    bpb: bool = True,
) -> dict[str, Any]:
    """Evaluate ``run_dir`` on ``device`` in ``dtype`` (defaults: :func:`mythos.eval.device.resolve`)
    and write the results file; returns the results dict. ``tokenizer``: the shards' tokenizer
    where the manifest's path no longer finds it; ``bpb=False`` skips bits per byte.
    ``hops_offsets``: multi-hop queries also run at ``T = hops + c`` per query (default: the RDT's
    ``loops.hops_offset`` when it was trained with ``loops.schedule=hops``, else none).
    ``exit_kl`` / ``exit_act`` / ``exit_max_loops``: adaptive exits of an RDT on the multi-hop
    queries (:func:`mythos.eval.multihop.adaptive_answer`; ignored for dense)."""
    from mythos.eval.device import dtype_name, resolve
    from mythos.eval.loading import load_run, load_run_config_from_dir
    from mythos.eval.multihop import evaluate_multihop
    from mythos.tasks.build import load_task_card, load_test_examples

    t0 = time.perf_counter()
    torch.manual_seed(0)
    # every check that needs no weights comes before loading them: bad input fails fast
    dev, dt = resolve(device, dtype)
    if batch_size < 0 or max_batches < 0:
        raise ConfigError(f"--batch-size and --max-batches must be >= 0, got {batch_size} and {max_batches}")
    if exit_max_loops < 1:
        raise ConfigError(f"--exit-max-loops must be >= 1, got {exit_max_loops}")
    run_cfg = load_run_config_from_dir(run_dir)
    if multihop is not None:
        card, examples = load_task_card(multihop), load_test_examples(multihop)
        if exit_act and run_cfg.model.kind == "rdt" and not run_cfg.model.act.enabled:
            raise ConfigError(f"--exit-act: {run_dir} has no ACT (model.act.enabled=false); use --exit-kl")
    token_bytes = resolve_token_bytes(run_cfg.data, tokenizer, bpb) if lm else None
    out_path = out_file(out, Path(run_dir) / RESULTS.parent, RESULTS.name)
    # before minutes of evaluation, not after them; created only when the results are written
    check_out_dir(out_path.parent, "--out" if out else "the results directory (RUN/eval; or pass --out)")
    run = load_run(run_dir, checkpoint, device=dev, dtype=dt)  # refuses another model's checkpoint
    is_rdt = run.cfg.model.kind == "rdt"
    results: dict[str, Any] = {}
    if out_path.is_file():
        old = json.loads(out_path.read_text())
        # keep sections this call does not recompute (a file without "dtype" was written in fp32)
        if old.get("checkpoint") == run.checkpoint and old.get("dtype", "float32") == dtype_name(dt):
            results = old
    tokens_per_step = run.info.get("tokens_per_step")
    results.update({
        "run_dir": str(run_dir),
        "name": run.cfg.name,
        "kind": run.cfg.model.kind,
        "checkpoint": run.checkpoint,
        "step": run.step,
        "tokens_seen": run.step * tokens_per_step if tokens_per_step and run.step >= 0 else None,
        "params": sum(p.numel() for p in run.model.parameters()),
        "data_hash": run.info.get("data_hash"),
        "data_fingerprint": run.info.get("data_fingerprint"),
        "loops": list(loops) if is_rdt else None,
        "device": str(dev),
        "dtype": dtype_name(dt),
    })
    bs = batch_size or run.cfg.train.micro_batch_size
    if lm:
        results["lm"] = evaluate_lm(run, loops if is_rdt else (), bs, max_batches, device=dev, quiet=quiet,
                                    token_bytes=token_bytes)
    if multihop is not None:
        lc = run.cfg.model.loops
        if hops_offsets is None:
            hops_offsets = [lc.hops_offset] if is_rdt and lc.schedule == "hops" else []
        res = evaluate_multihop(run.model, examples, loops if is_rdt else (),
                                hops_offsets=hops_offsets if is_rdt else (), exit_kl=exit_kl if is_rdt else (),
                                exit_act=exit_act and is_rdt, exit_max_loops=exit_max_loops, device=dev, quiet=quiet)
        tc = card["config"]
        chance = 1.0 / (tc["n_entities"] if card["task"] == "khop" else tc["n_nodes"])  # uniform guess
        results["multihop"] = {"task_dir": str(multihop), "task": card["task"], "data_hash": card["data_hash"],
                               "train_hops": card["train_hops"], "chance": chance,
                               # the card's data hash covers the train/val shards, this the test queries
                               "test_sha256": sha256_file(Path(multihop) / "test.jsonl"),
                               "floor": card["structure"].get("floor"), **res}
    results["elapsed_s"] = round(time.perf_counter() - t0, 2)
    results["time"] = time.time()
    atomic_write_text(out_path, json.dumps(results, indent=2) + "\n")
    return results


def summary(results: dict[str, Any]) -> str:
    """Human-readable lines for the console."""
    lines = [f"{results['name']} ({results['kind']}, {results['params'] / 1e6:.2f}M params) at {results['checkpoint']}"
             f" on {results.get('device', 'cpu')} in {results.get('dtype', 'float32')}"]
    lm = results.get("lm")
    if lm:
        bpb = f" | bpb {lm['bpb']:.4f}" if lm.get("bpb") is not None else ""
        lines.append(f"  val loss {lm['loss']:.4f} | ppl {lm['ppl']:.2f}{bpb} ({lm['tokens']:.0f} tokens)")
        for t, v in lm.get("by_loops", {}).items():
            b = f" | bpb {v['bpb']:.4f}" if v.get("bpb") is not None else ""
            lines.append(f"    T={t:>3}: loss {v['loss']:.4f}{b}")
    mh = results.get("multihop")
    if mh:
        hops = list(mh["count"])
        lines.append(f"  {mh['task']} exact match by hops ({', '.join(hops)}); trained on {mh['train_hops']}")
        for key, acc in mh["accuracy"].items():
            label = f"T={key}" if key.isdigit() else key
            lines.append(f"    {label:>7}: " + " ".join(f"{acc[h]:.2f}" for h in hops))
        for key, ts in mh.get("exit_loops", {}).items():
            lines.append(f"    {key} mean T: " + " ".join(f"{ts[h]:.1f}" for h in hops))
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The ``python -m mythos.eval`` / ``mythos-eval`` argument parser."""
    p = ArgumentParser(prog="mythos-eval", description=__doc__)
    add_run_arguments(p)
    p.add_argument("--loops", metavar="N[,N...]", default=",".join(map(str, DEFAULT_LOOPS)),
                   help="comma-separated RDT loop counts (ignored for dense)")
    p.add_argument("--multihop", default=None, metavar="TASK_DIR",
                   help="task directory from `python -m mythos.tasks` (test.jsonl) (default: none, no multi-hop pass)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"results directory, writes {RESULTS.name} there (default: RUN/{RESULTS.parent}); "
                        "a .json path names the file itself")
    p.add_argument("--hops-offsets", metavar="C[,C...]", default=None,
                   help="multi-hop: also run each query at T = hops + C (default: the RDT's loops.hops_offset "
                        "when it trained with loops.schedule=hops; '' for none)")
    p.add_argument("--exit-kl", metavar="THR[,THR...]", default="",
                   help="multi-hop, RDT: also exit per query at the first iteration whose answer distribution "
                        "is within KL THR of the previous one (e.g. 1e-3)")
    p.add_argument("--exit-act", action="store_true",
                   help="multi-hop, RDT with ACT: also exit per query once all its positions halted")
    p.add_argument("--exit-max-loops", type=int, default=32, metavar="N",
                   help="most iterations of an adaptive exit (a query not converged by then exits at N)")
    p.add_argument("--no-lm", action="store_true", help="skip the val loss / bpb pass")
    p.add_argument("--tokenizer", default=None,
                   help="the shards' tokenizer (dir or .model) when the manifest's recorded path no longer finds it "
                        "(default: the path the manifest records)")
    p.add_argument("--no-bpb", action="store_true", help="skip bits per byte (e.g. the tokenizer is gone)")
    p.add_argument("--batch-size", type=int, default=0, help="val batch size (0 = train.micro_batch_size)")
    p.add_argument("--max-batches", type=int, default=0, help="val batches (0 = the whole split)")
    add_device_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        offsets = (None if a.hops_offsets is None else  # "" = no per-query setting
                   parse_int_list(a.hops_offsets, "--hops-offsets", 0) if a.hops_offsets.strip() else [])
        exit_kl = parse_float_list(a.exit_kl, "--exit-kl") if a.exit_kl.strip() else []
        res = run_eval(a.run, checkpoint=a.checkpoint, loops=parse_loops(a.loops), multihop=a.multihop, out=a.out,
                       hops_offsets=offsets, exit_kl=exit_kl, exit_act=a.exit_act, exit_max_loops=a.exit_max_loops,
                       lm=not a.no_lm, batch_size=a.batch_size, max_batches=a.max_batches, device=a.device,
                       dtype=a.dtype, quiet=a.quiet, tokenizer=a.tokenizer, bpb=not a.no_bpb)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    print(summary(res))
    print(f"wrote {out_file(a.out, Path(a.run) / RESULTS.parent, RESULTS.name)}")
    return 0
