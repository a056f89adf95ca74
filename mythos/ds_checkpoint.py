"""Reading DeepSpeed checkpoints without running their pickles, and consolidating them to fp32.

DeepSpeed's checkpoint files are pickles, and unpickling runs whatever code the file names. We
load them with ``torch.load(weights_only=True)`` -- also inside DeepSpeed's ``zero_to_fp32``,
which asks for ``weights_only=False`` -- allowing beyond torch's tensor/container types only the
plain data classes ZeRO optimizer shards hold (:data:`DS_SAFE_GLOBALS`), and first scan each file
(:func:`check_pickles`) so a refusal names the offending global. ``trust=True`` (the CLIs'
``--trust-checkpoint``) turns this off: load only checkpoints you trust. Resuming training goes
through DeepSpeed's own ``engine.load_checkpoint``, which unpickles freely: a run reads only the
checkpoints it wrote itself.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor

#: Classes DeepSpeed (0.19, ZeRO 1-3, fp32/bf16) pickles into ``*_optim_states.pt`` beyond torch's
#: weights_only defaults: an int enum, a two-int dataclass and a loss-scale holder -- plain data.
#: Model-states files hold none (checked on real stage 0-3 checkpoints).
DS_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed/DDP wrapper, torch.compile


def clean_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``) from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out



class UntrustedCheckpointError(ValueError):
    """A checkpoint file that would need arbitrary unpickling (one-line message)."""


def _safe_globals() -> list:
    """:data:`DS_SAFE_GLOBALS` as objects, for ``torch.serialization.safe_globals`` (the ones
    whose module is not importable -- no DeepSpeed installed -- are simply not allowed)."""
    import importlib

    out = []
    for name in DS_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            out.append(getattr(importlib.import_module(module), attr))
    return out


def check_pickles(files: Sequence[Path]) -> None:
    """Refuse (:class:`UntrustedCheckpointError`) any file whose pickle names a global outside
    torch's weights_only set and :data:`DS_SAFE_GLOBALS`, or that the static scan cannot read
    (e.g. opcodes ``torch.save`` does not write). Nothing is unpickled here."""
    with torch.serialization.safe_globals(_safe_globals()):
        for f in files:
            try:
                unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
            except (pickle.UnpicklingError, ValueError, EOFError, RuntimeError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UntrustedCheckpointError(
                    f"refusing to unpickle {f}: not a plain torch.save file ({reason}); load only checkpoints "
                    "you trust (--trust-checkpoint loads it anyway)") from None
            if unsafe:
                raise UntrustedCheckpointError(
                    f"refusing to unpickle {unsafe[0]} from {f}: load only checkpoints you trust "
                    "(--trust-checkpoint loads it anyway)")


@contextlib.contextmanager
def _loads(trust: bool) -> Iterator[None]:
    """Every ``torch.load`` in the block -- DeepSpeed's ``zero_to_fp32`` passes
    ``weights_only=False`` -- runs with ``weights_only=True`` and :data:`DS_SAFE_GLOBALS` allowed,
    so the pre-scan in :func:`check_pickles` is not the only guard. ``trust``: no change."""
    if trust:
        yield
        return
    real_load = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UntrustedCheckpointError(f"refusing to unpickle {args[0] if args else ''}: {first}; load only "
                                           "checkpoints you trust (--trust-checkpoint loads it anyway)") from None

    with torch.serialization.safe_globals(_safe_globals()), mock.patch.object(torch, "load", load):
        yield


def consolidate_deepspeed(ckpt: str | Path, *, trust: bool = False) -> dict[str, Tensor]:
    """fp32 state dict (prefixes stripped) of the DeepSpeed checkpoint directory ``ckpt`` =
    ``.../checkpoints/TAG``.

    With ZeRO optimizer shards (``*_optim_states.pt``, stages 1-3) the fp32 master weights are
    merged by ``deepspeed.utils.zero_to_fp32``. Without them (ZeRO stage 0: the optimizer state is
    inside the model-states file) the weights are ``mp_rank_00_model_states.pt``'s ``module``,
    upcast to fp32 -- with bf16/fp16 training and no ZeRO those are the low-precision copies.

    Files are checked by :func:`check_pickles` and loaded ``weights_only`` unless ``trust``
    (then they are unpickled as DeepSpeed does: only for checkpoints you trust).
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt}")
    model_files = sorted(ckpt.glob("*model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"no DeepSpeed *model_states.pt files in {ckpt} (is it a checkpoint tag dir?)")
    optim_files = sorted(ckpt.glob("*optim_states.pt"))
    if not trust:
        check_pickles(model_files + optim_files)  # the files zero_to_fp32 reads (rng_*.pt: never)
    if optim_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with _loads(trust):
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
            return clean_state_dict({k: v.float() for k, v in sd.items()})
        except ValueError as exc:  # e.g. a bf16 optimizer file without ZeRO partitions
            if isinstance(exc, UntrustedCheckpointError) or "is not a zero checkpoint" not in str(exc):
                raise
    states = ckpt / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{states} not found and no ZeRO optimizer shards to merge")
    with _loads(trust):
        module = torch.load(states, map_location="cpu", weights_only=not trust)["module"]
    return clean_state_dict({k: v.float() for k, v in module.items()})
