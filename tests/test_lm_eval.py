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
