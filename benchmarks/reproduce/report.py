"""The dataset's page: markdown tables (bold best, italic second), significance, sensitivity and grid
search, the raw JSON beside it, and the PNG plots the page embeds."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from cfsr_head.io import atomic_write_json, atomic_write_text

from .settings import DECODER_ROW, GROUPS, LOSSES, PARTS, PROTOCOLS, Study
from .stats import best_loss, best_point, mean_and_std, mean_test, metric_mean_and_std, paired_p, runs_p, valid_ndcg


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (no test possible, zero baseline, missing metric) as None:
    ``json.dumps`` would write the invalid ``NaN``; JSON readers get null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(mean: float, std: float, rank: int) -> str:
    text = f"{mean:.4f}" + (f" ± {std:.4f}" if std > 0 else "")
    return f"**{text}**" if rank == 0 else f"*{text}*" if rank == 1 else text


def results_table(rows: list[tuple[str, list[dict]]], protocol: str) -> str:
    """Markdown table: one row per (variant, loss), H@10 / N@10 per group, bold best, italic second."""
    cols = [(g, m) for g in GROUPS for m in ("HR@10", "NDCG@10")]
    values = [[metric_mean_and_std(recs, protocol, g, m) for g, m in cols] for _, recs in rows]
    header = "| model | " + " | ".join(f"{g} {m.replace('HR', 'H').replace('NDCG', 'N')}" for g, m in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    order = [np.argsort([-values[r][c][0] for r in range(len(rows))]) for c in range(len(cols))]
    for r, (name, _) in enumerate(rows):
        cells = []
        for c in range(len(cols)):
            rank = int(np.where(order[c] == r)[0][0])
            cells.append(_fmt(*values[r][c], rank))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bars(path: Path, rows: list[tuple[str, list[dict]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [n for n, _ in rows]
    x = np.arange(len(names))
    for ax, protocol in zip(axes, PROTOCOLS):
        for i, group in enumerate(("Overall", "Tail item")):
            ms = [metric_mean_and_std(recs, protocol, group, "NDCG@10") for _, recs in rows]
            ax.bar(x + (i - 0.5) * 0.4, [m for m, _ in ms], 0.4, yerr=[s for _, s in ms], label=group)
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{title}: N@10, {protocol} ranking")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(path: Path, r_rows: list[tuple[float, list[dict]]], k_rows: list[tuple[int, list[dict]]]) -> None:
    """Test N@10 against r and against K, mean over each point's runs with one standard deviation as
    error bars; one row of panels per protocol (their scales differ ~10x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), squeeze=False)
    for col, (rows, label) in enumerate(((r_rows, "drop probability r"), (k_rows, "views K"))):
        xs = [x for x, _ in rows]
        for row, protocol in enumerate(PROTOCOLS):
            ax = axes[row][col]
            for group, style in (("Overall", "-o"), ("Tail item", "--s")):
                cells = [metric_mean_and_std(recs, protocol, group, "NDCG@10") for _, recs in rows]
                means, stds = zip(*cells) if cells else ((), ())
                ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=group)
            ax.set_xticks(xs)
            ax.set_xlabel(label)
            ax.set_ylabel(f"test N@10 ({protocol})")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _seeds(records: list[dict]) -> str:
    return f"{len(records)} seed" + "s" * (len(records) > 1)


def _reseed_sentence(study: Study) -> str:
    """Which rows the best loss is run again for, with which seeds (or that every row has one seed)."""
    if len(study.seeds) < 2:
        return f"; every row has one seed ({study.seeds[0]})."
    rows = "the main table" + (f" and {list(study.all_seeds)}" if study.all_seeds else "")
    return f"; it alone is run again with seeds {list(study.seeds[1:])} for {rows}, other rows have one seed."


def _losses_sentence(losses: tuple[str, ...]) -> str:
    names = {"bpr": "BPR (one uniform negative per position)", "ce": "full-softmax cross-entropy (CE)"}
    if set(losses) == set(LOSSES):
        return f"Every variant is trained with {names['bpr']} and with {names['ce']};"
    return (f"Every variant is trained with {' and '.join(names[x] for x in losses)} only (an exploratory tier: "
            "the protocol trains both losses);")


