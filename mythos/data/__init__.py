"""Data loading: packed token shards -> deterministic, resumable micro-batches.

Public API::

    from mythos.data import DataConfig, build_train_loader, build_val_loader, Tokenizer
    loader = build_train_loader(cfg, global_batch_size, micro_batch_size, rank, world_size)
    for micro in loader.next_step(): ...          # {"input_ids", "labels"}: LongTensor [m, L]
    loader.state_dict() / loader.load_state_dict(s) / loader.fingerprint(n)
    loader.tokens_per_source()                    # {source: tokens} for mixtures (data.sources)

Shards are built offline by ``python -m data_prep.shard`` (format: :mod:`mythos.data.format`).
"""

from mythos.data.config import DataConfig, SourceConfig
from mythos.data.dataset import PackedSamples, verify_shard
from mythos.data.format import DataFormatError, Manifest, load_manifest
from mythos.data.loader import (
    IGNORE_INDEX,
    TrainLoader,
    ValLoader,
    build_train_loader,
    build_val_loader,
    to_batch,
)
from mythos.data.mixture import MixtureSamples, ResolvedData, resolve_data, resolve_quotas
from mythos.data.order import GlobalOrder, Position
from mythos.data.tokenizer import Tokenizer, bits_per_byte

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "DataFormatError",
    "GlobalOrder",
    "Manifest",
    "MixtureSamples",
    "PackedSamples",
    "Position",
    "ResolvedData",
    "SourceConfig",
    "Tokenizer",
    "TrainLoader",
    "ValLoader",
    "bits_per_byte",
    "build_train_loader",
    "build_val_loader",
    "load_manifest",
    "resolve_data",
    "resolve_quotas",
    "to_batch",
    "verify_shard",
]
