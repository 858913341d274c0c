"""Collaborative signals for contrastive fine-tuning (extensions beyond the paper).

The paper's CFT treats two masked prompts of the *same* item as positives: it teaches the model
which attributes identify an item, not which items users consume together. Two ways to add the
collaborative signal:

- ``positive_pairs`` (:func:`sequence_pairs`) for :meth:`ItemEmbedder.fit`: the masked prompt of an
  item that followed it in some user's history is a positive too (with probability ``pair_prob``
  per view);
- ``targets`` (:func:`cooccurrence_embeddings`): each masked prompt, through a learned projection,
  is matched to its item's collaborative vector among the batch's, so the text encoder learns the
  map from text to collaborative neighbourhoods and carries it to items with few interactions.

>>> pairs = sequence_pairs(interactions, holdout_last=2)   # leave-one-out: never train on valid/test
>>> embedder.fit(items, positive_pairs=pairs, pair_prob=0.5)
>>> targets = cooccurrence_embeddings(interactions, holdout_last=2)
>>> embedder.fit(items, targets=targets, view_weight=0.0)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # the return type only: embeddings.py is imported where it is needed
    from .embeddings import ItemEmbeddings


def user_histories(interactions: pd.DataFrame, user_column: str, item_column: str, time_column: str | None,
                   holdout_last: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, item id as str) of every interaction in (user, time) order, each user's last
    ``holdout_last`` dropped; the columns are checked first."""
    for col in (user_column, item_column, *([time_column] if time_column else [])):
        if col not in interactions.columns:
            raise KeyError(f"interactions has no column {col!r} (columns: {list(interactions.columns)})")
    if holdout_last < 0:
        raise ValueError(f"holdout_last must be >= 0, got {holdout_last}")
    df = interactions[[user_column, item_column] + ([time_column] if time_column else [])]
    if time_column:
        df = df.sort_values([user_column, time_column], kind="stable")
    else:
        df = df.sort_values(user_column, kind="stable")
    if holdout_last:
        df = df[df.groupby(user_column, sort=False).cumcount(ascending=False).to_numpy() >= holdout_last]
    return df[user_column].to_numpy(), df[item_column].astype(str).to_numpy()


