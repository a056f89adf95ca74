"""Merge the partial manifests of a partitioned build into the final ``manifest.json``.

    python -m data_prep.merge OUT [--verify full|size]

``OUT/partitions/p{i:05d}.json`` is written by ``python -m data_prep.shard ... --num-partitions N
--partition i`` as the last step of partition ``i``. The merge checks, before writing anything:

- every partition ``0..N-1`` is present, readable and of this format (a missing or corrupt one
  is named, with the command that rebuilds it);
- all partitions belong to the same build: identical build key, hence tokenizer sha256, shard
  parameters, partition count and input list; identical manifest header (format, dtype,
  tokenizer ids, tool versions -- a different sentencepiece would tokenize differently);
- every shard exists with the recorded size and (``--verify full``, default) sha256;
- the units read by the partitions tile every input exactly once (byte ranges / row groups with
  no gap or overlap); with ``--dedup global`` every partition read every unit, with equal hashes.

It then writes ``manifest.json`` atomically: shards in (split, partition, index) order -- all
train shards of partition 0, then of partition 1, ..., then the val shards likewise -- so the
loader's global sample index, and hence its order, depends only on the manifest. The merge is a
pure function of the partial manifests, and each partition's output is a pure function of the
build and its index, so N array tasks + merge give the same bytes as one process running all N.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.common import DataPrepError, run_cli, sha256_file
from data_prep.output import PARTIAL_VERSION, finish_build, split_summary
from data_prep.partition import PARTITIONS_DIR
from mythos.cli_common import ArgumentParser
from mythos.data.format import SPLITS
from mythos.data.shard_writer import write_manifest

#: Manifest fields every partition must agree on (besides the build key).
HEADER_KEYS = ("format_version", "seq_len", "tokens_per_sample", "dtype", "sample_format", "tokenizer", "versions")


def _rerun_hint(i: int) -> str:
    return f"re-run `python -m data_prep.shard <same args> --partition {i}` (or resubmit array task {i})"


def _load_partials(out: Path) -> dict[int, dict[str, Any]]:
    pdir = out / PARTITIONS_DIR
    paths = sorted(pdir.glob("p*.json")) if pdir.is_dir() else []
    if not paths:
        raise DataPrepError(
            f"{out}: no partial manifests in {pdir} (run `python -m data_prep.shard ... --num-partitions N "
            f"--partition i` for every i first)"
        )
    partials: dict[int, dict[str, Any]] = {}
    for p in paths:
        stem = p.stem.removeprefix("p")
        idx = int(stem) if stem.isdigit() else -1
        try:
            doc = json.loads(p.read_text())
            ok = (
                isinstance(doc, dict)
                and doc.get("partial_version") == PARTIAL_VERSION
                and doc["partition"] == idx
                and isinstance(doc["shards"], list)
                and isinstance(doc["build"]["key"], str)
            )
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise DataPrepError(f"partition {idx}: {p} is corrupt or of another version; {_rerun_hint(idx)}")
        partials[idx] = doc
    return partials


def _check_same_build(partials: dict[int, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    first = min(partials)
    ref = partials[first]
    n = ref["num_partitions"]
    for i, doc in sorted(partials.items()):
        if doc["build"]["key"] != ref["build"]["key"]:
            what = [k for k in ("params", "tokenizer_sha256", "inputs") if doc["build"].get(k) != ref["build"].get(k)]
            raise DataPrepError(
                f"partition {i} belongs to a different build than partition {first} ({', '.join(what) or 'key'} "
                f"differ); {_rerun_hint(i)} with the arguments of the others, or clear the directory"
            )
        for k in HEADER_KEYS:
            if doc.get(k) != ref.get(k):
                raise DataPrepError(
                    f"partition {i}: '{k}' differs from partition {first} (different tool versions or "
                    f"tokenizer path?); {_rerun_hint(i)} in the same environment"
                )
    missing = [i for i in range(n) if i not in partials]
    extra = [i for i in partials if i >= n]
    if extra:
        raise DataPrepError(f"partition {extra[0]} is outside 0..{n - 1} of this {n}-partition build; remove it")
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[:8]})" if len(missing) > 1 else ""
        raise DataPrepError(
            f"partition {missing[0]} of {n} is missing{more}: no {PARTITIONS_DIR}/p{missing[0]:05d}.json; "
            f"{_rerun_hint(missing[0])}"
        )
    return n, ref


def _verify_shards(out: Path, partials: dict[int, dict[str, Any]], verify: str) -> None:
    seen: dict[str, int] = {}
    for i, doc in sorted(partials.items()):
        for s in doc["shards"]:
            name = s["name"]
            if name in seen:
                raise DataPrepError(f"partitions {seen[name]} and {i} both list shard {name}; clear the directory")
            seen[name] = i
            p = out / name
            if not p.is_file():
                raise DataPrepError(f"partition {i}: shard {p} is missing; {_rerun_hint(i)}")
            if p.stat().st_size != s["bytes"]:
                raise DataPrepError(
                    f"partition {i}: shard {p} is {p.stat().st_size} bytes, expected {s['bytes']}; {_rerun_hint(i)}"
                )
            if verify == "full" and sha256_file(p) != s["sha256"]:
                raise DataPrepError(f"partition {i}: shard {p} is corrupt (sha256 differs); {_rerun_hint(i)}")


def _check_units(partials: dict[int, dict[str, Any]], n: int, hash_assigned: bool) -> list[list[dict[str, Any]]]:
    """Units per input file, in order, each tagged with its partition; raise on a gap/overlap."""
    n_files = len(partials[0]["inputs"])
    per_file: list[list[dict[str, Any]]] = [[] for _ in range(n_files)]
    if hash_assigned:  # every partition read every unit: they must agree
        for i in range(1, n):
            if partials[i]["units"] != partials[0]["units"]:
                raise DataPrepError(
                    f"partition {i} read different input units than partition 0 (inputs changed during the "
                    f"build?); {_rerun_hint(i)}"
                )
        for u in partials[0]["units"]:
            per_file[u["file"]].append({**u, "partition": "all"})
    else:
        for i in range(n):
            for u in partials[i]["units"]:
                per_file[u["file"]].append({**u, "partition": i})
    for f, units in enumerate(per_file):
        path = partials[0]["inputs"][f]["path"]
        units.sort(key=lambda u: u["start"])
        pos = 0
        for u in units:
            if u["start"] != pos:
                raise DataPrepError(
                    f"input {path}: units do not tile the file (gap or overlap at {pos}, partition "
                    f"{u['partition']}); clear the directory and rebuild every partition"
                )
            pos = u["end"]
        if not units or pos != units[-1]["total"]:
            raise DataPrepError(f"input {path}: not completely covered by the partitions; rebuild every partition")
    return per_file


def merge_partitions(out_dir: str | Path, verify: str = "full") -> dict[str, Any]:
    """Validate ``OUT/partitions/*.json`` and write ``OUT/manifest.json`` atomically; returns it."""
    out = Path(out_dir)
    partials = _load_partials(out)
    n, ref = _check_same_build(partials)
    _verify_shards(out, partials, verify)
    params = ref["build"]["params"]
    hash_assigned = params.get("dedup") == "global" and n > 1
    per_file = _check_units(partials, n, hash_assigned)

    # Inputs: read statistics add up over partitions, except that with hash assignment every
    # partition read everything (take one; _check_units proved they read the same units).
    readers = [0] if hash_assigned else list(range(n))
    inputs = []
    for f, d in enumerate(ref["inputs"]):
        entry = {k: d[k] for k in ("path", "bytes", "fingerprint")}
        for k in ("documents", "skipped_bad_utf8", "replaced_bad_utf8"):
            entry[k] = sum(partials[i]["inputs"][f][k] for i in readers)
        keys = ("kind", "start", "end", "sha256", "partition")
        entry["units"] = [{k: u[k] for k in keys} for u in per_file[f]]
        inputs.append(entry)

    filters = {k: ref["filters"][k] for k in ("min_chars", "dedup", "dedup_scope")}
    for k in ("kept", "dropped_short", "dropped_duplicate"):
        filters[k] = sum(partials[i]["filters"][k] for i in range(n))

    splits, shards = {}, []
    for split in SPLITS:
        split_shards = [s for i in range(n) for s in partials[i]["shards"] if s["split"] == split]
        shards += split_shards
        tot = {k: sum(partials[i]["splits"][split][k] for i in range(n)) for k in ("documents", "text_bytes")}
        tot["stream_tokens"] = sum(partials[i]["splits"][split]["stream_tokens"] for i in range(n))
        dropped = sum(partials[i]["splits"][split]["dropped_tail_tokens"] for i in range(n))
        splits[split] = split_summary(tot["documents"], tot["text_bytes"], tot["stream_tokens"], split_shards, dropped)
    if not any(s["split"] == "train" for s in shards):
        raise DataPrepError(
            f"empty corpus: the {n} partitions hold {splits['train']['stream_tokens']} train tokens and no full "
            f"sample of seq_len+1={ref['seq_len'] + 1} tokens (add text, lower --seq-len or use fewer partitions)"
        )
    if params.get("val_fraction", 0) > 0 and not any(s["split"] == "val" for s in shards):
        print("warning: no val shards (val split smaller than one sample per partition)", file=sys.stderr)

    manifest: dict[str, Any] = {
        **{k: ref[k] for k in HEADER_KEYS},
        "build": ref["build"],
        "inputs": inputs,
        "filters": filters,
        "splits": splits,
        "shards": shards,
        "partitions": {
            "num_partitions": n,
            "assignment": "content hash" if hash_assigned else "contiguous units by weight",
            "unit_bytes": params.get("unit_bytes"),
            "per_partition": [
                {
                    "partition": i,
                    "units": len(partials[i]["units"]),
                    "documents": sum(partials[i]["splits"][s]["documents"] for s in SPLITS),
                    "samples": {s: partials[i]["splits"][s]["samples"] for s in SPLITS},
                    "shards": len(partials[i]["shards"]),
                }
                for i in range(n)
            ],
        },
    }
    write_manifest(out, manifest)
    finish_build(out)
    print(
        f"{out}: merged {n} partitions: {len(shards)} shards, train {splits['train']['samples']} samples, "
        f"val {splits['val']['samples']} samples, data {manifest['data_hash'][:12]}",
        file=sys.stderr,
    )
    return manifest


def build_parser() -> ArgumentParser:
    """The ``python -m data_prep.merge`` argument parser."""
    p = ArgumentParser(prog="python -m data_prep.merge", description=__doc__.split("\n")[0])
    p.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help="the --out directory of the partitioned data_prep.shard runs (required)")
    p.add_argument("out", nargs="?", default=None, help=argparse.SUPPRESS)  # the older positional spelling
    p.add_argument(
        "--verify",
        choices=("full", "size"),
        default="full",
        help="full = sha256 of every shard against its partial manifest; size = byte sizes only",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if (a.out is None) == (a.out_dir is None):
        p.error("give the shard directory once: --out DIR")
    merge_partitions(a.out_dir or a.out, a.verify)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
