"""Do item-embedding neighbourhoods match what users interact with next? Frozen vs CFT embeddings.

A cheap check, before any stage-2 training, of whether contrastive fine-tuning moved the item
embeddings towards or away from the sequential signal: over training transitions (each user's
history without the last two items, which leave-one-out keeps for validation and test),

- ``next@k``: how often the next item is among the k nearest neighbours (cosine) of the previous
  one, over all items;
- ``AUC``: how often a consecutive pair is more similar than a random pair of items.
With ``--held-out`` the transitions into leave-one-out's validation items are scored instead (for
embeddings fine-tuned with collaborative positives, which have seen the training transitions).
``--by-popularity`` splits ``next@k`` by the next item's group (tail / head item, the evaluation's
``GroupSpec`` on training counts). ``--reference`` adds two rows to read the text models against: a
purely collaborative embedding of the same items (``llm_item_embed.cooccurrence_embeddings`` of the
training histories: truncated SVD of the positive PMI of items near each other) and the best linear map from each
frozen text embedding onto it (``linear_map``, ridge regression), i.e. how much of the
collaborative neighbourhood a text model could reach by a linear readout.

By default it reads every embedding file the study cached for the dataset
(``runs/reproduce/<dataset>/embeddings``; each file's training metadata says frozen, CFT or pair
CFT) and prints each tuned file's ratio to the frozen one::

    python -m benchmarks.bench_neighbours --dataset amazon_beauty
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.reproduce import REPO_ROOT
from cfsr_head import GroupSpec, leave_one_out, load_dataset
from llm_item_embed import ItemEmbeddings, cooccurrence_embeddings
from llm_item_embed.evaluation import neighbour_scores, next_item_transitions


def tail_items(dataset: str) -> set[str]:
    """Ids of the evaluation's tail items: below the head threshold of ``GroupSpec`` on training counts."""
    split = leave_one_out(load_dataset(dataset))
    threshold, _ = GroupSpec().thresholds(split)
    pop = split.item_popularity[1:]
    return set(np.asarray(split.item_index.ids)[pop < threshold].tolist())


def fit_linear_map(source: ItemEmbeddings, target: ItemEmbeddings, alpha: float = 1.0):
    """Ridge regression of ``target`` on ``source`` (rows matched by id), fitted on the items with a
    non-zero target row; returns the fitted ``sklearn.linear_model.Ridge``."""
    from sklearn.linear_model import Ridge

    x = source.numpy().astype(np.float32)
    y = target.numpy()[np.asarray(target.index_of(list(source.ids)))]
    fit = np.linalg.norm(y, axis=1) > 0
    return Ridge(alpha=alpha).fit(x[fit], y[fit])


def linear_map(source: ItemEmbeddings, target: ItemEmbeddings, alpha: float = 1.0) -> ItemEmbeddings:
    """``source`` mapped onto ``target`` by :func:`fit_linear_map`, for every item (the best linear
    readout of the target from the source)."""
    pred = fit_linear_map(source, target, alpha).predict(source.numpy().astype(np.float32)).astype(np.float32)
    return ItemEmbeddings(list(source.ids), pred, {"reference": "linear map"})


def embeddings_label(emb: ItemEmbeddings) -> str:
    """"frozen", "CFT (N steps)", "pair CFT (N steps)", "target CFT (N steps)", "target CFT + views
    (N steps)", "co-occurrence" or "linear map" from the file's metadata (files written before the
    metadata carried the training summary: from the study's fit_seconds)."""
    if "reference" in emb.metadata:
        return str(emb.metadata["reference"])
    if "collaborative" in emb.metadata:
        return "co-occurrence"
    training = emb.metadata.get("training")
    if training is None:
        fit_s = float(emb.metadata.get("fit_seconds", 0) or 0)
        return "frozen" if fit_s == 0 else f"CFT ({fit_s:.0f} s)"
    if not training:
        return "frozen"
    targets = training.get("targets")
    kind = "pair CFT" if training.get("positive_pairs") else "target CFT" if targets else "CFT"
    if targets and targets.get("view_weight", 0):
        kind += " + views"  # the paper's InfoNCE between views kept beside the alignment
    return f"{kind} ({training.get('steps', '?')} steps)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset folder, or a name under CFSR_DATA_DIR")
    p.add_argument("--embeddings", nargs="+", default=None,
                   help="embedding files (default: every file the study cached for the dataset)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--held-out", action="store_true",
                   help="score the transitions into the validation items instead of the training ones (use "
                        "this for embeddings fine-tuned on training transitions, e.g. pair_prob > 0)")
    p.add_argument("--by-popularity", action="store_true",
                   help="also next@k over transitions into tail items and into head items (evaluation groups)")
    p.add_argument("--reference", action="store_true",
                   help="add a co-occurrence embedding of the training histories and its linear readout from "
                        "each frozen text embedding")
    p.add_argument("--queries", type=int, default=5000, help="transitions sampled for next@k")
    a = p.parse_args(argv)
    files = [Path(f) for f in a.embeddings] if a.embeddings else sorted(
        (REPO_ROOT / "runs" / "reproduce" / Path(a.dataset).name / "embeddings").glob("*.safetensors"))
    if not files:
        p.error("no embedding files: run benchmarks.reproduce on the dataset first or pass --embeddings")
    interactions = load_dataset(a.dataset).interactions
    prev, nxt = next_item_transitions(interactions, holdout_last=2, held_out=a.held_out)
    print(f"{Path(a.dataset).name}: {len(prev)} {'held-out' if a.held_out else 'training'} transitions, k={a.k}")
    tail = tail_items(a.dataset) if a.by_popularity else None
    loaded = [(f.name, ItemEmbeddings.load(f)) for f in files]
    if a.reference:
        collab = cooccurrence_embeddings(interactions, ids=list(loaded[0][1].ids),
                                         holdout_last=2)
        readouts = [(f"{name} (linear map)", linear_map(emb, collab)) for name, emb in loaded
                    if embeddings_label(emb) == "frozen"]
        loaded += [("co-occurrence", collab), *readouts]
    rows = []
    for name, emb in loaded:
        groups = None if tail is None else {"tail": tail, "head": set(emb.ids) - tail}
        rows.append((embeddings_label(emb), name, neighbour_scores(emb, prev, nxt, k=a.k, max_queries=a.queries,
                                                                   groups=groups)))
    frozen = next((r for r in rows if r[0] == "frozen"), None)
    for label, name, s in rows:
        ratio = ""
        if frozen is not None and label != "frozen":
            ratio = "  ratio to frozen: " + ", ".join(f"{m} {s[m] / frozen[2][m]:.2f}x" for m in s
                                                      if m.startswith("next@") or m == "AUC")
        print(f"  {label:<26} {name:<40} " + "  ".join(f"{m} {v:.3f}" for m, v in s.items()) + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
