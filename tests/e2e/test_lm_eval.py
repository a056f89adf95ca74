"""The lm-evaluation-harness adapter on a real short run, offline, with local task YAMLs over
jsonl files (multiple choice -> loglikelihood, perplexity -> loglikelihood_rolling, and
generate_until), plus a direct check of the log-likelihood arithmetic."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_utils import LM_EVAL_MC_TASK

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra: pip install -e '.[dev]'")

for _k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"  # nothing may be downloaded

TASKS = {
    "mythos_mc": "task: mythos_mc\n" + LM_EVAL_MC_TASK,
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
               {"context": "My lord, I", "choices": [" will", " xylophone"], "label": 0},
               {"context": "To be, or not to be, that is the", "choices": [" question", " banana"], "label": 1}],
        "ppl": [{"text": "Now is the winter of our discontent made glorious summer."}],
        "gen": [{"context": "ROMEO: What", "answer": " say"}],
    }
    for name, items in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    for name, text in TASKS.items():
        (d / f"{name}.yaml").write_text(text.format(data=d))
    return d


def _direct_logprobs(model, ids: list[int], loops: int) -> torch.Tensor:
    """``[len(ids) - 1, V]`` next-token log-probs straight from the model (no adapter code)."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids[:-1]]), num_loops=loops).logits.float(), -1)[0]


def test_adapter_runs_local_tasks(short_runs, task_dir: Path, tmp_path: Path) -> None:
    """lm-eval's numbers for the three task types are the ones computed here from the model's own
    log-probs: multiple-choice accuracy (argmax of each choice's summed log-prob), word perplexity
    and bits per byte of the rolling log-likelihood, and exact match of greedy decoding (one gen
    target is this model's own greedy continuation, one is not: exact_match must be 0.5)."""
    from lm_eval.tasks import TaskManager

    import mythos.eval.lm_eval_adapter  # noqa: F401  (registers "mythos")
    from mythos.eval.lm_eval_adapter import MythosLM

    loops = 2
    lm = MythosLM(run=str(short_runs["rdt"]), loops=loops, device="cpu", dtype="float32", quiet=True)
    model, tok = lm.model.eval(), lm.tok

    def choice_score(ctx: str, cont: str) -> float:
        c, t = tok.encode(ctx) or [tok.eos_id], tok.encode(cont)
        logp = _direct_logprobs(model, c + t, loops)
        return sum(float(logp[len(c) - 1 + i, x]) for i, x in enumerate(t))

    def greedy(ctx: str, n: int = 8) -> str:
        ids = tok.encode(ctx)
        for _ in range(n):
            nxt = int(_direct_logprobs(model, [*ids, 0], loops)[-1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
        return tok.decode(ids[len(tok.encode(ctx)):]).split("\n")[0]

    gen_ctx = ["ROMEO: What", "My lord,"]
    data = tmp_path / "tasks"
    data.mkdir()
    for name in ("mc", "ppl"):
        (data / f"{name}.jsonl").write_text((task_dir / f"{name}.jsonl").read_text())
    gen_rows = [{"context": gen_ctx[0], "answer": greedy(gen_ctx[0])},
                {"context": gen_ctx[1], "answer": greedy(gen_ctx[1]) + " and not this"}]
    (data / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows))
    for name, text in TASKS.items():
        (data / f"{name}.yaml").write_text(text.format(data=data))

    res = lm_eval.simple_evaluate(
        model="mythos", model_args={"run": str(short_runs["rdt"]), "loops": loops, "batch_size": 2},
        tasks=["mythos_mc", "mythos_ppl", "mythos_gen"], task_manager=TaskManager(include_path=str(data)),
        log_samples=False,
    )
    r = res["results"]
    mc = [json.loads(ln) for ln in (data / "mc.jsonl").read_text().splitlines()]
    right = [max(range(len(d["choices"])), key=lambda i: choice_score(d["context"], d["choices"][i])) == d["label"]
             for d in mc]
    assert 0 < sum(right) < len(right), right  # the rows are chosen so that the accuracy is not 0 or 1
    assert r["mythos_mc"]["acc,none"] == pytest.approx(sum(right) / len(right))

    (text,) = [json.loads(ln)["text"] for ln in (data / "ppl.jsonl").read_text().splitlines()]
    ids = [tok.eos_id, *tok.encode(text)]  # one window (< max_length): every token given EOS + its prefix
    assert len(ids) <= lm.max_length
    logp = _direct_logprobs(model, ids, loops)
    ll = sum(float(logp[i, x]) for i, x in enumerate(ids[1:]))
    assert r["mythos_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-ll / len(re.split(r"\s+", text))),
                                                                    rel=1e-4)
    assert r["mythos_ppl"]["bits_per_byte,none"] == pytest.approx(-ll / (len(text.encode()) * math.log(2)), rel=1e-4)
    assert r["mythos_gen"]["exact_match,none"] == pytest.approx(0.5)


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
