"""The lm-evaluation-harness adapter on a real short run, offline, with local task YAMLs over
jsonl files (multiple choice -> loglikelihood, perplexity -> loglikelihood_rolling, and
generate_until), plus a direct check of the log-likelihood arithmetic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest_plugins = ["data_fixtures", "eval_fixtures"]
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra: pip install -e '.[dev]'")

for _k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"  # nothing may be downloaded

TASKS = {
    "mythos_mc": """task: mythos_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/mc.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list: [{{metric: acc}}]
""",
    "mythos_ppl": """task: mythos_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/ppl.jsonl}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: bits_per_byte}}]
""",
    "mythos_gen": """task: mythos_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/gen.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false, temperature: 0.0}}
metric_list: [{{metric: exact_match}}]
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = {
        "mc": [{"context": "To be, or not to be, that is the", "choices": [" question", " banana"], "label": 0},
               {"context": "My lord, I", "choices": [" will", " xylophone"], "label": 0}],
        "ppl": [{"text": "Now is the winter of our discontent made glorious summer."}],
        "gen": [{"context": "ROMEO: What", "answer": " say"}],
    }
    for name, items in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    for name, text in TASKS.items():
        (d / f"{name}.yaml").write_text(text.format(data=d))
    return d


def test_adapter_runs_local_tasks(short_runs, task_dir: Path) -> None:
    from lm_eval.tasks import TaskManager

    import mythos.eval.lm_eval_adapter  # noqa: F401  (registers "mythos")

    res = lm_eval.simple_evaluate(
        model="mythos", model_args={"run": str(short_runs["rdt"]), "loops": 2, "batch_size": 2},
        tasks=["mythos_mc", "mythos_ppl", "mythos_gen"], task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=False,
    )
    r = res["results"]
    assert 0.0 <= r["mythos_mc"]["acc,none"] <= 1.0
    assert r["mythos_ppl"]["word_perplexity,none"] > 1.0 and r["mythos_ppl"]["bits_per_byte,none"] > 0
    assert 0.0 <= r["mythos_gen"]["exact_match,none"] <= 1.0


def test_loglikelihood_matches_the_model(short_runs) -> None:
    from lm_eval.api.instance import Instance

    from mythos.eval.lm_eval_adapter import MythosLM

    lm = MythosLM(run=str(short_runs["dense"]), batch_size=4)
    ctx, cont = "To be, or not to be", ", that is the question"
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
    ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(ids[:, :-1]).logits.float(), -1)[0]
    want = sum(float(logp[len(ctx_ids) - 1 + i, t]) for i, t in enumerate(cont_ids))
    assert ll == pytest.approx(want, abs=1e-4)
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Some text here.",), 0)])
    assert rolling < 0
    with pytest.raises(ValueError, match="loops"):
        MythosLM(run=str(short_runs["dense"]), loops=4)


REQUESTS = [("To be, or not to be", ", that is the question"), ("", "Hello there"), ("My lord, I", " will"),
            ("ROMEO: " * 30, " What say you?"),  # longer than max_length=64: left-truncated
            ("a", " b c d e f g"), ("Now is the winter", " of our discontent"), ("x", " y")]
TEXTS = ["Some text here.", "Now is the winter of our discontent made glorious summer by this sun of York; " * 3, "x"]


def _score(lm, requests=REQUESTS, texts=TEXTS) -> tuple[list[tuple[float, bool]], list[float]]:
    from lm_eval.api.instance import Instance

    ll = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    return ll, rolling


@pytest.mark.parametrize("kind", ["rdt", "dense"])
def test_batched_loglikelihoods_equal_one_request_at_a_time(short_runs, kind: str) -> None:
    """Sorting longest-first, right-padding and batching (rolling windows of several strings
    together) change no number beyond fp32 round-off, and results come back in request order."""
    from mythos.eval.lm_eval_adapter import MythosLM

    kw = {"loops": 2} if kind == "rdt" else {}
    lm = MythosLM(run=str(short_runs[kind]), batch_size=3, device="cpu", dtype="float32", quiet=True, **kw)
    ll_one = [_score(lm, [r], [])[0][0] for r in REQUESTS]  # one call per request: nothing to reorder
    rolling_one = [_score(lm, [], [t])[1][0] for t in TEXTS]
    ll, rolling = _score(lm)
    assert [g for _, g in ll] == [g for _, g in ll_one]
    assert [s for s, _ in ll] == pytest.approx([s for s, _ in ll_one], abs=1e-5)
    assert rolling == pytest.approx(rolling_one, abs=1e-4)  # sums of ~10^2-10^3 nats
    assert len({round(s, 3) for s, _ in ll}) == len(ll)  # distinct scores: a permutation would show
    lm.batch_size = 1  # and batch size 1 over the whole list (sorted, no padding) agrees too
    ll1, rolling1 = _score(lm)
    assert [s for s, _ in ll1] == pytest.approx([s for s, _ in ll], abs=1e-5)
    assert rolling1 == pytest.approx(rolling, abs=1e-4)


def test_adapter_bf16_on_cpu_is_close(short_runs, capsys) -> None:
    """``dtype=bfloat16`` really casts the model and stays within 1% of fp32; progress goes to stderr."""
    from mythos.eval.lm_eval_adapter import MythosLM

    fp32 = MythosLM(run=str(short_runs["rdt"]), batch_size=4, device="cpu", dtype="float32", quiet=True)
    bf16 = MythosLM(run=str(short_runs["rdt"]), batch_size=4, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16} and bf16.device == torch.device("cpu")
    (ll32, r32), (ll16, r16) = _score(fp32), _score(bf16)
    assert [s for s, _ in ll16] != [s for s, _ in ll32]
    assert [s for s, _ in ll16] == pytest.approx([s for s, _ in ll32], rel=1e-2)
    assert r16 == pytest.approx(r32, rel=1e-2)
    err = capsys.readouterr().err
    assert "lm-eval loglikelihood: 2/2 batches" in err  # 7 requests, batches of 4


def test_adapter_main_errors_are_one_line(short_runs, tmp_path: Path, task_dir: Path, capsys) -> None:
    """``python -m mythos.eval.lm_eval_adapter`` with bad input: one ``error:`` line, exit code 2."""
    from mythos.eval.lm_eval_adapter import main

    rdt, dense = str(short_runs["rdt"]), str(short_runs["dense"])
    cases = [["--run", str(tmp_path)], ["--run", rdt, "--checkpoint", "step9999999"], ["--run", rdt, "--loops", "0"],
             ["--run", dense, "--loops", "2"], ["--run", rdt, "--loops", "a"], ["--run", rdt, "--device", "tpu"],
             ["--run", rdt, "--dtype", "half"], ["--run", rdt, "--batch-size", "0"],
             ["--run", rdt, "--tasks", "no_such_task", "--include-path", str(task_dir)]]
    if not torch.cuda.is_available():
        cases.append(["--run", rdt, "--device", "cuda"])
    for args in cases:
        argv = args if "--tasks" in args else [*args, "--tasks", "mythos_mc"]
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse usage errors exit (with our one-line message)
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err[-2000:])
