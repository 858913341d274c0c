"""The unit tests' tiny learnable dataset: each user reads a run of items, item i followed by i+1."""
from __future__ import annotations

import numpy as np
import pandas as pd


def cyclic_interactions(n_items: int = 30, n_users: int = 120, seed: int = 0) -> pd.DataFrame:
    """user_id, item_id ("i<k>"), timestamp: each user a run of 5-11 items from a random start,
    item i followed by item i + 1 (wrapping), so the next item is always learnable."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start, length = rng.integers(0, n_items), rng.integers(5, 12)
        rows += [(f"u{u}", f"i{(start + t) % n_items}", t) for t in range(length)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def write_dataset_folder(folder, interactions: pd.DataFrame) -> list[str]:
    """A dataset folder in the project's layout: ``interactions.csv`` as given and an
    ``items.csv`` with a title per item; returns the item ids, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    interactions.to_csv(folder / "interactions.csv", index=False)
    ids = sorted(set(interactions["item_id"]))
    pd.DataFrame({"item_id": ids, "title": [f"item {i}" for i in ids]}).to_csv(folder / "items.csv", index=False)
    return ids
