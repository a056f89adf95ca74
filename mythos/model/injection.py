"""State injection for the RDT: how the loop state ``h`` and the prelude output ``e`` combine
into the core's input ``u`` at every iteration.

All three forms split into a part computed once per forward from ``e`` (``forward``, returning
a context) and a cheap per-iteration update of ``h`` (``step``), because ``e`` does not change
across iterations. The parameters are only read inside ``forward`` (or by submodule calls), which
is what ZeRO-3's parameter gathering requires.

``LTIInjection`` (Parcae) is the default and the reason the loop is stable::

    dt    = softplus(dt_bias)                   per channel, > 0
    A_bar = exp(-dt * exp(A_log))               per channel, in (0, 1)
    u     = A_bar * h + dt * (B e)

As a linear time-invariant system in ``h`` its spectral radius is ``max(A_bar)``, which must stay
below 1 for *every* parameter value -- in the arithmetic that actually runs. In fp32
``exp(-exp(-20))`` is exactly 1.0 and in bf16 anything above ~0.998 rounds to 1.0, so clamping the
exponent (the public OpenMythos approach) is not enough. We compute in fp32 through
``log(dt) + A_log`` (no ``0 * inf``) and bound by construction with a scale::

    A_bar = (1 - eps(dtype)) * exp(-exp(log(dt) + A_log))

where ``dtype`` is the dtype the update runs in. ``1 - eps`` is exactly representable there and the
product never exceeds it (monotone rounding), so the cast keeps rho < 1. Unlike a clamp
``min(A_bar, 1 - eps)``, which passes zero gradient once a channel reaches the cap (so it could never
move back), the scale keeps ``dA_bar/dA_log = -A_bar * rate`` non-zero wherever ``rate`` is
representable (``log_rate`` > ~-100 in fp32). The scale changes A_bar by a factor of at most
``1 - eps`` (2^-23 in fp32, 2^-7 in bf16), negligible next to the init ``a_bar_init`` ~ 0.447.

**Active rows.** The RDT may run an iteration on a prefix of the batch (the sequences still
looping); ``rows(ctx, a)`` returns the context of the first ``a`` rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _log_softplus(x: Tensor) -> Tensor:
    """log(softplus(x)) without underflow: softplus(x) ~ exp(x) for x << 0, so log ~ x there."""
    return torch.where(x < -15.0, x, torch.log(F.softplus(x.clamp(min=-15.0))))


class LTIInjection(nn.Module):
    """Parcae's stable injection. Parameters: ``A_log [d]``, ``dt_bias [d]``, ``B: d x d``."""

    def __init__(self, d: int, a_bar_init: float) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        # with A_log = 0: A_bar = exp(-softplus(dt_bias))  =>  softplus(dt_bias) = -log(a0)
        dt0 = -math.log(a_bar_init)
        self.dt_bias = nn.Parameter(torch.full((d,), math.log(math.expm1(dt0))))
        self.B = nn.Linear(d, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.B.weight.copy_(torch.eye(self.B.weight.shape[0]))

    def a_bar(self, dtype: torch.dtype | None = None) -> Tensor:
        """``A_bar [d]`` in ``dtype`` (default: the module's dtype), guaranteed in [0, 1 - eps]."""
        dtype = dtype or self.A_log.dtype
        log_rate = _log_softplus(self.dt_bias.float()) + self.A_log.float()
        # clamp(max=88) only keeps exp finite (A_bar is exactly 0 there either way)
        a = torch.exp(-torch.exp(log_rate.clamp(max=88.0)))
        return ((1.0 - torch.finfo(dtype).eps) * a).to(dtype)

    def spectral_radius(self) -> Tensor:
        """``max(A_bar)`` computed in the module's dtype (the bound the update actually has)."""
        return self.a_bar().max()

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        dt = torch.exp(_log_softplus(self.dt_bias.float())).to(e.dtype)
        return self.a_bar(e.dtype), dt * self.B(e)

    def step(self, h: Tensor, ctx: tuple[Tensor, Tensor]) -> Tensor:
        a_bar, drive = ctx
        return a_bar * h + drive

    @staticmethod
    def rows(ctx: tuple[Tensor, Tensor], a: int) -> tuple[Tensor, Tensor]:
        return ctx[0], ctx[1][:a]  # A_bar is per channel, the drive per row


class AdditiveInjection(nn.Module):
    """OpenMythos-style ``u = h + e`` (ablation; no stability guarantee: rho = 1)."""

    def __init__(self, d: int) -> None:
        super().__init__()

    def spectral_radius(self) -> Tensor:
        return torch.tensor(1.0)

    def forward(self, e: Tensor) -> Tensor:
        return e

    def step(self, h: Tensor, ctx: Tensor) -> Tensor:
        return h + ctx

    @staticmethod
    def rows(ctx: Tensor, a: int) -> Tensor:
        return ctx[:a]


class ConcatInjection(nn.Module):
    """Huginn's adapter ``u = W [h; e]``, stored as ``W_h h + W_e e`` (the same map; ``W_e e`` is
    computed once). Both halves start at identity, i.e. additive at init."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.h_proj = nn.Linear(d, d, bias=False)
        self.e_proj = nn.Linear(d, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.h_proj.weight.copy_(torch.eye(self.h_proj.weight.shape[0]))
            self.e_proj.weight.copy_(torch.eye(self.e_proj.weight.shape[0]))

    @torch.no_grad()
    def spectral_radius(self) -> Tensor:
        return torch.linalg.eigvals(self.h_proj.weight.float()).abs().max()

    def forward(self, e: Tensor) -> Tensor:
        return self.e_proj(e)

    def step(self, h: Tensor, ctx: Tensor) -> Tensor:
        return self.h_proj(h) + ctx

    @staticmethod
    def rows(ctx: Tensor, a: int) -> Tensor:
        return ctx[:a]


def build_injection(kind: str, d: int, a_bar_init: float) -> nn.Module:
    if kind == "lti":
        return LTIInjection(d, a_bar_init)
    if kind == "additive":
        return AdditiveInjection(d)
    return ConcatInjection(d)
