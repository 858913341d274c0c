"""Top-k next-item recommendations from a trained model, for users given by their histories.

``recommend(model, histories, k)`` encodes each history's most recent ``max_len`` items, scores every
item (``full_scores``) and returns the ``k`` best per user, by default leaving out the items the
history already holds. Any model of the evaluation protocol works (``user_state`` and
``full_scores``): a ``DualViewHead``, a popularity-adjusted wrapper, ``PopularityModel``.
``read_histories(path)`` reads histories from a CSV or JSON file, for users outside any dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import InteractionData, normalise_interactions, read_csv_columns, sort_within_user
from .evaluate import model_device, model_max_len
from .io import read_json
from .split import ItemIndex, gather_left_padded

__all__ = ["Recommendations", "read_histories", "recommend"]


@dataclass
class Recommendations:
    """The ``k`` best items per user, best first.

    ``item_indices [U, k]`` are 1-based item indices and ``scores [U, k]`` their scores; a user with
    fewer than ``k`` items left to recommend has index 0 and score ``-inf`` in the remaining slots.
    ``items`` gives raw item ids (``None`` in those slots) when an ``item_index`` is known."""

    users: np.ndarray             # [U] user keys (the histories' keys, or row numbers)
    item_indices: np.ndarray      # [U, k] int64
    scores: np.ndarray            # [U, k] float32
    item_index: ItemIndex | None = None

    def __len__(self) -> int:
        return len(self.users)

    @property
    def items(self) -> np.ndarray:
        """``[U, k]`` raw item ids (object array, ``None`` where nothing is left), or the indices when
        no ``item_index`` was given."""
        if self.item_index is None:
            return self.item_indices
        ids = np.asarray(self.item_index.ids, dtype=object)
        out = np.full(self.item_indices.shape, None, dtype=object)
        real = self.item_indices > 0
        out[real] = ids[self.item_indices[real] - 1]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"format", "version", "k", "recommendations": [{"user_id", "items",
        "scores"}, ...]}`` with empty slots left out (item ids as str, or indices)."""
        items = self.items
        rows = []
        for u, row_items, row_idx, row_scores in zip(self.users, items, self.item_indices, self.scores):
            real = row_idx > 0
            rows.append({"user_id": u.item() if isinstance(u, np.generic) else u,
                         "items": [i.item() if isinstance(i, np.generic) else i for i in row_items[real]],
                         "scores": [float(x) for x in row_scores[real]]})
        return {"format": "cfsr_head.Recommendations", "version": 1, "k": int(self.item_indices.shape[1]),
                "recommendations": rows}

    def to_frame(self) -> pd.DataFrame:
        """Long table with columns ``user_id``, ``rank`` (1 = best), ``item_id``, ``score``; empty
        slots are left out."""
        U, k = self.item_indices.shape
        real = (self.item_indices > 0).ravel()
        return pd.DataFrame({
            "user_id": np.repeat(np.asarray(self.users, dtype=object), k)[real],
            "rank": np.tile(np.arange(1, k + 1), U)[real],
            "item_id": self.items.ravel()[real],
            "score": self.scores.ravel()[real],
        })


