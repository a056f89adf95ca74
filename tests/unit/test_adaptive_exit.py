"""Adaptive exit of the multi-hop eval (:func:`mythos.eval.multihop.adaptive_answer`): the RDT picks
its own loop count per query, by KL convergence of the answer distribution or by ACT halting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mythos.eval.multihop import EXIT_ACT, adaptive_answer, evaluate_multihop, exit_kl_key
from mythos.model import build_model
from mythos.model.config import ACTConfig, LoopConfig, ModelConfig
from mythos.model.layers import KVCache

LOOPS = LoopConfig(schedule="fixed", mean=4, bwd_depth=0, max_loops=64)


def _rdt(act: bool = False, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="rdt", vocab_size=32, d_model=32, n_heads=2, max_seq_len=32,
                      n_prelude=kw.pop("n_prelude", 1), n_core=1, n_coda=kw.pop("n_coda", 1), loops=LOOPS,
                      zero_init_out=False, init_std=0.3,
                      act=ACTConfig(enabled=act, threshold=0.99, halt_bias_init=-1.0), **kw)
    return build_model(cfg).eval()


def _prompts(n: int = 6, s: int = 7) -> torch.Tensor:
    return torch.randint(3, 32, (n, s), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("act", [False, True])
def test_threshold_zero_is_fixed_t(act: bool) -> None:
    """exit_kl = 0 never exits early: every row runs max_loops and gets the fixed-T logits."""
    model, x = _rdt(act), _prompts()
    for t in (1, 3, 7):
        logits, loops = adaptive_answer(model, x, exit_kl=0.0, max_loops=t)
        with torch.no_grad():
            ref = model(x, num_loops=t).logits[:, -1].float()
        assert loops.tolist() == [t] * len(x)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def _reference(model: torch.nn.Module, x: torch.Tensor, top: int, act: bool) -> tuple[list, float, list[int]]:
    """From independent fixed-T runs: logits ``ref[t - 1]`` at every T <= top, a KL threshold at
    which the rows exit at different depths, and each row's first t >= 2 with KL(p_t || p_t-1) < thr."""
    with torch.no_grad():
        ref = [model(x, num_loops=t).logits[:, -1].float() for t in range(1, top + 1)]
    logp = [torch.log_softmax(r, -1) for r in ref]
    kl = torch.stack([(lp.exp() * (lp - prev)).sum(-1) for prev, lp in zip(logp, logp[1:])], 1)  # [B, top-1]
    # about half the rows converge early (ACT: halted rows reach KL 0 exactly, so a fixed threshold)
    thr = 1e-3 if act else float(kl[:, : top // 2].min(1).values.median())
    first = [next((t + 2 for t in range(top - 1) if kl[i, t] < thr), top) for i in range(len(x))]
    assert len(set(first)) > 1  # the rows really exit at different depths
    return ref, thr, first


@pytest.mark.parametrize("act", [False, True])
def test_each_row_exits_at_its_first_converged_t_with_that_ts_logits(act: bool) -> None:
    """Row i's exit T is the first t >= 2 with KL(p_t || p_t-1) < thr (else max_loops), and its
    logits are those of T = its exit T."""
    model, x, top = _rdt(act), _prompts(12), 24
    ref, thr, first = _reference(model, x, top, act)
    logits, loops = adaptive_answer(model, x, exit_kl=thr, max_loops=top)
    assert loops.tolist() == first
    for i, t in enumerate(first):
        torch.testing.assert_close(logits[i], ref[t - 1][i], rtol=1e-4, atol=1e-4)


class _Scripted:
    """A stand-in core step: the state moves by ``steps[row][t]`` at iteration t, so the answer
    distribution of a row stops changing exactly where its script says."""

    def __init__(self, steps: torch.Tensor, d: int) -> None:
        self.steps = steps
        # a new direction per iteration: the (normalised) state really turns when it moves
        self.dirs = torch.randn(steps.shape[1], d, generator=torch.Generator().manual_seed(3))

    def __call__(self, h, ctx, t, rope, ve, cache, t2):  # the signature of RDT._iterate
        # the batch shrinks as rows exit: row 0 exits first, so 2 rows = both, 1 row = row 1
        delta = self.steps[torch.tensor([0, 1])[-h.shape[0]:], t].to(h.dtype)  # [B]
        return h + delta[:, None, None] * self.dirs[t], None


def test_a_query_exits_where_its_distribution_stops_changing_and_then_stays_frozen() -> None:
    """Row 0 stops moving after iteration 3, row 1 after iteration 5, then both move again: the
    KL exit picks T = 4 and 6 (the first iteration equal to its predecessor), and their answers
    are those of T = 4 and 6, not of the later, different states."""
    model = _rdt(n_prelude=0, n_coda=0)
    x = _prompts(2)
    steps = torch.ones(2, 16) * 3.0
    steps[0, 3] = 0.0  # iteration index 3 (T = 4) leaves row 0 unchanged
    steps[1, 5] = 0.0  # T = 6 leaves row 1 unchanged
    script = model._iterate = _Scripted(steps, 32)  # an instance attribute shadows the method
    logits, loops = adaptive_answer(model, x, exit_kl=1e-6, max_loops=16)
    assert loops.tolist() == [4, 6]
    for i, t in enumerate((4, 6)):  # the state after t scripted steps, read out
        h = torch.zeros(1, x.shape[1], 32)
        for k in range(t):
            h = h + steps[i, k] * script.dirs[k]
        with torch.no_grad():
            ref = model.head(model._finish(h, x[i : i + 1], model.rope(0, x.shape[1]), None))[0, -1].float()
        torch.testing.assert_close(logits[i], ref)


def test_act_exit_waits_for_the_last_position_and_then_nothing_changes() -> None:
    """Positions halt at different iterations: a row exits once its *last* position halted, so
    its answer is final (T = max_loops gives the same logits) and one iteration earlier it was not."""
    model, x, top = _rdt(act=True), _prompts(12), 24
    logits, loops = adaptive_answer(model, x, act=True, max_loops=top)
    assert min(loops.tolist()) > 1 and max(loops.tolist()) < top and len(set(loops.tolist())) > 1
    with torch.no_grad():
        final = model(x, num_loops=top).logits[:, -1].float()
        for i, t in enumerate(loops.tolist()):
            before = model(x[i : i + 1], num_loops=t - 1).logits[0, -1].float()
            assert not torch.allclose(before, final[i], atol=1e-4)
    torch.testing.assert_close(logits, final, rtol=1e-4, atol=1e-4)


def test_act_exit_stops_when_every_position_halted() -> None:
    """With a halting unit that halts everything at once (huge bias), the ACT exit takes one loop;
    with one that never reaches the threshold it runs to max_loops."""
    model, x = _rdt(act=True), _prompts()
    with torch.no_grad():
        model.halt.bias.fill_(50.0)
    assert adaptive_answer(model, x, act=True, max_loops=9)[1].tolist() == [1] * len(x)
    with torch.no_grad():
        model.halt.bias.fill_(-50.0)
        model.halt.weight.zero_()
    assert adaptive_answer(model, x, act=True, max_loops=9)[1].tolist() == [9] * len(x)


def test_evaluate_multihop_reports_exit_accuracy_and_chosen_t() -> None:
    """Answers defined as the model's own prediction at a converged depth score 1.0 under the KL
    exit, and exit_loops gives the mean T chosen per hop count."""
    model, x = _rdt(), _prompts(8)
    ref, thr, first = _reference(model, x, 24, act=False)
    ans = [int(ref[t - 1][i].argmax()) for i, t in enumerate(first)]
    examples = [{"hops": 1 + i % 2, "prompt_ids": x[i].tolist(), "answer_ids": [ans[i]]} for i in range(8)]
    res = evaluate_multihop(model, examples, loops=[1], exit_kl=[thr], exit_max_loops=24)
    key = exit_kl_key(thr)
    assert res["accuracy"][key] == {"1": 1.0, "2": 1.0}
    want = {h: sum(t for i, t in enumerate(first) if 1 + i % 2 == int(h)) / 4 for h in ("1", "2")}
    assert res["exit_loops"][key] == pytest.approx(want) and res["exit_max_loops"] == 24


def test_bad_exit_options_are_one_line_errors() -> None:
    model, ex = _rdt(), [{"hops": 1, "prompt_ids": [3, 4, 5], "answer_ids": [6]}]
    with pytest.raises(ValueError, match="exit-kl"):
        evaluate_multihop(model, ex, exit_kl=[-1.0])
    with pytest.raises(ValueError, match="exit-act"):
        evaluate_multihop(model, ex, exit_act=True)
    with pytest.raises(ValueError, match="max_loops"):
        adaptive_answer(model, torch.tensor([[3, 4]]), max_loops=0)
    assert EXIT_ACT == "exit-act"


# ----------------------------------------------------------------------------- the model's own exit
# (RDT._trunk_adaptive: forward / generate with exit_kl=, exit_act=, num_loops= as the cap)


def test_exited_rows_leave_the_active_set() -> None:
    """The core runs on the rows still looping only: at iteration t it sees #{i: T_i > t} rows,
    so the batch runs sum_i T_i core row-iterations (``loops_executed`` = their mean) instead of
    B * cap, while every row exits where the fixed-T runs say it should."""
    model, x, top = _rdt(), _prompts(12), 24
    _, thr, first = _reference(model, x, top, act=False)
    rows: list[int] = []
    hook = model.core[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    with torch.no_grad():
        out = model(x, num_loops=top, exit_kl=thr)
    hook.remove()
    exits = out.aux["exit_loops"].tolist()
    assert exits == first
    assert rows == [sum(t > k for t in exits) for k in range(max(exits))], rows
    assert out.aux["loops_executed"].item() == pytest.approx(sum(exits) / len(exits))
    assert sum(exits) < len(exits) * top and out.aux["loops_run"].item() == max(exits)
    # the KL criterion's readouts: one per active row per iteration (none at the last one)
    assert out.aux["exit_evals"].item() == sum(rows) - sum(t == top for t in exits)


def test_act_exit_costs_what_its_rows_cost_alone_and_changes_nothing() -> None:
    """The ACT exit is lossless (a row whose positions all halted can no longer change): its
    logits are fixed T = cap's, and its FLOPs (counted) are exactly those of each row run alone
    at its own exit T, below the fixed-T batch's."""
    model, x, top = _rdt(act=True), _prompts(12), 24
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(x, num_loops=top, exit_act=True)
    exits = out.aux["exit_loops"].tolist()
    assert len(set(exits)) > 1 and max(exits) < top
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x, num_loops=top).logits, rtol=1e-4, atol=1e-4)
        with FlopCounterMode(display=False) as fixed:
            model(x, num_loops=top)
        alone = 0
        for i, t in enumerate(exits):
            with FlopCounterMode(display=False) as one:
                ref = model(x[i : i + 1], num_loops=t).logits
            alone += one.get_total_flops()
            torch.testing.assert_close(out.logits[i], ref[0], rtol=1e-4, atol=1e-4)
    assert fc.get_total_flops() == alone < fixed.get_total_flops()


def test_exit_on_all_positions_scores_each_row_at_its_t() -> None:
    """``exit_positions="all"`` (scoring whole sequences): a row exits once the largest KL over its
    positions is below the threshold, and every position's logits, and its loss, are those of
    fixed T = its exit T."""
    model, x, top = _rdt(), _prompts(12), 24
    with torch.no_grad():
        ref = [model(x, num_loops=t).logits.float() for t in range(1, top + 1)]  # [B, S, V] each
    logp = [torch.log_softmax(r, -1) for r in ref]
    kl = torch.stack([(lp.exp() * (lp - prev)).sum(-1).amax(-1) for prev, lp in zip(logp, logp[1:])], 1)
    thr = float(kl[:, : top // 2].min(1).values.median())
    first = [next((t + 2 for t in range(top - 1) if kl[i, t] < thr), top) for i in range(len(x))]
    assert len(set(first)) > 1
    with torch.no_grad():
        out = model(x, labels=x, num_loops=top, exit_kl=thr, exit_positions="all", return_logits=True)
    assert out.aux["exit_loops"].tolist() == first
    for i, t in enumerate(first):
        torch.testing.assert_close(out.logits[i], ref[t - 1][i], rtol=1e-4, atol=1e-4)
    want = sum(torch.nn.functional.cross_entropy(ref[t - 1][i], x[i], reduction="sum") for i, t in enumerate(first))
    torch.testing.assert_close(out.ce_sum, want, rtol=1e-4, atol=1e-3)


def _decode_exits(model: torch.nn.Module, seq: torch.Tensor, prompt_len: int, **kw) -> tuple[list, list]:
    """Cached decoding of ``seq`` (prompt, then a token a step): last-position logits and each
    row's exit T per step."""
    cache, logits, exits = KVCache(), [], []
    with torch.no_grad():
        for end in range(prompt_len, seq.shape[1] + 1):
            out = model(seq[:, (0 if end == prompt_len else end - 1):end], cache=cache, **kw)
            logits.append(out.logits[:, -1])
            exits.append(out.aux["exit_loops"].tolist())
    return logits, exits


def test_cached_decoding_exits_per_row_as_each_row_alone() -> None:
    """Per-token exit with the KV cache: a batch generates, token for token, what each row
    generates alone with the same exit, its rows exit at different iterations within one step,
    and the prompt step's logits are fixed T = the row's exit T (nothing cached before)."""
    model, x, cap, thr = _rdt(), _prompts(6, 5), 12, 3e-2
    kw = {"num_loops": cap, "exit_kl": thr}
    batch = model.generate(x, 5, **kw)
    for i in range(len(x)):
        assert torch.equal(model.generate(x[i : i + 1], 5, **kw)[0], batch[i]), i
    logits, exits = _decode_exits(model, batch, x.shape[1], **kw)
    assert any(len(set(step)) > 1 for step in exits) and min(min(s) for s in exits) < cap, exits
    with torch.no_grad():
        for i, t in enumerate(exits[0]):
            torch.testing.assert_close(logits[0][i], model(x, num_loops=t).logits[i, -1], rtol=1e-4, atol=1e-4)
    for i in range(len(x)):  # per-step logits too (to round-off: batched attention sums differently)
        alone, alone_exits = _decode_exits(model, batch[i : i + 1], x.shape[1], **kw)
        assert [s[0] for s in alone_exits] == [s[i] for s in exits]
        for got, want in zip(logits, alone, strict=True):
            torch.testing.assert_close(got[i], want[0], rtol=1e-3, atol=1e-3)


def test_skipped_iterations_cache_the_exit_iterations_keys_and_values() -> None:
    """The fill-in: after a cached forward, row i's cache slots of the iterations it skipped hold
    its keys/values of its exit iteration T_i (later tokens attend to those), and the iterations
    it ran hold their own (each differs from the one before)."""
    model, x, cap = _rdt(), _prompts(6, 5), 12
    cache = KVCache()
    with torch.no_grad():
        exits = model(x, cache=cache, num_loops=cap, exit_kl=3e-2).aux["exit_loops"].tolist()
    assert len(set(exits)) > 1 and min(exits) < cap
    layer = model.core_layer_offset
    for i, t_exit in enumerate(exits):
        for kv in (0, 1):
            slots = [cache.store[(t, layer)][kv][i] for t in range(cap)]
            for t in range(1, cap):
                if t >= t_exit:
                    assert torch.equal(slots[t], slots[t_exit - 1]), (i, t)
                else:
                    assert not torch.allclose(slots[t], slots[t - 1]), (i, t)


def test_the_model_exit_refuses_what_it_cannot_do() -> None:
    model, x = _rdt(), _prompts(2)
    with pytest.raises(ValueError, match="exit_act"):
        model(x, exit_act=True)
    with pytest.raises(ValueError, match="exit_positions"):
        model(x, exit_kl=1e-3, exit_positions="first")
    with pytest.raises(ValueError, match="loop_counts"):
        model(x, exit_kl=1e-3, loop_counts=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="exit_kl must be >= 0"):
        model(x, exit_kl=-1.0)
    model.train()
    with pytest.raises(ValueError, match="inference option"):
        model(x, exit_kl=1e-3)


def test_the_report_states_the_row_iterations_an_exit_saved() -> None:
    """The experiment report's adaptive-exit rows give core row-iterations per test query: the
    mean T chosen weighted by each hop count's queries (exited queries cost nothing more), against
    fixed T = max_loops, with min-max over seeds."""
    from types import SimpleNamespace

    from mythos.tools.experiment_multihop import _mh_exit_table, _row

    key, hops = exit_kl_key(1e-3), ["1", "2"]

    def run(t1: float, t2: float) -> SimpleNamespace:
        mh = {"accuracy": {key: {"1": 1.0, "2": 0.5}}, "count": {"1": 3, "2": 1},
              "exit_loops": {key: {"1": t1, "2": t2}}, "exit_max_loops": 16}
        return SimpleNamespace(eval={"multihop": mh}, path="run")

    row = _row([run(2.0, 4.0), run(4.0, 8.0)], key, "kl", hops, train_hops=2)
    assert row["loops_per_query"]["mean"] == pytest.approx((2.5 + 5.0) / 2)  # (2*3 + 4) / 4, (4*3 + 8) / 4
    lines = _mh_exit_table({"a": {"name": "rdt", "rows": [row]}, "hops": hops})
    assert any("3.75 per query (2.50-5.00) vs 16 at fixed T = 16: 77% saved" in ln for ln in lines), lines
