"""Reading runs back: test metrics averaged over seeds, the choices the harness makes on validation
(grid point, loss), and the significance tests (paired over users, Welch over runs)."""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd

from cfsr_head import EvalResult

from .settings import Study


def valid_ndcg(record: dict) -> float:
    """A run's best validation NDCG@10 (NaN when the record has none)."""
    v = record.get("valid") or {}
    return float(v.get("Overall", v.get("overall", {})).get("NDCG@10", float("nan")))


def load_eval(study: Study, record: dict, protocol: str) -> EvalResult:
    return EvalResult.from_json(study.workdir / study.name / "runs" / f"{record['key']}.{protocol}.json")


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = np.asarray(values, dtype=float)
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0


def metric_mean_and_std(records: list[dict], protocol: str, group: str, metric: str) -> tuple[float, float]:
    """Mean and sample standard deviation over the runs of one test metric (e.g. full, Overall, NDCG@10)."""
    return mean_and_std([r["test"][protocol][group][metric] for r in records])


def mean_test(records: list[dict]) -> dict:
    """The runs' test metrics averaged, in the records' own ``{protocol: {group: {metric: value}}}`` shape."""
    first = records[0]["test"]
    return {protocol: {group: {metric: metric_mean_and_std(records, protocol, group, metric)[0]
                               for metric in metrics}
                       for group, metrics in groups.items()} for protocol, groups in first.items()}


def best_loss(runs: dict[str, list[dict]]) -> str:
    """The loss whose first-seed run has the best validation NDCG@10 (never chosen on test; the
    first seed is the one every loss was trained with, so the comparison is like for like)."""
    return max(runs, key=lambda loss: valid_ndcg(runs[loss][0]))


def best_point(candidates: list[tuple[Any, dict]]) -> tuple[Any, dict]:
    """Of one loss's ``(grid point, first-seed run)`` pairs, in grid order, the pair whose run has the
    best validation NDCG@10 (the earlier point on a tie). The one rule by which ``Runner.run`` trains
    and ``reported_runs`` reads back."""
    return max(candidates, key=lambda c: valid_ndcg(c[1]))  # max keeps the first of equals


def reported_runs(records: list[dict], grid: dict[str, tuple], first_seed: int) -> list[dict]:
    """Of one variant's cached runs (any loss, grid point and seed), those the harness reports, as
    ``Runner.run`` chooses them: per loss the point of ``grid`` whose ``first_seed`` run validates best
    (``best_point``), then the loss whose chosen point validates best (``best_loss``); that point's runs,
    sorted by seed. Runs at points that were not chosen, of losses that lost, or at values outside
    ``grid`` are left out, so that they are never mistaken for more seeds."""
    def point(rec: dict) -> tuple:
        return tuple(rec["stage2"][k] for k in grid)

    by_loss: dict[str, dict[tuple, list[dict]]] = {}
    for rec in records:
        by_loss.setdefault(rec["stage2"]["loss"], {}).setdefault(point(rec), []).append(rec)
    chosen: dict[str, list[dict]] = {}
    for loss, groups in by_loss.items():
        candidates = [(p, first[0]) for p in itertools.product(*grid.values()) if p in groups
                      and (first := [r for r in groups[p] if r["stage2"]["seed"] == first_seed])]
        if candidates:
            p, _ = best_point(candidates)
            chosen[loss] = sorted(groups[p], key=lambda r: r["stage2"]["seed"] != first_seed)
    if not chosen:
        return []
    return sorted(chosen[best_loss(chosen)], key=lambda r: r["stage2"]["seed"])


def per_user_mean(study: Study, records: list[dict], protocol: str, group: str) -> pd.Series:
    """Per-user NDCG@10 averaged over seeds, restricted to ``group``."""
    series = []
    for r in records:
        res = load_eval(study, r, protocol)
        mask = res.groups[group]
        series.append(pd.Series(res.metric("NDCG@10")[mask], index=res.user_ids[mask]))
    return pd.concat(series, axis=1).mean(axis=1)


def paired_p(study: Study, a: list[dict], b: list[dict], protocol: str, group: str) -> tuple[float, float]:
    """Paired t-test over users of per-user NDCG@10 (seed-averaged): (p, relative gain of a over b)."""
    from scipy.stats import ttest_rel

    sa, sb = per_user_mean(study, a, protocol, group), per_user_mean(study, b, protocol, group)
    common = sa.index.intersection(sb.index)
    x, y = sa[common].to_numpy(), sb[common].to_numpy()
    p = float(ttest_rel(x, y).pvalue) if len(common) > 1 and np.any(x != y) else float("nan")
    gain = (x.mean() / y.mean() - 1.0) if y.mean() > 0 else float("nan")
    return p, float(gain)


def runs_p(a: list[dict], b: list[dict], protocol: str, group: str) -> float:
    """Welch t-test over runs of test NDCG@10, each seed one unit (with ``--stage1-seed-per-run`` a
    unit counts the CFT run too): p, or NaN when either row has fewer than two runs."""
    from scipy.stats import ttest_ind

    x, y = ([r["test"][protocol][group]["NDCG@10"] for r in runs] for runs in (a, b))
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    return float(ttest_ind(x, y, equal_var=False).pvalue)
