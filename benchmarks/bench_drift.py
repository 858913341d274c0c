"""How far each item's ID row moved from its PCA initialisation, by item popularity.

SAID-style tables and the collaborative view of ``DualViewHead`` start at the PCA coordinates of the
item-text embeddings. This script reloads the best checkpoint of cached ``benchmarks.reproduce`` /
``benchmarks.explore`` runs whose ID table was PCA-initialised and reports, for head items (the most
popular 20%, as the evaluation's groups) and tail items, the mean cosine between each final row and
its initial row and the mean relative drift ``||E - E0|| / ||E0||``. It shows whether rare items
keep their semantic coordinates (``DualViewConfig.collab_anchor_weight`` pulls them back). Options
are those of ``benchmarks.explore`` (they select cached runs; nothing is trained or encoded)::

    python -m benchmarks.bench_drift --dataset amazon_beauty --quick --cft-steps 200 --length-buckets 16 \\
        --seeds 0 --names "SAID cos0.1" "SAID anchor1 cos0.1"
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
import torch

from benchmarks import reproduce as rp
from benchmarks.bench_views import cached_rows
from benchmarks.explore import build_study
from benchmarks.reproduce import Variant
from cfsr_head import DualViewHead, GroupSpec

GROUPS = ("Head item", "Tail item")


def row_drift(head: DualViewHead, head_item: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean cosine to the initial row and mean relative drift of items 1..N, per item group
    (``head_item [N]``: True for head items)."""
    if head.item_embedding is None or head.pca is None:
        raise ValueError("row_drift needs a head whose ID table was PCA-initialised")
    n = head.num_items
    with torch.no_grad():
        final = head.item_embedding.weight[1: n + 1].float()
        init = (head.pca.transform(head.semantic_table[1: n + 1]) * head.collab_scale).float()
        cos = torch.nn.functional.cosine_similarity(final, init, dim=-1).numpy()
        rel = ((final - init).norm(dim=-1) / init.norm(dim=-1).clamp_min(1e-12)).numpy()
    out = {}
    for group, mask in (("Head item", head_item), ("Tail item", ~head_item)):
        out[group] = {"cosine": float(cos[mask].mean()), "relative drift": float(rel[mask].mean())}
    return out


def drift_table(study: rp.Study, rows: dict[str, Variant]) -> list[dict[str, Any]]:
    """One row per cached run of ``rows`` with a PCA-initialised ID table; others are skipped with
    a message."""
    runner = rp.Runner(dataclasses.replace(study, report_only=True))
    split = runner.split
    threshold, _ = GroupSpec().thresholds(split)
    head_item = np.asarray(split.item_popularity[1:]) >= threshold
    out = []
    for row in cached_rows(study, runner, rows, "drift"):
        if row.semantic is None:
            print(f"[drift] {row.name!r} has no semantic table, so no PCA start", file=sys.stderr)
            continue
        for rec in row.records:
            head = row.load_head(study, runner, rec)
            if head.item_embedding is None or head.config.collab_init != "pca":
                print(f"[drift] {row.name!r}: its ID table is not PCA-initialised", file=sys.stderr)
                break
            out.append({"variant": row.name, "seed": rec["stage2"]["seed"], "loss": rec["stage2"]["loss"],
                        **row_drift(head, head_item)})
    return out


def main(argv: list[str] | None = None) -> int:
    study, rows = build_study(argv)
    print("| variant | loss | seed | " + " | ".join(f"{g}: cosine to init | {g}: relative drift" for g in GROUPS) + " |")
    print("|---|---|---|" + "---|---|" * len(GROUPS))
    for r in drift_table(study, rows):
        cells = [f"{r[g]['cosine']:.3f} | {r[g]['relative drift']:.3f}" for g in GROUPS]
        print(f"| {r['variant']} | {r['loss']} | {r['seed']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
