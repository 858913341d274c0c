"""The command line: ``python -m benchmarks.reproduce`` (alias ``cfsr-reproduce``) parses a ``Study``,
runs every variant it names through the ``Runner`` and writes the report."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from cfsr_head import Adjustment, default_data_dir

from .report import write_report
from .runner import Runner
from .settings import (
    DECODER_ROW,
    FULL_GRID,
    LOSSES,
    PARTS,
    REPO_ROOT,
    SENSITIVITY_K,
    SENSITIVITY_R,
    VARIANTS,
    Stage1,
    Stage2,
    Study,
    Variant,
    sensitivity_variant,
    smollm2_variant,
)
from .stage1 import embeddings_path
from .stats import best_loss


def run_study(study: Study, extra_variants: dict[str, Variant] | None = None) -> Path:
    """Run (or load from the cache) every variant the study names and write its report.
    ``extra_variants`` defines names beyond the study's own ``VARIANTS`` (benchmarks.explore)."""
    known = {**VARIANTS, **(extra_variants or {})}
    if study.decoder:
        known[DECODER_ROW] = smollm2_variant()
    runner = Runner(study)
    names: list[str] = []
    for part in study.parts:
        names += [n for n in PARTS.get(part, []) if n not in names]
    names += [n for n in study.variants if n not in names]
    if study.stage1_only:
        return stage1_only(study, runner, [known[n] for n in names])
    results: dict[str, dict[str, list[dict]]] = {}
    for n in names:
        results[n] = runner.run(known[n], seeds_of(study, n))
    if study.decoder:
        results[DECODER_ROW] = runner.run(known[DECODER_ROW], seeds_of(study, DECODER_ROW))
    results = {n: runs for n, runs in results.items() if runs}  # report-only: variants with no cached run
    sens: dict[str, list] = {}
    if "sensitivity" in study.parts:
        seeds, base = study.seeds[:study.sensitivity_seeds], study.stage1
        sens["r"] = [(r, recs) for r in study.sensitivity_r
                     if (recs := _best_records(runner.run(sensitivity_variant(r, base.n_views, base), seeds)))]
        sens["k"] = [(k, recs) for k in study.sensitivity_k
                     if (recs := _best_records(runner.run(sensitivity_variant(base.drop_prob, k, base), seeds)))]
    if runner.missing:
        print(f"[report only] {len(runner.missing)} run(s) not cached, left out of the report:\n  "
              + "\n  ".join(runner.missing), flush=True)
    stage1_rows = {n: known[n].stage1 for n in results if known[n].stage1}
    return write_report(study, results, sens, runner.missing, runner.searched, stage1_rows)


def seeds_of(study: Study, name: str) -> tuple[int, ...]:
    """The seeds a row runs with: every seed for the main table and the rows ``--all-seeds`` names,
    the first seed for the rest."""
    return study.seeds if name in PARTS["main"] or name in study.all_seeds else study.seeds[:1]


def stage1_only(study: Study, runner: Runner, variants: list[Variant]) -> Path:
    """Compute (or find in the cache) the item embeddings of ``variants``, of the decoder row and of the
    sensitivity points the study names, train nothing else, and print each file; returns their folder
    (``bench_neighbours`` reads every file there)."""
    if study.decoder:
        variants = [*variants, smollm2_variant()]
    if study.stage1_seed_per_run:  # each seed the row will run with
        variants = [runner.with_seed(v, s) for v in variants for s in seeds_of(study, v.name)]
    if "sensitivity" in study.parts:
        base, seeds = study.stage1, study.seeds[:study.sensitivity_seeds]
        points = [sensitivity_variant(r, base.n_views, base) for r in study.sensitivity_r]
        points += [sensitivity_variant(base.drop_prob, k, base) for k in study.sensitivity_k]
        variants += [runner.with_seed(v, s) for v in points for s in seeds] if study.stage1_seed_per_run else points
    done: set[Path] = set()
    for variant in variants:
        settings = runner.stage1_settings(variant)
        if settings is None or (path := embeddings_path(study, settings)) in done:
            continue
        runner.semantic(variant)
        done.add(path)
        print(f"[stage 1] {variant.name}: {path}", flush=True)
    return study.workdir / study.name / "embeddings"


def _best_records(runs: dict[str, list[dict]]) -> list[dict]:
    """The runs (one per seed) of the loss that validates best; empty when nothing ran."""
    return runs[best_loss(runs)] if runs else []


