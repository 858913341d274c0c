"""Post-hoc popularity adjustment of cached runs, its strength chosen on validation.

Every model here is trained with a full softmax over items and so carries a popularity prior in its
scores. ``cfsr_head.PopularityAdjusted`` subtracts ``beta * log(1 + training count)`` at scoring
time (post-hoc logit adjustment); nothing is retrained. For each cached run of the named rows this
script reloads the best checkpoint, chooses ``beta`` from a grid on the validation split's
full-ranking N@10 (``choose_popularity_beta``; the grid contains 0, so the unadjusted model is a
candidate), and evaluates test under both protocols with that ``beta``. Every row gets the same
grid, baselines included. Per-user results are cached beside the run (``<key>.popadj.*.json``), so
a second call only reads them, and a new grid only evaluates the betas it adds. Options are those of
``benchmarks.explore`` (they select cached runs; nothing is trained or encoded), plus ``--betas`` and
``--logit-adjustments`` (runs trained with the logit-adjusted loss beside the plain ones, all in one
report with paired t-tests between every two rows)::

    python -m benchmarks.bench_popadjust --dataset amazon_beauty --quick --cft-steps 200 --length-buckets 16 \\
        --seeds 0 --names "SASRec cos0.1" "SAID cos0.1" --out runs/popadjust
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import reproduce as rp
from benchmarks.bench_views import CachedRow, cached_rows
from benchmarks.explore import build_study
from benchmarks.reproduce import Variant
from cfsr_head import PopularityAdjusted, choose_popularity_beta, evaluate
from cfsr_head.adjust import DEFAULT_BETAS, best_beta
from cfsr_head.io import atomic_write_json, read_json

PROTOCOLS = ("full", "sampled")
GROUPS = ("Overall", "Tail item")


def adjust_run(study: rp.Study, runner: rp.Runner, row: CachedRow, record: dict,
               betas: tuple[float, ...]) -> dict[str, Any]:
    """Choose beta on validation for one cached run and evaluate test with it (cached beside the run).
    Returns ``{"key", "variant", "seed", "beta", "valid": {beta: N@10}, "test": {protocol: summary}}``;
    its ``key`` names the adjusted per-user results, so ``rp.paired_p`` reads them."""
    runs = study.workdir / study.name / "runs"
    cache = runs / f"{record['key']}.popadj.json"
    got = read_json(cache) if cache.exists() else None
    if got is not None and tuple(got["betas"]) == betas:
        return got
    # a cache made with another grid still holds the validation value of each beta it tried
    known = {float(b): v for b, v in got["valid"].items()} if got is not None else {}
    s2 = rp.Stage2(**record["stage2"])
    head = None
    missing = [b for b in betas if b not in known]
    if missing:
        head = row.load_head(study, runner, record)
        known.update(choose_popularity_beta(head, runner.split, missing)[1])
    valid = {b: known[b] for b in betas}
    beta = best_beta(valid)
    if got is not None and float(got["beta"]) == beta:
        test = got["test"]  # the same beta: its test results are on disk already
    else:
        head = head if head is not None else row.load_head(study, runner, record)
        adjusted = PopularityAdjusted(head, runner.split.item_popularity, beta)
        test = {}
        for protocol in PROTOCOLS:
            res = evaluate(adjusted, runner.split, split="test", protocol=protocol, seed=s2.seed)
            res.to_json(runs / f"{record['key']}.popadj.{protocol}.json")
            test[protocol] = res.summary()
    out = {"key": f"{record['key']}.popadj", "run": record["key"], "variant": record["variant"], "seed": s2.seed,
           "betas": list(betas), "beta": beta, "valid": {str(b): v for b, v in valid.items()}, "test": test}
    atomic_write_json(cache, out)
    return out


def popadjust(study: rp.Study, rows: dict[str, Variant], betas: tuple[float, ...] = DEFAULT_BETAS
              ) -> dict[str, list[tuple[dict, dict]]]:
    """``{row: [(run record, adjusted record), ...]}`` over the study's seeds, for the loss whose
    first-seed run validates best (as the harness reports it); a row with no cached run, or whose
    embeddings are gone, is skipped with a message."""
    runner = rp.Runner(dataclasses.replace(study, report_only=True))
    plain = {n: v for n, v in rows.items() if not v.popularity}
    for name in rows.keys() - plain.keys():
        print(f"[popadjust] {name!r} is the popularity model itself; skipped", file=sys.stderr)
    out = {}
    for row in cached_rows(study, runner, plain, "popadjust"):
        by_loss: dict[str, list[dict]] = {}
        for rec in row.records:  # sorted by loss, then seed: each list starts with the first seed
            by_loss.setdefault(rec["stage2"]["loss"], []).append(rec)
        chosen = by_loss[rp.best_loss(by_loss)]  # the loss the harness would report, chosen on validation
        out[row.name] = [(rec, adjust_run(study, runner, row, rec, betas)) for rec in chosen]
    return out


def popadjust_by_tau(study: rp.Study, rows: dict[str, Variant], betas: tuple[float, ...],
                     taus: list[float]) -> dict[str, list[tuple[dict, dict]]]:
    """``popadjust`` for the rows' runs trained with each logit adjustment in ``taus`` (0: the plain
    loss), merged; rows of tau > 0 are named ``"<row> la<tau>"``."""
    results: dict[str, list[tuple[dict, dict]]] = {}
    for tau in dict.fromkeys(taus):
        at_tau = dataclasses.replace(study, stage2=dataclasses.replace(study.stage2, logit_adjustment=tau))
        for name, pairs in popadjust(at_tau, rows, betas).items():
            results[f"{name} la{tau:g}" if tau else name] = pairs
    return results


def report(study: rp.Study, results: dict[str, list[tuple[dict, dict]]]) -> tuple[str, dict]:
    """Markdown (plain and adjusted test N@10 per row, mean over seeds; paired t-tests between rows
    on the adjusted results and of each row's adjusted against its plain results) and its raw data."""
    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    lines = ["| row | seeds | beta chosen | valid plain -> adjusted | "
             + " | ".join(f"{p} {g} plain -> adjusted" for p in PROTOCOLS for g in GROUPS) + " |",
             "|---|---|---|---|" + "---|" * (len(PROTOCOLS) * len(GROUPS))]
    raw: dict[str, Any] = {"rows": {}, "tests": []}
    for name, pairs in results.items():
        plain_valid = mean([r["valid"]["Overall"]["NDCG@10"] for r, _ in pairs])
        adj_valid = mean([a["valid"][str(a["beta"])] for _, a in pairs])
        cells, row_raw = [], {"seeds": [a["seed"] for _, a in pairs], "beta": [a["beta"] for _, a in pairs],
                              "valid": [plain_valid, adj_valid], "test": {}}
        for p, g in itertools.product(PROTOCOLS, GROUPS):
            before = mean([r["test"][p][g]["NDCG@10"] for r, _ in pairs])
            after = mean([a["test"][p][g]["NDCG@10"] for _, a in pairs])
            cells.append(f"{before:.4f} -> {after:.4f} ({after / before - 1:+.1%})" if before > 0 else f"{after:.4f}")
            row_raw["test"][f"{p} {g}"] = [before, after]
        lines.append(f"| {name} | {len(pairs)} | {', '.join(str(a['beta']) for _, a in pairs)} | "
                     f"{plain_valid:.4f} -> {adj_valid:.4f} | " + " | ".join(cells) + " |")
        raw["rows"][name] = row_raw
    lines += ["", "Paired t-tests over users (seed-averaged per-user N@10; gain of the first over the second):", "",
              "| comparison | " + " | ".join(f"{p} {g}" for p in PROTOCOLS for g in GROUPS) + " |",
              "|---|" + "---|" * (len(PROTOCOLS) * len(GROUPS))]
    comparisons = [(f"{n} adjusted vs plain", [a for _, a in v], [r for r, _ in v]) for n, v in results.items()]
    comparisons += [(f"{a} vs {b} (both adjusted)", [x for _, x in results[a]], [x for _, x in results[b]])
                    for a, b in itertools.combinations(results, 2)]
    for label, first, second in comparisons:
        cells = []
        for p, g in itertools.product(PROTOCOLS, GROUPS):
            pv, gain = rp.paired_p(study, first, second, p, g)
            cells.append(f"{gain:+.1%} (p = {pv:.2g})")
            raw["tests"].append({"comparison": label, "protocol": p, "group": g, "gain": gain, "p": pv})
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", raw


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--betas", nargs="+", type=float, default=list(DEFAULT_BETAS))
    p.add_argument("--logit-adjustments", nargs="+", type=float, default=None, metavar="TAU",
                   help="the rows' runs trained with each of these logit adjustments (0: the plain loss), "
                        "side by side in one report; rows of tau > 0 are named '<row> la<tau>'")
    a, rest = p.parse_known_args(argv)
    study, rows = build_study(rest)
    betas = tuple(sorted(set(a.betas)))
    taus = a.logit_adjustments if a.logit_adjustments else [study.stage2.logit_adjustment]
    results = popadjust_by_tau(study, rows, betas, taus)
    text, raw = report(study, results)
    command = "python -m benchmarks.bench_popadjust " + shlex.join(argv)
    text = (f"# Post-hoc popularity adjustment on {study.name}\n\nMade by `{command}`. Each run's beta is "
            f"chosen on validation (full-ranking N@10) from {list(betas)}; test N@10, mean over seeds."
            + (" Rows named `la<tau>` were trained with the logit-adjusted loss (`TrainConfig.logit_adjustment`"
               " tau); their plain column is that model's own scores." if any(taus) else "") + "\n\n" + text)
    print(text)
    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study.name}_popadjust.md").write_text(text)
    atomic_write_json(out / f"{study.name}_popadjust.json", rp._json_safe({"command": command, **raw}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
