"""The Recurrent-Depth Transformer (prelude -> looped core -> coda), Parcae's formulation.

::

    e    = RMSNorm(Prelude(Embed(ids)))            P blocks, once
    h_0  ~ TruncNormal(0, h0_std)                  zeros in eval mode (the noise mean)
    u_t  = Inject(h_t, e)                          LTI by default: A_bar*h + dt*(B e)
    h_t+1= Core(u_t)                               R blocks, weights shared across t
    y    = Head(Norm(Coda(C h_T)))                 C: d x d readout, then the coda blocks

**Per-sequence loop counts, right-aligned.** In training each sequence i has its own ``T_i``
(a function of (seed, step, global position), see :mod:`mythos.model.loops` and
:mod:`mythos.train.loop_layout`) and the batch runs ``n >= max T`` iterations (``n_steps``: more
than the batch's own max only to keep ZeRO-3 ranks in step). Sequence i is *active* for the last
``T_i`` of them -- it holds ``h_0`` before -- so all sequences finish together. Truncated backprop
then needs no per-sequence bookkeeping: only the last ``bwd_depth`` iterations run with autograd,
and each sequence gets gradients through exactly ``min(T_i, bwd_depth)`` iterations. Activation
memory is O(bwd_depth) (O(1) per iteration with ``checkpoint_loops``), not O(max T). The loop
index seen by depth-wise LoRA and the loop embedding is each sequence's own iteration number
``t - (n - T_i)``.

**Active rows only** (``loops.execution=active``, the default). Once the rows are ordered by T
(descending; done on the host from the CPU counts, then undone on the output), the active set of
every iteration is a prefix ``[:a_t]``: the core runs on ``h[:a_t]`` only, so a batch costs
``sum_i T_i`` core applications instead of ``B * max T`` -- no gather, no device sync. ``a_t`` may
be 0 (a ZeRO-3 lockstep iteration): the core is still called, on zero rows. ``masked`` keeps the
old computation (every row runs all ``n``, finished rows discarded by ``torch.where``) for A/B.

**ACT** (optional) weights the states of a position's iterations by its halting probabilities
(remainder rule, forced remainder at the last iteration), freezes halted positions, and adds a
ponder cost; in training it never changes how many core calls run.

**Adaptive exit** (inference, ``exit_kl=`` / ``exit_act=``): each row stops by itself and leaves
the active set; see :meth:`RDT._trunk_adaptive`.

**Layout.** :meth:`RDT.trunk` checks the exit options, resolves the loop counts, picks an
execution and assembles the outputs; :meth:`RDT._start` runs what every execution runs first
(prelude, injection context, ``h_0``). One method per execution: :meth:`RDT._run_active` (the
active-rows prefix), :meth:`RDT._run_masked` (``torch.where``; with a KV cache the batch may stop
early as a whole), :meth:`RDT._trunk_adaptive` (the per-row exit). Each runs an iteration through
:meth:`RDT._core_step` (autograd and checkpointing policy, statistics) around the one loop body
:meth:`RDT._iterate` (injection, loop embedding, core blocks with the LoRA loop index), and folds
ACT in by :meth:`RDT._act_fold`. The per-forward state (:class:`Loop`, the ACT accumulators, the
HFU and MoE statistics) lives in :mod:`mythos.model.loop_state`, the row bookkeeping (the
active-rows plan, the exit's cache view) in :mod:`mythos.model.rows`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mythos.model.base import CausalLM
from mythos.model.config import ModelConfig
from mythos.model.injection import build_injection
from mythos.model.layers import Block, KVCache, RMSNorm, init_weights
from mythos.model.loop_state import ACTState, Exits, Loop, LoopStats, ponder_cost
from mythos.model.loops import sample_loop_counts
from mythos.model.rows import ActiveRows, RowsCache, to_device


class RDT(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.prelude_norm = RMSNorm(d, cfg.norm_eps)
        self.injection = build_injection(cfg.injection, d, cfg.a_bar_init)
        self.core = nn.ModuleList(Block(cfg, in_core=True) for _ in range(cfg.n_core))
        self.readout = nn.Linear(d, d, bias=False)  # C
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.loop_embed = nn.Embedding(cfg.lora.max_iters, d) if cfg.loop_embed else None
        self.halt = nn.Linear(d, 1) if cfg.act.enabled else None
        self.loop_seed = 0
        """Seed for loop counts drawn by the model itself (the trainer passes its own counts)."""
        self.sample_step = 0
        init_weights(self, cfg)
        with torch.no_grad():
            self.readout.weight.copy_(torch.eye(d))
            if hasattr(self.injection, "reset_parameters"):
                self.injection.reset_parameters()
            if self.loop_embed is not None:
                self.loop_embed.weight.zero_()
            if self.halt is not None:
                self.halt.bias.fill_(cfg.act.halt_bias_init)

    # ------------------------------------------------------------------ helpers
    @property
    def core_layer_offset(self) -> int:
        return self.cfg.n_prelude

    def spectral_radius(self) -> Tensor:
        return self.injection.spectral_radius()

    def _resolve_loops(
        self, batch: int, num_loops: int | None, loop_counts: Tensor | None, n_steps: int | None
    ) -> tuple[int, Tensor | None]:
        """-> (iterations to run, per-sequence counts on the host, or None when every sequence
        runs them all). Pass ``loop_counts`` as a CPU tensor: it decides Python control flow."""
        if loop_counts is not None:
            counts = loop_counts.detach().to("cpu", torch.long)
            if counts.shape != (batch,):
                raise ValueError(f"loop_counts must have shape [{batch}], got {tuple(counts.shape)}")
            if int(counts.min()) < 1:
                raise ValueError("loop_counts must be >= 1")
            n = int(n_steps) if n_steps is not None else int(counts.max())
            if n < int(counts.max()):
                raise ValueError(f"n_steps={n} is below the largest loop count {int(counts.max())}")
            return n, None if bool((counts == n).all()) else counts
        if num_loops is not None:
            if num_loops < 1:
                raise ValueError(f"num_loops must be >= 1, got {num_loops}")
            return int(num_loops), None
        lc = self.cfg.loops
        if self.training:
            counts = sample_loop_counts(lc, self.loop_seed, self.sample_step, batch)
            self.sample_step += 1
            return self._resolve_loops(batch, None, counts, None)
        return int(lc.eval_loops or round(lc.mean)), None

    def _exit_options(self, cache: KVCache | None, loop_counts: Tensor | None, exit_kl: float | None,
                      exit_act: bool | None, exit_positions: str) -> tuple[float, bool]:
        """-> (KL threshold, ACT exit) in effect, checked. Defaults: no exit without a cache; with
        a cache (decoding) ``cfg.early_exit_kl`` and, for an ACT model, the ACT exit."""
        kl = float(self.cfg.early_exit_kl if exit_kl is None and cache is not None else (exit_kl or 0.0))
        act_exit = (self.halt is not None and cache is not None) if exit_act is None else bool(exit_act)
        if kl < 0:
            raise ValueError(f"exit_kl must be >= 0, got {kl}")
        if act_exit and self.halt is None:
            raise ValueError(f"exit_act: {self.cfg.name} has no ACT halting unit (model.act.enabled=false)")
        if exit_positions not in ("last", "all"):
            raise ValueError(f"exit_positions must be 'last' or 'all', got {exit_positions!r}")
        if (bool(exit_kl) or bool(exit_act)) and (self.training or loop_counts is not None):
            raise ValueError("adaptive exit is an inference option: eval mode, with num_loops as the cap "
                             "(not loop_counts: the exit picks each row's count)")
        return kl, act_exit

    def _finish(self, h: Tensor, input_ids: Tensor, rope: tuple[Tensor, Tensor],
                cache: KVCache | RowsCache | None) -> Tensor:
        """Readout and coda: the loop's state ``h [B, S, d]`` -> ``[B, S, d]`` for the head."""
        y = self.readout(h)
        base = self.cfg.n_prelude + self.cfg.n_core
        for j, block in enumerate(self.coda):
            y = self.run_block(block, y, rope, self.value_embed(base + j, input_ids), cache, (-1, base + j))
        return y

    def _fill_cache(self, cache: KVCache, from_iter: int, to_iter: int, new_len: int) -> None:
        """After an early stop at ``from_iter``, give the skipped iterations' caches this step's
        keys/values from the last computed iteration (Huginn's fill-in), so later tokens can
        attend at every depth."""
        off = self.core_layer_offset
        for t in range(from_iter + 1, to_iter):
            for j in range(self.cfg.n_core):
                k, v = cache.store[(from_iter, off + j)]
                cache.update((t, off + j), k[:, :, -new_len:], v[:, :, -new_len:])

    def _trial_readout(self, h: Tensor, input_ids: Tensor, lp: Loop) -> Tensor:
        """:meth:`_finish` of the state ``h [a, S, d]`` of an iteration that may not be the last,
        for an exit test: the coda reads the cache (``lp.cache``), and stores nothing in it."""
        if lp.cache is not None:
            lp.cache.peek = True
        try:
            return self._finish(h, input_ids, lp.rope, lp.cache)
        finally:
            if lp.cache is not None:
                lp.cache.peek = False

    # ------------------------------------------------------------------ trunk
    def trunk(self, x: Tensor, input_ids: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None, *,
              num_loops: int | None = None, loop_counts: Tensor | None = None, n_steps: int | None = None,
              h0: Tensor | None = None, exit_kl: float | None = None, exit_act: bool | None = None,
              exit_positions: str = "last") -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Embedded tokens ``x [B, S, d]`` -> (final states ``[B, S, d]``, aux loss, metrics).

        ``num_loops``: run every sequence this many iterations. ``loop_counts [B]`` (CPU) with
        optional ``n_steps``: per-sequence counts and the number of iterations to run (>= max;
        more only to keep ZeRO-3 ranks in step). Neither: sample in training, ``loops.eval_loops``
        in eval. ``h0 [B, S, d]``: the initial state (default: noise in training, zeros in eval).

        ``exit_kl`` / ``exit_act`` / ``exit_positions`` (eval only): per-row adaptive exit with
        ``num_loops`` as the cap, see :meth:`_trunk_adaptive`. Defaults: no exit without a cache;
        with a cache (decoding) ``cfg.early_exit_kl`` and, for an ACT model, the ACT exit."""
        b = x.shape[0]
        kl, act_exit = self._exit_options(cache, loop_counts, exit_kl, exit_act, exit_positions)
        if (kl > 0 or act_exit) and not self.training and loop_counts is None:
            n, _ = self._resolve_loops(b, num_loops, None, None)
            return self._trunk_adaptive(x, input_ids, rope, cache, n=n, exit_kl=kl, exit_act=act_exit,
                                        exit_positions=exit_positions, h0=h0)
        n, counts = self._resolve_loops(b, num_loops, loop_counts, n_steps)
        # active rows need per-row counts, and no cache: its rows stay in the caller's order
        plan = ActiveRows(counts, n, x.device) if (
            counts is not None and self.cfg.loops.execution == "active" and cache is None) else None
        if plan is not None:  # order rows by T: the active set is a prefix
            x, input_ids = plan.order(x), plan.order(input_ids)
            h0 = None if h0 is None else plan.order(h0)
        h, lp = self._start(x, input_ids, rope, cache, h0, n)
        if plan is not None:
            h = self._run_active(h, lp, plan)
        else:
            start = None if counts is None else to_device(n - counts, x.device)
            # with a cache (inference) the batch stops as a whole once every row converged
            stop_kl = kl if (cache is not None and not self.training) else 0.0
            h = self._run_masked(h, lp, start, input_ids, stop_kl, act_exit)
        aux = lp.stats.aux(counts.float().mean() if counts is not None else torch.tensor(float(n)))
        aux_loss: Tensor | None = None
        if lp.act is not None:  # the output is the halting-weighted mix of the iterations' states
            h = lp.act.output
            aux_loss = ponder_cost(self.cfg, lp.act.n_updates, lp.act.remainder, aux, bins=n + 1)
        aux_loss = lp.stats.add_moe_balance(self.cfg, aux_loss, aux)
        y = self._finish(h, input_ids, rope, cache)
        return (y if plan is None else plan.restore(y)), aux_loss, aux

    def _start(self, x: Tensor, input_ids: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None,
               h0: Tensor | None, n: int, core_cache: RowsCache | None = None) -> tuple[Tensor, Loop]:
        """What every execution runs first: the prelude on ``x [B, S, d]``, the injection context
        and value embeddings, ``h_0 [B, S, d]``. -> ``(h_0, loop state)`` for ``n`` iterations.
        The core sees ``core_cache`` when given (the adaptive exit's row view), else ``cache``."""
        cfg = self.cfg
        for j, block in enumerate(self.prelude):
            x = self.run_block(block, x, rope, self.value_embed(j, input_ids), cache, (-1, j))
        e = self.prelude_norm(x)
        ctx = self.injection(e)  # the part of the injection that depends on e only: once per forward
        off = self.core_layer_offset
        ve = [self.value_embed(off + j, input_ids) for j in range(cfg.n_core)]
        if h0 is not None:
            h = h0.to(e.dtype)
        elif self.training and cfg.h0 == "noise":  # fresh noise each training forward
            h = torch.empty_like(e)
            nn.init.trunc_normal_(h, std=cfg.h0_std, a=-2 * cfg.h0_std, b=2 * cfg.h0_std)
        else:
            h = torch.zeros_like(e)  # the noise mean: evaluation is deterministic
        bwd = cfg.loops.bwd_depth
        # truncated backprop: right-aligned counts make "the last bwd_depth iterations" per row too
        grad_from = max(n - bwd, 0) if (self.training and bwd > 0) else 0
        act = ACTState(h) if self.halt is not None else None
        lp = Loop(ctx, ve, rope, cache if core_cache is None else core_cache, n, torch.is_grad_enabled(),
                  grad_from, act, LoopStats(x.shape[0]))
        return h, lp

    # ------------------------------------------------------------------ one iteration
    def _iterate(self, h: Tensor, inj_ctx: object, loop_idx: int | Tensor | None, rope: tuple[Tensor, Tensor],
                 value_embeds: list[Tensor | None], cache: KVCache | RowsCache | None,
                 t: int) -> tuple[Tensor, Tensor | None]:
        """The loop body, the same in every execution: inject, add the loop embedding, run the R
        core blocks (LoRA adapters picked by ``loop_idx``). ``h [a, S, d]`` and ``inj_ctx``,
        ``value_embeds`` of the same ``a`` rows; ``loop_idx``: one int, or ``[a]`` per row (each
        row's own iteration number). ``t`` keys the cache slots. -> (h_next [a, S, d], MoE aux sum)."""
        u = self.injection.step(h, inj_ctx)
        if self.loop_embed is not None:
            idx = loop_idx if isinstance(loop_idx, Tensor) else torch.tensor(loop_idx, device=u.device)
            emb = self.loop_embed(idx.clamp(max=self.loop_embed.num_embeddings - 1))
            u = u + (emb.unsqueeze(-2) if emb.dim() == 2 else emb)
        lora_idx = loop_idx if self.cfg.lora.rank else None
        aux_sum: Tensor | None = None
        off = self.core_layer_offset
        for j, block in enumerate(self.core):
            u, aux = block(
                u, rope, value_embed=value_embeds[j], loop_idx=lora_idx, cache=cache, cache_key=(t, off + j)
            )
            if aux is not None:
                aux_sum = aux if aux_sum is None else aux_sum + aux
        return u, aux_sum

    def _core_step(self, h: Tensor, ctx: object, loop_idx: int | Tensor, ve: list[Tensor | None], t: int,
                   lp: Loop) -> Tensor:
        """Iteration ``t`` on the rows of ``h [a, S, d]`` (``ctx``, ``ve``, ``loop_idx`` of the
        same rows): :meth:`_iterate`, checkpointed when configured, recorded in ``lp.stats``.
        The caller holds autograd at ``lp.tracked(t)`` around this and the state update after it,
        so both are in the graph of a tracked iteration and neither is in an untracked one."""
        track = lp.tracked(t)
        if track and self.cfg.checkpoint_loops and self.training and lp.cache is None:
            # one checkpointed region per iteration: activation memory O(1) per tracked iteration
            h_new, aux = checkpoint(self._iterate, h, ctx, loop_idx, lp.rope, ve, None, t, use_reentrant=False)
        else:
            h_new, aux = self._iterate(h, ctx, loop_idx, lp.rope, ve, lp.cache, t)
        lp.stats.record(h.shape[0], track, aux)
        return h_new

    def _act_fold(self, act: ACTState, h: Tensor, h_new: Tensor, active: Tensor, last: bool,
                  rows: int | None = None) -> Tensor:
        """Fold the iteration's state ``h_new [B, S, d]`` into ``act`` and return the next state:
        ``h_new`` where a position ran, ``h`` where it halted before or is not active (``active``
        ``[B, 1]`` or ``[B, S]``). ``last``: the forced remainder. ``rows``: halting probabilities
        of ``h_new[:rows]`` only (the rows computed), the others get 0; None: of all rows."""
        p = torch.sigmoid(self.halt(h_new if rows is None else h_new[:rows]).squeeze(-1).float())
        if rows is not None and rows < h_new.shape[0]:
            p = torch.cat([p, p.new_zeros(h_new.shape[0] - rows, h_new.shape[1])])
        run = act.update(p, h_new, active, last, self.cfg.act.threshold)
        return torch.where(run.unsqueeze(-1), h_new, h)

    # ------------------------------------------------------------------ executions
    def _run_active(self, h: Tensor, lp: Loop, plan: ActiveRows) -> Tensor:
        """Active-rows execution of ``lp.n`` iterations on ``h_0 [B, S, d]`` (rows in plan order,
        by T descending): iteration t runs the core on the prefix ``h[:a_t]`` only; the rows past
        it have not started and keep ``h_0``. Each row's loop index is its own iteration number
        ``t - start``. -> the state after the last iteration (``[B, S, d]``, plan order)."""
        b = h.shape[0]
        for t in range(lp.n):
            a = plan.active[t]  # rows computed this iteration; 0 in a ZeRO-3 lockstep iteration
            loop_idx = t - plan.start[:a]
            h_in = h if a == b else h[:a]
            ctx = lp.ctx if a == b else self.injection.rows(lp.ctx, a)
            ve = lp.ve if a == b else [None if v is None else v[:a] for v in lp.ve]
            with torch.set_grad_enabled(lp.tracked(t)):
                h_new = self._core_step(h_in, ctx, loop_idx, ve, t, lp)
                if a < b:
                    h_new = torch.cat([h_new, h[a:]])
                h = h_new if lp.act is None else self._act_fold(lp.act, h, h_new, plan.mask(t), t == lp.n - 1, a)
        return h

    def _run_masked(self, h: Tensor, lp: Loop, start: Tensor | None, input_ids: Tensor, exit_kl: float,
                    exit_act: bool) -> Tensor:
        """Masked execution of ``lp.n`` iterations on ``h_0 [B, S, d]``: every row runs every
        iteration, and a row before its first one (``start [B]`` on the device; None: all rows
        from 0) keeps its state by ``torch.where``. With a cache the whole batch may stop early
        (:meth:`_batch_converged`); the skipped iterations' cache slots are filled in.
        -> the state after the last iteration run (``[B, S, d]``)."""
        b, s, _ = h.shape
        all_active = torch.ones(b, 1, dtype=torch.bool, device=h.device)
        prev: Tensor | None = None  # log p_{t-1} at the last position, for the KL stop
        for t in range(lp.n):
            if start is None:
                active, loop_idx = all_active, t
            else:
                active = (t >= start).unsqueeze(-1)  # [B, 1]
                loop_idx = (t - start).clamp(min=0)
            with torch.set_grad_enabled(lp.tracked(t)):
                h_new = self._core_step(h, lp.ctx, loop_idx, lp.ve, t, lp)
                if lp.act is not None:
                    h = self._act_fold(lp.act, h, h_new, active, t == lp.n - 1, b)
                else:
                    h = h_new if start is None else torch.where(active.unsqueeze(-1), h_new, h)
            if lp.cache is not None and t < lp.n - 1:
                stop, prev = self._batch_converged(h, input_ids, lp, prev, exit_kl, exit_act)
                if stop:
                    self._fill_cache(lp.cache, t, lp.n, s)
                    break
        return h

    def _batch_converged(self, h: Tensor, input_ids: Tensor, lp: Loop, prev: Tensor | None, exit_kl: float,
                         exit_act: bool) -> tuple[bool, Tensor | None]:
        """Whether the batch stops after this iteration (fixed counts with a cache): with
        ``exit_act`` once every position halted, with ``exit_kl > 0`` once ``KL(p_t || p_{t-1})``
        at the last position is below it for every row. ``h [B, S, d]``: the state now; ``prev``:
        ``log p_{t-1} [B, V]`` or None. -> ``(stop, log p_t)`` (``prev`` when not computed)."""
        if lp.act is not None and exit_act and not bool(lp.act.running.any()):
            return True, prev
        if exit_kl <= 0:
            return False, prev
        logp = F.log_softmax(self.head(self._trial_readout(h, input_ids, lp))[:, -1].float(), -1)
        if prev is None:
            return False, logp
        kl = F.kl_div(prev, logp, log_target=True, reduction="none").sum(-1)
        return bool((kl < exit_kl).all()), logp

    # ------------------------------------------------------------------ adaptive exit (inference)
    def _trunk_adaptive(self, x: Tensor, input_ids: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None, *,
                        n: int, exit_kl: float, exit_act: bool, exit_positions: str,
                        h0: Tensor | None) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Per-row adaptive depth, at most ``n`` iterations: a row that has converged leaves the
        active set, so its later iterations are not computed while the other rows go on. Row i
        exits after iteration ``T_i`` (1-based) by :meth:`_rows_done`, or at ``T_i = n``.

        Its output is its state at ``T_i``: **row i's logits equal the model's at fixed
        ``num_loops = T_i``** (without a cache; with ACT the state read out is the one the trunk
        outputs when ``T_i`` is its last iteration, forced remainder included).

        Cost: the core runs on the rows still active only (the working tensors are compacted, a
        row gather only at iterations where some row exits); the KL criterion adds one readout
        (coda + head) per active row per iteration, counted in ``aux["exit_evals"]``.
        ``aux["exit_loops"] [B]`` holds each row's ``T_i``, ``aux["loops_executed"]`` the mean
        core iterations per row actually run (``sum T_i / B``; fixed T runs ``n``).

        With a cache (decoding), each forward's rows exit on their own (per token when decoding
        one token a step): iterations a row skipped get, in their cache slots, its keys/values of
        its exit iteration (Huginn's fill-in, :class:`RowsCache`), so later tokens can attend at
        every depth. Exact in this sense: a batch decodes each row as that row decoded alone, and
        a forward with no past (the prompt) gives the logits of fixed ``num_loops = T_i``.
        """
        b, s, _ = x.shape
        view = RowsCache(cache) if cache is not None else None
        h, lp = self._start(x, input_ids, rope, cache, h0, n, core_cache=view)
        ex = Exits(h, n)
        ids, prev = input_ids, None  # the working rows' tokens; their log p_{t-1} for the KL exit
        for t in range(n):
            if view is not None:
                view.rows = None if ex.idx.numel() == b else ex.idx
            h_new = self._core_step(h, lp.ctx, t, lp.ve, t, lp)
            if lp.act is not None:
                h = self._act_fold(lp.act, h, h_new, torch.ones_like(lp.act.running), t == n - 1)
                state = lp.act.output_if_last(h_new)
            else:
                h = state = h_new
            done, prev = self._rows_done(state, ids, t, lp, prev, ex, exit_kl, exit_act, exit_positions)
            if not bool(done.any()):  # the one host sync per iteration: which rows go on
                continue
            ex.retire(done, state, t, lp.act)
            if bool(done.all()):
                break
            keep = ~done  # compact the working set: exited rows are not computed any more
            ex.idx, h, ids = ex.idx[keep], h[keep], ids[keep]
            prev = None if prev is None else prev[keep]
            lp.take(keep)
        if cache is not None and lp.stats.ran < n:
            # every row exited: the iterations nobody ran get slot ``ran - 1``'s new keys/values,
            # which hold each row's exit iteration (earlier exits were filled in per iteration)
            self._fill_cache(cache, lp.stats.ran - 1, n, s)
        aux = lp.stats.aux(ex.exit_t.float().mean())
        aux["exit_loops"], aux["exit_evals"] = ex.exit_t, torch.tensor(float(ex.evals))
        aux_loss = None if lp.act is None else ponder_cost(self.cfg, ex.act_steps, ex.act_rem, aux)
        aux_loss = lp.stats.add_moe_balance(self.cfg, aux_loss, aux)
        return self._finish(ex.out, input_ids, rope, cache), aux_loss, aux

    def _rows_done(self, state: Tensor, ids: Tensor, t: int, lp: Loop, prev: Tensor | None, ex: Exits,
                   exit_kl: float, exit_act: bool, positions: str) -> tuple[Tensor, Tensor | None]:
        """The adaptive exit's criterion after iteration ``t`` for the ``a`` working rows, whose
        state read out now is ``state [a, S, d]`` (tokens ``ids [a, S]``). A row is done when

        - ``t`` is the last iteration, or
        - ``exit_act`` and every position of the row has halted (lossless: the output can no
          longer change), or
        - ``exit_kl > 0`` and ``KL(p_t || p_{t-1}) < exit_kl``, where ``p_t`` is the next-token
          distribution the model would output at ``num_loops = t + 1`` (the last position with
          ``positions="last"``; with ``"all"`` the largest KL over the row's positions: every
          position has settled). Needs a previous ``p``, so never after the first iteration.

        ``prev``: ``log p_{t-1}`` (``[a, V]``, or ``[a, S, V]`` with "all"), None at first.
        -> ``(done [a] bool, log p_t)``; KL readouts are counted in ``ex.evals``."""
        last = t == lp.n - 1
        done = torch.full((state.shape[0],), last, dtype=torch.bool, device=state.device)
        if not last and exit_act and lp.act is not None:
            done |= ~lp.act.running.any(-1)
        if last or exit_kl <= 0:
            return done, prev
        y = self._trial_readout(state, ids, lp)
        logp = F.log_softmax(self.head(y if positions == "all" else y[:, -1]).float(), -1)
        ex.evals += state.shape[0]
        if prev is not None:
            kl = F.kl_div(prev, logp, log_target=True, reduction="none").sum(-1)  # KL(p_t || p_t-1)
            done |= (kl.amax(-1) if positions == "all" else kl) < exit_kl
        return done, logp