def parse_args(argv: list[str] | None = None) -> Study:
    p = argparse.ArgumentParser(prog="cfsr-reproduce",
                                description="Reproduce the LLM-CFSR study on any dataset folder, with one command.")
    p.add_argument("--dataset", required=True, help="dataset folder, or a name under CFSR_DATA_DIR")
    p.add_argument("--quick", action="store_true",
                   help="small, fast version: 1 seed, short fine-tune, 20 epochs, no grid, fewer sensitivity points")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--parts", nargs="+", default=None, choices=[*PARTS, "sensitivity"])
    p.add_argument("--variants", nargs="+", default=(), choices=list(VARIANTS), metavar="NAME",
                   help=f"single variants to run on top of --parts; one of: {', '.join(VARIANTS)}")
    p.add_argument("--decoder", action="store_true", help="add the SmolLM2-135M decoder row (slow: small datasets)")
    p.add_argument("--cft-steps", type=int, default=None, help="stage-1 steps (default: one epoch)")
    p.add_argument("--text-max-length", type=int, default=None, metavar="TOKENS",
                   help=f"stage-1 token limit of an item's prompt, for fine-tuning and encoding (Stage1.max_length; "
                        f"default {Stage1.max_length}, --quick 64)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--dropout-grid", type=float, nargs="+", default=None)
    p.add_argument("--lr-grid", type=float, nargs="+", default=None, metavar="LR",
                   help="stage-2 learning rates searched with the dropout grid, per variant and loss on validation "
                        f"N@10 (default {FULL_GRID['lr']}; --quick: Stage2's single lr {Stage2.lr})")
    p.add_argument("--max-len-grid", type=int, nargs="+", default=None, metavar="N",
                   help="stage-2 history lengths (the encoder's max_len) searched with the dropout and learning-rate "
                        "grids, per variant and loss on validation N@10 (default: --max-len alone, "
                        f"{Stage2.max_len} unless given)")
    p.add_argument("--length-buckets", type=int, default=None,
                   help="batches of similar-length sequences, sorted within chunks of this many batches "
                        "(TrainConfig.length_buckets; 0 = plain shuffle)")
    p.add_argument("--logit-adjustment", type=float, default=None, metavar="TAU",
                   help="train every row with the logit-adjusted loss (TrainConfig.logit_adjustment; "
                        "beyond the paper; default 0: the plain loss)")
    p.add_argument("--validate-with-logit-bias", action="store_true",
                   help="with --logit-adjustment: choose each run's best epoch on validation scores with the training "
                        "bias added back (TrainConfig.validate_with_logit_bias)")
    p.add_argument("--train-prior", type=float, nargs=3, default=None, metavar=("WEIGHT", "RECENCY", "GAMMA"),
                   help="train every row with a SemanticPrior over the frozen embeddings added to its training logits "
                        "(Trainer(..., prior=...); beyond the paper; scored with it added)")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES,
                   help="stage-2 losses to train (default: both, as the protocol asks; one loss for a fast tier)")
    p.add_argument("--significance", nargs="+", default=(), metavar="NAME",
                   help="variants tested against every other row (paired t-test), beside the LLM-CFSR forms")
    p.add_argument("--all-seeds", nargs="+", default=(), choices=[*VARIANTS, DECODER_ROW], metavar="NAME",
                   help="variants outside the main table to run with every seed too (default: first seed only)")
    p.add_argument("--stage1-seed-per-run", action="store_true",
                   help="each seed of a fine-tuned row fits its own CFT, seeded with the run's seed, so the row's "
                        "spread and p-values count the CFT run (default: all seeds share one CFT)")
    p.add_argument("--sensitivity-r", type=float, nargs="+", default=None, metavar="R",
                   help=f"drop probabilities of the sensitivity part (default {SENSITIVITY_R}; "
                        f"--quick: {SENSITIVITY_R[1:4]})")
    p.add_argument("--sensitivity-k", type=int, nargs="+", default=None, metavar="K",
                   help=f"view counts of the sensitivity part (default {SENSITIVITY_K}; --quick: {SENSITIVITY_K[:2]})")
    p.add_argument("--sensitivity-seeds", type=int, default=1, metavar="N",
                   help="each sensitivity point runs with the first N of --seeds (default 1, as the protocol "
                        "asks); with --stage1-seed-per-run every run fits its own CFT, so the spread counts it")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs already cached (missing ones are listed "
                        "and left out; rows show how many seeds they have)")
    p.add_argument("--stage1-only", action="store_true",
                   help="compute (or find in the cache) the item embeddings of the rows named and stop: no stage 2, "
                        "no report (for benchmarks.bench_neighbours)")
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "reproduce"))
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "results"))
    a = p.parse_args(argv)
    command = "python -m benchmarks.reproduce " + shlex.join(sys.argv[1:] if argv is None else argv)
    folder = Path(a.dataset)
    if not folder.is_dir():
        folder = default_data_dir() / a.dataset
    for f in ("items.csv", "interactions.csv"):
        if not (folder / f).is_file():
            p.error(f"{folder / f} does not exist (give a dataset folder or a name under CFSR_DATA_DIR)")
    stage1, stage2 = Stage1(), Stage2()
    grid: dict[str, tuple] = dict(FULL_GRID)
    seeds = (0, 1, 2)
    sens_r, sens_k = SENSITIVITY_R, SENSITIVITY_K
    if a.quick:
        sens_r, sens_k = SENSITIVITY_R[1:4], SENSITIVITY_K[:2]
        stage1 = dataclasses.replace(stage1, max_steps=30, max_length=64)
        stage2 = dataclasses.replace(stage2, epochs=20, patience=3)
        grid, seeds = {"dropout": (0.2,)}, (0,)  # lr: Stage2's single 1e-3
    if a.cft_steps is not None:
        stage1 = dataclasses.replace(stage1, max_steps=a.cft_steps)
    if a.text_max_length is not None:
        if a.text_max_length < 1:
            p.error(f"--text-max-length must be positive, got {a.text_max_length}")
        stage1 = dataclasses.replace(stage1, max_length=a.text_max_length)
    for name, value in (("epochs", a.epochs), ("patience", a.patience), ("max_len", a.max_len),
                        ("length_buckets", a.length_buckets), ("logit_adjustment", a.logit_adjustment)):
        if value is not None:
            stage2 = dataclasses.replace(stage2, **{name: value})
    if a.validate_with_logit_bias:
        if not stage2.logit_adjustment:
            p.error("--validate-with-logit-bias needs --logit-adjustment TAU > 0")
        stage2 = dataclasses.replace(stage2, validate_with_logit_bias=True)
    if a.train_prior is not None:
        weight, recency, gamma = a.train_prior
        try:
            Adjustment(weight=weight, recency=recency, tail_exponent=gamma)
        except ValueError as e:
            p.error(f"--train-prior WEIGHT RECENCY GAMMA: {e}")
        stage2 = dataclasses.replace(stage2, prior_weight=weight, prior_recency=recency, prior_tail_exponent=gamma)
    if a.dropout_grid:
        grid["dropout"] = tuple(dict.fromkeys(a.dropout_grid))
    if a.lr_grid:
        if min(a.lr_grid) <= 0:
            p.error(f"--lr-grid: learning rates must be positive, got {a.lr_grid}")
        grid["lr"] = tuple(dict.fromkeys(a.lr_grid))
    if a.max_len_grid:
        if min(a.max_len_grid) < 1:
            p.error(f"--max-len-grid: history lengths must be positive, got {a.max_len_grid}")
        grid["max_len"] = tuple(dict.fromkeys(a.max_len_grid))
    if a.sensitivity_r and not all(0 < r < 1 for r in a.sensitivity_r):
        p.error(f"--sensitivity-r: drop probabilities must lie in (0, 1), got {a.sensitivity_r}")
    if not 1 <= a.sensitivity_seeds <= len(a.seeds or seeds):
        p.error(f"--sensitivity-seeds: must lie in 1..{len(a.seeds or seeds)} (the number of --seeds), "
                f"got {a.sensitivity_seeds}")
    if a.sensitivity_k and min(a.sensitivity_k) < 2:
        p.error(f"--sensitivity-k: contrastive fine-tuning needs at least 2 views, got {a.sensitivity_k}")
    return Study(dataset=folder.resolve(), workdir=Path(a.workdir), out_dir=Path(a.out),
                 seeds=tuple(a.seeds) if a.seeds else seeds,
                 parts=tuple(a.parts) if a.parts else ("main", "ablations", "improved", "backbone", "sensitivity"),
                 variants=tuple(a.variants),
                 decoder=a.decoder, stage1=stage1, stage2=stage2, grid=grid, losses=tuple(dict.fromkeys(a.losses)),
                 significance=tuple(a.significance), all_seeds=tuple(a.all_seeds), quick=a.quick,
                 sensitivity_r=tuple(a.sensitivity_r or sens_r), sensitivity_k=tuple(a.sensitivity_k or sens_k),
                 sensitivity_seeds=a.sensitivity_seeds,
                 report_only=a.report_only, stage1_only=a.stage1_only,
                 stage1_seed_per_run=a.stage1_seed_per_run, command=command)


def main(argv: list[str] | None = None) -> int:
    study = parse_args(argv)
    out = run_study(study)
    print(f"{'embeddings' if study.stage1_only else 'report'}: {out}")
    return 0
