"""Data mixtures: several shard directories with weights -> one fixed, deterministic sample set.

A run config names either one directory (``data.shards``) or a mixture::

    data:
      sources:
        - {shards: data/web/shards, weight: 0.7}
        - {shards: data/code/shards, weight: 0.2, name: code}
        - {shards: data/books/shards, weight: 0.1}
      mixture_samples: 0        # 0 = largest size without repeating any source

Resolution (Megatron ``BlendableDataset`` / OLMo-core source mixture), from the manifests alone:

1. **Quotas.** ``p_s = w_s / sum(w)``. The mixture epoch has ``M = mixture_samples`` samples, or
   by default ``M = min_s floor(N_s / p_s)`` (the largest size at which no source repeats).
   Quotas ``q_s = floor(p_s * M)`` plus the remainder by largest fractional part (ties: lower
   source index), computed in exact rational arithmetic, so ``sum(q) == M`` on every machine.
2. **Which samples.** Source ``s`` contributes the first ``q_s`` entries of its stream: seeded
   permutations of its ``N_s`` train samples, ``PCG64(SeedSequence([seed, MIX_TAG, s, pass]))``
   for pass 0, 1, ... (a source with ``q_s > N_s`` repeats every sample before any twice).
3. **Interleave.** The ``j``-th sample of source ``s`` sits at ideal time ``(j + 1/2) / q_s``; all
   samples sorted by (time, source) give the mixture's stored order: every prefix holds each
   source in proportion (within one sample), even with ``shuffle: false``.

The result is a map-style dataset of ``M`` samples that the unchanged :class:`GlobalOrder`
permutes per epoch, so resume, world-size invariance and fingerprints work as for one
directory. Its identity, ``data_hash``, covers every source's data hash, weight and quota: two
runs with equal hashes and seeds train on exactly the same mixture in the same order.

Realised per-source counts: :meth:`mythos.data.TrainLoader.tokens_per_source`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from mythos.config import ConfigError
from mythos.data.config import DataConfig
from mythos.data.dataset import PackedSamples, PartedSamples
from mythos.data.format import Manifest, load_manifest

#: Domain separator of the per-source selection streams (ASCII "mix").
MIX_TAG = 0x6D6978
MIXTURE_VERSION = 1
#: Manifest fields all sources of a mixture must share (else the samples are not interchangeable).
#: The tokenizer comes first: when it differs, it is the cause to name (vocab and ids follow from it).
_COMPATIBLE = ("tokenizer_sha256", "seq_len", "dtype", "vocab_size", "bos_id", "eos_id", "pad_id", "loss_mask")


def resolve_quotas(weights: Sequence[float], sizes: Sequence[int], total: int = 0) -> np.ndarray:
    """``int64 [S]`` per-source sample counts summing to ``total`` (0 = largest non-repeating)."""
    w = [Fraction(x) for x in weights]  # floats are exact binary fractions: no rounding here
    if not w or any(x <= 0 for x in w):
        raise ConfigError(f"mixture weights must be positive, got {list(weights)}")
    p = [x / sum(w) for x in w]
    if total <= 0:
        total = min(int(Fraction(n) / ps) for n, ps in zip(sizes, p))
    exact = [ps * total for ps in p]
    quotas = [int(e) for e in exact]  # floor (all positive)
    left = total - sum(quotas)
    by_remainder = sorted(range(len(p)), key=lambda s: (-(exact[s] - quotas[s]), s))
    for s in by_remainder[:left]:
        quotas[s] += 1
    return np.array(quotas, dtype=np.int64)


def interleave(quotas: Sequence[int]) -> np.ndarray:
    """``int32 [sum(quotas)]``: the source of each mixture position (see the module docstring)."""
    src = np.concatenate([np.full(q, s, dtype=np.int32) for s, q in enumerate(quotas)])
    j = np.concatenate([np.arange(q, dtype=np.float64) for q in quotas])
    q = np.concatenate([np.full(q, q, dtype=np.float64) for q in quotas])
    # IEEE division is correctly rounded, so the keys (and the order) are identical everywhere
    return src[np.lexsort((src, (j + 0.5) / q))]


def selection(quota: int, size: int, seed: int, source: int) -> np.ndarray:
    """``int64 [quota]``: the local sample indices source ``source`` contributes, in order."""
    parts, have, k = [], 0, 0
    while have < quota:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, MIX_TAG, source, k])))
        parts.append(rng.permutation(size))
        have += size
        k += 1
    return np.concatenate(parts)[:quota].astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class ResolvedData:
    """The data of a :class:`DataConfig`, resolved from manifests only (no shard is opened)."""

    names: tuple[str, ...]
    manifests: tuple[Manifest, ...]
    weights: tuple[float, ...] | None
    """None for a single directory (``data.shards``)."""
    quotas: tuple[int, ...] | None
    data_hash: str
    description: str

    @property
    def manifest(self) -> Manifest:
        """The first source's manifest: seq_len, dtype, tokenizer and ids are shared by all."""
        return self.manifests[0]

    @property
    def is_mixture(self) -> bool:
        return self.quotas is not None

    @property
    def num_train_samples(self) -> int:
        return sum(self.quotas) if self.quotas is not None else self.manifest.num_samples("train")

    def open(self, split: str, verify: str = "full", index_cache: bool = True, seed: int = 0):
        """The samples of ``split``: a :class:`PackedSamples` for one directory; for a mixture the
        :class:`MixtureSamples` (train) or all sources' val samples one after another (val)."""
        parts = [PackedSamples(m, split, verify, index_cache) for m in self.manifests]
        if not self.is_mixture:
            return parts[0]
        if split != "train":
            return ConcatSources(parts)
        return MixtureSamples(parts, self.quotas, seed)  # type: ignore[arg-type]

    def source_counts(self, samples: object, indices: np.ndarray) -> np.ndarray:
        """``int64 [S]``: how many of the train samples ``indices`` come from each source."""
        if isinstance(samples, MixtureSamples):
            return samples.counts(indices)
        return np.array([len(indices)], dtype=np.int64)


