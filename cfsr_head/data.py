"""Datasets for sequential recommendation: the uniform folder layout, raw MovieLens and Amazon 2014
files, and filters. The id map and the leave-one-out split are in ``split.py``, checked downloads
in ``download.py``. Raw ids are always read as strings (``"007"`` stays ``"007"``).
"""
from __future__ import annotations

import ast
import gzip
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "InteractionData", "load_dataset", "load_movielens_raw", "load_amazon2014", "kcore_filter",
    "drop_short_users", "default_data_dir", "default_cache_dir",
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


def sort_within_user(df: pd.DataFrame) -> pd.DataFrame:
    """Users in order of first appearance; within a user by timestamp, ties keep file order."""
    codes, _ = pd.factorize(df["user_id"], sort=False)
    ts = df["timestamp"].to_numpy(dtype=np.float64)
    order = np.lexsort((np.arange(len(df)), ts, codes))  # lexsort is stable; last key is primary
    return df.iloc[order].reset_index(drop=True)


def normalise_interactions(df: pd.DataFrame, source: str, duplicates: DuplicatePolicy) -> pd.DataFrame:
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
    return sort_within_user(df)


def read_csv_columns(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """A CSV read as str columns (empty cells NaN); names the file and any column of ``required`` missing."""
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
    inter = read_csv_columns(inter_path, REQUIRED_INTERACTION_COLUMNS)
    items = read_csv_columns(items_path, ("item_id",))
    items["item_id"] = items["item_id"].astype(str).str.strip()
    if items["item_id"].duplicated().any():
        dup = items.loc[items["item_id"].duplicated(), "item_id"].head(5).tolist()
        raise ValueError(f"{items_path}: duplicated item_id values, e.g. {dup}")
    inter = normalise_interactions(inter, str(inter_path), duplicates)
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
    inter = normalise_interactions(inter[["user_id", "item_id", "timestamp", "rating"]], str(data_path), duplicates)
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
    inter = normalise_interactions(inter, str(reviews_path), duplicates)
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
