"""How popular the validation and test targets are in the training data, per dataset.

    python -m benchmarks.bench_target_popularity --datasets amazon_beauty amazon_scientific ml-100k

Leave-one-out holds out each user's last item (test) and the one before (validation); both are
scored against item counts from the training part. When the catalogue drifts over time, the test
targets are rarer in training than the validation targets, so a popularity prior (or a popularity
adjustment) tuned on validation is tuned for a more popular target than test asks for. This prints
the mean log(1 + training count) of the targets, their median count, the share with at most 5
training interactions and the share in the tail-item group (``GroupSpec``: outside the 20% most
popular items), for both splits and as test / validation ratios; and the test targets once more on
counts over the test inputs (``SplitData.input_popularity("test")``: the validation items added),
which count up to the target as the training counts do for validation. The last statistic is the
full-ranking N@10 of the popularity model scored with each of those counts. Nothing is trained.
"""
from __future__ import annotations

import argparse

import numpy as np

from cfsr_head import GroupSpec, PopularityModel, evaluate, leave_one_out, load_dataset


def target_popularity(split) -> dict[str, dict[str, float]]:
    """``{"valid" | "test" | "test, input counts": {statistic: value}}`` over every user's target of
    that split: counted in the training part (``item_popularity``), and for test also in the test
    inputs (``input_popularity("test")``: the validation items added), which counts up to the
    target's position as the training part does for validation. The tail-item share always uses
    the evaluation's groups (training counts)."""
    train = np.asarray(split.item_popularity)
    tail_threshold, _ = GroupSpec().thresholds(split)
    out = {}
    for name, split_name, counts in (("valid", "valid", train), ("test", "test", train),
                                     ("test, input counts", "test", np.asarray(split.input_popularity("test")))):
        targets = split.targets(split_name)
        c = counts[targets]
        out[name] = {"mean log(1 + count)": float(np.log1p(c).mean()), "median count": float(np.median(c)),
                     "share count <= 5": float((c <= 5).mean()),
                     "share tail item": float((train[targets] < tail_threshold).mean())}
    return out


def popularity_model_ndcg(split) -> dict[str, float]:
    """Full-ranking N@10 of the popularity model on the keys of ``target_popularity``: scored with
    training counts on validation and test, and with counts over the test inputs on test."""
    models = {"valid": ("valid", split.item_popularity), "test": ("test", split.item_popularity),
              "test, input counts": ("test", split.input_popularity("test"))}
    return {name: float(evaluate(PopularityModel(popularity=counts), split, split=which, groups=None)
                        .summary()["Overall"]["NDCG@10"]) for name, (which, counts) in models.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["amazon_beauty", "amazon_scientific", "ml-100k"],
                   help="dataset folders, or names under CFSR_DATA_DIR")
    a = p.parse_args(argv)
    print("| dataset | statistic | validation targets | test targets | test / validation | test targets, "
          "counts over the test inputs | that / validation |")
    print("|---|---|---|---|---|---|---|")
    for name in a.datasets:
        split = leave_one_out(load_dataset(name))
        stats = target_popularity(split)
        for key, value in popularity_model_ndcg(split).items():
            stats[key]["popularity model N@10"] = value
        for key in stats["valid"]:
            v, t, ti = stats["valid"][key], stats["test"][key], stats["test, input counts"][key]
            ratios = [f"{x / v:.3f}" if v else "-" for x in (t, ti)]
            print(f"| {name} | {key} | {v:.4f} | {t:.4f} | {ratios[0]} | {ti:.4f} | {ratios[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
