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

Long because the trunk's three executions (active rows, masked, the per-row adaptive exit with
its KV-cache view) share the iteration, ACT and cache code here; split apart they would each
re-implement the loop body, which is what the parity tests guard against.
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
from mythos.model.loops import sample_loop_counts


class ACTState:
    """Running ACT accumulators for positions ``[B, S]`` (fp32)."""

    def __init__(self, h: Tensor) -> None:
        b, s, _ = h.shape
        self.cum = h.new_zeros(b, s, dtype=torch.float32)
        self.remainder = h.new_zeros(b, s, dtype=torch.float32)
        self.n_updates = h.new_zeros(b, s, dtype=torch.float32)
        self.running = torch.ones(b, s, dtype=torch.bool, device=h.device)
        self.output = torch.zeros_like(h)

    def update(self, p: Tensor, h_new: Tensor, active: Tensor, last: bool, threshold: float) -> Tensor:
        """Fold iteration state ``h_new`` in with halting probs ``p [B,S]``; returns the mask of
        positions that ran this iteration (to freeze the others)."""
        run = self.running & active
        halt = run & ((self.cum + p >= threshold) | last)
        cont = run & ~halt
        w = torch.where(halt, 1.0 - self.cum, torch.where(cont, p, torch.zeros_like(p)))
        self.output = self.output + w.unsqueeze(-1).to(h_new.dtype) * h_new
        self.remainder = torch.where(halt, 1.0 - self.cum, self.remainder)
        self.cum = self.cum + torch.where(cont, p, torch.zeros_like(p))
        self.n_updates = self.n_updates + run.float()
        self.running = self.running & ~halt
        return run


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

    def _iterate(
        self,
        h: Tensor,
        inj_ctx: object,
        loop_idx: int | Tensor | None,
        rope: tuple[Tensor, Tensor],
        value_embeds: list[Tensor | None],
        cache: KVCache | None,
        t: int,
    ) -> tuple[Tensor, Tensor | None]:
        """One loop iteration: inject, then the R core blocks. Returns (h_next, MoE aux sum)."""
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

    def _finish(self, h: Tensor, input_ids: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None) -> Tensor:
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

    # ------------------------------------------------------------------ trunk
    def trunk(
        self,
        x: Tensor,
        input_ids: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        *,
        num_loops: int | None = None,
        loop_counts: Tensor | None = None,
        n_steps: int | None = None,
        h0: Tensor | None = None,
        exit_kl: float | None = None,
        exit_act: bool | None = None,
        exit_positions: str = "last",
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """``num_loops``: run every sequence this many iterations. ``loop_counts [B]`` (CPU) with
        optional ``n_steps``: per-sequence counts and the number of iterations to run (>= max;
        more only to keep ZeRO-3 ranks in step). Neither: sample in training, ``loops.eval_loops``
        in eval. ``h0 [B, S, d]``: the initial state (default: noise in training, zeros in eval).

        ``exit_kl`` / ``exit_act`` / ``exit_positions`` (eval only): per-row adaptive exit with
        ``num_loops`` as the cap, see :meth:`_trunk_adaptive`. Defaults: no exit without a cache;
        with a cache (decoding) ``cfg.early_exit_kl`` and, for an ACT model, the ACT exit."""
        cfg = self.cfg
        b, s, _ = x.shape
        kl = float(cfg.early_exit_kl if exit_kl is None and cache is not None else (exit_kl or 0.0))
        act_exit = (self.halt is not None and cache is not None) if exit_act is None else bool(exit_act)
        if kl < 0:
            raise ValueError(f"exit_kl must be >= 0, got {kl}")
        if act_exit and self.halt is None:
            raise ValueError(f"exit_act: {cfg.name} has no ACT halting unit (model.act.enabled=false)")
        if exit_positions not in ("last", "all"):
            raise ValueError(f"exit_positions must be 'last' or 'all', got {exit_positions!r}")
        explicit = bool(exit_kl) or bool(exit_act)
        if explicit and (self.training or loop_counts is not None):
            raise ValueError("adaptive exit is an inference option: eval mode, with num_loops as the cap "
                             "(not loop_counts: the exit picks each row's count)")
        if (kl > 0 or act_exit) and not self.training and loop_counts is None:
            n, _ = self._resolve_loops(b, num_loops, None, None)
            return self._trunk_adaptive(x, input_ids, rope, cache, n=n, exit_kl=kl, exit_act=act_exit,
                                        exit_positions=exit_positions, h0=h0)
        n, counts = self._resolve_loops(b, num_loops, loop_counts, n_steps)
        plan = _ActiveRows(counts, n, x.device) if (
            counts is not None and cfg.loops.execution == "active" and cache is None) else None
        if plan is not None and plan.perm is not None:  # order rows by T: the active set is a prefix
            x, input_ids = x[plan.perm], input_ids[plan.perm]
            h0 = None if h0 is None else h0[plan.perm]

        for j, block in enumerate(self.prelude):
            x = self.run_block(block, x, rope, self.value_embed(j, input_ids), cache, (-1, j))
        e = self.prelude_norm(x)
        inj_ctx = self.injection(e)
        off = self.core_layer_offset
        ve_core = [self.value_embed(off + j, input_ids) for j in range(cfg.n_core)]

        if h0 is not None:
            h = h0.to(e.dtype)
        elif self.training and cfg.h0 == "noise":
            h = torch.empty_like(e)
            nn.init.trunc_normal_(h, std=cfg.h0_std, a=-2 * cfg.h0_std, b=2 * cfg.h0_std)
        else:
            h = torch.zeros_like(e)
        # masked execution: first active iteration per row (device), for torch.where
        start = None if counts is None or plan is not None else _to_device(n - counts, x.device)
        bwd = cfg.loops.bwd_depth
        grad_from = max(n - bwd, 0) if (self.training and bwd > 0) else 0
        outer_grad = torch.is_grad_enabled()
        act = ACTState(h) if self.halt is not None else None
        all_active = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        aux_terms: list[tuple[Tensor, int]] = []
        # a cache with per-sequence loop_counts: the batch stops as a whole (every row converged)
        exit_kl = kl if (cache is not None and not self.training) else 0.0
        prev_logp: Tensor | None = None
        ran = n

        for t in range(n):
            rows = b if plan is None else plan.active[t]  # rows computed this iteration (a prefix)
            if plan is not None:
                active, loop_idx = plan.mask(t), t - plan.start[:rows]
            elif start is None:
                active, loop_idx = all_active, t
            else:
                active = (t >= start).unsqueeze(-1)  # [B, 1]
                loop_idx = (t - start).clamp(min=0)
            h_in = h if rows == b else h[:rows]
            ctx = inj_ctx if rows == b else self.injection.rows(inj_ctx, rows)
            ve = ve_core if rows == b else [None if v is None else v[:rows] for v in ve_core]
            track = outer_grad and t >= grad_from
            with torch.set_grad_enabled(track):
                if track and cfg.checkpoint_loops and self.training and cache is None:
                    h_new, aux = checkpoint(
                        self._iterate, h_in, ctx, loop_idx, rope, ve, None, t, use_reentrant=False
                    )
                else:
                    h_new, aux = self._iterate(h_in, ctx, loop_idx, rope, ve, cache, t)
                if aux is not None:
                    aux_terms.append((aux, rows))
                if rows < b:  # rows past the prefix keep their state (they have not started)
                    h_new = torch.cat([h_new, h[rows:]])
                if act is not None:
                    p = torch.sigmoid(self.halt(h_new[:rows]).squeeze(-1).float())
                    if rows < b:
                        p = torch.cat([p, p.new_zeros(b - rows, s)])
                    ran_mask = act.update(p, h_new, active, t == n - 1, cfg.act.threshold)
                    h = torch.where(ran_mask.unsqueeze(-1), h_new, h)
                elif start is None:
                    h = h_new
                else:
                    h = torch.where(active.unsqueeze(-1), h_new, h)

            if cache is not None and t < n - 1:  # inference-time early stopping
                stop = act is not None and act_exit and not bool(act.running.any())
                if exit_kl > 0 and not stop:
                    cache.peek = True
                    logp = F.log_softmax(self.head(self._finish(h, input_ids, rope, cache))[:, -1].float(), -1)
                    cache.peek = False
                    if prev_logp is not None:
                        kl = F.kl_div(prev_logp, logp, log_target=True, reduction="none").sum(-1)
                        stop = bool((kl < exit_kl).all())
                    prev_logp = logp
                if stop:
                    self._fill_cache(cache, t, n, s)
                    ran = t + 1
                    break

        aux: dict[str, Tensor] = {"loops_run": torch.tensor(float(ran))}
        aux["loops_mean"] = counts.float().mean() if counts is not None else torch.tensor(float(n))
        # core iterations computed per sequence, forward and with autograd (what the hardware ran,
        # for HFU; with active rows the sequences' own T and min(T, bwd_depth))
        tracked = range(grad_from, ran) if outer_grad else range(0)
        if plan is not None:
            aux["loops_executed"] = torch.tensor(sum(plan.active[:ran]) / b)
            aux["bwd_loops_executed"] = torch.tensor(sum(plan.active[t] for t in tracked) / b)
        else:
            aux["loops_executed"] = torch.tensor(float(ran))
            aux["bwd_loops_executed"] = torch.tensor(float(len(tracked)))
        aux_loss: Tensor | None = None
        if act is not None:
            h = act.output
            ponder = (act.n_updates + act.remainder).mean()
            aux_loss = cfg.act.ponder_weight * ponder
            aux["ponder"] = ponder.detach()
            aux["act_steps"] = act.n_updates.mean().detach()
            # histogram of per-position step counts (each in [0, n]): a fixed-size scatter_add
            # instead of ``bincount``, whose output size depends on the data (a host sync on GPU)
            steps = act.n_updates.detach().long().flatten()
            aux["act_halt_hist"] = torch.zeros(n + 1, dtype=torch.long, device=steps.device).scatter_add_(
                0, steps, torch.ones_like(steps))
        aux_loss = _add_moe_balance(aux_terms, cfg, aux_loss, aux)
        y = self._finish(h, input_ids, rope, cache)
        if plan is not None and plan.perm is not None:
            y = y[plan.inverse]
        return y, aux_loss, aux


    # ------------------------------------------------------------------ adaptive exit (inference)
    def _trunk_adaptive(
        self,
        x: Tensor,
        input_ids: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        *,
        n: int,
        exit_kl: float,
        exit_act: bool,
        exit_positions: str,
        h0: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Per-row adaptive depth, at most ``n`` iterations: a row that has converged leaves the
        active set, so its later iterations are not computed while the other rows go on.

        Row i exits after iteration ``T_i`` (1-based) when

        - ``exit_kl > 0`` and ``T_i >= 2`` and ``KL(p_T || p_{T-1}) < exit_kl``, where ``p_t`` is
          the next-token distribution the model would output at ``num_loops = t`` (the last
          position with ``exit_positions="last"``; with ``"all"`` the largest KL over the row's
          positions: every position has settled), or
        - ``exit_act`` and every position of the row has halted (lossless: the output can no
          longer change), or
        - ``T_i = n``.

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
        its exit iteration (Huginn's fill-in), so later tokens can attend at every depth. Exact
        in this sense: a batch decodes each row as that row decoded alone, and a forward with no
        past (the prompt) gives the logits of fixed ``num_loops = T_i``.
        """
        cfg = self.cfg
        b, s, _ = x.shape
        for j, block in enumerate(self.prelude):
            x = self.run_block(block, x, rope, self.value_embed(j, input_ids), cache, (-1, j))
        e = self.prelude_norm(x)
        off = self.core_layer_offset
        ve = [self.value_embed(off + j, input_ids) for j in range(cfg.n_core)]
        h = torch.zeros_like(e) if h0 is None else h0.to(e.dtype)
        ctx = self.injection(e)
        act = ACTState(h) if self.halt is not None else None
        view = _RowsCache(cache) if cache is not None else None
        # working set: the rows still looping (``idx``: their original index), compacted on exit
        idx = torch.arange(b, device=x.device)
        ids = input_ids
        out = torch.empty_like(h)  # each row's state at its exit
        exit_t = torch.full((b,), n, dtype=torch.long)
        act_steps = torch.zeros(b, s, dtype=torch.float32, device=x.device)
        act_rem = torch.zeros(b, s, dtype=torch.float32, device=x.device)
        prev: Tensor | None = None  # log p_{t-1} of the working rows, [a, V] or [a, S, V]
        aux_terms: list[tuple[Tensor, int]] = []
        row_iters = evals = 0
        ran = n
        for t in range(n):
            a = idx.numel()
            if view is not None:
                view.rows = None if a == b else idx
            h_new, aux = self._iterate(h, ctx, t, rope, ve, view, t)
            row_iters += a
            if aux is not None:
                aux_terms.append((aux, a))
            last = t == n - 1
            if act is not None:
                p = torch.sigmoid(self.halt(h_new).squeeze(-1).float())
                run = act.update(p, h_new, torch.ones_like(act.running), last, cfg.act.threshold)
                h = torch.where(run.unsqueeze(-1), h_new, h)
                # the state the trunk outputs were t its last iteration: still-running positions
                # take the forced remainder 1 - cum of this iteration's state
                left = torch.where(act.running, 1.0 - act.cum, torch.zeros_like(act.cum))
                state = act.output + left.unsqueeze(-1).to(h_new.dtype) * h_new
            else:
                h = state = h_new
            done = torch.full((a,), last, dtype=torch.bool, device=x.device)
            if not last and exit_act and act is not None:
                done |= ~act.running.any(-1)
            if not last and exit_kl > 0:
                if view is not None:
                    view.peek = True
                y = self._finish(state, ids, rope, view)
                if view is not None:
                    view.peek = False
                logp = F.log_softmax(self.head(y if exit_positions == "all" else y[:, -1]).float(), -1)
                evals += a
                if prev is not None:
                    kl = F.kl_div(prev, logp, log_target=True, reduction="none").sum(-1)  # KL(p_t || p_t-1)
                    done |= (kl.amax(-1) if exit_positions == "all" else kl) < exit_kl
                prev = logp
            if not bool(done.any()):  # the one host sync per iteration: which rows go on
                continue
            gone = idx[done]
            out[gone] = state[done]
            exit_t[gone.cpu()] = t + 1
            if act is not None:
                act_steps[gone], act_rem[gone] = act.n_updates[done], act.remainder[done]
            if bool(done.all()):
                ran = t + 1
                break
            keep = ~done
            idx, h, ids = idx[keep], h[keep], ids[keep]
            ctx = _take_rows(ctx, keep)
            ve = [None if v is None else v[keep] for v in ve]
            prev = None if prev is None else prev[keep]
            if act is not None:
                for name in ("cum", "remainder", "n_updates", "running", "output"):
                    setattr(act, name, getattr(act, name)[keep])
        if cache is not None and ran < n:
            # every row exited: the iterations nobody ran get slot ``ran - 1``'s new keys/values,
            # which hold each row's exit iteration (earlier exits were filled in per iteration)
            self._fill_cache(cache, ran - 1, n, s)
        aux_out: dict[str, Tensor] = {
            "loops_run": torch.tensor(float(ran)),
            "loops_mean": exit_t.float().mean(),
            "loops_executed": torch.tensor(row_iters / b),
            "bwd_loops_executed": torch.tensor(row_iters / b if torch.is_grad_enabled() else 0.0),
            "exit_loops": exit_t,
            "exit_evals": torch.tensor(float(evals)),
        }
        aux_loss: Tensor | None = None
        if act is not None:
            ponder = (act_steps + act_rem).mean()
            aux_loss = cfg.act.ponder_weight * ponder
            aux_out["ponder"] = ponder.detach()
            aux_out["act_steps"] = act_steps.mean()
        aux_loss = _add_moe_balance(aux_terms, cfg, aux_loss, aux_out)
        return self._finish(out, input_ids, rope, cache), aux_loss, aux_out


def _add_moe_balance(aux_terms: list[tuple[Tensor, int]], cfg: ModelConfig, aux_loss: Tensor | None,
                     aux: dict[str, Tensor]) -> Tensor | None:
    """``aux_loss`` plus the MoE balance term of the core calls ``aux_terms`` (``(loss, rows)``
    each; a call's balance loss is a mean over the rows it ran, so calls are weighted by rows);
    records ``aux["moe_balance"]``. Unchanged without MoE calls."""
    if not aux_terms:
        return aux_loss
    total = sum(r for _, r in aux_terms)
    balance = sum(a * (r / total) for a, r in aux_terms if r) / cfg.n_core
    term = cfg.moe.balance_weight * balance
    aux["moe_balance"] = balance.detach()
    return term if aux_loss is None else aux_loss + term


class _RowsCache:
    """A :class:`KVCache` seen by a subset of its rows, for the adaptive exit.

    ``rows`` (None = all): the original indices of the rows the core runs on now. ``update``
    returns past + new keys/values of those rows only (what their attention needs). Stored, every
    core slot ``(t, layer)`` gets this forward's keys/values for **all** rows: the rows computed
    at ``t`` give theirs, the others (exited) keep the newest ones of that layer, i.e. those of
    their exit iteration (the fill-in). ``peek``: return past + new without storing (the KL
    criterion's trial readout through the coda)."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.rows: Tensor | None = None
        self.peek = False
        self.fresh: dict[int, tuple[Tensor, Tensor]] = {}
        """core layer -> this forward's newest keys/values ``[B, kv_heads, S_new, head_dim]``"""

    @property
    def pos(self) -> int:
        return self.cache.pos

    def update(self, key: tuple[int, int], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.rows
        if rows is not None and self.peek:
            past = self.cache.store.get(key)
            if past is None:
                return k, v
            return torch.cat([past[0][rows], k], dim=2), torch.cat([past[1][rows], v], dim=2)
        if rows is not None:  # a core slot with some rows exited: theirs from their exit iteration
            fk, fv = self.fresh[key[1]]
            k, v = fk.index_copy(0, rows, k), fv.index_copy(0, rows, v)
        if key[0] >= 0 and not self.peek:
            self.fresh[key[1]] = (k, v)
        self.cache.peek = self.peek
        try:
            full_k, full_v = self.cache.update(key, k, v)
        finally:
            self.cache.peek = False
        return (full_k, full_v) if rows is None else (full_k[rows], full_v[rows])


def _take_rows(ctx: object, keep: Tensor) -> object:
    """The injection context of the rows ``keep`` (bool over the working rows): per-row tensors
    (``[a, S, d]``) are indexed, per-channel ones (LTI's ``A_bar [d]``) kept."""
    if isinstance(ctx, tuple):
        return tuple(_take_rows(c, keep) for c in ctx)
    if isinstance(ctx, Tensor) and ctx.dim() >= 2 and ctx.shape[0] == keep.numel():
        return ctx[keep]
    return ctx


class _ActiveRows:
    """Host-side plan for running per-sequence loop counts on active rows only.

    With right-aligned counts, sequence i is active in iterations ``[n - T_i, n)``. Once the rows
    are ordered by T (descending, ``perm``; None when already ordered), the active set of every
    iteration is a prefix: ``active[t]`` rows. All of it is computed on the host from the CPU
    counts, so the loop needs no device sync. ``active[t]`` may be 0 when ``n`` exceeds the
    largest count (ZeRO-3 keeps ranks in step): the core is then called on zero rows.
    """

    def __init__(self, counts: Tensor, n: int, device: torch.device) -> None:
        b = counts.numel()
        order = torch.argsort(counts, descending=True, stable=True)
        self.perm: Tensor | None = None
        self.inverse: Tensor | None = None
        if not bool((order == torch.arange(b)).all()):
            self.perm = _to_device(order, device)
            self.inverse = _to_device(torch.argsort(order), device)
        first = n - counts[order]  # first active iteration of each ordered row (ascending)
        self.active = [int(v) for v in torch.searchsorted(first, torch.arange(n), right=True)]
        self.start = _to_device(first, device)
        self._rows = torch.arange(b, device=device).unsqueeze(-1)

    def mask(self, t: int) -> Tensor:
        """``[B, 1]`` bool: rows active in iteration ``t`` (a prefix)."""
        return self._rows < self.active[t]


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host index tensor -> ``device`` without a host sync: a plain ``.to("cuda")`` from pageable
    memory waits for the copy; from pinned memory with ``non_blocking`` it is queued."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
