"""How often does CFT with collaborative positives meet an anchor's partner among its in-batch negatives?

With ``ItemEmbedder.fit(positive_pairs=..., pair_prob=p)``, a batch of items can hold two items
that users consume together, and a partner's prompt can stand in for an item in a later view.
Unless it is masked (``mask_known_positives``, the default), such a candidate is a negative of the
anchor although the same loss treats it as a positive elsewhere. This counts, over random batches
drawn like the trainer's (a uniform permutation cut into batches; no model involved), the share of
anchors with at least one partner among their candidates in any view, and the masked logits::

    python -m benchmarks.bench_pair_conflicts --dataset amazon_beauty ml-100k
"""
from __future__ import annotations

import argparse

import numpy as np

from cfsr_head import load_dataset
from llm_item_embed import sequence_pairs
from llm_item_embed.pairs import PairIndex


def partner_conflicts(index: PairIndex, n_items: int, batch_size: int = 32, pair_prob: float = 0.5,
                      n_views: int = 2, n_batches: int = 300, seed: int = 0) -> dict[str, float]:
    """Share of anchors that meet a partner among their candidates, and masked logits per batch."""
    rng = np.random.default_rng(seed)
    anchors_hit, logits = [], []
    for _ in range(n_batches):
        idx = rng.permutation(n_items)[:batch_size]
        sources = [idx] + [index.sample(idx, pair_prob, rng) for _ in range(n_views - 1)]
        # a candidate showing one of the anchor's partners, or the anchor's own item (a partner's view)
        known = index.known_positives(idx, sources)
        known[:, np.arange(len(idx)), np.arange(len(idx))] = False  # the positive itself
        anchors_hit.append(known.any(axis=(0, 2)).mean())
        logits.append(known.sum())
    return {"anchors_with_a_partner": float(np.mean(anchors_hit)), "masked_logits_per_batch": float(np.mean(logits))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_pair_conflicts", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", nargs="+", required=True, help="dataset folder names under the data root")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pair-prob", type=float, default=0.5)
    p.add_argument("--n-views", type=int, default=2)
    p.add_argument("--batches", type=int, default=300)
    a = p.parse_args(argv)
    print("| dataset | items | pairs | anchors meeting a partner | masked logits per batch |")
    print("|---|---|---|---|---|")
    for name in a.dataset:
        data = load_dataset(name)
        ids = data.items["item_id"].astype(str).tolist()
        index = PairIndex.build(sequence_pairs(data.interactions, holdout_last=2), ids)
        r = partner_conflicts(index, len(ids), a.batch_size, a.pair_prob, a.n_views, a.batches)
        print(f"| {name} | {len(ids)} | {index.n_pairs} | {r['anchors_with_a_partner']:.3f} | "
              f"{r['masked_logits_per_batch']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