def resolve_data(cfg: DataConfig) -> ResolvedData:
    """Load the manifest(s) of ``cfg`` and, for a mixture, check compatibility and fix quotas."""
    if not cfg.sources:
        m = load_manifest(cfg.shards)
        return ResolvedData((m.directory.name,), (m,), None, None, m.data_hash, f"data.shards={cfg.shards}")
    manifests = tuple(load_manifest(s.shards) for s in cfg.sources)
    names = tuple(s.label for s in cfg.sources)
    ref = manifests[0]
    for s, m in zip(cfg.sources[1:], manifests[1:]):
        for k in _COMPATIBLE:
            if getattr(m, k, None) != getattr(ref, k, None):
                raise ConfigError(
                    f"mixture source {s.shards}: {k}={getattr(m, k, None)!r} but {cfg.sources[0].shards} has "
                    f"{getattr(ref, k, None)!r} (all sources must share tokenizer, seq_len and dtype; re-shard it)"
                )
    sizes = [m.num_samples("train") for m in manifests]
    for s, n in zip(cfg.sources, sizes):
        if n == 0:
            raise ConfigError(f"mixture source {s.shards} has no train samples (re-shard it or drop it)")
    weights = tuple(s.weight for s in cfg.sources)
    quotas = resolve_quotas(weights, sizes, cfg.mixture_samples)
    for name, q in zip(names, quotas):
        if q == 0:
            raise ConfigError(
                f"mixture source '{name}' gets 0 of {int(quotas.sum())} samples (raise its weight or mixture_samples)"
            )
    ident = {
        "mixture_version": MIXTURE_VERSION,
        "sources": [
            {"data_hash": m.data_hash, "weight": w.hex(), "quota": int(q)}
            for m, w, q in zip(manifests, map(float, weights), quotas)
        ],
    }
    mix_hash = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    desc = "data.sources=[" + ", ".join(f"{n}:{q}" for n, q in zip(names, quotas)) + "]"
    return ResolvedData(names, manifests, weights, tuple(int(q) for q in quotas), mix_hash, desc)


class MixtureSamples:
    """Map-style mixture: position ``g`` -> sample ``local[g]`` of source ``source_of[g]``. Same
    interface as :class:`PackedSamples` (``num_samples``, ``[g]``, ``get_many``, ``close``)."""

    def __init__(self, parts: Sequence[PackedSamples], quotas: Sequence[int], seed: int):
        self.parts = list(parts)
        self.quotas = np.asarray(quotas, dtype=np.int64)
        self.tokens_per_sample = parts[0].tokens_per_sample
        self.rows = getattr(parts[0], "rows", 1)
        self.source_of = interleave(self.quotas)
        self.local = np.empty(len(self.source_of), dtype=np.int64)
        for s, part in enumerate(self.parts):
            # positions of source s appear in increasing j, so the j-th gets the j-th selected sample
            self.local[self.source_of == s] = selection(int(self.quotas[s]), part.num_samples, seed, s)
        self.num_samples = len(self.source_of)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, g: int) -> np.ndarray:
        if not 0 <= g < self.num_samples:
            raise IndexError(f"sample {g} out of range [0, {self.num_samples}) of the mixture")
        return self.parts[int(self.source_of[g])][int(self.local[g])]

    def get_many(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        shape = (self.tokens_per_sample,) if self.rows == 1 else (self.rows, self.tokens_per_sample)
        out = np.empty((len(indices), *shape), dtype=np.int64)
        for row, g in enumerate(indices):
            out[row] = self[int(g)]
        return out

    def counts(self, indices: np.ndarray) -> np.ndarray:
        """``int64 [S]`` samples per source among mixture positions ``indices``."""
        return np.bincount(self.source_of[np.asarray(indices, dtype=np.int64)], minlength=len(self.parts))

    def close(self) -> None:
        for p in self.parts:
            p.close()


class ConcatSources(PartedSamples):
    """Several sources' samples one after another (the val split of a mixture)."""

    def __init__(self, parts: Sequence[PackedSamples]):
        self.parts = list(parts)
        self.tokens_per_sample = parts[0].tokens_per_sample
        self.rows = getattr(parts[0], "rows", 1)
        self._set_part_sizes([p.num_samples for p in parts])

    def _read(self, part: int, index: int) -> np.ndarray:
        return self.parts[part][index]

    def close(self) -> None:
        for p in self.parts:
            p.close()
