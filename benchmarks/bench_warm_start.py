"""Bolt the dual view onto a trained SASRec: a warm start against a head trained from scratch.

The SDK's use case: a user has a trained SASRec and adds the LLM view to it. Compared here, each
with full-softmax CE, the same budget and its learning rate chosen on validation
(``cfsr_head.grid_search``), per seed:

- ``SASRec``: the ID-only model, the one being bolted onto;
- ``<fusion>, scratch``: a new dual-view head (PCA-initialised ID table, fresh encoder);
- ``<fusion>, warm``: a new dual-view head whose encoder is a copy of that seed's trained SASRec
  encoder and whose ID table starts from its item embeddings (``DualViewHead.init_collaborative_from``),
  then fine-tuned;

for the concatenation fusion (``concat``, the stronger form in docs/results) and the paper's
cross-attention (``cross``). The semantic table is the bundled MiniLM, untuned, over the study's
prompt. Prints test N@10 (full ranking and 100 sampled negatives, Overall and Tail item) as mean ±
std over seeds, each row's ratio to SASRec with a paired t-test on per-user N@10 averaged over the
seeds, and the epochs each row trained (a warm start's are on top of SASRec's). Every run keeps its
checkpoints under ``--workdir``, so a rerun resumes and a finished run is not repeated::

    python -m benchmarks.bench_warm_start --dataset ml-100k --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import ttest_rel

from benchmarks.reproduce import REPO_ROOT
from benchmarks.reproduce.stage1 import item_template
from cfsr_head import (DualViewHead, SASRecEncoder, TrainConfig, Trainer, align_semantic, default_data_dir, evaluate,
                       grid_search, leave_one_out, load_dataset)
from llm_item_embed import ItemEmbedder, ItemEmbeddings

D, LAYERS, HEADS, MAX_LEN, DROPOUT = 64, 2, 4, 50, 0.2
PROTOCOLS = ("full", "sampled")
GROUPS = ("Overall", "Tail item")


def frozen_embeddings(data: Any, workdir: Path) -> ItemEmbeddings:
    """The bundled MiniLM's embeddings of every item's prompt (the study's template), cached."""
    path = workdir / "frozen_minilm.safetensors"
    if path.is_file():
        return ItemEmbeddings.load(path)
    embedder = ItemEmbedder(template=item_template(data.items), max_length=64)
    emb = embedder.encode(data.items, id_column="item_id", show_progress_bar=False)
    emb.save(path)
    return emb


def train_row(name: str, split: Any, build, seed: int, *, lrs: list[float], workdir: Path, epochs: int,
              patience: int, length_buckets: int = 0) -> dict[str, Any]:
    """grid_search over ``lrs`` of the heads ``build()`` makes; the kept run's test results."""
    def make_trainer(point: dict[str, float]) -> Trainer:
        torch.manual_seed(seed)
        config = TrainConfig(loss="ce", lr=point["lr"], epochs=epochs, patience=patience, max_len=MAX_LEN,
                             seed=seed, show_progress_bar=False, length_buckets=length_buckets,
                             output_dir=str(workdir / name.replace(", ", "_") / f"seed{seed}" / f"lr{point['lr']:g}"))
        return Trainer(build(), split, config)

    t0 = time.perf_counter()
    found = grid_search({"lr": lrs}, make_trainer)
    model = found.model.eval()
    tests = {p: evaluate(model, split, split="test", protocol=p, seed=seed) for p in PROTOCOLS}
    kept = found.best.result
    test_full = tests["full"].summary()["Overall"]["NDCG@10"]
    print(f"  seed {seed} {name:<16} lr {found.best_point['lr']:g}: valid {kept.best_metric:.4f}, "
          f"best epoch {kept.best_epoch} of {kept.epochs_run}, test full {test_full:.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"model": model, "tests": tests, "epochs": kept.epochs_run, "best_epoch": kept.best_epoch}


def per_user(results: list[dict[str, Any]], protocol: str, group: str) -> np.ndarray:
    """Per-user test N@10 in ``group``, averaged over the seeds (users in one order for all)."""
    runs = [r["tests"][protocol] for r in results]
    mask = runs[0].groups[group]
    return np.mean([run.metric("NDCG@10")[mask] for run in runs], axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-100k", help="dataset folder, or a name under CFSR_DATA_DIR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="learning rates searched per row")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--fusions", nargs="+", default=["concat", "cross"], choices=["concat", "cross"])
    p.add_argument("--length-buckets", type=int, default=0,
                   help="batches of similar-length sequences (TrainConfig.length_buckets; 16 on the Amazon sets)")
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "warm_start"))
    a = p.parse_args(argv)
    folder = Path(a.dataset) if Path(a.dataset).is_dir() else default_data_dir() / a.dataset
    workdir = Path(a.workdir) / folder.name
    workdir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(folder)
    split = leave_one_out(data, max_len=MAX_LEN)
    semantic = align_semantic(frozen_embeddings(data, workdir), split.item_index)
    print(f"{folder.name}: {split.num_items} items, {len(split.users)} users; seeds {a.seeds}, lr from {a.lrs}, "
          f"up to {a.epochs} epochs (patience {a.patience}), CE")

    def encoder() -> SASRecEncoder:
        return SASRecEncoder(d=D, n_layers=LAYERS, n_heads=HEADS, max_len=MAX_LEN, dropout=DROPOUT)

    rows: dict[str, list[dict[str, Any]]] = {}
    budget = dict(lrs=a.lrs, workdir=workdir, epochs=a.epochs, patience=a.patience, length_buckets=a.length_buckets)
    for seed in a.seeds:
        base = train_row("SASRec", split, lambda: DualViewHead(encoder(), num_items=split.num_items, d=D,
                                                               use_semantic=False, collab_init="random"),
                         seed, **budget)
        rows.setdefault("SASRec", []).append(base)
        for fusion in a.fusions:
            def scratch(fusion: str = fusion) -> DualViewHead:
                return DualViewHead(encoder(), semantic, d=D, fusion=fusion, dropout=DROPOUT)

            def warm(fusion: str = fusion, trained: DualViewHead = base["model"]) -> DualViewHead:
                head = DualViewHead(copy.deepcopy(trained.encoder), semantic, d=D, fusion=fusion, dropout=DROPOUT,
                                    collab_init="random")
                head.init_collaborative_from(trained.item_embedding.weight)
                return head

            for kind, build in (("scratch", scratch), ("warm", warm)):
                rows.setdefault(f"{fusion}, {kind}", []).append(
                    train_row(f"{fusion}, {kind}", split, build, seed, **budget))

    print(f"\nTest N@10, mean ± std over {len(a.seeds)} seeds; ratio to SASRec (paired t-test over users, "
          "per-user N@10 averaged over the seeds); epochs trained (best epoch):")
    columns = [(p, g) for p in PROTOCOLS for g in GROUPS]
    print(f"  {'row':<16}" + "".join(f"{p + ' ' + g:>34}" for p, g in columns) + f"{'epochs':>14}")
    for name, results in rows.items():
        cells = []
        for protocol, group in columns:
            values = [r["tests"][protocol].summary()[group]["NDCG@10"] for r in results]
            cell = f"{np.mean(values):.4f} ± {np.std(values):.4f}"
            if name != "SASRec":
                ours, ref = per_user(results, protocol, group), per_user(rows["SASRec"], protocol, group)
                pval = ttest_rel(ours, ref).pvalue
                cell += f" {ours.mean() / ref.mean():.2f}x p={pval:.1g}"
            cells.append(f"{cell:>34}")
        epochs = f"{np.mean([r['epochs'] for r in results]):.0f} ({np.mean([r['best_epoch'] for r in results]):.0f})"
        print(f"  {name:<16}" + "".join(cells) + f"{epochs:>14}")
    print("\nWarm against scratch (same paired test):")
    for fusion in a.fusions:
        cells = []
        for protocol, group in columns:
            warm, scratch = (per_user(rows[f"{fusion}, {kind}"], protocol, group) for kind in ("warm", "scratch"))
            pval = ttest_rel(warm, scratch).pvalue
            cells.append(f"{protocol} {group} {warm.mean() / scratch.mean():.2f}x (p = {pval:.2g})")
        print(f"  {fusion}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
