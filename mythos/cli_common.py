"""What every mythos command line shares (docs/cli.md, "CLI conventions").

- :class:`ArgumentParser`: ``--help`` shows each option's default; a usage error is one
  ``error: <message> (see PROG --help)`` line on stderr and exit code 2.
- :func:`fail`: the same one line for errors found after parsing (a missing run dir, a bad config).
- :func:`parse_loops`: ``--loops 1,2,4`` (always a comma-separated list).
- :func:`resolve_checkpoint`: ``--run DIR --checkpoint TAG|latest|PATH``, resolved the same way by
  every tool that reads a checkpoint (eval, the lm-eval adapter, export).
- :func:`out_file`: ``--out DIR`` for a tool that writes one results file (a ``.json`` path is
  still accepted, for scripts written before the convention).
- :func:`check_out_dir` / :func:`prepare_out_dir`: prove an output directory writable (and
  create it) *before* the work, so a bad ``--out`` (a file, a read-only place) is one line, not a
  traceback after minutes of work.

Kept free of heavy imports: the data-prep tools use it too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from mythos.config import ConfigError
from mythos.run_dir import COMPLETE, EXPORTED_WEIGHTS, TAG_RE, checkpoints, is_complete, list_tags


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends ``(default: X)`` to every option's help that has
    a default and does not state it already. Flags (``store_true``) and ``None`` defaults (the help
    says what "unset" means) get nothing appended."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (text == argparse.SUPPRESS or "default" in text.lower() or default is None or default is argparse.SUPPRESS
                or action.nargs == 0):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%') or 'none'})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with :class:`HelpFormatter` and one-line usage errors (exit 2), like our ConfigErrors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {' '.join(str(message).split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def fail(exc: BaseException | str) -> int:
    """Print ``error: <message>`` (on one line) to stderr and return exit code 2."""
    print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """``--run DIR`` (required) and ``--checkpoint TAG|latest|PATH``: the same two options, with
    the same meaning, for every tool that loads a trained run (see :func:`resolve_checkpoint`)."""
    p.add_argument("--run", required=True, metavar="DIR",
                   help="training run directory (holds config.resolved.yaml, checkpoints/)")
    p.add_argument("--checkpoint", default="latest", metavar="TAG|latest|PATH",
                   help="tag (step0000200), 'latest' (the newest complete one) or a path (tag or exported model dir)")


def _parse_list(text: str | int | None, option: str, convert: type, what: str) -> list:
    """Comma-separated ``convert`` values, sorted and unique; an empty item ("1,,2", "4,") is a
    typo, not a value to skip: a :class:`ConfigError` naming ``option``."""
    try:
        return sorted({convert(x) for x in str(text).split(",")})
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated {what}, got '{text}'") from None


def parse_int_list(text: str | int | None, option: str, minimum: int) -> list[int]:
    """``"1,2,4"`` as sorted unique integers >= ``minimum``; a :class:`ConfigError` naming
    ``option`` for anything else."""
    values = _parse_list(text, option, int, "integers")
    if not values or values[0] < minimum:
        raise ConfigError(f"{option} must be integers >= {minimum}, got '{text}'")
    return values


def parse_float_list(text: str, option: str) -> list[float]:
    """``"1e-2,1e-3"`` as sorted unique floats > 0; a :class:`ConfigError` naming ``option`` otherwise."""
    values = _parse_list(text, option, float, "numbers")
    if not values or values[0] <= 0:
        raise ConfigError(f"{option} must be numbers > 0, got '{text}'")
    return values


def parse_loops(text: str | int | None) -> list[int]:
    """``"1,2,4"`` as sorted unique loop counts >= 1; a :class:`ConfigError` for anything else."""
    return parse_int_list(text, "--loops", 1)


def out_file(out: str | Path | None, default_dir: Path, name: str) -> Path:
    """The results file of ``--out``: ``DIR/name`` for a directory (``default_dir`` when unset);
    a path ending in ``.json`` is taken as the file itself (the older spelling)."""
    if out is None or str(out) == "":
        return default_dir / name
    path = Path(out)
    return path if path.suffix == ".json" else path / name


def _probe(directory: Path) -> None:
    fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.unlink(probe)


def check_out_dir(out: str | Path, option: str = "--out") -> Path:
    """Prove that the directory ``out`` can be created (or written, if it exists) *without*
    creating it: a probe file goes into ``out`` or its nearest existing ancestor. A
    :class:`ConfigError` naming ``option`` when ``out`` is a file, lies under a file, or cannot be
    written (read-only filesystem, permissions, an immutable directory)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a directory: give a directory (created if missing)")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{option} {path} lies under the file {base}: give a directory")
    try:
        _probe(base)
    except OSError as exc:
        raise ConfigError(f"{option} {path} is not writable ({exc.strerror or exc}): "
                          "choose a directory you can write to") from None
    return path


def prepare_out_dir(out: str | Path, option: str = "--out") -> Path:
    """:func:`check_out_dir`, then create ``out`` (and its parents) and probe it; returns it."""
    path = check_out_dir(out, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe(path)
    except OSError as exc:
        raise ConfigError(f"{option} {path} is not writable ({exc.strerror or exc}): "
                          "choose a directory you can write to") from None
    return path



def resolve_checkpoint(run_dir: str | Path | None, checkpoint: str | Path | None, *,
                       require_complete: bool = True) -> tuple[Path, int]:
    """``(directory, step)`` of ``--checkpoint`` (step -1 when its name is not ``stepNNNNNNN``).

    ``checkpoint``: ``None``/``latest`` = the newest *complete* checkpoint under ``RUN/checkpoints``
    (:func:`mythos.run_dir.list_tags`); a tag name (``step0000200``) under
    ``RUN/checkpoints``; or a path (a tag directory, or a directory written by
    ``mythos-export``). ``require_complete=False`` accepts a tag without the ``COMPLETE``
    marker (the caller warns). Raises a one-line :class:`ConfigError`.
    """
    root = checkpoints(run_dir) if run_dir is not None else None
    if checkpoint is None or str(checkpoint) == "latest":
        if root is None:
            raise ConfigError("--checkpoint latest needs --run RUN_DIR (or pass --checkpoint PATH)")
        tags = list_tags(root)
        if not tags:
            raise ConfigError(f"no complete checkpoint in {root} (train first, or pass --checkpoint)")
        step, path = tags[-1]
        return path, step
    path = Path(checkpoint)
    if not path.is_dir() and root is not None:
        path = root / str(checkpoint)
    if (path / EXPORTED_WEIGHTS).is_file():  # an exported model directory
        return path, -1
    if not path.is_dir():
        if root is None:
            raise ConfigError(f"checkpoint not found: {checkpoint} (expected RUN_DIR/checkpoints/TAG, or pass "
                              "--run RUN_DIR --checkpoint TAG|latest)")
        have = ", ".join(p.name for _, p in list_tags(root)) or "none"
        raise ConfigError(f"checkpoint '{checkpoint}' not found in {root} (complete checkpoints: {have})")
    if require_complete and not is_complete(path):
        raise ConfigError(f"checkpoint {path} has no {COMPLETE} marker (a partial save); pick another tag")
    m = TAG_RE.match(path.name)
    return path, int(m.group(1)) if m else -1
