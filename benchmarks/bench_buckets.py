"""Epoch time with and without length-bucketed batches (``TrainConfig.length_buckets``), same run.

    python -m benchmarks.bench_buckets --dataset amazon_beauty --loss ce

Trains one epoch of plain SASRec and of the dual-view head (random 384-d semantic table: only the
cost matters here) with plain shuffled batches and with length buckets, and prints the speed-up.
Quality is not measured here: see docs/benchmarks.md for the paired validation runs.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.reproduce import VARIANTS, Stage2, build_model
from cfsr_head import Trainer, TrainConfig, default_data_dir, leave_one_out, load_dataset


def epoch_seconds(variant: str, split, semantic, loss: str, buckets: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = build_model(VARIANTS[variant], Stage2(), split, None if variant == "SASRec" else semantic)
    cfg = TrainConfig(loss=loss, epochs=1, batch_size=128, max_len=50, show_progress_bar=False,
                      length_buckets=buckets, seed=seed)
    # validation is not what is timed here: a constant stands in for the evaluator
    result = Trainer(model, split, cfg, eval_fn=lambda *args, **kwargs: {"Overall": {"NDCG@10": 0.0}}).fit()
    return float(result.history[0]["train_time"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="amazon_beauty")
    p.add_argument("--loss", default="ce", choices=["ce", "bpr"])
    p.add_argument("--buckets", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    split = leave_one_out(load_dataset(default_data_dir() / a.dataset))
    lens = split.train_lengths
    print(f"{a.dataset}: {split.num_users} users, {split.num_items} items; training length mean {lens.mean():.1f}, "
          f"median {np.median(lens):.0f}, p90 {np.percentile(lens, 90):.0f}, max {lens.max()}")
    semantic = np.random.default_rng(a.seed).standard_normal((split.num_items, 384)).astype("float32")
    for variant in ("SASRec", "LLM-CFSR"):
        plain = epoch_seconds(variant, split, semantic, a.loss, 0, a.seed)
        bucketed = epoch_seconds(variant, split, semantic, a.loss, a.buckets, a.seed)
        print(f"{variant:<9} loss={a.loss}: plain {plain:.1f} s/epoch, length_buckets={a.buckets} {bucketed:.1f} s/epoch, "
              f"speed-up {plain / bucketed:.2f}x", flush=True)


if __name__ == "__main__":
    main()
