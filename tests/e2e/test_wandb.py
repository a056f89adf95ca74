"""Weights & Biases logging (``log.wandb``) on a real 2-rank run, offline: rank 0 alone writes one
W&B run under ``RUN_DIR/wandb`` with the same scalars as ``metrics.jsonl``, its id is derived from
the run, and a resumed launch continues that id. Also the dry run's resume verdicts on the real
checkpoint this run leaves (resume / convert for another world size)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from train_utils import REPO, TINY, metrics, run_training

from mythos.train.dryrun import dry_run
from mythos.train.wandb_log import run_id

pytestmark = pytest.mark.slow
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

DENSE = "configs/run/dense-tiny-cpu.yaml"
COMMON = ["train.save_interval=0", "log.wandb.mode=offline", "log.wandb.project=mythos-test"]


def _records(path: Path) -> Iterator[bytes]:
    """Records of a ``.wandb`` file (W&B's leveldb-log framing: 7-byte file header, 32 KiB blocks,
    each record ``crc32 u32, length u16, type u8`` + payload; types 1 full, 2-4 first/middle/last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk


def read_run(path: Path) -> tuple[str, dict[int, dict[str, float]]]:
    """(run id, {step: scalars}) of one offline run file."""
    rid, history = "", {}
    for raw in _records(path):
        rec = wandb_pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            rid = rec.run.run_id
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(int(items["_step"]), {}).update({k: v for k, v in items.items() if k[0] != "_"})
    return rid, history


def test_offline_run_logs_rank0_scalars_and_resumes_the_same_run(data_corpus, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    stray = REPO / "wandb"
    existed = stray.exists()
    run_training(DENSE, run, data_corpus.shards_dir, [*COMMON, "train.max_steps=3"])
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # rank 1 started no W&B run
    assert stray.exists() == existed  # nor wrote one into the cwd
    rid, hist = read_run(files[0])
    assert rid == run_id(run, "dense-tiny-cpu") == files[0].stem.removeprefix("run-")
    logged: dict[int, dict] = {}
    for m in metrics(run):  # a step may have several rows (train scalars, then the final eval)
        logged.setdefault(m["step"], {}).update({k: v for k, v in m.items() if k not in ("step", "time")})
    assert sorted(hist) == sorted(logged) == [1, 2, 3]
    for step, scalars in hist.items():
        assert scalars["train/loss"] == pytest.approx(logged[step]["train/loss"])
        assert set(scalars) == set(logged[step]), step  # the same scalars (non-finite ones aside)

    # the dry run on the checkpoint this run left: same world size resumes, another converts
    args = [f"run_dir={run}", f"data.shards={data_corpus.shards_dir}", *TINY, "train.max_steps=5"]
    assert dry_run(DENSE, args, gpus=2) == 0
    assert "resume from step0000003 (" in capsys.readouterr().out
    assert dry_run(DENSE, args, gpus=1) == 0
    assert "written by 2 ranks, would convert it to the universal format for 1 ranks" in capsys.readouterr().out
    assert not (run / "checkpoints" / "step0000003" / "universal").exists()  # a dry run converts nothing
    # issue 24: the dry run said "ok resume" where the launch refuses another model or data order
    capsys.readouterr()
    for change, what in (("model.mlp_hidden=192", "model hash"), ("data.seed=7", "data fingerprint")):
        assert dry_run(DENSE, [*args, change], gpus=2) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: resume: checkpoint {run / 'checkpoints' / 'step0000003'} was written with a "
                              f"different {what}") and err.count("\n") == 1, err
        if what == "model hash":  # the launch's main refuses it with the same line, before converting anything
            from mythos.train.cli import main

            assert main(["--config", DENSE, *args, change]) == 2
            want = "error: " + err.strip().removeprefix("error: resume: ")
            assert capsys.readouterr().err.strip().splitlines() == [want]
            assert not torch.distributed.is_initialized()  # no process group was started
            assert not (run / "checkpoints" / "step0000003" / "universal").exists()

    # resume: a second launch continues the same W&B run id with the new steps
    run_training(DENSE, run, data_corpus.shards_dir, [*COMMON, "train.max_steps=5"])
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{rid}.wandb"}
    ids, hists = zip(*(read_run(f) for f in files))
    assert set(ids) == {rid}
    assert sorted(set(hists[0]) | set(hists[1])) == [1, 2, 3, 4, 5]
