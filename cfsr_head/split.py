"""The id map and the leave-one-out split: raw item ids <-> indices ``1..N``, each user's training,
validation and test positions, vectorised batching and negative sampling, and the alignment of a
semantic table to the index order.

Conventions (see ``docs/architecture.md``): items are indexed ``1..N`` with ``0`` as padding;
sequences handed to models are **left-padded** (most recent item at position ``L-1``);
``padding_mask`` is ``item_seq == 0``. Raw ids are always strings.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from .data import InteractionData, drop_short_users, sort_within_user
from .io import atomic_write_json, read_json

__all__ = ["ItemIndex", "SplitData", "leave_one_out", "align_semantic"]


class ItemIndex:
    """Bijection raw string id <-> contiguous index ``1..N`` (``0`` is padding)."""

    def __init__(self, ids: Sequence[str]):
        ids = [str(i) for i in ids]
        lookup = {raw: n + 1 for n, raw in enumerate(ids)}
        if len(lookup) != len(ids):
            seen: set[str] = set()
            dups = [i for i in ids if i in seen or seen.add(i)]
            raise ValueError(f"ItemIndex: {len(ids) - len(lookup)} duplicated id(s), e.g. {dups[:5]}")
        self._ids = np.asarray(ids, dtype=object)
        self._lookup = lookup

    @classmethod
    def from_data(cls, data: InteractionData) -> "ItemIndex":
        """Items of the interactions, in order of first appearance."""
        return cls(pd.unique(data.interactions["item_id"]).tolist())

    def extended(self, new_ids: Sequence[str]) -> "ItemIndex":
        """A new index with ``new_ids`` appended as ``N+1..N+M`` (the order ``DualViewHead.add_items``
        gives new items); ids already in this index or repeated raise."""
        new = [str(i) for i in new_ids]
        known = [i for i in new if i in self._lookup]
        if known:
            raise ValueError(f"ItemIndex.extended: {len(known)} id(s) already in the index, e.g. {known[:5]}")
        return ItemIndex(self.ids + new)

    @property
    def ids(self) -> list[str]:
        return self._ids.tolist()

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def num_items(self) -> int:
        return len(self._ids)

    def __contains__(self, raw_id: object) -> bool:
        return str(raw_id) in self._lookup

    def index_of(self, ids: Sequence[str] | str, *, missing: Literal["error", "zero"] = "error") -> np.ndarray:
        """Indices (int64) of raw ids; unknown ids raise (count + examples) or map to 0."""
        scalar = isinstance(ids, str)
        arr = pd.Series([ids] if scalar else list(ids), dtype=object).astype(str)
        out = arr.map(self._lookup)
        unknown = out.isna()
        if unknown.any():
            if missing == "error":
                ex = arr[unknown].unique()[:5].tolist()
                raise KeyError(f"{int(unknown.sum())} id(s) not in the item index (e.g. {ex})")
            out = out.fillna(0)
        res = out.to_numpy(dtype=np.int64)
        return res[0] if scalar else res

    def id_of(self, indices: Sequence[int] | np.ndarray | int) -> np.ndarray | str:
        """Raw ids of indices ``1..N``; other values raise."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 1 or idx.max() > len(self._ids)):
            raise IndexError(f"indices must be in 1..{len(self._ids)}, got range {idx.min()}..{idx.max()}")
        out = self._ids[idx - 1]
        return str(out) if idx.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return {"format": "cfsr_head.ItemIndex", "version": 1, "ids": self.ids}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"ids": [...]}`` as JSON, atomically (index ``i`` = ``ids[i-1]``)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ItemIndex":
        obj = read_json(path)
        if not isinstance(obj, dict) or not isinstance(obj.get("ids"), list):
            raise ValueError(f"{path}: not an ItemIndex file (expected a JSON object with an 'ids' list)")
        return cls(obj["ids"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemIndex) and self.ids == other.ids

    def __repr__(self) -> str:
        return f"ItemIndex(num_items={len(self)})"


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """``rng`` itself, or a new generator seeded with it."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def gather_left_padded(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Rows ``flat[starts[r]:ends[r]]`` (each at most ``width`` long) left-padded with 0 -> [R, width]."""
    n = (ends - starts).astype(np.int64)
    if n.size and n.max(initial=0) > width:
        raise ValueError("window longer than width")
    out = np.zeros((len(n), width), dtype=np.int64)
    total = int(n.sum())
    if total == 0:
        return out
    rows = np.repeat(np.arange(len(n)), n)
    within = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
    cols = width - np.repeat(n, n) + within
    out[rows, cols] = flat[np.repeat(starts, n) + within]
    return out


def sample_excluding(rng: np.random.Generator, rows: np.ndarray, num_items: int, keys: np.ndarray,
                     max_rounds: int = 1000) -> np.ndarray:
    """Uniform items in ``1..num_items`` for each entry of ``rows`` (user rows), rejecting items whose
    key ``row * (num_items + 1) + item`` is in sorted ``keys``. Vectorised rejection sampling."""
    out = rng.integers(1, num_items + 1, size=rows.shape, dtype=np.int64)
    todo = np.arange(rows.size)
    flat_rows, flat_out = rows.reshape(-1), out.reshape(-1)
    for _ in range(max_rounds):
        cand = flat_rows[todo] * (num_items + 1) + flat_out[todo]
        pos = np.searchsorted(keys, cand)
        hit = (pos < len(keys)) & (keys[np.minimum(pos, len(keys) - 1)] == cand) if len(keys) else np.zeros(len(cand), bool)
        todo = todo[hit]
        if todo.size == 0:
            return flat_out.reshape(rows.shape)
        flat_out[todo] = rng.integers(1, num_items + 1, size=todo.size, dtype=np.int64)
    raise RuntimeError("negative sampling did not converge (a user has interacted with almost every item)")


@dataclass
class SplitData:
    """Leave-one-out split of chronological user sequences, stored flat (CSR-like).

    Per user ``u`` (row), the full sequence is ``items[offsets[u]:offsets[u+1]]`` (indices 1..N):
    train = all but the last two, validation target = second last, test target = last.
    ``max_len`` is only the default window for :meth:`train_batches` / :meth:`eval_inputs`.
    """

    item_index: ItemIndex
    user_ids: np.ndarray          # [U] raw user ids (str, object array)
    items: np.ndarray             # [total] int64 item indices, users concatenated chronologically
    offsets: np.ndarray           # [U + 1] int64
    max_len: int | None = None
    name: str = ""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.items = np.asarray(self.items, dtype=np.int64)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.user_ids = np.asarray(self.user_ids, dtype=object)
        if np.any(np.diff(self.offsets) < 3):
            raise ValueError("every user needs at least 3 interactions for leave-one-out")

    # ---- basic facts ----------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.item_index)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def users(self) -> np.ndarray:
        """Alias of ``user_ids``."""
        return self.user_ids

    @property
    def lengths(self) -> np.ndarray:
        """Full sequence length per user (train + 2)."""
        return np.diff(self.offsets)

    @property
    def train_lengths(self) -> np.ndarray:
        """Training-sequence length per user (the user's history length used for groups)."""
        return self.lengths - 2

    @property
    def sequences(self) -> np.ndarray:
        """Left-padded int64 matrix [U, max length] of the full sequences (built once)."""
        if "sequences" not in self._cache:
            self._cache["sequences"] = gather_left_padded(
                self.items, self.offsets[:-1], self.offsets[1:], int(self.lengths.max(initial=0)))
        return self._cache["sequences"]

    @property
    def item_popularity(self) -> np.ndarray:
        """Interaction counts per item index [N + 1] from TRAINING sequences only (index 0 = 0)."""
        if "pop" not in self._cache:
            mask = self._position_in_user() < np.repeat(self.train_lengths, self.lengths)
            self._cache["pop"] = np.bincount(self.items[mask], minlength=self.num_items + 1).astype(np.int64)
        return self._cache["pop"]

    def input_popularity(self, split: Literal["valid", "test"] = "test") -> np.ndarray:
        """Interaction counts per item index [N + 1] over every user's input for ``split`` (index 0 =
        0): the training part for validation (``item_popularity``), the training part plus each
        user's validation item for test. Counts up to the target's position in every sequence, so the
        test targets are measured as the validation targets are; with ``item_popularity`` alone they
        look rarer than they are, by the one interaction per user the test input adds (Beauty: mean
        log(1 + count) of the test targets 0.937 of the validation targets' on training counts, 1.01
        on these). Evaluation groups (``GroupSpec``) stay on ``item_popularity``."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if split == "valid":
            return self.item_popularity
        if "pop_test" not in self._cache:
            self._cache["pop_test"] = self.item_popularity + np.bincount(self.targets("valid"),
                                                                         minlength=self.num_items + 1)
        return self._cache["pop_test"]

    def _position_in_user(self) -> np.ndarray:
        if "pos" not in self._cache:
            self._cache["pos"] = np.arange(len(self.items)) - np.repeat(self.offsets[:-1], self.lengths)
        return self._cache["pos"]

    def _keys(self, part: Literal["train", "valid", "test", "all"]) -> np.ndarray:
        """Sorted unique ``row * (N+1) + item`` keys of the items each user has in ``part``'s history
        (train: train items; valid: its input = train; test: train + valid; all: whole sequence)."""
        if ("keys", part) not in self._cache:
            drop = {"train": 2, "valid": 2, "test": 1, "all": 0}[part]
            mask = self._position_in_user() < np.repeat(self.lengths - drop, self.lengths)
            rows = np.repeat(np.arange(self.num_users), self.lengths)[mask]
            self._cache[("keys", part)] = np.unique(rows * (self.num_items + 1) + self.items[mask])
        return self._cache[("keys", part)]

    def _users_without_negatives(self, part: Literal["train", "valid", "test", "all"]) -> np.ndarray:
        """Rows of users whose ``part`` history already holds every item (no negative exists)."""
        counts = np.bincount(self._keys(part) // (self.num_items + 1), minlength=self.num_users)
        return np.flatnonzero(counts >= self.num_items)

    def check_negatives(self, part: Literal["train", "valid", "test", "all"]) -> None:
        """Raise a clear error if some user has interacted with every item (nothing to sample)."""
        full = self._users_without_negatives(part)
        if len(full):
            raise ValueError(f"{len(full)} user(s) have interacted with all {self.num_items} items, so no "
                             f"negative item can be sampled for them (e.g. {self.user_ids[full[:5]].tolist()})")

    def history(self, split: Literal["valid", "test", "all"] = "test"):
        """``scipy.sparse.csr_matrix`` [U, N+1] (bool) of the items in each user's evaluation input
        (valid: train items; test: train + valid item; all: every interacted item)."""
        from scipy.sparse import csr_matrix

        if split not in ("valid", "test", "all", "train"):
            raise ValueError(f"split must be 'valid', 'test' or 'all', got {split!r}")
        keys = self._keys(split)
        n1 = self.num_items + 1
        rows, cols = keys // n1, keys % n1
        return csr_matrix((np.ones(len(keys), dtype=bool), (rows, cols)), shape=(self.num_users, n1))

    # ---- training batches -------------------------------------------------------------------
    def _train_windows(self, max_len: int, sliding: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user row, start, end) of each training window over flat ``items``: input = [start, end-1),
        pos = [start+1, end). Users whose train sequence has < 2 items give no window."""
        n_tr = self.train_lengths
        users = np.flatnonzero(n_tr >= 2)
        base, n = self.offsets[:-1][users], n_tr[users]
        if not sliding:
            ends = base + n
            return users, np.maximum(base, ends - max_len - 1), ends
        n_win = -(-(n - 1) // max_len)  # ceil((n - 1) / max_len)
        rows = np.repeat(users, n_win)
        k = np.arange(int(n_win.sum())) - np.repeat(np.cumsum(n_win) - n_win, n_win)
        ends = np.repeat(base + n, n_win) - k * max_len
        starts = np.maximum(np.repeat(base, n_win), ends - max_len - 1)
        return rows, starts, ends

    def num_train_rows(self, max_len: int | None = None, *, sliding: bool = False) -> int:
        """Number of training rows (sequences) one epoch of :meth:`train_batches` yields."""
        return len(self._train_windows(self._resolve_len(max_len, train=True), sliding)[0])

    def _resolve_len(self, max_len: int | None, *, train: bool) -> int:
        if max_len is None:
            max_len = self.max_len
        if max_len is None:
            longest = self.train_lengths - 1 if train else self.lengths - 1
            max_len = int(longest.max(initial=1))
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        return int(max_len)

    def train_batches(self, batch_size: int, max_len: int | None = None,
                      rng: np.random.Generator | int | None = None, *, shuffle: bool = True,
                      sliding: bool = False, drop_last: bool = False, n_negatives: int = 1,
                      with_users: bool = False, length_buckets: int = 0) -> Iterator[tuple]:
        """Yield ``(input_seq, pos, neg)`` int64 LongTensors ``[B, L]`` (``L = max_len``), left-padded:
        input = train_seq[:-1], pos = train_seq[1:], neg = uniform items not in the user's training
        history (0 where pos is padding). Sequences longer than ``max_len + 1`` keep the most recent
        items, or with ``sliding=True`` are cut into consecutive windows so every position is
        trained once. One call = one epoch; ``rng`` seeds shuffling and negatives.
        ``n_negatives > 1``: neg is ``[B, L, n_negatives]``. ``with_users=True`` adds a 4th element,
        the user rows ``[B]`` (LongTensor, index into ``user_ids``).

        ``length_buckets=k > 0`` (sortish sampling): the shuffled rows are sorted by length within
        chunks of ``k * batch_size`` rows and cut into batches of about ``batch_size * mean length``
        trained positions each (many short sequences or few long ones), then the batch order is
        shuffled again. A batch then holds sequences of similar length, so the all-padding columns
        the Trainer trims (``TrainConfig.trim_padding``) are most of the padding, while every
        position keeps about the same weight in its batch's mean loss and an epoch has about the
        same number of steps. Every row still appears once per epoch (``drop_last`` does not apply)."""
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n_negatives < 1:
            raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
        if length_buckets < 0:
            raise ValueError(f"length_buckets must be >= 0, got {length_buckets}")
        if length_buckets and drop_last:
            raise ValueError("drop_last=True does not apply to length_buckets > 0 (batches have varying row counts)")
        L = self._resolve_len(max_len, train=True)
        rng = as_rng(rng)
        rows, starts, ends = self._train_windows(L, sliding)
        order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
        if length_buckets:
            bounds = self._length_bucketed(order, ends - starts - 1, batch_size, length_buckets)
            if shuffle:
                bounds = [bounds[i] for i in rng.permutation(len(bounds))]
        else:
            bounds = [(b, min(b + batch_size, len(order))) for b in range(0, len(order), batch_size)]
            if drop_last:
                bounds = [(a, b) for a, b in bounds if b - a == batch_size]
        keys = self._keys("train")
        self.check_negatives("train")
        for a, b in bounds:
            sel = order[a:b]
            inp = gather_left_padded(self.items, starts[sel], ends[sel] - 1, L)
            pos = gather_left_padded(self.items, starts[sel] + 1, ends[sel], L)
            valid = pos > 0
            row_of = np.broadcast_to(rows[sel][:, None], pos.shape)[valid]
            if n_negatives == 1:
                neg = np.zeros_like(pos)
                neg[valid] = sample_excluding(rng, row_of, self.num_items, keys)
            else:
                neg = np.zeros((*pos.shape, n_negatives), dtype=np.int64)
                neg[valid] = sample_excluding(rng, np.repeat(row_of[:, None], n_negatives, axis=1),
                                               self.num_items, keys)
            out = (torch.from_numpy(inp), torch.from_numpy(pos), torch.from_numpy(neg))
            yield out + (torch.from_numpy(rows[sel].copy()),) if with_users else out

    @staticmethod
    def _length_bucketed(order: np.ndarray, width: np.ndarray, batch_size: int,
                         chunk_batches: int) -> list[tuple[int, int]]:
        """Sort ``order`` in place by row width within chunks of ``chunk_batches * batch_size`` rows;
        return batch bounds holding about ``batch_size * mean(width)`` positions each."""
        w = width[order]
        target = batch_size * max(float(w.mean()), 1.0) if len(w) else 1.0
        chunk = chunk_batches * batch_size
        bounds: list[tuple[int, int]] = []
        for c in range(0, len(order), chunk):
            idx = np.argsort(w[c:c + chunk], kind="stable")
            order[c:c + chunk] = order[c:c + chunk][idx]
            cum = np.cumsum(w[c:c + chunk][idx])
            n_batches = max(1, int(round(cum[-1] / target)))
            cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n_batches) / n_batches, side="left") + 1
            edges = np.unique(np.concatenate([[0], cuts, [len(cum)]]))
            bounds += [(c + int(lo), c + int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
        return bounds

    # ---- evaluation inputs ------------------------------------------------------------------
    def targets(self, split: Literal["valid", "test"] = "test") -> np.ndarray:
        """Target item index per user [U]."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        return self.items[self.offsets[1:] - (2 if split == "valid" else 1)]

    def eval_inputs(self, split: Literal["valid", "test"] = "test", max_len: int | None = None):
        """``(input_seq LongTensor [U, L] left-padded, target LongTensor [U], user_ids ndarray [U])``.
        valid input = train sequence; test input = train + validation item; cut to the most recent
        ``max_len`` items (``L = max_len``; default ``self.max_len`` or the longest input)."""
        import torch

        target = self.targets(split)
        L = self._resolve_len(max_len, train=False)
        ends = self.offsets[1:] - (2 if split == "valid" else 1)
        starts = np.maximum(self.offsets[:-1], ends - L)
        seq = gather_left_padded(self.items, starts, ends, L)
        return torch.from_numpy(seq), torch.from_numpy(target.copy()), self.user_ids.copy()

    # ---- persistence -------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write ``split.json`` (user ids, offsets, items) and ``item_index.json`` atomically."""
        folder = Path(folder)
        self.item_index.save(folder / "item_index.json")
        atomic_write_json(folder / "split.json", {
            "format": "cfsr_head.SplitData", "version": 1, "name": self.name, "max_len": self.max_len,
            "user_ids": self.user_ids.tolist(), "offsets": self.offsets.tolist(), "items": self.items.tolist()})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SplitData":
        folder = Path(folder)
        obj = read_json(folder / "split.json")
        if obj.get("format") != "cfsr_head.SplitData":
            raise ValueError(f"{folder / 'split.json'} is not a SplitData file")
        return cls(ItemIndex.load(folder / "item_index.json"), np.asarray(obj["user_ids"], dtype=object),
                   np.asarray(obj["items"], dtype=np.int64), np.asarray(obj["offsets"], dtype=np.int64),
                   obj.get("max_len"), obj.get("name", ""))


def leave_one_out(data: InteractionData, max_len: int | None = None, *, item_index: ItemIndex | None = None,
                  min_len: int = 3) -> SplitData:
    """Leave-one-out split: users with fewer than ``min_len`` (>= 3) interactions are dropped (with a
    warning); per user the last item is the test target, the second last the validation target.
    ``item_index`` defaults to the items of the data in order of first appearance; interactions
    with items outside a given index raise. ``max_len`` becomes the default window length."""
    if min_len < 3:
        raise ValueError("min_len must be >= 3 (train, validation and test need one item each)")
    data = drop_short_users(data, min_len)
    df = sort_within_user(data.interactions)
    if len(df) == 0:
        raise ValueError(f"no user has at least {min_len} interactions")
    if item_index is None:
        item_index = ItemIndex.from_data(InteractionData(df))
    items = item_index.index_of(df["item_id"].to_numpy())
    codes, uniques = pd.factorize(df["user_id"], sort=False)
    counts = np.bincount(codes, minlength=len(uniques))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SplitData(item_index, np.asarray(uniques, dtype=object), items, offsets, max_len, data.name)


# --------------------------------------------------------------------------------------------
# semantic table alignment
# --------------------------------------------------------------------------------------------
def _semantic_table(embeddings: Any) -> tuple[list[str], np.ndarray]:
    """(ids, matrix) from ItemEmbeddings-like (.ids/.matrix), DataFrame or dict id -> vector."""
    if hasattr(embeddings, "ids") and hasattr(embeddings, "matrix"):
        return [str(i) for i in embeddings.ids], np.asarray(embeddings.matrix)
    if isinstance(embeddings, pd.DataFrame):
        df = embeddings
        if "item_id" in df.columns:
            ids, df = df["item_id"].astype(str).tolist(), df.drop(columns="item_id")
        else:
            ids = df.index.astype(str).tolist()
        if df.shape[1] == 1 and df.dtypes.iloc[0] == object:
            return ids, np.stack([np.asarray(v, dtype=np.float64) for v in df.iloc[:, 0]])
        return ids, df.to_numpy(dtype=np.float64)
    if isinstance(embeddings, Mapping):
        ids = [str(k) for k in embeddings.keys()]
        vals = list(embeddings.values())
        return ids, (np.stack([np.asarray(v, dtype=np.float64) for v in vals]) if vals else np.zeros((0, 0)))
    raise TypeError("embeddings must have .ids and .matrix (ItemEmbeddings), or be a DataFrame or a dict "
                    f"id -> vector; got {type(embeddings).__name__}")


def align_semantic(embeddings: Any, item_index: ItemIndex,
                   missing: Literal["error", "zeros", "mean"] = "error") -> np.ndarray:
    """Float32 ``[N, d]`` semantic table in index order (row ``i-1`` = item index ``i``).

    ``missing``: items of the index absent from the embeddings raise (count + examples), or get a
    zero row / the mean row (with a warning). NaN/inf rows of used items raise."""
    ids, mat = _semantic_table(embeddings)
    if hasattr(mat, "detach"):
        mat = mat.detach().cpu().numpy()
    mat = np.asarray(mat, dtype=np.float32)
    if mat.ndim != 2 or mat.shape[0] != len(ids):
        raise ValueError(f"semantic matrix must be [len(ids), d]; got shape {mat.shape} for {len(ids)} ids")
    lookup = pd.Series(np.arange(len(ids)), index=pd.Index(ids, dtype=object))
    if not lookup.index.is_unique:
        dups = lookup.index[lookup.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"semantic table has duplicated ids, e.g. {dups}")
    wanted = pd.Index(item_index.ids, dtype=object)
    pos = lookup.reindex(wanted)
    absent = pos.isna().to_numpy()
    if absent.any():
        examples = wanted[absent][:5].tolist()
        msg = f"{int(absent.sum())} of {len(wanted)} item(s) have no semantic embedding (e.g. {examples})"
        if missing == "error":
            raise KeyError(msg + "; pass missing='zeros' or 'mean' to fill them")
        if missing not in ("zeros", "mean"):
            raise ValueError(f"missing must be 'error', 'zeros' or 'mean', got {missing!r}")
        warnings.warn(msg + f"; filled with {missing}", stacklevel=2)
    idx = pos.fillna(0).to_numpy(dtype=np.int64)
    out = mat[idx] if len(mat) else np.zeros((len(wanted), 0), np.float32)
    bad = ~np.isfinite(out).all(axis=1) & ~absent
    if bad.any():
        raise ValueError(f"{int(bad.sum())} semantic row(s) contain NaN/inf (e.g. {wanted[bad][:5].tolist()})")
    if absent.any():
        fill = out[~absent].mean(axis=0) if (missing == "mean" and (~absent).any()) else 0.0
        out[absent] = fill
    return np.ascontiguousarray(out, dtype=np.float32)
