"""Datasets for sequential recommendation: loading, filtering, id maps, leave-one-out split, batching
and checked downloads.

Conventions (see ``docs/architecture.md``): items are indexed ``1..N`` with ``0`` as padding;
sequences handed to models are **left-padded** (most recent item at position ``L-1``);
``padding_mask`` is ``item_seq == 0``. Raw ids are always strings.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from .io import atomic_write_json, make_staging_dir, read_json

__all__ = [
    "InteractionData", "load_dataset", "load_movielens_raw", "load_amazon2014", "kcore_filter",
    "drop_short_users", "ItemIndex", "SplitData", "leave_one_out", "align_semantic",
    "default_data_dir", "default_cache_dir", "RemoteFile", "DatasetSpec", "DATASET_REGISTRY",
    "download_dataset",
]

REQUIRED_INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
DuplicatePolicy = Literal["drop", "keep", "error"]


# --------------------------------------------------------------------------------------------
# locations
# --------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """Datasets folder: ``$CFSR_DATA_DIR``, else ``../shared/data`` from the current directory,
    else ``../shared/data`` beside the repository root that holds this package."""
    env = os.environ.get("CFSR_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cwd_candidate = Path.cwd().parent / "shared" / "data"
    if cwd_candidate.is_dir():
        return cwd_candidate
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def default_cache_dir() -> Path:
    """Download cache: ``$CFSR_CACHE_DIR``, else ``~/.cache/cfsr_head``."""
    env = os.environ.get("CFSR_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cfsr_head"


# --------------------------------------------------------------------------------------------
# interaction tables
# --------------------------------------------------------------------------------------------
@dataclass
class InteractionData:
    """Interactions (``user_id``, ``item_id`` as str, numeric ``timestamp``, extra columns kept)
    plus an optional item attribute table (``item_id`` + text columns)."""

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    name: str = ""

    @property
    def num_users(self) -> int:
        return int(self.interactions["user_id"].nunique())

    @property
    def num_items(self) -> int:
        return int(self.interactions["item_id"].nunique())

    @property
    def num_interactions(self) -> int:
        return int(len(self.interactions))

    def stats(self) -> dict[str, int]:
        """``{"users", "items", "interactions"}`` counted over the interactions."""
        return {"users": self.num_users, "items": self.num_items, "interactions": self.num_interactions}


def _sort_within_user(df: pd.DataFrame) -> pd.DataFrame:
    """Users in order of first appearance; within a user by timestamp, ties keep file order."""
    codes, _ = pd.factorize(df["user_id"], sort=False)
    ts = df["timestamp"].to_numpy(dtype=np.float64)
    order = np.lexsort((np.arange(len(df)), ts, codes))  # lexsort is stable; last key is primary
    return df.iloc[order].reset_index(drop=True)


def _normalise_interactions(df: pd.DataFrame, source: str, duplicates: DuplicatePolicy) -> pd.DataFrame:
    """Check columns and values, make ids str and timestamps numeric, handle duplicates, sort."""
    missing = [c for c in REQUIRED_INTERACTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {list(df.columns)}")
    df = df.copy()
    for col in ("user_id", "item_id"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            rows = np.flatnonzero(empty.to_numpy())[:5].tolist()
            raise ValueError(f"{source}: {int(empty.sum())} empty value(s) in column {col!r} (rows {rows})")
        df[col] = df[col].astype(str).str.strip()
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    bad = ts.isna()
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())[:5].tolist()
        examples = df["timestamp"].iloc[rows].tolist()
        raise ValueError(f"{source}: {int(bad.sum())} non-numeric/empty timestamp(s) in column "
                         f"'timestamp' (rows {rows}: {examples})")
    if (ts == ts.round()).all() and ts.abs().max() < 2**62:
        ts = ts.astype(np.int64)
    df["timestamp"] = ts
    if "rating" in df.columns:
        df["rating"] = pd.to_numeric(df["rating"], errors="coerce")
    if duplicates not in ("drop", "keep", "error"):
        raise ValueError(f"duplicates must be 'drop', 'keep' or 'error', got {duplicates!r}")
    dup = df.duplicated(subset=list(REQUIRED_INTERACTION_COLUMNS), keep="first")
    n_dup = int(dup.sum())
    if n_dup and duplicates == "error":
        ex = df.loc[dup, list(REQUIRED_INTERACTION_COLUMNS)].head(3).to_dict("records")
        raise ValueError(f"{source}: {n_dup} duplicate interaction(s) (same user_id, item_id, timestamp), e.g. {ex}")
    if n_dup and duplicates == "drop":
        warnings.warn(f"{source}: dropped {n_dup} duplicate interaction(s) (same user_id, item_id, timestamp)",
                      stacklevel=3)
        df = df.loc[~dup]
    return _sort_within_user(df)


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError as exc:
        raise ValueError(f"{path} is empty") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def load_dataset(folder_or_name: str | os.PathLike, *, duplicates: DuplicatePolicy = "drop") -> InteractionData:
    """Load the uniform layout: ``items.csv`` (``item_id`` + text columns) and ``interactions.csv``
    (``user_id,item_id,timestamp`` [+ ``rating``]). A bare name (``"ml-100k"``) is looked up under
    :func:`default_data_dir`. Ids are read as strings (``"007"`` stays ``"007"``).
    ``duplicates``: ``"drop"`` (warn with the count), ``"keep"`` or ``"error"``."""
    folder = Path(folder_or_name).expanduser()
    if not folder.is_dir():
        root = default_data_dir()
        candidate = root / str(folder_or_name)
        if not candidate.is_dir():
            avail = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(f"dataset {str(folder_or_name)!r} not found: neither {folder} nor {candidate} "
                                    f"is a folder (available under {root}: {avail})")
        folder = candidate
    inter_path = folder / "interactions.csv"
    items_path = folder / "items.csv"
    for p in (inter_path, items_path):
        if not p.is_file():
            raise FileNotFoundError(f"dataset folder {folder} is missing file {p.name} ({p})")
    inter = _read_csv(inter_path, REQUIRED_INTERACTION_COLUMNS)
    items = _read_csv(items_path, ("item_id",))
    items["item_id"] = items["item_id"].astype(str).str.strip()
    if items["item_id"].duplicated().any():
        dup = items.loc[items["item_id"].duplicated(), "item_id"].head(5).tolist()
        raise ValueError(f"{items_path}: duplicated item_id values, e.g. {dup}")
    inter = _normalise_interactions(inter, str(inter_path), duplicates)
    return InteractionData(inter, items.reset_index(drop=True), name=folder.name)


# --------------------------------------------------------------------------------------------
# raw formats
# --------------------------------------------------------------------------------------------
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def load_movielens_raw(folder: str | os.PathLike, *, duplicates: DuplicatePolicy = "drop") -> InteractionData:
    """Raw MovieLens-100K: ``u.data`` (tab-separated ``user item rating timestamp``) and ``u.item``
    (pipe-separated, latin-1: id|title|release date|video date|url|19 genre flags)."""
    folder = Path(folder)
    data_path, item_path = folder / "u.data", folder / "u.item"
    for p in (data_path, item_path):
        if not p.is_file():
            raise FileNotFoundError(f"MovieLens folder {folder} is missing file {p.name} ({p})")
    inter = pd.read_csv(data_path, sep="\t", header=None, dtype=str,
                        names=["user_id", "item_id", "rating", "timestamp"])
    if inter[["user_id", "item_id", "rating", "timestamp"]].isna().any().any():
        raise ValueError(f"{data_path}: expected 4 tab-separated fields per line (user item rating timestamp)")
    inter = _normalise_interactions(inter[["user_id", "item_id", "timestamp", "rating"]], str(data_path), duplicates)
    raw = pd.read_csv(item_path, sep="|", header=None, dtype=str, encoding="latin-1",
                      keep_default_na=False, na_values=[""])
    if raw.shape[1] < 5:
        raise ValueError(f"{item_path}: expected pipe-separated fields id|title|release date|...")
    genre_names = ML100K_GENRES
    genre_path = folder / "u.genre"
    if genre_path.is_file():
        g = pd.read_csv(genre_path, sep="|", header=None, dtype=str, encoding="latin-1").dropna()
        genre_names = g.sort_values(1, key=lambda s: s.astype(int))[0].tolist()
    flags = raw.iloc[:, 5:5 + len(genre_names)].fillna("0").to_numpy() == "1"
    genres = [", ".join(np.asarray(genre_names[: flags.shape[1]])[row].tolist()) for row in flags]
    title = raw[1].fillna("").astype(str)
    year_in_title = title.str.extract(r"\((\d{4})\)\s*$")[0]
    year_from_date = raw[2].fillna("").astype(str).str.extract(r"(\d{4})\s*$")[0]
    items = pd.DataFrame({
        "item_id": raw[0].astype(str).str.strip(),
        "title": title.str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True).str.strip(),
        "year": year_in_title.fillna(year_from_date),
        "genres": genres,
    })
    return InteractionData(inter, items, name="ml-100k")


def _open_text(path: Path):
    """Open a plain or gzip text file (detected by magic bytes)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _parse_record(line: str, path: Path, lineno: int) -> dict:
    """One JSON object per line, or (Amazon 2014 metadata) one Python literal dict; never eval."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{path}:{lineno}: neither JSON nor a Python literal: {line[:80]!r}") from exc
    if not isinstance(rec, dict):
        raise ValueError(f"{path}:{lineno}: expected an object/dict per line, got {type(rec).__name__}")
    return rec


def load_amazon2014(reviews_path: str | os.PathLike, meta_path: str | os.PathLike | None = None, *,
                    duplicates: DuplicatePolicy = "drop", name: str = "") -> InteractionData:
    """Raw Amazon 2014 review JSON lines (``reviewerID``, ``asin``, ``unixReviewTime``, ``overall``)
    and optional metadata (Python-literal or JSON lines; ``asin``, ``title``, ``brand``,
    ``categories``, ``price``, ``description``). Plain or gzip files. Only metadata of reviewed
    items is kept; ``categories`` paths are joined with ``" > "`` and several paths with ``" | "``."""
    reviews_path = Path(reviews_path)
    if not reviews_path.is_file():
        raise FileNotFoundError(f"missing file {reviews_path}")
    users, items, times, ratings = [], [], [], []
    with _open_text(reviews_path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = _parse_record(line, reviews_path, lineno)
            try:
                users.append(rec["reviewerID"])
                items.append(rec["asin"])
                times.append(rec["unixReviewTime"])
            except KeyError as exc:
                raise ValueError(f"{reviews_path}:{lineno}: missing field {exc.args[0]!r}") from exc
            ratings.append(rec.get("overall", np.nan))
    inter = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": times, "rating": ratings})
    inter = _normalise_interactions(inter, str(reviews_path), duplicates)
    items_df = None
    if meta_path is not None:
        meta_path = Path(meta_path)
        if not meta_path.is_file():
            raise FileNotFoundError(f"missing file {meta_path}")
        wanted = set(inter["item_id"].unique())
        rows = []
        with _open_text(meta_path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                rec = _parse_record(line, meta_path, lineno)
                asin = str(rec.get("asin", ""))
                if asin not in wanted:
                    continue
                cats = rec.get("categories")
                if isinstance(cats, list):
                    cats = " | ".join(" > ".join(map(str, p)) if isinstance(p, list) else str(p) for p in cats)
                desc = rec.get("description")
                if isinstance(desc, list):
                    desc = " ".join(map(str, desc))
                price = rec.get("price")
                rows.append({"item_id": asin, "title": rec.get("title"), "brand": rec.get("brand"),
                             "categories": cats, "price": None if price is None else str(price),
                             "description": desc})
        items_df = pd.DataFrame(rows, columns=["item_id", "title", "brand", "categories", "price", "description"])
        items_df = items_df.drop_duplicates("item_id").reset_index(drop=True)
    return InteractionData(inter, items_df, name=name or reviews_path.name.split(".")[0])


# --------------------------------------------------------------------------------------------
# filtering
# --------------------------------------------------------------------------------------------
def kcore_filter(data: InteractionData, k: int, *, item_k: int | None = None) -> InteractionData:
    """Iteratively drop users with < ``k`` and items with < ``item_k`` (default ``k``) interactions
    until stable. The items table is kept unchanged."""
    item_k = k if item_k is None else item_k
    df = data.interactions
    while True:
        ucount = df.groupby("user_id", sort=False)["item_id"].transform("size")
        icount = df.groupby("item_id", sort=False)["user_id"].transform("size")
        keep = (ucount >= k) & (icount >= item_k)
        if keep.all():
            break
        df = df.loc[keep]
    return InteractionData(df.reset_index(drop=True), data.items, data.name)


def drop_short_users(data: InteractionData, min_len: int = 3) -> InteractionData:
    """Drop users with fewer than ``min_len`` interactions (warns with the count)."""
    counts = data.interactions.groupby("user_id", sort=False)["item_id"].transform("size")
    keep = counts >= min_len
    n_users = int(data.interactions.loc[~keep, "user_id"].nunique())
    if n_users:
        warnings.warn(f"dropped {n_users} user(s) with fewer than {min_len} interactions", stacklevel=2)
    return InteractionData(data.interactions.loc[keep].reset_index(drop=True), data.items, data.name)


# --------------------------------------------------------------------------------------------
# id map
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------
def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _gather_left_padded(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
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


def _sample_excluding(rng: np.random.Generator, rows: np.ndarray, num_items: int, keys: np.ndarray,
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
            self._cache["sequences"] = _gather_left_padded(
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
        rng = _as_rng(rng)
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
            inp = _gather_left_padded(self.items, starts[sel], ends[sel] - 1, L)
            pos = _gather_left_padded(self.items, starts[sel] + 1, ends[sel], L)
            valid = pos > 0
            row_of = np.broadcast_to(rows[sel][:, None], pos.shape)[valid]
            if n_negatives == 1:
                neg = np.zeros_like(pos)
                neg[valid] = _sample_excluding(rng, row_of, self.num_items, keys)
            else:
                neg = np.zeros((*pos.shape, n_negatives), dtype=np.int64)
                neg[valid] = _sample_excluding(rng, np.repeat(row_of[:, None], n_negatives, axis=1),
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
        seq = _gather_left_padded(self.items, starts, ends, L)
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
    df = _sort_within_user(data.interactions)
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


# --------------------------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """One public file: where, under which local name, and its SHA-256 (None: not verified)."""

    url: str
    filename: str
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A downloadable dataset: its files, the loader (``"movielens"`` or ``"amazon2014"``) and the
    statistics expected after loading (``users``, ``items``, ``interactions``)."""

    name: str
    files: tuple[RemoteFile, ...]
    loader: Literal["movielens", "amazon2014"]
    expected: Mapping[str, int] = field(default_factory=dict)


