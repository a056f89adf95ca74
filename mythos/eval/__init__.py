"""Evaluation of trained runs: ``python -m mythos.eval --run DIR`` (val loss / ppl / bpb per loop
count, multi-hop accuracy), the lm-evaluation-harness adapter (:mod:`mythos.eval.lm_eval_adapter`)."""

from mythos.eval.loading import LoadedRun, load_run
from mythos.eval.multihop import evaluate_multihop

__all__ = ["LoadedRun", "evaluate_multihop", "load_run"]
