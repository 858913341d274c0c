"""Do item-embedding neighbourhoods match what users interact with next? Frozen vs CFT embeddings.

A cheap check, before any stage-2 training, of whether contrastive fine-tuning moved the item
embeddings towards or away from the sequential signal: over training transitions (each user's
history without the last two items, which leave-one-out keeps for validation and test),

- ``next@k``: how often the next item is among the k nearest neighbours (cosine) of the previous
  one, over all items;
- ``AUC``: how often a consecutive pair is more similar than a random pair of items.
With ``--held-out`` the transitions into leave-one-out's validation items are scored instead (for
embeddings fine-tuned with collaborative positives, which have seen the training transitions).

By default it reads every embedding file the study cached for the dataset
(``runs/reproduce/<dataset>/embeddings``; each file's training metadata says frozen, CFT or pair
CFT) and prints each tuned file's ratio to the frozen one::

    python -m benchmarks.bench_neighbours --dataset amazon_beauty
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.reproduce import REPO_ROOT
from cfsr_head import load_dataset
from llm_item_embed import ItemEmbeddings


def _ranked_from_end(dataset: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Interactions in (user, time) order and each one's position from the end of its user's history."""
    inter = load_dataset(dataset).interactions.sort_values(["user_id", "timestamp"], kind="stable")
    return inter, inter.groupby("user_id").cumcount(ascending=False).to_numpy()


def training_transitions(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(previous item id, next item id) for consecutive interactions, last two per user held out."""
    inter, rank_from_end = _ranked_from_end(dataset)
    inter = inter[rank_from_end >= 2]
    users, items = inter["user_id"].to_numpy(), inter["item_id"].to_numpy()
    same = users[1:] == users[:-1]
    return items[:-1][same], items[1:][same]


def held_out_transitions(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(previous item id, validation item id) per user: the transition into leave-one-out's
    validation item, which neither stage 2 nor a CFT with ``sequence_pairs(holdout_last=2)`` trains on."""
    inter, rank_from_end = _ranked_from_end(dataset)
    prev, nxt = inter[rank_from_end == 2], inter[rank_from_end == 1]
    both = np.intersect1d(prev["user_id"].to_numpy(), nxt["user_id"].to_numpy())
    prev, nxt = prev.set_index("user_id").loc[both], nxt.set_index("user_id").loc[both]
    return prev["item_id"].to_numpy(), nxt["item_id"].to_numpy()


def neighbour_scores(emb: ItemEmbeddings, prev: np.ndarray, nxt: np.ndarray, k: int = 10,
                     n_queries: int = 5000, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    X = emb.numpy().astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True).clip(min=1e-12)
    a, b = np.asarray(emb.index_of(list(prev))), np.asarray(emb.index_of(list(nxt)))
    keep = a != b  # repeated consumption says nothing about neighbourhoods
    a, b = a[keep], b[keep]
    pick = rng.choice(len(a), size=min(n_queries, len(a)), replace=False)
    hits = 0
    for chunk in np.array_split(pick, max(1, len(pick) // 500)):
        sims = X[a[chunk]] @ X.T
        sims[np.arange(len(chunk)), a[chunk]] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        hits += int((top == b[chunk][:, None]).any(axis=1).sum())
    pos = (X[a] * X[b]).sum(axis=1)
    pairs = rng.integers(0, len(X), size=(len(a), 2))
    neg = (X[pairs[:, 0]] * X[pairs[:, 1]]).sum(axis=1)
    auc = float((pos[:, None] > rng.choice(neg, size=256)[None, :]).mean())
    return {f"next@{k}": hits / len(pick), "AUC": auc, "cos next": float(pos.mean()), "cos random": float(neg.mean())}


def embeddings_label(emb: ItemEmbeddings) -> str:
    """"frozen", "CFT (N steps)" or "pair CFT (N steps)" from the file's metadata (files written before
    the metadata carried the training summary: from the study's fit_seconds)."""
    training = emb.metadata.get("training")
    if training is None:
        fit_s = float(emb.metadata.get("fit_seconds", 0) or 0)
        return "frozen" if fit_s == 0 else f"CFT ({fit_s:.0f} s)"
    if not training:
        return "frozen"
    return f"{'pair CFT' if training.get('positive_pairs') else 'CFT'} ({training.get('steps', '?')} steps)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset folder, or a name under CFSR_DATA_DIR")
    p.add_argument("--embeddings", nargs="+", default=None,
                   help="embedding files (default: every file the study cached for the dataset)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--held-out", action="store_true",
                   help="score the transitions into the validation items instead of the training ones (use "
                        "this for embeddings fine-tuned on training transitions, e.g. pair_prob > 0)")
    a = p.parse_args(argv)
    files = [Path(f) for f in a.embeddings] if a.embeddings else sorted(
        (REPO_ROOT / "runs" / "reproduce" / Path(a.dataset).name / "embeddings").glob("*.safetensors"))
    if not files:
        p.error("no embedding files: run benchmarks.reproduce on the dataset first or pass --embeddings")
    prev, nxt = (held_out_transitions if a.held_out else training_transitions)(a.dataset)
    print(f"{Path(a.dataset).name}: {len(prev)} {'held-out' if a.held_out else 'training'} transitions, k={a.k}")
    rows = []
    for f in files:
        emb = ItemEmbeddings.load(f)
        rows.append((embeddings_label(emb), f.name, neighbour_scores(emb, prev, nxt, k=a.k)))
    frozen = next((r for r in rows if r[0] == "frozen"), None)
    for label, name, s in rows:
        ratio = ""
        if frozen is not None and label != "frozen":
            ratio = "  ratio to frozen: " + ", ".join(f"{m} {s[m] / frozen[2][m]:.2f}x" for m in (f"next@{a.k}", "AUC"))
        print(f"  {label:<14} {name:<28} " + "  ".join(f"{m} {v:.3f}" for m, v in s.items()) + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
