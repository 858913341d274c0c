"""Does the neighbourhood check rank CFT runs the way stage 2 does?

``llm-item-embed evaluate`` / ``neighbour_scores`` score embeddings in seconds, before any recommender
is trained. This script asks whether those scores predict the stage-2 results of the runs the study
trained on each embedding file: among the rows whose runs each fitted their own CFT
(``--stage1-seed-per-run`` pages, the r/K sensitivity with several runs a point), does a CFT run with
a higher ``next@10`` (or AUC) give a better validation or test N@10?

Each cached CFT file's stage-1 settings are read back from its metadata and checked against its file
name (a file whose settings do not rebuild its name is skipped and counted), which links it to the
stage-2 runs that used it (their records hold the settings' key). Within each row (variant and
stage-2 settings but the seed) with at least ``--min-files`` different CFT files, the scores and each
metric are standardised, then pooled over the rows: the Pearson r of the pooled values says whether
the check orders runs of one recipe. Nothing is trained::

    python -m benchmarks.bench_neighbours_runs --dataset amazon_beauty --held-out
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr

from benchmarks.reproduce import REPO_ROOT
from benchmarks.reproduce.settings import Stage1, config_hash, file_digest, stage1_key
from cfsr_head import default_data_dir, load_dataset
from llm_item_embed import ItemEmbeddings, neighbour_scores, next_item_transitions

METRICS = {"valid": ("valid", None, None), "full Overall": ("test", "full", "Overall"),
           "full Tail item": ("test", "full", "Tail item"), "sampled Overall": ("test", "sampled", "Overall"),
           "sampled Tail item": ("test", "sampled", "Tail item")}


def stage1_of(emb: ItemEmbeddings) -> Stage1 | None:
    """The study's stage-1 settings of a paper-CFT file, read from its metadata; None for frozen, pair
    and target files. A file whose model the study named differently (a wheel name for a path) will not
    rebuild its file name, and :func:`run_key` leaves it out."""
    meta = emb.metadata
    training = meta.get("training") or {}
    fit = training.get("fit_config") or {}
    backbone = meta.get("backbone") or {}
    if not training or training.get("positive_pairs") or training.get("targets"):
        return None
    return Stage1(model=backbone.get("model_name_or_path"), gguf_file=backbone.get("gguf_file"),
                  drop_prob=float(meta["drop_prob"]), n_views=int(meta["n_views"]), epochs=int(fit["epochs"]),
                  max_steps=fit.get("max_steps"), batch_size=int(fit["batch_size"]), lr=float(fit["lr"]),
                  max_length=int(backbone["max_length"]), pooling=str(meta.get("pooling", "mean")),
                  seed=int(fit["seed"]), similarity=str(meta.get("similarity", "dot")),
                  bidirectional=backbone.get("bidirectional"))


def run_key(path: Path, emb: ItemEmbeddings, items_digest: str) -> str | None:
    """The stage-1 key that the runs trained on this file hold, when the file's metadata rebuilds
    its name (``items_digest``: ``file_digest`` of the dataset's items.csv); None otherwise."""
    s1 = stage1_of(emb)
    if s1 is None or config_hash({"stage1": stage1_key(s1), "items": items_digest}) != path.stem:
        return None
    return config_hash(stage1_key(s1))


def metric_of(record: dict[str, Any], where: tuple[str, str | None, str | None]) -> float:
    part, protocol, group = where
    if part == "valid":
        return float(record["valid"]["Overall"]["NDCG@10"])
    return float(record["test"][protocol][group]["NDCG@10"])


def standardised(values: list[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return (v - v.mean()) / v.std() if v.std() > 0 else np.zeros_like(v)


def pooled_correlations(rows: dict[tuple[str, str], list[dict[str, Any]]], scores: dict[str, dict[str, float]],
                        min_files: int, next_name: str = "next@10") -> dict[str, Any]:
    """Per score (``next_name``, AUC) and metric, the Pearson ``(r, p)`` of the values standardised
    within each row, pooled over the rows that used at least ``min_files`` different embedding files;
    ``rows`` maps (variant, stage-2 settings) to run records, ``scores`` an embeddings key to its scores."""
    kept = [(row, records) for row, records in sorted(rows.items())
            if len({r["embeddings"] for r in records}) >= min_files]
    out: dict[str, Any] = {"rows": kept, "r": {}}
    if not kept:
        return out
    for score in (next_name, "AUC"):
        x = np.concatenate([standardised([scores[r["embeddings"]][score] for r in records]) for _, records in kept])
        out["r"][score] = {}
        for m, where in METRICS.items():
            y = np.concatenate([standardised([metric_of(r, where) for r in records]) for _, records in kept])
            result = pearsonr(x, y)
            out["r"][score][m] = (float(result.statistic), float(result.pvalue))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset folder, or a name under CFSR_DATA_DIR")
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "reproduce"), help="the study's run cache")
    p.add_argument("--held-out", action="store_true", help="score the transitions into the validation items")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--min-files", type=int, default=3, help="rows with at least this many different CFT files")
    a = p.parse_args(argv)
    dataset = Path(a.dataset) if Path(a.dataset).is_dir() else default_data_dir() / a.dataset
    workdir = Path(a.workdir)
    prev, nxt = next_item_transitions(load_dataset(dataset).interactions, holdout_last=2, held_out=a.held_out)
    items_digest = file_digest(dataset / "items.csv")
    scores: dict[str, dict[str, float]] = {}  # stage-1 key -> the file's scores
    skipped = 0
    for path in sorted((workdir / dataset.name / "embeddings").glob("*.safetensors")):
        emb = ItemEmbeddings.load(path)  # once per file: its metadata links it, its matrix is scored
        key = run_key(path, emb, items_digest)
        if key is not None:
            scores[key] = neighbour_scores(emb, prev, nxt, k=a.k)
        elif stage1_of(emb) is not None:
            skipped += 1
    rows: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for path in sorted((workdir / dataset.name / "runs").glob("*.json")):
        if path.name.count(".") > 1:  # per-user result files beside each run record
            continue
        record = json.loads(path.read_text())
        if record.get("embeddings") not in scores or not record.get("test"):
            continue
        stage2 = {k: v for k, v in record["stage2"].items() if k != "seed"}
        rows[(record["variant"], json.dumps(stage2, sort_keys=True))].append(record)
    print(f"{dataset.name}: {len(scores)} CFT files linked to their settings ({skipped} skipped), "
          f"{len(prev)} {'held-out' if a.held_out else 'training'} transitions, k={a.k}")
    found = pooled_correlations(rows, scores, a.min_files, f"next@{a.k}")
    for (variant, stage2), records in found["rows"]:
        print(f"  {variant} (lr {json.loads(stage2)['lr']:g}): {len(records)} runs; next@{a.k} "
              + " ".join(f"{scores[r['embeddings']][f'next@{a.k}']:.4f}" for r in records))
    if not found["rows"]:
        print(f"no row has runs on {a.min_files} or more different CFT files")
        return 1
    n_runs = sum(len(records) for _, records in found["rows"])
    print(f"\nPearson r over {n_runs} runs in {len(found['rows'])} rows (each row standardised):")
    print(f"  {'metric':<20}" + "".join(f"{score + ' r':>12}{'p':>9}" for score in found["r"]))
    for m in METRICS:
        print(f"  {m:<20}" + "".join(f"{found['r'][score][m][0]:>+12.3f}{found['r'][score][m][1]:>9.2g}"
                                     for score in found["r"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