def grid_search_table(searched: dict[str, dict[str, list[tuple[dict, dict]]]]) -> list[str]:
    """Markdown lines: per variant and loss, the first seed's validation N@10 at each grid point searched
    (``Runner.searched``), the point ``best_point`` kept in bold; empty when no variant searched more than
    one point."""
    def label(point: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in point.items())

    if not any(len(points) > 1 for losses in searched.values() for points in losses.values()):
        return []
    labels = list(dict.fromkeys(label(point) for losses in searched.values() for points in losses.values()
                                for point, _ in points))
    lines = ["## Grid search", "",
             "First seed's validation N@10 at each grid point, per variant and loss; **bold**: the point kept "
             "(the later seeds of the variant's best loss run there); -: not run.", "",
             "| model | loss | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name, losses in searched.items():
        for loss, points in losses.items():
            kept = label(best_point(points)[0])
            values = {label(point): valid_ndcg(rec) for point, rec in points}
            cells = [("-" if lab not in values else f"**{values[lab]:.4f}**" if lab == kept else f"{values[lab]:.4f}")
                     for lab in labels]
            lines.append(f"| {name} | {loss.upper()} | " + " | ".join(cells) + " |")
    return lines + [""]


def _stage1_rows_sentence(stage1_rows: dict[str, tuple]) -> str:
    """The rows whose item embeddings come from stage-1 settings other than the study's, and how they differ."""
    def show(key: str, value: Any) -> str:
        return f"{key}={Path(value).name if key == 'model' and value else value}"  # no machine paths in pages

    rows = [f"{name}: " + ", ".join(show(k, v) for k, v in over) for name, over in stage1_rows.items()]
    return (" Rows with their own stage-1 settings (overriding the line above): " + "; ".join(rows) + "."
            if rows else "")


def _header(study: Study, stage1_rows: dict[str, tuple]) -> list[str]:
    """The page's title, the command that made it, and the study's stage-1 and stage-2 settings."""
    name = study.name
    return [f"# {name}: LLM-CFSR against its baselines", "",
            "Generated by `" + (study.command or f"python -m benchmarks.reproduce --dataset {name}"
                                + (" --quick" if study.quick else "")) + "`"
            f" on {time.strftime('%Y-%m-%d')} (CPU, 2 cores); runs cached earlier under other commands "
            "are reused when their settings match.", "",
            f"Stage 1: {study.stage1.model or 'all-MiniLM-L6-v2 (bundled)'}, LoRA r=8 alpha=16, "
            f"drop r={study.stage1.drop_prob}, K={study.stage1.n_views} views, batch {study.stage1.batch_size}, "
            f"lr {study.stage1.lr}, " + (f"{study.stage1.max_steps} steps" if study.stage1.max_steps else
                                         f"{study.stage1.epochs} epoch(s)")
            + f", {study.stage1.pooling} pooling, prompts cut at {study.stage1.max_length} tokens."
            + (" Each seed of a fine-tuned row fits its own CFT, seeded with the run's seed, so its spread and"
               " p-values count the CFT run too." if study.stage1_seed_per_run else "")
            + _stage1_rows_sentence(stage1_rows),
            f"Stage 2: d={study.stage2.d}, "
            + ("max_len from the grid" if "max_len" in study.grid else f"max_len={study.stage2.max_len}")
            + f", {study.stage2.n_layers} layers, "
            f"{study.stage2.n_heads} heads, Adam" + ("" if "lr" in study.grid else f" lr {study.stage2.lr}")
            + f", batch {study.stage2.batch_size}, "
            f"up to {study.stage2.epochs} epochs, early stopping (patience {study.stage2.patience}) on "
            f"validation N@10" + (f", length-bucketed batches (chunks of {study.stage2.length_buckets} batches)"
                                  if study.stage2.length_buckets else "")
            + (f", every row trained with the logit-adjusted loss (tau {study.stage2.logit_adjustment}: "
               f"training logits + tau * log(1 + training count))" if study.stage2.logit_adjustment else "")
            + (", validated with that bias added back" if study.stage2.validate_with_logit_bias else "")
            + ". "
            + _losses_sentence(study.losses) + f" the grid {dict(study.grid)} is searched per variant and "
            f"loss on validation N@10 (first seed). The loss whose chosen point validates better is the variant's "
            f"best loss (the rows without a loss in their name)" + _reseed_sentence(study), "",
            "Leave-one-out; test metrics; mean ± std over seeds. **bold** = best, *italic* = second. "
            "Tail/head item: Pareto 20% most popular items (training popularity); tail/head user: "
            "20% longest training histories are head.", ""]


def _raw_json(study: Study, results: dict[str, dict[str, list[dict]]]) -> dict[str, Any]:
    """The JSON beside the page: the study's settings and every reported run's metrics."""
    return {"dataset": study.name,
            "study": {"seeds": list(study.seeds), "quick": study.quick,
                      "stage1": dataclasses.asdict(study.stage1), "stage2": dataclasses.asdict(study.stage2),
                      "grid": {k: list(v) for k, v in study.grid.items()},
                      "parts": list(study.parts), "losses": list(study.losses),
                      "sensitivity_r": list(study.sensitivity_r), "sensitivity_k": list(study.sensitivity_k),
                      "sensitivity_seeds": study.sensitivity_seeds,
                      "stage1_seed_per_run": study.stage1_seed_per_run},
            "variants": {vname: {loss: [{"seed": r["stage2"]["seed"], "dropout": r["stage2"]["dropout"],
                                         "lr": r["stage2"].get("lr"), "valid_NDCG@10": valid_ndcg(r),
                                         "test": r["test"], "seconds": r.get("seconds")} for r in recs]
                                 for loss, recs in runs.items()}
                         for vname, runs in results.items()}}


def _table_rows(study: Study, results: dict[str, dict[str, list[dict]]], names: list[str],
                with_losses: bool) -> list[tuple[str, list[dict]]]:
    """The rows of one results table: per variant its best loss (or, ``with_losses``, each loss), named
    with its seed count where it has fewer than the study's seeds."""
    rows = []
    for n in names:
        if n not in results:
            continue
        runs = results[n]
        if with_losses and len(runs) > 1:
            rows += [(f"{n} ({loss.upper()}" + (f", {_seeds(recs)})" if len(study.seeds) > 1 else ")"), recs)
                     for loss, recs in runs.items()]
        else:
            recs = runs[best_loss(runs)]
            deterministic = "-" in runs  # popularity: no seed to vary
            short = len(study.seeds) > 1 and len(recs) < len(study.seeds) and not deterministic
            rows.append((f"{n} ({_seeds(recs)})" if short else n, recs))
    return rows


def _results_sections(study: Study, results: dict[str, dict[str, list[dict]]]) -> list[str]:
    """The main comparison, ablations, backbone and other rows, each under both protocols; the main
    comparison's bar plot."""
    lines: list[str] = []
    sections = [("Main comparison", PARTS["main"]), ("Ablations", PARTS["ablations"] + PARTS["improved"]),
                ("Backbone generality", ["SASRec", "LLM-CFSR"] + PARTS["backbone"] + [DECODER_ROW])]
    covered = {n for _, names in sections for n in names}
    sections.append(("Other variants", ["SASRec", "LLM-CFSR", *[n for n in results if n not in covered]]))
    for title, names in sections:
        # a section needs a row of its own; SASRec and LLM-CFSR only anchor the sections after the main one
        anchors = () if title == "Main comparison" else ("SASRec", "LLM-CFSR")
        if not any(n in results for n in names if n not in anchors):
            continue
        for protocol in PROTOCOLS:
            label = "full ranking over all items" if protocol == "full" else "1 positive + 100 sampled negatives"
            lines += [f"## {title}: {label}", ""]
            if len(study.losses) > 1:
                lines += ["Each loss:", "", results_table(_table_rows(study, results, names, True), protocol), "",
                          "Best loss per variant (chosen on validation):", ""]
            lines += [results_table(_table_rows(study, results, names, False), protocol), ""]
        if title == "Main comparison":
            plot_bars(study.out_dir / f"{study.name}_main.png", _table_rows(study, results, names, False), study.name)
            lines += [f"![overall vs tail-item N@10]({study.name}_main.png)", ""]
    return lines


def _significance_section(study: Study, results: dict[str, dict[str, list[dict]]]) -> tuple[list[str], dict]:
    """Each LLM-CFSR form (and each ``--significance`` row) against every other row: gain, paired p over
    users and Welch p over runs, Overall and Tail item, both protocols; and the same as JSON
    (form -> other -> protocol -> group)."""
    ours = ["LLM-CFSR", "LLM-CFSR (GRU4Rec)", DECODER_ROW, *PARTS["improved"], *study.significance]
    ours_names = [n for n in dict.fromkeys(ours) if n in results]
    if not ours_names:
        return [], {}
    lines = ["## Significance", "",
             "Paired t-test over users of per-user N@10 (averaged over seeds): each LLM-CFSR form (and each "
             "variant named with --significance), best loss, against each variant's best-loss version; "
             "gain = relative difference of the means. p (runs) = Welch t-test over the rows' runs (test "
             "N@10 per seed), n/a below two runs a row: the per-user p counts users, so it cannot see how "
             "far a repeated run moves (a stage-2 seed, or with --stage1-seed-per-run the CFT run); "
             "p (runs) can, with the little power of a few runs.", ""]
    raw: dict[str, dict] = {}
    for ours_name in ours_names:
        mine = results[ours_name][best_loss(results[ours_name])]
        lines += [f"{ours_name} against:", "",
                  "| against | protocol | Overall gain | Overall p | Overall p (runs) | Tail-item gain | "
                  "Tail-item p | Tail-item p (runs) |", "|---|---|---|---|---|---|---|---|"]
        sig = raw.setdefault(ours_name, {})
        for other, runs in results.items():
            if other == ours_name:
                continue
            theirs = runs[best_loss(runs)]
            for protocol in PROTOCOLS:
                cells = []
                for group in ("Overall", "Tail item"):
                    p, gain = paired_p(study, mine, theirs, protocol, group)
                    p_runs = runs_p(mine, theirs, protocol, group)
                    cells += [f"{gain:+.1%}" if math.isfinite(gain) else "n/a (zero baseline)", f"{p:.2g}",
                              f"{p_runs:.2g}" if math.isfinite(p_runs) else "n/a"]
                    sig.setdefault(other, {}).setdefault(protocol, {})[group] = {"p": p, "gain": gain,
                                                                                 "p_runs": p_runs}
                lines.append(f"| {other} | {protocol} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines, raw


def _sensitivity_section(study: Study, sens: dict[str, list]) -> tuple[list[str], dict]:
    """The r and K points: table (mean ± std over each point's runs), plot, and JSON (mean and every run)."""
    if not (sens.get("r") or sens.get("k")):
        return [], {}
    s1 = study.stage1
    counts = {len(recs) for rows in sens.values() for _, recs in rows}
    lines = ["## Sensitivity of LLM-CFSR to the stage-1 drop probability r and view count K", "",
             ("One seed" if counts == {1} else
              ("" if len(counts) == 1 else "Up to ") + f"{max(counts)} seeds a point (mean ± std over the runs"
              + ("; the seeds column says how many)" if len(counts) > 1 else ")")
              + ("; each run fits its own CFT" if study.stage1_seed_per_run else ""))
             + f"; r varies with K={s1.n_views}, K varies with r={s1.drop_prob} (the point equal to the "
             "study's stage 1 is the LLM-CFSR run itself); each point keeps the loss that validates best.", "",
             "| setting | loss | seeds | valid N@10 | full Overall N@10 | full Tail N@10 | "
             "sampled Overall N@10 | sampled Tail N@10 |", "|---|---|---|---|---|---|---|---|"]
    cells = [("full", "Overall"), ("full", "Tail item"), ("sampled", "Overall"), ("sampled", "Tail item")]
    points = (("r", sens.get("r", [])), ("K", sens.get("k", [])))
    for label, rows in points:
        for x, recs in rows:
            lines.append(f"| {label}={x} | {recs[0]['stage2']['loss'].upper()} | {len(recs)} | "
                         + " | ".join(_fmt(*stats, rank=-1) for stats in
                                      [mean_and_std([valid_ndcg(rec) for rec in recs]),
                                       *(metric_mean_and_std(recs, pr, g, "NDCG@10") for pr, g in cells)]) + " |")
    plot_sensitivity(study.out_dir / f"{study.name}_sensitivity.png", sens.get("r", []), sens.get("k", []))
    lines += ["", f"![sensitivity]({study.name}_sensitivity.png)", ""]
    raw = {label: [{"value": x, "loss": recs[0]["stage2"]["loss"],
                    "seeds": [rec["stage2"]["seed"] for rec in recs],
                    "valid_NDCG@10": mean_and_std([valid_ndcg(rec) for rec in recs])[0],
                    "test": mean_test(recs),
                    "runs": [{"seed": rec["stage2"]["seed"], "valid_NDCG@10": valid_ndcg(rec),
                              "test": rec["test"]} for rec in recs]} for x, recs in rows]
           for label, rows in points}
    return lines, raw


def write_report(study: Study, results: dict[str, dict[str, list[dict]]], sens: dict[str, list],
                 missing: list[str] = (), searched: dict[str, dict[str, list[tuple[dict, dict]]]] | None = None,
                 stage1_rows: dict[str, tuple] | None = None) -> Path:
    """The dataset's markdown page, JSON and plots; ``missing`` lists runs a report-only study did not find,
    ``searched`` the grid points ``Runner.run`` validated (``Runner.searched``), ``stage1_rows`` the
    reported rows' own stage-1 overrides (``Variant.stage1``)."""
    out = study.out_dir
    out.mkdir(parents=True, exist_ok=True)
    lines = _header(study, stage1_rows or {}) + _results_sections(study, results)
    raw = _raw_json(study, results)
    significance, raw_significance = _significance_section(study, results)
    if significance:
        lines += significance
        raw["significance"] = raw_significance
    sensitivity, raw_sensitivity = _sensitivity_section(study, sens)
    if sensitivity:
        lines += sensitivity
        raw["sensitivity"] = raw_sensitivity
    if searched:
        lines += grid_search_table(searched)
        raw["grid_search"] = {n: {loss: [{**point, "valid_NDCG@10": valid_ndcg(rec)} for point, rec in points]
                                  for loss, points in losses.items()} for n, losses in searched.items()}
    if missing:
        lines += ["## Runs not in this report", "",
                  f"Written with `--report-only` from the runs cached so far; these {len(missing)} were not "
                  "cached and are left out (the same command without `--report-only` trains them):", ""]
        lines += [f"- {m}" for m in missing] + [""]
        raw["missing_runs"] = list(missing)
    atomic_write_json(out / f"{study.name}.json", json_safe(raw))
    report = out / f"{study.name}.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
