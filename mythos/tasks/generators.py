"""Deterministic synthetic multi-hop tasks for depth extrapolation (train on <= 5 hops, test on 6-12).

Two generators, both pure functions of a :class:`TaskConfig` (numpy PCG64 seeded by
``cfg.seed``; the same config gives the same examples on any machine):

``khop`` -- k-hop composition over a random knowledge graph (Kohli et al. 2026, "Loop, Think, &
Generalize"). ``n_entities`` entities and ``n_relations`` relations; every relation is a random
permutation of the entities, so each fact ``e r -> e'`` has exactly one answer. A query is a start
entity and a chain of k relations; the answer is the entity reached::

    <s> E3 R1 R0 R2 = E9 </s>            (3 hops: R2(R0(R1(E3))) = E9)

The graph itself is *never* in the prompt: the 1-hop queries (every atomic fact, repeated
``fact_repeats`` times) teach it, the 2..``train_max_hops``-hop queries teach composition, and the
model must compose the memorised facts internally -- one hop per layer application is the natural
algorithm, which is why a looped model can run more hops by running more loops.

``pointer`` -- pointer chasing in context (the p-hop induction family of Saunshi et al. 2025). Each
example draws a fresh random permutation of ``n_nodes`` nodes and lists its pairs ``a pi(a)`` in
random order; the query names a start node and k hops in unary (k arrows, so hop counts unseen in
training need no unseen token)::

    <s> V2 V0 V0 V3 V3 V1 V1 V2 ; V0 > > = V1 </s>      (pi(pi(V0)) = V1)

Splits: ``train`` (hops 1..train_max_hops), ``val`` (held-out queries, same hops, for the training
loss curve) and ``test`` (``test_hops``, 200 per hop by default). For ``khop``, val and test queries
of length >= 2 are excluded from train, so every multi-hop test query is unseen (1-hop queries are
the facts themselves and are necessarily shared). The loss is on the answer token only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mythos.tasks.vocab import BOS_ID, EOS_ID, WordVocab


@dataclass(kw_only=True)
class TaskConfig:
    """A multi-hop task and its split sizes (``configs/tasks/*.yaml``)."""

    kind: Literal["khop", "pointer"] = "khop"
    seed: int = 0
    train_max_hops: int = 5
    """Training (and val) queries have 1..train_max_hops hops."""
    test_hops: list[int] = field(default_factory=lambda: list(range(1, 13)))
    """Hop counts of the test split (in- and out-of-distribution)."""
    train_per_hop: int = 4000
    """Training queries per hop count >= 2 (khop) or per hop count (pointer)."""
    val_per_hop: int = 64
    test_per_hop: int = 200
    """Test queries per hop count (khop 1-hop: at most one per fact)."""
    test_per_unseen_hop: int = 0
    """Test queries per hop count above ``train_max_hops`` (0 = ``test_per_hop``). On a small
    graph (one relation, 64 entities: 64 distinct queries per hop count) the trained hop counts
    cannot hold out many queries without starving training, while the unseen ones can."""
    n_entities: int = 32
    """khop: entities of the knowledge graph."""
    n_relations: int = 4
    """khop: relations (each a random permutation of the entities)."""
    fact_repeats: int = 16
    """khop: copies of every atomic fact in train (the facts must be memorised)."""
    n_nodes: int = 8
    """pointer: nodes of each example's permutation."""

    def validate(self) -> None:
        if self.train_max_hops < 1:
            raise ValueError(f"train_max_hops must be >= 1, got {self.train_max_hops}")
        if not self.test_hops or min(self.test_hops) < 1:
            raise ValueError("test_hops must be a non-empty list of hop counts >= 1")
        if min(self.train_per_hop, self.val_per_hop, self.test_per_hop) < 1:
            raise ValueError("train_per_hop, val_per_hop and test_per_hop must be >= 1")
        if self.test_per_unseen_hop < 0:
            raise ValueError(f"test_per_unseen_hop must be >= 0 (0 = test_per_hop), got {self.test_per_unseen_hop}")
        if self.kind == "khop" and (self.n_entities < 2 or self.n_relations < 1 or self.fact_repeats < 1):
            raise ValueError("khop needs n_entities >= 2, n_relations >= 1, fact_repeats >= 1")
        if self.kind == "pointer" and self.n_nodes < 2:
            raise ValueError(f"pointer needs n_nodes >= 2, got {self.n_nodes}")

    def test_count(self, hops: int) -> int:
        """Test queries of ``hops`` hops: ``test_per_unseen_hop`` above ``train_max_hops`` when set."""
        if hops > self.train_max_hops and self.test_per_unseen_hop:
            return self.test_per_unseen_hop
        return self.test_per_hop

    @property
    def max_hops(self) -> int:
        return max(self.train_max_hops, *self.test_hops)


@dataclass(frozen=True)
class Example:
    """One query. ``prompt`` and ``answer`` are words of the task vocabulary (no specials)."""

    hops: int
    prompt: tuple[str, ...]
    answer: tuple[str, ...]

    def ids(self, vocab: WordVocab) -> tuple[list[int], list[int]]:
        """``(prompt_ids, answer_ids)``: ``[BOS] + prompt`` and the answer (no EOS)."""
        return [BOS_ID, *vocab.encode(self.prompt)], vocab.encode(self.answer)

    def sample(self, vocab: WordVocab) -> tuple[list[int], list[int]]:
        """Training row ``(tokens, mask)``: ``<s> prompt answer </s>``; mask 1 on answer tokens only."""
        prompt, answer = self.ids(vocab)
        tokens = [*prompt, *answer, EOS_ID]
        mask = [0] * len(prompt) + [1] * len(answer) + [0]
        return tokens, mask


@dataclass
class TaskData:
    """All splits of one task, plus the vocabulary and a description of the hidden structure."""

    config: TaskConfig
    vocab: WordVocab
    splits: dict[str, list[Example]]
    structure: dict


def build_vocab(cfg: TaskConfig) -> WordVocab:
    if cfg.kind == "khop":
        words = [f"E{i}" for i in range(cfg.n_entities)] + [f"R{i}" for i in range(cfg.n_relations)] + ["="]
    else:
        words = [f"V{i}" for i in range(cfg.n_nodes)] + [";", ">", "="]
    return WordVocab(words)


def generate(cfg: TaskConfig) -> TaskData:
    """Every split of ``cfg``'s task; deterministic in ``cfg``."""
    cfg.validate()
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    gen = _generate_khop if cfg.kind == "khop" else _generate_pointer
    splits, structure = gen(cfg, rng)
    return TaskData(cfg, build_vocab(cfg), splits, structure)


# ---------------------------------------------------------------------------------------------
# khop: knowledge-graph composition


def _khop_answer(relations: np.ndarray, start: int, chain: tuple[int, ...]) -> int:
    e = start
    for r in chain:
        e = int(relations[r, e])
    return e


def _khop_example(relations: np.ndarray, start: int, chain: tuple[int, ...]) -> Example:
    prompt = (f"E{start}", *(f"R{r}" for r in chain), "=")
    return Example(len(chain), prompt, (f"E{_khop_answer(relations, start, chain)}",))


def _sample_queries(cfg: TaskConfig, rng: np.random.Generator, hops: int, n: int, exclude: set, distinct: bool
                    ) -> list[tuple[int, tuple[int, ...]]]:
    """``n`` random (start, chain) queries of ``hops`` hops not in ``exclude`` (a set of queries of
    this hop count), distinct from each other if asked."""
    space = cfg.n_entities * cfg.n_relations**hops
    free = space - len(exclude)
    if free <= 0 or (distinct and n > free):
        raise ValueError(
            f"khop: only {max(free, 0)} unused {hops}-hop queries exist ({cfg.n_entities} entities x "
            f"{cfg.n_relations}^{hops} chains); lower test_per_hop/val_per_hop or enlarge the graph"
        )
    out: list[tuple[int, tuple[int, ...]]] = []
    taken = set(exclude)
    while len(out) < n:
        # draw in blocks: a vectorised draw per block keeps generation fast for 10^4-10^5 queries
        m = 2 * (n - len(out)) + 16
        starts = rng.integers(cfg.n_entities, size=m)
        chains = rng.integers(cfg.n_relations, size=(m, hops))
        for s, c in zip(starts.tolist(), chains.tolist()):
            q = (s, tuple(c))
            if q in taken:
                continue
            if distinct:
                taken.add(q)
            out.append(q)
            if len(out) == n:
                break
    return out


def _generate_khop(cfg: TaskConfig, rng: np.random.Generator) -> tuple[dict[str, list[Example]], dict]:
    relations = np.stack([rng.permutation(cfg.n_entities) for _ in range(cfg.n_relations)])  # [R, E]
    facts = [(e, (r,)) for r in range(cfg.n_relations) for e in range(cfg.n_entities)]
    held: dict[int, set] = {k: set() for k in range(1, cfg.max_hops + 1)}  # val/test queries, per hop count
    test: list[Example] = []
    for k in cfg.test_hops:
        if k == 1:  # the facts themselves: a memorisation check
            idx = rng.choice(len(facts), size=min(cfg.test_count(1), len(facts)), replace=False)
            test += [_khop_example(relations, *facts[i]) for i in sorted(idx.tolist())]
            continue
        qs = _sample_queries(cfg, rng, k, cfg.test_count(k), held[k], distinct=True)
        held[k].update(qs)
        test += [_khop_example(relations, *q) for q in qs]
    val: list[Example] = []
    for k in range(2, cfg.train_max_hops + 1):
        qs = _sample_queries(cfg, rng, k, cfg.val_per_hop, held[k], distinct=True)
        held[k].update(qs)
        val += [_khop_example(relations, *q) for q in qs]
    train = [_khop_example(relations, *f) for f in facts] * cfg.fact_repeats
    for k in range(2, cfg.train_max_hops + 1):
        train += [_khop_example(relations, *q) for q in _sample_queries(cfg, rng, k, cfg.train_per_hop, held[k], False)]
    order = rng.permutation(len(train))
    train = [train[i] for i in order.tolist()]
    structure = {"relations": relations.tolist(), "num_facts": len(facts)}
    if cfg.n_relations == 1:
        structure["floor"] = _shortcut_floor(relations[0], test, cfg.train_max_hops)
    return {"train": train, "val": val, "test": test}, structure


def _shortcut_floor(pi: np.ndarray, test: list[Example], train_max_hops: int) -> dict[str, float]:
    """Single relation: per test hop count k, the best exact match of answering every k-hop query
    with ``pi^j(start)`` for one trained depth ``j <= train_max_hops`` -- what a model that runs a
    fixed, trained depth gets for free (cycles of pi make ``pi^k == pi^j`` on some starts). An
    unseen-hop accuracy means depth extrapolation only above this floor."""
    powers = [np.arange(len(pi))]
    for _ in range(max(e.hops for e in test)):
        powers.append(pi[powers[-1]])
    floor: dict[str, float] = {}
    for k in sorted({e.hops for e in test}):
        qs = [e for e in test if e.hops == k]
        starts = np.array([int(e.prompt[0][1:]) for e in qs])
        answers = np.array([int(e.answer[0][1:]) for e in qs])
        floor[str(k)] = max(float((powers[j][starts] == answers).mean()) for j in range(1, train_max_hops + 1))
    return floor


# ---------------------------------------------------------------------------------------------
# pointer chasing in context


def _pointer_example(cfg: TaskConfig, rng: np.random.Generator, hops: int) -> Example:
    perm = rng.permutation(cfg.n_nodes)
    listing = rng.permutation(cfg.n_nodes)
    start = int(rng.integers(cfg.n_nodes))
    node = start
    for _ in range(hops):
        node = int(perm[node])
    pairs = [w for a in listing.tolist() for w in (f"V{a}", f"V{int(perm[a])}")]
    return Example(hops, (*pairs, ";", f"V{start}", *([">"] * hops), "="), (f"V{node}",))


def _generate_pointer(cfg: TaskConfig, rng: np.random.Generator) -> tuple[dict[str, list[Example]], dict]:
    # fresh permutations per example: train/val/test collide with probability ~ 1/n_nodes!
    train_hops = range(1, cfg.train_max_hops + 1)
    test = [_pointer_example(cfg, rng, k) for k in cfg.test_hops for _ in range(cfg.test_count(k))]
    val = [_pointer_example(cfg, rng, k) for k in train_hops for _ in range(cfg.val_per_hop)]
    train = [_pointer_example(cfg, rng, k) for k in train_hops for _ in range(cfg.train_per_hop)]
    order = rng.permutation(len(train))
    return {"train": [train[i] for i in order.tolist()], "val": val, "test": test}, {}


# ---------------------------------------------------------------------------------------------
# scoring


def exact_match(prediction: list[int] | tuple[int, ...], answer: list[int] | tuple[int, ...]) -> bool:
    """A prediction is correct iff its first ``len(answer)`` tokens equal the answer exactly."""
    return len(prediction) >= len(answer) and list(prediction[: len(answer)]) == list(answer)
