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
from safetensors.torch import load_file

from benchmarks import reproduce as rp
from benchmarks.bench_views import finished_runs, matching_runs
from benchmarks.explore import build_study
from benchmarks.reproduce import Variant
from cfsr_head import DualViewHead, GroupSpec, align_semantic
from llm_item_embed import ItemEmbeddings

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
    all_runs, out = finished_runs(study), []
    for name, variant in rows.items():
        _, embeddings_key = runner.semantic(variant)
        records = matching_runs(all_runs, study, name, embeddings_key)
        path = rp.embeddings_path(study, runner.stage1_settings(variant)) if embeddings_key else None
        if not records or path is None or not path.exists():
            print(f"[drift] {name!r}: no cached run with a semantic table for these settings", file=sys.stderr)
            continue
        semantic = align_semantic(ItemEmbeddings.load(path), split.item_index)
        for rec in records:
            s2 = rp.Stage2(**rec["stage2"])
            head = rp.build_model(variant, s2, split, semantic)
            if head.item_embedding is None or head.config.collab_init != "pca":
                print(f"[drift] {name!r}: its ID table is not PCA-initialised", file=sys.stderr)
                break
            ckpt = study.workdir / study.name / "runs" / f"{rec['key']}-ckpt" / "best" / "model.safetensors"
            head.load_state_dict(load_file(str(ckpt)))
            out.append({"variant": name, "seed": s2.seed, "loss": s2.loss, **row_drift(head, head_item)})
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