def _within_window(users: np.ndarray, values: np.ndarray, window: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(gap, earlier, later)`` for ``gap`` in 1..window: the ``values`` of every two interactions ``gap``
    steps apart in one user's history (``users`` / ``values`` in (user, time) order)."""
    for gap in range(1, window + 1):
        same = users[gap:] == users[:-gap]
        yield gap, values[:-gap][same], values[gap:][same]


def sequence_pairs(interactions: pd.DataFrame, user_column: str = "user_id", item_column: str = "item_id",
                   time_column: str | None = "timestamp", window: int = 1, holdout_last: int = 0,
                   min_count: int = 1, counts: bool = False) -> pd.DataFrame:
    """``(item_id, positive_id)`` pairs of items that follow each other within ``window`` steps in a
    user's history (ordered by ``time_column``; file order where it is None or ties).

    ``holdout_last`` drops each user's last interactions first: with leave-one-out evaluation pass 2, so that
    no validation or test item is ever a training positive. Repeats (an item followed by itself) are dropped;
    the pairs are unordered and de-duplicated. ``min_count`` keeps only pairs seen at least that many times
    (over all users and gaps); ``counts=True`` adds that number as a third column ``count``, which
    :meth:`ItemEmbedder.fit` then uses as the partner's sampling weight.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    users, items = user_histories(interactions, user_column, item_column, time_column, holdout_last)
    left, right = [], []
    for _, a, b in _within_window(users, items, window):
        keep = a != b
        left.append(a[keep])
        right.append(b[keep])
    a, b = np.concatenate(left), np.concatenate(right)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    out = (pd.DataFrame({"item_id": lo, "positive_id": hi})
           .groupby(["item_id", "positive_id"], sort=False).size().reset_index(name="count"))
    out = out[out["count"] >= min_count].reset_index(drop=True)
    return out if counts else out[["item_id", "positive_id"]]


def cooccurrence_embeddings(interactions: pd.DataFrame, ids: Sequence[str] | None = None, dim: int = 64,
                            window: int = 3, holdout_last: int = 0, user_column: str = "user_id",
                            item_column: str = "item_id", time_column: str | None = "timestamp",
                            seed: int = 0) -> ItemEmbeddings:
    """A purely collaborative item embedding, e.g. the ``targets`` of :meth:`ItemEmbedder.fit`.

    Two items ``g <= window`` steps apart in one user's history co-occur with weight ``1 / g``; the rows
    are the truncated SVD (``dim`` components) of the positive PMI of these counts (context counts
    smoothed by the power 0.75, as word2vec's negative sampling), L2-normalised. ``ids`` fixes the
    rows (default: every item of ``interactions``, sorted); an item that never co-occurs gets a zero
    row, which ``fit`` reads as "no target". ``holdout_last`` as in :func:`sequence_pairs` (2 for
    leave-one-out). Sparse throughout: memory grows with the distinct co-occurring pairs.
    """
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    from .embeddings import ItemEmbeddings

    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    users, items = user_histories(interactions, user_column, item_column, time_column, holdout_last)
    ids = sorted(set(interactions[item_column].astype(str))) if ids is None else [str(i) for i in ids]
    rows = pd.Index(ids).get_indexer(items)
    if (rows < 0).any():
        raise KeyError(f"interactions: item id {items[np.flatnonzero(rows < 0)[0]]!r} is not among ids")
    n = len(ids)
    if not 1 <= dim < n:
        raise ValueError(f"dim must be in [1, {n - 1}] for {n} items, got {dim}")
    src, dst, weight = [], [], []
    for gap, a, b in _within_window(users, rows, window):
        src += [a, b]
        dst += [b, a]
        weight.append(np.full(2 * len(a), 1.0 / gap))
    counts = sp.coo_matrix((np.concatenate(weight), (np.concatenate(src), np.concatenate(dst))),
                           shape=(n, n)).tocsr()  # duplicates summed
    counts.setdiag(0)
    counts.eliminate_zeros()
    if counts.nnz == 0:
        raise ValueError("no two different items co-occur in the histories (after holdout_last)")
    c = counts.tocoo()
    total = np.asarray(counts.sum(axis=1)).ravel()
    context = total ** 0.75
    pmi = np.log(c.data * context.sum() / (total[c.row] * context[c.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (c.row[keep], c.col[keep])), shape=(n, n))
    x = TruncatedSVD(dim, random_state=seed).fit_transform(ppmi)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    return ItemEmbeddings(ids, x.astype(np.float32),
                          {"collaborative": {"method": "PPMI-SVD", "dim": dim, "window": window,
                                             "holdout_last": holdout_last, "seed": seed}})


@dataclass(frozen=True)
class PairIndex:
    """Positives per item row, as CSR arrays over the rows of the training table (both directions).

    ``weights`` (aligned with ``neighbours``; None = uniform) are the partners' sampling weights."""

    offsets: np.ndarray     # [n_items + 1]
    neighbours: np.ndarray  # [2 * n_pairs] row indices
    weights: np.ndarray | None = None  # [2 * n_pairs] float64 > 0, or None

    @classmethod
    def build(cls, pairs: Any, ids: Sequence[str]) -> "PairIndex":
        """From a DataFrame or an ``(n, 2)`` array of item ids; every id must be in ``ids``.

        A DataFrame has two columns (item id, positive id), or three where the third is a positive
        sampling weight (e.g. :func:`sequence_pairs`' ``count``); a pair given twice is kept once (with
        weights, their sum)."""
        weights = None
        if isinstance(pairs, pd.DataFrame):
            if pairs.shape[1] not in (2, 3):
                raise ValueError(f"positive_pairs must have 2 columns (item id, positive id) or 3 (and a "
                                 f"weight), got {list(pairs.columns)}")
            arr = pairs.iloc[:, :2].astype(str).to_numpy()
            if pairs.shape[1] == 3:
                column = pairs.columns[2]
                weights = pd.to_numeric(pairs[column], errors="coerce").to_numpy(np.float64)
                bad = np.flatnonzero(~(np.isfinite(weights) & (weights > 0)))
                if len(bad):
                    raise ValueError(f"positive_pairs: weight column {column!r} must hold finite numbers > 0; "
                                     f"row {int(bad[0])} has {pairs[column].iloc[bad[0]]!r}")
        else:
            arr = np.asarray(pairs, dtype=object)
            if arr.ndim != 2 or arr.shape[1] != 2:
                raise ValueError(f"positive_pairs must be (n, 2) item ids, got shape {arr.shape}")
            arr = arr.astype(str)
        rows = pd.Index([str(i) for i in ids]).get_indexer(arr.ravel()).reshape(-1, 2)
        if (rows < 0).any():
            unknown = arr.ravel()[np.flatnonzero(rows.ravel() < 0)[0]]
            raise KeyError(f"positive_pairs: item id {unknown!r} is not in the item table")
        a, b = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
        keep = a != b
        src, dst = np.concatenate([a[keep], b[keep]]), np.concatenate([b[keep], a[keep]])
        if len(src) == 0:
            raise ValueError("positive_pairs has no pair of two different items")
        order = np.lexsort((dst, src))
        src, dst = src[order], dst[order]
        first = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])]
        if weights is not None:
            w = np.concatenate([weights[keep], weights[keep]])[order]
            weights = np.add.reduceat(w, np.flatnonzero(first))
        src, dst = src[first], dst[first]
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.add.at(offsets, src + 1, 1)
        return cls(np.cumsum(offsets), dst, weights)

    @cached_property
    def _cumulative_weights(self) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(self.weights)])

    @property
    def n_pairs(self) -> int:
        return len(self.neighbours) // 2

    def degree(self, rows: np.ndarray) -> np.ndarray:
        return self.offsets[rows + 1] - self.offsets[rows]

    def sample(self, rows: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
        """For each row: with probability ``prob`` (and where it has positives) one of its positives,
        uniformly or in proportion to ``weights``; otherwise the row itself."""
        rows = np.asarray(rows, np.int64)
        deg = self.degree(rows)
        swap = (deg > 0) & (rng.random(len(rows)) < prob)
        u = rng.random(len(rows))
        start = self.offsets[rows]
        if self.weights is None:
            pick = start + (u * np.maximum(deg, 1)).astype(np.int64)
        else:  # inverse CDF within each row's slice of the cumulative weights
            cum = self._cumulative_weights
            lo, hi = cum[start], cum[start + deg]
            pick = np.searchsorted(cum, lo + u * (hi - lo), side="right") - 1
            pick = np.clip(pick, start, start + np.maximum(deg, 1) - 1)
        return np.where(swap, self.neighbours[np.minimum(pick, len(self.neighbours) - 1)], rows)

    def linked(self, anchors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Bool ``[len(anchors), len(candidates)]``: True where the candidate row is one of the anchor
        row's positives (a row is not its own positive here)."""
        anchors = np.asarray(anchors, np.int64)
        candidates = np.asarray(candidates, np.int64)
        deg = self.degree(anchors)
        owner = np.repeat(np.arange(len(anchors), dtype=np.int64), deg)
        # position of every positive of every anchor in the CSR array
        within = np.arange(int(deg.sum()), dtype=np.int64) - np.repeat(np.cumsum(deg) - deg, deg)
        partners = self.neighbours[np.repeat(self.offsets[anchors], deg) + within]
        n_rows = len(self.offsets) - 1
        query = np.arange(len(anchors), dtype=np.int64)[:, None] * n_rows + candidates[None, :]
        return np.isin(query, owner * n_rows + partners)

    def known_positives(self, anchors: np.ndarray, sources: Sequence[np.ndarray],
                        groups: np.ndarray | None = None) -> np.ndarray:
        """Bool ``[K, B, B]`` for :class:`~llm_item_embed.losses.ContrastiveLoss`: ``sources[b][k]`` is the
        row whose prompt stands for item ``k`` in view ``b``; True where that row is one of anchor ``i``'s
        positives or anchor ``i``'s own row (with ``groups``, any row rendering the same prompt)."""
        anchors = np.asarray(anchors, np.int64)
        masks = []
        for src in sources:
            src = np.asarray(src, np.int64)
            if groups is None:
                same = anchors[:, None] == src[None, :]
            else:
                same = groups[anchors][:, None] == groups[src][None, :]
            masks.append(self.linked(anchors, src) | same)
        return np.stack(masks)
