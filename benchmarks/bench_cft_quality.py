"""Does contrastive fine-tuning (CFT) make item embeddings recommendation-aware?

Retrieval of an item from a masked view of its own prompt: for held-out items (never seen in
training), embed a masked view (each attribute atom dropped with probability ``--query-drop``,
seeded apart from training) and rank every item's full-prompt embedding by the model's own
similarity; report recall@1 / recall@10 of the un-tuned model and of the fine-tuned one, in one run.

    python benchmarks/bench_cft_quality.py --dataset amazon_scientific --steps 100
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from llm_item_embed import ItemEmbedder, LoraSettings, PromptTemplate
from cfsr_head.data import default_data_dir


def recall(embedder: ItemEmbedder, items: pd.DataFrame, queries: list[str], query_rows: np.ndarray,
           cosine: bool) -> dict[str, float]:
    """Recall@1/@10 of each query's own item among all items' full prompts."""
    keys = torch.from_numpy(embedder.encode(items, id_column="item_id", show_progress_bar=False).matrix)
    q = torch.from_numpy(embedder.encode_texts(queries, show_progress_bar=False))
    if cosine:
        keys, q = torch.nn.functional.normalize(keys, dim=1), torch.nn.functional.normalize(q, dim=1)
    scores = q @ keys.T
    own = scores[torch.arange(len(q)), torch.from_numpy(query_rows)]
    rank = (scores > own[:, None]).sum(1).numpy()  # 0 = retrieved first (pessimistic ties not needed: floats)
    return {"recall@1": float((rank < 1).mean()), "recall@10": float((rank < 10).mean()),
            "mean_rank": float(rank.mean() + 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="amazon_scientific")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--drop-prob", type=float, default=0.2)
    p.add_argument("--query-drop", type=float, default=0.5)
    p.add_argument("--held-out", type=int, default=500, help="items kept out of training, used as queries")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--similarity", default="dot", choices=["dot", "cos"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    items = pd.read_csv(default_data_dir() / a.dataset / "items.csv", dtype=str, keep_default_na=False)
    columns = [c for c in items.columns if c != "item_id"]
    names = {"title": "name", "categories": "category"}
    template = PromptTemplate(instruction="This item has the following attributes:",
                              fields={c: names.get(c, c) for c in columns})
    rng = np.random.default_rng(a.seed)
    held = rng.choice(len(items), size=a.held_out, replace=False)
    train_items = items.drop(index=items.index[held])
    query_rng = np.random.default_rng(10_000 + a.seed)
    rows = items.iloc[held][columns].to_dict("records")
    queries = [template.render(r, a.query_drop, query_rng) for r in rows]

    def new_embedder() -> ItemEmbedder:
        return ItemEmbedder(template=template, drop_prob=a.drop_prob, n_views=2, lora=LoraSettings(r=8, alpha=16),
                            max_length=a.max_length, similarity=a.similarity)

    cosine = a.similarity == "cos"
    before = recall(new_embedder(), items, queries, held, cosine)
    t0 = time.time()
    tuned = new_embedder().fit(train_items, id_column="item_id", batch_size=a.batch_size, lr=a.lr,
                               max_steps=a.steps, seed=a.seed, show_progress_bar=False)
    fit_s = time.time() - t0
    after = recall(tuned, items, queries, held, cosine)
    print(f"dataset {a.dataset}: {len(items)} items, {a.held_out} held-out queries (drop {a.query_drop}), "
          f"CFT {a.steps} steps x {a.batch_size} items (r={a.drop_prob}) in {fit_s:.0f} s")
    print(f"{'model':<10}{'recall@1':>10}{'recall@10':>11}{'mean rank':>11}")
    for name, r in (("untuned", before), ("CFT", after)):
        print(f"{name:<10}{r['recall@1']:>10.4f}{r['recall@10']:>11.4f}{r['mean_rank']:>11.1f}")
    print(f"ratio CFT/untuned: recall@1 {after['recall@1'] / max(before['recall@1'], 1e-9):.2f}x, "
          f"recall@10 {after['recall@10'] / max(before['recall@10'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
