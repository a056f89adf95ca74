"""Resume on another world size with the same command.

A checkpoint written by ``N`` ranks holds ZeRO optimizer shards partitioned ``N`` ways (ZeRO 1-3,
and the bf16 optimizer's fp32 master shards even at stage 0). Loading it on ``M != N`` ranks
needs DeepSpeed's *universal* format: one fp32 file per parameter and optimizer state, which any
world size can re-partition. The trainer does this by itself:

1. :func:`plan_resume`, before any process group: find the newest checkpoint whose files verify
   (sizes + sha256 recorded at save; a corrupt newer one is reported, moved aside and skipped:
   :func:`choose_checkpoint`), read the world size that wrote it (``COMPLETE``'s ``world_size``;
   else its shard files), and check that the new world size can honour it (global batch
   divisible; every shard present). Failures are one-line :class:`~mythos.config.ConfigError` s
   (exit 2).
2. :func:`ensure_universal`, still before the process group: global rank 0 converts the tag dir
   with ``deepspeed.checkpoint.ds_to_universal`` into ``TAG/universal/`` (written to a temp dir
   and renamed, so it exists only when whole; kept, so a second restart does not convert again,
   and pruned with its tag); the other ranks wait for that directory to appear.
3. The derived DeepSpeed config gets ``checkpoint: {load_universal: true}`` and the engine loads
   ``TAG/universal``; the client state (step, loader position) comes with it.

Why before the process group rather than "rank 0 converts, all ranks barrier" after it: the
conversion loads the whole optimizer state into host memory and forks worker processes; before
the engine exists that memory is free and forking is safe (no CUDA context, no NCCL threads), and
no collective timeout or NCCL watchdog runs while rank 0 works. A rank 0 that fails exits non-zero
and the launcher (``deepspeed``, ``torchrun``, ``srun --kill-on-bad-exit``) ends the waiting
ranks; the wait also times out after ``train.dist_timeout_s``. For a very large checkpoint,
convert once ahead of time: ``python -m mythos.train.reshard RUN_DIR/checkpoints/TAG``.

Per-rank RNG files (``rng_rank{r}.pt``) are restored only on the world size that wrote them:
nothing in training draws from the global RNG any more (the RDT's loop counts and h0 noise are
functions of (seed, step, global position)), so on a new world size every rank keeps the fresh
per-rank stream the trainer seeded, rather than inheriting another topology's rank's state.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mythos.config import ConfigError
from mythos.run_dir import COMPLETE, is_complete, list_tags
from mythos.train import checkpoint as ckpt

UNIVERSAL = ckpt.UNIVERSAL
_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


@dataclass(frozen=True)
class ResumePlan:
    """What ``_maybe_resume`` loads: ``path`` (the tag dir), and for a world-size change that needs
    conversion, ``universal`` (``path / "universal"``, once :func:`ensure_universal` ran)."""

    path: Path
    saved_world_size: int
    world_size: int
    universal: bool

    @property
    def load_dir(self) -> Path:
        """The directory DeepSpeed loads: the tag dir, or its universal conversion."""
        return self.path / UNIVERSAL if self.universal else self.path


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def shard_ranks(tag_dir: Path) -> list[int]:
    """Data-parallel ranks of the ZeRO optimizer shard files in ``tag_dir`` (empty at stage 0 fp32,
    where the optimizer state lives, unpartitioned, in the model-states file)."""
    return sorted(int(m.group(1)) for f in tag_dir.iterdir() if (m := _SHARD_RE.match(f.name)))


def saved_world_size(tag_dir: Path) -> int:
    """The world size that wrote ``tag_dir``: the ``COMPLETE`` marker records it; checkpoints
    from before that fall back to the number of ZeRO shards (1 without shards)."""
    try:
        return int(json.loads((tag_dir / COMPLETE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return max(len(shard_ranks(tag_dir)), 1)


def choose_checkpoint(ckpt_root: Path, resume: str, rank: int, verify: str = "sha256") -> Path | None:
    """The checkpoint to resume from, verified (:func:`mythos.train.checkpoint.verify`).

    ``auto``: the newest complete tag that verifies. Newer tags that fail are reported in one line
    on rank 0 and moved aside by rank 0 as ``TAG.corrupt-<time>`` (kept; see
    :func:`~mythos.train.checkpoint.quarantine`). Every rank runs the same checks on the same
    files, so every rank picks the same tag -- a rank that lists the directory after rank 0 moved a
    bad tag simply never sees it. When *no* tag verifies nothing is moved and the resume is refused
    (starting over from step 0 by surprise would be worse). An explicit ``train.resume=PATH`` that
    fails is refused too: it names the one checkpoint the user wants."""
    checksum = verify != "size"
    try:
        path = ckpt.find_resume(ckpt_root, resume)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if path is None:
        return None
    if resume != "auto":
        problem = ckpt.verify(path, checksum)
        if problem:
            raise ConfigError(f"checkpoint {path} is corrupt ({problem}); resume from another one (train.resume=PATH "
                              f"or auto)")
        return path
    bad: list[tuple[Path, str]] = []
    for _, tag in reversed(list_tags(ckpt_root)):
        if not tag.is_dir():  # rank 0 moved it aside meanwhile: it failed there, as it would here
            continue
        problem = ckpt.verify(tag, checksum)
        if problem is None:
            break
        if not tag.is_dir():
            continue
        bad.append((tag, problem))
    else:
        if not bad:
            return None
        raise ConfigError(
            "no checkpoint under " + str(ckpt_root) + " verifies: " + "; ".join(f"{t.name} ({p})" for t, p in bad)
            + "; move them away to start over, or restore them"
        )
    for b, problem in bad:
        if rank == 0:
            try:
                kept = ckpt.quarantine(b).name
            except OSError:  # already moved (a second rank 0 cannot exist; be safe anyway)
                kept = b.name
            print(f"warning: checkpoint {b.name} is corrupt ({problem}); resuming from {tag.name} instead; "
                  f"{b.name} kept for inspection as {kept}", file=sys.stderr, flush=True)
    return tag


def plan_resume(ckpt_root: Path, resume: str, world_size: int, global_batch: int,
                micro_batch: int, verify: str = "sha256") -> ResumePlan | None:
    """Which checkpoint to resume from (verified, see :func:`choose_checkpoint`; ``verify="size"``
    skips the checksums) and whether it needs a universal conversion; raises a one-line
    :class:`ConfigError` for a corrupt explicit checkpoint or a world-size change that cannot be
    honoured. No process group: safe (and required) to call on every rank first thing."""
    from mythos import dist

    path = choose_checkpoint(ckpt_root, resume, dist.env_info().rank, verify)
    if path is None:
        return None
    saved = saved_world_size(path)
    if saved == world_size:
        return ResumePlan(path, saved, world_size, universal=False)
    where = f"checkpoint {path} was written by {_ranks(saved)}"
    per_rank = global_batch // world_size
    if global_batch % world_size or per_rank % micro_batch:
        # the global batch is part of the data order the checkpoint continues, so it cannot change
        raise ConfigError(
            f"{where}; its global batch {global_batch} (micro batch {micro_batch}) does not split over "
            f"{_ranks(world_size)}: resume on a world size W with {global_batch} % (W * {micro_batch}) == 0, "
            f"or lower train.micro_batch_size"
        )
    shards = shard_ranks(path)
    if not shards:  # stage 0 in fp32: nothing partitioned, DeepSpeed loads it on any world size
        return ResumePlan(path, saved, world_size, universal=False)
    if shards != list(range(saved)):
        raise ConfigError(
            f"{where} but holds ZeRO shards of ranks {shards}; it cannot be converted for "
            f"{_ranks(world_size)}: resume from an older checkpoint (train.resume=PATH) or with {_ranks(saved)}"
        )
    return ResumePlan(path, saved, world_size, universal=True)


def convert(tag_dir: Path, workers: int = 1) -> Path:
    """Convert ``tag_dir`` to ``tag_dir/universal`` (idempotent, atomic: temp dir + rename)."""
    from deepspeed.checkpoint import ds_to_universal

    out = tag_dir / UNIVERSAL
    if out.is_dir():
        return out
    for stale in tag_dir.glob(f".{UNIVERSAL}.*.tmp"):  # a conversion killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tag_dir / f".{UNIVERSAL}.{time.time_ns()}.tmp"
    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=workers,
        num_merge_workers=workers, keep_temp_folder=False, strict=True,
        # our checkpoints predate nothing but carry no universal_checkpoint_info (no TP/PP): the
        # converter's own flag adds the version record it requires
        inject_missing_state=True,
    )
    try:
        ds_to_universal.main(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we never read it
    tmp.rename(out)
    return out


def ensure_universal(plan: ResumePlan | None, rank: int, timeout_s: float, poll_s: float = 0.2) -> None:
    """Before the process group: rank 0 converts, the other ranks wait for the result."""
    if plan is None or not plan.universal:
        return
    out = plan.load_dir
    if rank == 0:
        if not out.is_dir():
            print(f"converting {plan.path} ({_ranks(plan.saved_world_size)}) to a universal checkpoint for "
                  f"{_ranks(plan.world_size)}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                _quiet(convert, plan.path)
            except Exception as exc:  # noqa: BLE001 - any converter failure gets the same advice
                raise ConfigError(
                    f"cannot convert {plan.path} to a universal checkpoint for {_ranks(plan.world_size)} "
                    f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); "
                    f"resume with the {_ranks(plan.saved_world_size)} that wrote it"
                ) from exc
            print(f"converted in {time.perf_counter() - t0:.1f}s: {out}", file=sys.stderr, flush=True)
        return
    deadline = time.monotonic() + timeout_s
    while not out.is_dir():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"rank 0 did not finish converting {plan.path} to {out} within train.dist_timeout_s="
                f"{timeout_s:.0f}s; convert it first: python -m mythos.train.reshard {plan.path}"
            )
        time.sleep(poll_s)


def _quiet(fn, *args):  # noqa: ANN001, ANN202 - a private print filter
    """The converter prints a progress line per phase (and its args); keep them off stdout."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mythos.train.reshard",
                                description="Convert a checkpoint to TAG/universal ahead of a world-size change.")
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/TAG")
    p.add_argument("--workers", type=int, default=4, help="converter worker processes")
    args = p.parse_args(argv)
    tag = Path(args.checkpoint)
    if not is_complete(tag):
        print(f"error: {tag} is not a complete checkpoint (no {COMPLETE} marker)", file=sys.stderr)
        return 2
    if not shard_ranks(tag):
        print(f"{tag} has no ZeRO shards: it loads on any world size as it is")
        return 0
    print(convert(tag, args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