# Amazon 2014 files: the UCSD page jmcauley.ucsd.edu/data/amazon/links.html links to these SNAP URLs.
# SHA-256 values are None because they could not be verified offline when this was written;
# pass ``sha256=`` to download_dataset (or fill them in here) to enforce them. The statistics are
# the published ones of these exact files and are always checked.
DATASET_REGISTRY: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        "ml-100k",
        (RemoteFile("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "ml-100k.zip", None),),
        "movielens", {"users": 943, "items": 1682, "interactions": 100000}),
    "amazon-beauty-2014": DatasetSpec(
        "amazon-beauty-2014",
        (RemoteFile("http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz", "reviews_Beauty_5.json.gz", None),
         RemoteFile("http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz", "meta_Beauty.json.gz", None)),
        "amazon2014", {"users": 22363, "items": 12101, "interactions": 198502}),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, sha256: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed with an HTTP Range request when the
    server supports it), verify ``sha256``, then rename. An existing ``dest`` with the right
    checksum is reused."""
    if not url.startswith(("http://", "https://", "file://")):
        raise ValueError(f"unsupported URL scheme: {url}")
    if dest.is_file():
        if sha256 is None or _sha256(dest) == sha256.lower():
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            mode = "ab" if have and getattr(resp, "status", 200) == 206 else "wb"
            with open(part, mode) as fh:
                shutil.copyfileobj(resp, fh, 1 << 20)
    except urllib.error.HTTPError as exc:
        if not (exc.code == 416 and have):  # 416: the partial file is already complete
            raise ConnectionError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except OSError as exc:
        raise ConnectionError(f"download of {url} failed: {exc} (partial data kept in {part}; rerun to resume)") from exc
    if sha256 is not None:
        got = _sha256(part)
        if got != sha256.lower():
            part.unlink(missing_ok=True)
            raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {got} "
                             "(the download was deleted)")
    os.replace(part, dest)
    return dest


def _extract_zip(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` atomically (temp folder + rename); rejects unsafe paths."""
    if target.is_dir():
        return target
    tmp = make_staging_dir(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                p = Path(member)
                if p.is_absolute() or ".." in p.parts:
                    raise ValueError(f"{archive}: unsafe path in archive: {member!r}")
            zf.extractall(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def download_dataset(name: str, cache_dir: str | os.PathLike | None = None,
                     url: str | Mapping[str, str] | None = None,
                     sha256: str | Mapping[str, str] | None = None, *,
                     expected: Mapping[str, int] | None = None,
                     registry: Mapping[str, DatasetSpec] | None = None) -> InteractionData:
    """Download a registered dataset's public raw files into ``cache_dir/name`` (default
    :func:`default_cache_dir`), verify checksums, load it and verify the expected statistics.

    ``url`` / ``sha256`` override the registry: a string for a one-file dataset, or a mapping
    filename -> value. ``expected`` overrides the statistics (``{}`` skips the check)."""
    registry = DATASET_REGISTRY if registry is None else registry
    if name not in registry:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(registry)}")
    spec = registry[name]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)

    def pick(over, f: RemoteFile, default):
        if over is None:
            return default
        if isinstance(over, str):
            if len(spec.files) != 1:
                raise ValueError(f"{name} has {len(spec.files)} files; pass a mapping filename -> value")
            return over
        return over.get(f.filename, default)

    paths = [_fetch(pick(url, f, f.url), folder / f.filename, pick(sha256, f, f.sha256)) for f in spec.files]
    if spec.loader == "movielens":
        root = _extract_zip(paths[0], folder / "extracted")
        hits = sorted(root.rglob("u.data"))
        if not hits:
            raise FileNotFoundError(f"{paths[0]}: no u.data inside the archive")
        data = load_movielens_raw(hits[0].parent)
    elif spec.loader == "amazon2014":
        data = load_amazon2014(paths[0], paths[1] if len(paths) > 1 else None, name=name)
    else:
        raise ValueError(f"unknown loader {spec.loader!r}")
    data.name = name
    want = dict(spec.expected if expected is None else expected)
    got = data.stats()
    bad = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != v}
    if bad:
        detail = ", ".join(f"{k}: expected {v[0]}, got {v[1]}" for k, v in bad.items())
        raise ValueError(f"dataset {name} in {folder} does not have the expected statistics ({detail})")
    return data
