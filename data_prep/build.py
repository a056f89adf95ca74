"""The two shard build paths behind ``python -m data_prep.shard`` (see its docstring).

- classic (:func:`_build_single`): every input, one process, ``{split}-NNNNN.tar``;
- partitioned (:func:`_build_partitioned`, ``num_partitions = N``): the inputs are cut into work
  units, partition ``i`` packs its units into ``{split}-p{i:05d}-NNNNN.tar`` and records them in a
  partial manifest; without ``partition`` all N run here in turn and are merged.

Both use the same steps: the build record and "up to date" check (:mod:`data_prep.output`),
packing (:mod:`data_prep.packing`), the manifest records and the final write.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.common import DataPrepError, atomic_write_json, describe_inputs, expand_inputs
from data_prep.merge import merge_partitions
from data_prep.output import (
    BUILD_MARKER,
    PARTIAL_VERSION,
    build_record,
    content_records,
    finish_build,
    manifest_header,
    read_json,
    start_build,
)
from data_prep.packing import BuildContext, pack
from data_prep.params import ShardParams
from data_prep.partition import (
    PARTITIONS_DIR,
    DocFilter,
    Unit,
    assign_units,
    partial_manifest_path,
    partition_shard_prefix,
    plan_units,
    quick_fingerprint,
    unit_sha256,
)
from mythos.data.format import MANIFEST_NAME, dtype_for_vocab, dtype_max_vocab
from mythos.data.shard_writer import shards_intact, write_manifest
from mythos.data.tokenizer import Tokenizer


def build_shards(
    tokenizer: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    params: ShardParams,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
    partition: int | None = None,
) -> dict[str, Any]:
    """Build (or resume, or confirm) a shard directory; returns the manifest dict.

    With ``params.num_partitions = N`` the build is partitioned: ``partition=i`` builds only
    partition ``i`` and returns its partial manifest; ``partition=None`` builds all N in turn and
    returns the merged manifest (byte-identical to N separate runs + ``data_prep.merge``)."""
    params.validate()
    t0 = time.perf_counter()
    files = expand_inputs(inputs)
    tok, dtype = _load_tokenizer(tokenizer, params)
    ctx = BuildContext(tok, dtype, params, Path(out_dir), workers, progress)
    if params.num_partitions:
        return _build_partitioned(ctx, files, partition, overwrite)
    if partition is not None:
        raise DataPrepError("--partition needs --num-partitions N (the total number of partitions)")
    return _build_single(ctx, files, inputs, overwrite, t0)


def _load_tokenizer(tokenizer: str | Path, params: ShardParams) -> tuple[Tokenizer, str]:
    """The tokenizer and the shard dtype, with the vocabulary / EOS checks."""
    try:
        tok = Tokenizer(tokenizer)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise DataPrepError(f"cannot load tokenizer {tokenizer}: {exc}") from None
    dtype = dtype_for_vocab(tok.vocab_size) if params.dtype == "auto" else params.dtype
    if tok.vocab_size > dtype_max_vocab(dtype):
        raise DataPrepError(
            f"tokenizer {tok.path} has vocab {tok.vocab_size}, which does not fit --dtype {dtype} "
            f"(max {dtype_max_vocab(dtype)}); use --dtype uint32 or auto"
        )
    if tok.eos_id < 0:
        raise DataPrepError(f"tokenizer {tok.path} has no EOS id (train it with data_prep.train_tokenizer)")
    return tok, dtype


def _build_single(
    ctx: BuildContext, files: list[Path], inputs: Sequence[str | Path], overwrite: bool, t0: float
) -> dict[str, Any]:
    out, params = ctx.out, ctx.params
    inputs_desc = describe_inputs(files)
    build = build_record(ctx, [[d["sha256"], d["bytes"]] for d in inputs_desc])
    existing = start_build(out, build, overwrite)
    if existing is not None:
        return existing

    doc_filter = DocFilter(params.min_chars, params.dedup)  # type: ignore[arg-type]
    total = sum(d["bytes"] for d in inputs_desc)
    packed = pack(ctx, [(f, None) for f in files], doc_filter, total_bytes=total)

    n_docs = packed.documents
    if n_docs == 0:
        raise DataPrepError(f"empty corpus: no documents in {', '.join(map(str, inputs))}")
    train, val = packed.packers["train"], packed.packers["val"]
    if not train.shards:
        raise DataPrepError(
            f"empty corpus: {train.stream_tokens} train tokens is less than one sample of seq_len+1="
            f"{params.seq_len + 1} tokens (add text or lower --seq-len)"
        )
    if params.val_fraction > 0 and not val.shards:
        print(
            f"warning: val split has {val.stream_tokens} tokens, less than one sample; "
            f"no val shards written (raise --val-fraction or add text)",
            file=sys.stderr,
        )

    manifest = write_manifest(
        out, {**manifest_header(ctx, build), **content_records(ctx, inputs_desc, packed, doc_filter)}
    )
    finish_build(out)
    secs = time.perf_counter() - t0
    print(
        f"{out}: {len(manifest['shards'])} shards ({packed.written} written, {packed.skipped} already complete), "
        f"train {manifest['splits']['train']['samples']} samples, val {manifest['splits']['val']['samples']} "
        f"samples, {n_docs} documents, {secs:.1f}s",
        file=sys.stderr,
    )
    return manifest


@dataclass(frozen=True)
class PartitionPlan:
    """What all partitions of one build share: the inputs, their units and owners, the header."""

    files: list[Path]
    inputs_desc: list[dict[str, Any]]
    units: list[Unit]
    owners: list[int]
    header: dict[str, Any]


def _build_partitioned(ctx: BuildContext, files: list[Path], partition: int | None, overwrite: bool) -> dict[str, Any]:
    out, params = ctx.out, ctx.params
    n = params.num_partitions
    if partition is not None:
        if not 0 <= partition < n:
            raise DataPrepError(f"--partition {partition} is outside 0..{n - 1} (--num-partitions {n})")
        if overwrite:
            raise DataPrepError(
                "--overwrite with --partition would delete the other partitions' shards; "
                "clear --out once (or run without --partition) instead"
            )
    # A partition must not read the whole corpus to agree on the build key: inputs are keyed by
    # size + head/tail hash; each unit's full content hash is recorded by the partition reading it.
    inputs_desc = [
        {"path": f.as_posix(), "bytes": f.stat().st_size, "fingerprint": quick_fingerprint(f)} for f in files
    ]
    build = build_record(
        ctx,
        [[d["fingerprint"], d["bytes"]] for d in inputs_desc],
        input_identity="sha256(size, first MiB, last MiB) per file; per-unit sha256 in inputs[].units",
    )
    if not (out / BUILD_MARKER).is_file() and not (out / MANIFEST_NAME).is_file():
        # shards listed by a partial manifest of this very build are ours, marker or not (e.g. the
        # final manifest was removed to redo a partition): restore the marker before the check
        for p in sorted((out / PARTITIONS_DIR).glob("p*.json")):
            if (read_json(p) or {}).get("build", {}).get("key") == build["key"]:
                atomic_write_json(out / BUILD_MARKER, build)
                break
    existing = start_build(out, build, overwrite)
    if existing is not None:
        return existing

    units = plan_units(files, params.unit_bytes, params.plain_docs)
    plan = PartitionPlan(files, inputs_desc, units, assign_units(units, n), manifest_header(ctx, build))
    if partition is not None:
        return _run_partition(ctx, plan, partition)
    for i in range(n):
        _run_partition(ctx, plan, i)
    return merge_partitions(out)


def _run_partition(ctx: BuildContext, plan: PartitionPlan, i: int) -> dict[str, Any]:
    """Pack partition ``i`` and write ``partitions/p{i:05d}.json`` (skipped when complete)."""
    out, params = ctx.out, ctx.params
    n = params.num_partitions
    path = partial_manifest_path(out, i)
    prev = read_json(path) or {}
    if prev.get("build", {}).get("key") == plan.header["build"]["key"] and shards_intact(out, prev["shards"]):
        print(f"{out}: partition {i} of {n} already complete ({len(prev['shards'])} shards verified)", file=sys.stderr)
        return prev
    path.unlink(missing_ok=True)  # a stale or corrupt partial must not outlive a re-run that fails
    t0 = time.perf_counter()
    doc_filter = DocFilter(params.min_chars, params.dedup, n, i)  # type: ignore[arg-type]
    mine = plan.units if doc_filter.hash_assigned else [u for u, o in zip(plan.units, plan.owners) if o == i]
    packed = pack(
        ctx,
        [(plan.files[u.file], u.span) for u in mine],
        doc_filter,
        prefix=partition_shard_prefix(i),
        total_bytes=sum(u.weight for u in mine),
    )
    partial: dict[str, Any] = {
        **plan.header,
        "partial_version": PARTIAL_VERSION,
        "num_partitions": n,
        "partition": i,
        "units": [{**u.to_json(), "sha256": unit_sha256(plan.files[u.file], u)} for u in mine],
        **content_records(ctx, plan.inputs_desc, packed, doc_filter),
    }
    atomic_write_json(path, partial)  # last: its presence means the partition is complete
    print(
        f"{out}: partition {i} of {n}: {len(partial['shards'])} shards ({packed.written} written), "
        f"{len(mine)} units, {doc_filter.kept} documents kept, {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return partial
