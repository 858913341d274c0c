"""How recommendation-aware are item embeddings? Their neighbourhoods against what users take next.

A check that needs no recommender: take each transition ``previous item -> next item`` from users'
histories and ask

- ``next@k``: how often the next item is among the ``k`` nearest neighbours (cosine, over every
  item but the previous one) of the previous item;
- ``AUC``: how often a consecutive pair is more similar than a random pair of items;
- ``cos next`` / ``cos random``: the mean cosine of consecutive and of random pairs.

It tells, in seconds, whether a fine-tuning moved the embeddings towards or away from the
sequential signal. On Amazon Beauty two 200-step runs of the paper's masked-prompt CFT lowered
``next@10`` on held-out transitions from 0.064 (frozen MiniLM) to 0.042 and 0.048, and
recommenders built on CFT embeddings are worse there on the sampled protocol too; on MovieLens
it rises, and so do they (``docs/benchmarks.md``, ``docs/results``). It compares recipes: on
Beauty's 57 runs that each fitted their own CFT, a run's ``next@10`` did not predict its stage-2
results among runs of the same recipe (``benchmarks/bench_neighbours_runs.py``). Score the transitions into
the held-out items (``held_out=True``) for embeddings trained on the training transitions (pair or
target CFT), since they have seen the others::

    prev, nxt = next_item_transitions(interactions, holdout_last=2, held_out=True)
    neighbour_scores(embeddings, prev, nxt, k=10)     # {"next@10": 0.064, "AUC": 0.692, ...}
"""
from __future__ import annotations

from typing import Any, Collection, Mapping

import numpy as np
import pandas as pd

from .embeddings import ItemEmbeddings
from .pairs import user_histories

__all__ = ["next_item_transitions", "neighbour_scores"]


def next_item_transitions(interactions: pd.DataFrame, *, holdout_last: int = 2, held_out: bool = False,
                          user_column: str = "user_id", item_column: str = "item_id",
                          time_column: str | None = "timestamp") -> tuple[np.ndarray, np.ndarray]:
    """``(previous item ids, next item ids)``: consecutive items of each user's history, in (user,
    time) order, as strings.

    ``held_out=False``: every transition within each history without its last ``holdout_last``
    interactions (2 = leave-one-out's validation and test items), i.e. what training sees.
    ``held_out=True``: one transition per user, from the last kept item into the first held-out one
    (with 2: into leave-one-out's validation item); users with fewer than ``holdout_last + 1``
    interactions give none. Missing columns are named (``KeyError``).
    """
    if held_out:
        if holdout_last < 1:
            raise ValueError(f"held_out=True needs holdout_last >= 1, got {holdout_last}")
        users, items = user_histories(interactions, user_column, item_column, time_column, holdout_last - 1)
        ends = np.flatnonzero(np.r_[users[1:] != users[:-1], True])  # each user's last kept row
        ends = ends[(ends > 0) & (users[np.maximum(ends - 1, 0)] == users[ends])]
        return items[ends - 1], items[ends]
    users, items = user_histories(interactions, user_column, item_column, time_column, holdout_last)
    same = users[1:] == users[:-1]
    return items[:-1][same], items[1:][same]


def neighbour_scores(embeddings: ItemEmbeddings, previous_ids: Any, next_ids: Any, *, k: int = 10,
                     max_queries: int | None = 5000, seed: int = 0,
                     groups: Mapping[str, Collection[str]] | None = None) -> dict[str, float]:
    """``next@k``, ``AUC``, ``cos next`` and ``cos random`` of ``embeddings`` on transitions.

    Args:
        embeddings: the item table; every id of the transitions must be in it (a ``KeyError``
            lists the missing ones).
        previous_ids, next_ids: aligned id sequences (:func:`next_item_transitions`). Transitions
            from an item to itself say nothing about neighbourhoods and are left out.
        k: neighbours per query.
        max_queries: ``next@k`` is measured on this many transitions drawn without replacement
            (each query ranks every item); ``None`` = all. AUC and the cosines use every transition.
        seed: seeds the draws (queries, random pairs).
        groups: name -> item ids; adds ``next@k <name>`` over the transitions whose next item is in
            the set (NaN when none is), e.g. ``{"tail": rare_ids, "head": popular_ids}``.
    """
    prev, nxt = np.asarray(previous_ids, dtype=object), np.asarray(next_ids, dtype=object)
    if prev.shape != nxt.shape or prev.ndim != 1:
        raise ValueError(f"previous_ids and next_ids must be aligned 1-D sequences, got {prev.shape} and {nxt.shape}")
    n_items = len(embeddings)
    if not 1 <= k < n_items:
        raise ValueError(f"k must be in [1, {n_items - 1}] for {n_items} items, got {k}")
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1 or None, got {max_queries}")
    rng = np.random.default_rng(seed)
    X = embeddings.numpy().astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True).clip(min=1e-12)
    a, b = np.asarray(embeddings.index_of(list(prev))), np.asarray(embeddings.index_of(list(nxt)))
    keep = a != b
    a, b = a[keep], b[keep]
    if len(a) == 0:
        raise ValueError("no transition between two different items to score")
    pick = rng.choice(len(a), size=len(a) if max_queries is None else min(max_queries, len(a)), replace=False)
    hit = np.zeros(len(pick), dtype=bool)
    for chunk in np.array_split(np.arange(len(pick)), max(1, len(pick) // 500)):
        q = pick[chunk]
        sims = X[a[q]] @ X.T
        sims[np.arange(len(q)), a[q]] = -np.inf  # the previous item is not its own neighbour
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        hit[chunk] = (top == b[q][:, None]).any(axis=1)
    pos = (X[a] * X[b]).sum(axis=1)
    pairs = rng.integers(0, n_items, size=(len(a), 2))
    neg = (X[pairs[:, 0]] * X[pairs[:, 1]]).sum(axis=1)
    auc = float((pos[:, None] > rng.choice(neg, size=256)[None, :]).mean())
    out = {f"next@{k}": float(hit.mean()), "AUC": auc, "cos next": float(pos.mean()),
           "cos random": float(neg.mean())}
    if groups:
        next_of_query = np.asarray(embeddings.ids, dtype=object)[b[pick]]
        for name, ids in groups.items():
            member = np.isin(next_of_query, np.asarray([str(i) for i in ids], dtype=object))
            out[f"next@{k} {name}"] = float(hit[member].mean()) if member.any() else float("nan")
    return out