def read_histories(path: str | PathLike) -> dict[str, list[str]]:
    """Histories from a file, as ``recommend`` takes them: user id -> raw item ids (str), oldest first.

    ``.csv``: columns ``user_id`` and ``item_id`` (the ``interactions.csv`` layout), and optionally
    ``timestamp``, which orders each user's rows (ties and files without it keep the file order).
    ``.json``: an object ``{"user": ["item", ...], ...}`` with each list oldest first.
    Users keep the order of their first appearance; ids are read as strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"histories file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected an object user id -> list of item ids, got {type(raw).__name__}")
        out = {}
        for user, items in raw.items():
            if not isinstance(items, list) or any(isinstance(i, (dict, list, bool)) or i is None for i in items):
                raise ValueError(f"{path}: the history of user {user!r} must be a list of item ids, got {items!r:.80}")
            out[str(user)] = [str(i).strip() for i in items]
        return out
    if suffix != ".csv":
        raise ValueError(f"{path}: histories are read from .csv (user_id,item_id[,timestamp]) or .json "
                         f"(user -> items), not {suffix or 'a file without a suffix'}")
    df = read_csv_columns(path, ("user_id", "item_id"))
    if "timestamp" not in df.columns:
        df["timestamp"] = np.arange(len(df))  # file order
    # the dataset reader's checks and order: users by first appearance, each by timestamp, ties in file order
    df = normalise_interactions(df, str(path), duplicates="keep")
    codes, users = pd.factorize(df["user_id"], sort=False)
    per_user = np.split(df["item_id"].to_numpy(dtype=object), np.cumsum(np.bincount(codes))[:-1])
    return {user: items.tolist() for user, items in zip(users, per_user)}


def _flatten_histories(histories: Any) -> tuple[np.ndarray, Sequence[Any], np.ndarray, bool]:
    """(user keys [U], every history's items concatenated, history lengths [U], whether the items are
    already indices) from a mapping, a list of sequences, an InteractionData or a 2-D index array
    (the last two without a Python loop over items)."""
    if isinstance(histories, torch.Tensor):
        histories = histories.detach().cpu().numpy()
    if isinstance(histories, np.ndarray) and histories.ndim == 2:
        if histories.dtype.kind not in "iu":
            raise TypeError(f"a 2-D histories array must hold integer item indices (0 = padding), got dtype "
                            f"{histories.dtype}")
        real = histories != 0  # row-major order keeps each row's items in order
        return (np.arange(len(histories), dtype=np.int64).astype(object), histories[real].astype(np.int64),
                real.sum(axis=1).astype(np.int64), True)
    if isinstance(histories, InteractionData):
        df = sort_within_user(histories.interactions)
        codes, users = pd.factorize(df["user_id"], sort=False)
        return (np.asarray(users, dtype=object), df["item_id"].to_numpy(dtype=object),
                np.bincount(codes, minlength=len(users)).astype(np.int64), False)
    if isinstance(histories, Mapping):
        users, seqs = np.asarray(list(histories.keys()), dtype=object), list(histories.values())
    elif isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
        raise TypeError("histories must be a mapping user -> items, a list of item sequences, an InteractionData "
                        f"or a 2-D array of item indices, got {type(histories).__name__}")
    else:
        users, seqs = np.arange(len(histories), dtype=np.int64).astype(object), list(histories)
    for u, seq in zip(users, seqs):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray, pd.Series)):
            raise TypeError(f"the history of user {u!r} must be a sequence of items, got {type(seq).__name__}")
    return users, [x for seq in seqs for x in seq], np.array([len(seq) for seq in seqs], dtype=np.int64), False


def _index_histories(users: np.ndarray, flat_raw: Sequence[Any], lengths: np.ndarray, num_items: int,
                     item_index: ItemIndex | None, unknown: str, are_indices: bool) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 item indices, offsets [U + 1]): raw ids mapped through ``item_index``, or indices
    (``are_indices``, or no index given) checked against ``1..num_items``."""
    owners = np.repeat(np.arange(len(users)), lengths)
    if item_index is not None and not are_indices:
        flat = item_index.index_of(flat_raw, missing="zero") if len(flat_raw) else np.zeros(0, np.int64)
        bad = flat == 0
        if bad.any() and unknown == "error":
            first = int(np.flatnonzero(bad)[0])
            raise KeyError(f"{int(bad.sum())} history item(s) are not in the model's item index, e.g. item "
                           f"{flat_raw[first]!r} of user {users[owners[first]]!r} (unknown='skip' leaves them out)")
    else:
        flat = np.asarray(flat_raw).reshape(-1) if len(flat_raw) else np.zeros(0, np.int64)
        if flat.dtype.kind not in "iu":  # raw ids, even numeric strings like "50", need the index
            raise TypeError("without item_index, histories must hold integer item indices 1..num_items, got "
                            f"{flat_raw[0]!r}; pass the model's item_index to give raw ids")
        bad = (flat < 1) | (flat > num_items)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(f"item index {flat[first]} of user {users[owners[first]]!r} is outside 1..{num_items}")
    if bad.any():  # unknown == "skip"
        flat, owners = flat[~bad], owners[~bad]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owners, minlength=len(users)))]).astype(np.int64)
    return flat.astype(np.int64), offsets


