"""Other shapes of the semantic prior, and a post-hoc weight on one view, chosen on validation.

``cfsr_head.SemanticPrior`` adds ``weight * cos(e_last, e_i)`` (recency 0: the user's last item) to a
model's scores, optionally weighed towards rare items (``tail_exponent`` gamma); ``choose_adjustment``
picks it with the popularity ``beta`` on validation. This script asks whether another shape of the
same evidence would validate better, for cached runs of the named rows (nothing is trained):

- ``last``: the library's prior (cosine to the last item);
- ``max r``: the largest ``r ** age_t * cos(e_t, e_i)`` over the history (age 0 = the last item);
- ``kernel T``: ``exp((cos(e_last, e_i) - 1) / T)``, which keeps only close neighbours;
- ``semantic lam`` / ``collaborative lam`` (dual-view heads with a score temperature only): the
  ``last`` prior plus ``lam`` times that view's own cosine / temperature, i.e. one view weighed up
  or down after training.

Every shape gets the same grid of ``--betas`` x ``--prior-weights`` x ``--prior-tail-exponents``, and
each prints its best validation full-ranking N@10 (the criterion ``choose_adjustment`` uses). Test is
not looked at. Options are those of ``benchmarks.explore`` (they select cached runs), plus the grid
and ``--out`` (a JSON of every point's value)::

    python -m benchmarks.bench_prior_shapes --dataset amazon_beauty --quick --cft-steps 200 \\
        --length-buckets 16 --seeds 0 --logit-adjustment 0.5 --names "w/o Cro frozen vloss0.5 cos0.1"
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import reproduce as rp
from benchmarks.bench_popadjust import frozen_semantic
from benchmarks.bench_views import OneView, cached_rows
from benchmarks.explore import build_study
from cfsr_head import DualViewHead
from cfsr_head.adjust import log_popularity, prior_item_scale
from cfsr_head.evaluate import full_ranks, metrics_from_ranks, model_max_len
from cfsr_head.head import as_semantic_matrix
from cfsr_head.io import atomic_write_json

MAX_DECAYS = (1.0, 0.8, 0.5)
KERNEL_TEMPERATURES = (0.05, 0.1)
VIEW_WEIGHTS = (-0.5, 0.5, 1.0)


def prior_shapes(seq: Tensor, unit: Tensor) -> dict[str, Tensor]:
    """``{shape: [B, N+1] similarities}`` for left-padded ``seq`` and unit semantic rows ``unit``
    (row 0, padding, zero)."""
    real = seq > 0
    last = unit[seq[:, -1]] @ unit.T
    out = {"last": last}
    sims = torch.einsum("bld,nd->bln", unit[seq], unit).masked_fill(~real[:, :, None], -1.0)
    age = (real.flip(1).long().cumsum(1).flip(1) - 1).clamp_min(0).float()
    for r in MAX_DECAYS:
        out[f"max {r:g}"] = (sims * torch.pow(torch.tensor(r), age)[:, :, None]).max(1).values
    for t in KERNEL_TEMPERATURES:
        out[f"kernel {t:g}"] = torch.exp((last - 1) / t)
    return out


def view_scores(head: DualViewHead, states: Tensor) -> dict[str, Tensor]:
    """Each view's own score against every item (``bench_views.OneView``; ``{}`` unless ``head`` is a
    dual-view head with both views and a score temperature)."""
    cfg = getattr(head, "config", None)
    if not isinstance(head, DualViewHead) or cfg.score_temperature is None or not (
            cfg.use_semantic and cfg.use_collaborative):
        return {}
    out = {}
    for view in ("semantic", "collaborative"):
        one = OneView(head, view)
        out[view] = one.full_scores(states[:, one.half])
        out[view][:, 0] = 0.0  # padding: the head's own -inf keeps it out, whatever the view's weight
    return out


@torch.no_grad()
def shape_values(head: DualViewHead, split, semantic, betas, weights, gammas, batch_size: int = 128
                 ) -> dict[tuple[str, float, float, float], float]:
    """Validation full-ranking N@10 of every (shape, gamma, weight, beta) point."""
    head.eval()
    n = split.num_items
    table, _ = as_semantic_matrix(semantic)
    unit = F.normalize(table.float(), dim=1)
    unit = torch.cat([unit.new_zeros(1, unit.shape[1]), unit])
    seq_all, tgt_all, _ = split.eval_inputs("valid", model_max_len(head) or split.max_len)
    history = split.history("valid")
    log_pop = log_popularity(split.item_popularity, n)
    scales = {g: prior_item_scale(split.item_popularity, n, g) for g in gammas}
    totals: dict[tuple[str, float, float, float], float] = {}
    for b in range(0, len(tgt_all), batch_size):
        seq, tgt, hist = seq_all[b:b + batch_size], tgt_all[b:b + batch_size], history[b:b + batch_size]
        states = head.user_state(seq, seq == 0)
        own = head.full_scores(states)
        shapes = prior_shapes(seq, unit)
        bases = {shape: (own, sim) for shape, sim in shapes.items()}
        bases.update({f"{view} {lam:g}": (own + lam * extra, shapes["last"])
                      for view, extra in view_scores(head, states).items() for lam in VIEW_WEIGHTS})
        for shape, (base, sim) in bases.items():
            for g in gammas:
                prior = sim * scales[g]
                for w in weights:
                    with_prior = base + w * prior
                    for beta in betas:
                        ranks = full_ranks(with_prior - beta * log_pop, tgt, hist, n).numpy()
                        key = (shape, g, w, beta)
                        totals[key] = totals.get(key, 0.0) + float(metrics_from_ranks(ranks, (10,))[1][10].sum())
    return {k: v / len(tgt_all) for k, v in totals.items()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # abbreviations would take the harness's flags
    p.add_argument("--betas", nargs="+", type=float, default=[-1.0, -0.75, -0.5, -0.3, 0.0])
    p.add_argument("--prior-weights", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--prior-tail-exponents", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    p.add_argument("--out", type=Path, default=None, help="write every point's validation N@10 here (JSON)")
    a, rest = p.parse_known_args(argv)
    study, rows = build_study(rest)
    runner = rp.Runner(dataclasses.replace(study, report_only=True))
    semantic = frozen_semantic(study, runner)
    raw = []
    print("| row | seed | shape | best validation N@10 | (gamma, weight, beta) |\n|---|---|---|---|---|")
    for row in cached_rows(study, runner, rows, "prior-shapes"):
        for rec in rp.reported_runs(row.records, study.grid, study.seeds[0]):  # as the harness reports them
            values = shape_values(row.load_head(study, runner, rec), runner.split, semantic,
                                  a.betas, a.prior_weights, a.prior_tail_exponents)
            seed = rec["stage2"]["seed"]
            for shape in dict.fromkeys(k[0] for k in values):
                best = max((k for k in values if k[0] == shape), key=values.get)
                print(f"| {row.name} | {seed} | {shape} | {values[best]:.5f} | {best[1:]} |", flush=True)
            raw.append({"row": row.name, "run": rec["key"], "seed": seed,
                        "values": [{"shape": k[0], "gamma": k[1], "weight": k[2], "beta": k[3], "value": v}
                                   for k, v in values.items()]})
    if a.out is not None:
        atomic_write_json(a.out, {"command": "python -m benchmarks.bench_prior_shapes " + shlex.join(argv), "runs": raw})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