@torch.no_grad()
def recommend(model: Any, histories: Any, k: int = 10, *, item_index: ItemIndex | None = None,
              exclude_seen: bool = True, unknown: Literal["error", "skip"] = "error", max_len: int | None = None,
              batch_size: int = 256, device: str | torch.device | None = None) -> Recommendations:
    """Top-``k`` next items for each history.

    ``histories``: a mapping user -> chronological items, a list of such sequences, an
    ``InteractionData`` (every user's whole history, by timestamp), or a 2-D integer array or tensor
    of item indices, one row per user, 0 = padding (a batch as the model takes it). Items are raw
    ids when ``item_index`` (the index the model was trained with) is given, except in a 2-D array,
    else 1-based item indices; ``item_index`` also names the recommended items.
    ``unknown``: raw ids the index lacks raise (``"error"``) or are dropped (``"skip"``).
    ``exclude_seen`` leaves out every item of the user's history, not only those in the window.
    ``max_len``: input window (default: the model's ``max_len``, else the longest history).
    An empty history is scored as an all-padding input."""
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    n_items = int(model.num_items)
    if item_index is not None and len(item_index) != n_items:
        raise ValueError(f"item_index has {len(item_index)} items but the model scores {n_items}")
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be in 1..{n_items} (the model's item count), got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    users, flat_raw, raw_lengths, are_indices = _flatten_histories(histories)
    flat, offsets = _index_histories(users, flat_raw, raw_lengths, n_items, item_index, unknown, are_indices)
    lengths = np.diff(offsets)  # after unknown items were skipped
    L = max_len if max_len is not None else (model_max_len(model) or int(lengths.max(initial=1)))
    if L < 1:
        raise ValueError(f"max_len must be >= 1, got {L}")
    windows = torch.from_numpy(gather_left_padded(flat, np.maximum(offsets[:-1], offsets[1:] - L), offsets[1:], L))
    dev = torch.device(device) if device is not None else model_device(model)
    U = len(users)
    top_idx = np.zeros((U, k), dtype=np.int64)
    top_scores = np.full((U, k), -np.inf, dtype=np.float32)
    was_training = getattr(model, "training", None)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        for b in range(0, U, batch_size):
            e = min(b + batch_size, U)
            seq = windows[b:e].to(dev)
            scores = model.full_scores(model.user_state(seq, seq == 0)).float()
            if scores.shape != (e - b, n_items + 1):
                raise ValueError(f"full_scores returned shape {tuple(scores.shape)}, expected ({e - b}, {n_items + 1})")
            scores = torch.nan_to_num(scores, nan=float("-inf"))  # a copy: the model's tensor stays as it is
            scores[:, 0] = float("-inf")
            if exclude_seen:
                rows = torch.from_numpy(np.repeat(np.arange(e - b), lengths[b:e])).to(dev)
                cols = torch.from_numpy(flat[offsets[b]:offsets[e]]).to(dev)
                scores[rows, cols] = float("-inf")
            values, idx = scores.topk(k, dim=1)
            values, idx = values.cpu().numpy(), idx.cpu().numpy()
            idx[np.isneginf(values)] = 0  # nothing left to recommend
            top_idx[b:e], top_scores[b:e] = idx, values
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
    return Recommendations(users, top_idx, top_scores, item_index)
