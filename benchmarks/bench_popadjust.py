"""Post-hoc adjustment of cached runs (popularity, and a semantic-neighbour prior), chosen on validation.

Every model here is trained with a full softmax over items and so carries a popularity prior in its
scores. ``cfsr_head.PopularityAdjusted`` subtracts ``beta * log(1 + training count)`` at scoring
time (post-hoc logit adjustment); nothing is retrained. ``cfsr_head.SemanticPrior`` adds ``weight``
times the cosine between an item's un-tuned LLM embedding (the study's frozen MiniLM table, the same
for every row) and the user's last item (``recency`` 0) or recency-weighted history. For each cached
run of the named rows this script reloads the best checkpoint, chooses the adjustment from a grid on
the validation split's full-ranking N@10 (``choose_adjustment``; the grid contains the model's own
scores when it contains 0), and evaluates test under both protocols with it. Every row gets the same
grid, baselines included. With ``--prior-weights`` each row appears twice: popularity only, and
popularity with the prior (``<row> +prior``). Per-user results are cached beside the run
(``<key>.adj-<grid hash>.*.json``), so a second call only reads them. Options are those of
``benchmarks.explore`` (they select cached runs; nothing is trained or encoded), plus ``--betas``,
``--prior-weights``, ``--prior-recencies``, ``--prior-tail-exponents`` (the prior's weight for item i
times ``(1 + count_i) ** -gamma`` over the geometric mean), ``--logit-adjustments`` (runs trained with the
logit-adjusted loss beside the plain ones, all in one report with paired t-tests between every two rows,
and a second table with each row's tau chosen per seed on validation, ``choose_tau``),
``--choose-on sampled`` (choose on the validation N@10 of the 100-sampled-negative protocol,
the paper's, with validation negatives drawn from another seed than the test negatives) and
``--test-counts inputs`` (on test, the popularity term counts each user's validation item too,
``SplitData.input_popularity``)::

    python -m benchmarks.bench_popadjust --dataset amazon_beauty --quick --cft-steps 200 --length-buckets 16 \\
        --seeds 0 --names "SASRec cos0.1" "SAID cos0.1" --prior-weights 0 2 4 --out runs/popadjust
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import reproduce as rp
from benchmarks.bench_views import CachedRow, cached_rows
from benchmarks.explore import build_study
from benchmarks.reproduce import Variant
from cfsr_head import Adjustment, align_semantic, choose_adjustment, evaluate
from cfsr_head.adjust import DEFAULT_BETAS, VALID_NEGATIVES_SEED_OFFSET
from cfsr_head.io import atomic_write_json, read_json
from llm_item_embed import ItemEmbeddings

PROTOCOLS = ("full", "sampled")
TEST_COUNTS = ("train", "inputs")
GROUPS = ("Overall", "Tail item")
PRIOR_SUFFIX = " +prior"
_PROTOCOL_NAMES = {"full": "full-ranking", "sampled": "100-sampled-negative"}
# Grid fields added after caches were written, with the default they had implicitly before
_LATER_FIELDS = {"protocol": "full", "test_counts": "train", "tail_exponents": (0.0,), "pseudo_counts": (1.0,)}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The adjustments a run is chosen from (``choose_adjustment``'s grid)."""

    betas: tuple[float, ...] = DEFAULT_BETAS
    weights: tuple[float, ...] = (0.0,)
    recencies: tuple[float, ...] = (0.0,)
    protocol: str = "full"  # the validation protocol the adjustment is chosen under
    # the counts of the popularity term on test: "train" (those validation chose on) or "inputs"
    # (``SplitData.input_popularity("test")``: the validation items counted too)
    test_counts: str = "train"
    # SemanticPrior tail exponents: the prior's weight for item i scales as (1 + count_i) ** -gamma
    tail_exponents: tuple[float, ...] = (0.0,)
    # pseudo counts c of the popularity term, beta * log(c + count): 1 is the plain term
    pseudo_counts: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.test_counts not in TEST_COUNTS:
            raise ValueError(f"test_counts must be one of {TEST_COUNTS}, got {self.test_counts!r}")
        for c in self.pseudo_counts:  # checked before any run is loaded
            Adjustment(pseudo_count=c)

    @property
    def tag(self) -> str:
        """Names the cached results of this grid (``<run key>.<tag>``); a field added after the first
        caches were written is left out of the hash at its default, so those caches keep their names."""
        return "adj-" + rp.config_hash(rp.key_fields(self, _LATER_FIELDS))[:8]

    @property
    def has_prior(self) -> bool:
        return any(w != 0 for w in self.weights)


def frozen_semantic(study: rp.Study, runner: rp.Runner):
    """The study's un-tuned (frozen) item embeddings in index order: the prior's table for every row."""
    path = rp.embeddings_path(study, dataclasses.replace(study.stage1, tuned=False))
    if not path.exists():
        raise FileNotFoundError(f"the semantic prior needs the study's frozen embeddings, {path}, which are not "
                                "cached (run any row on frozen embeddings first)")
    return align_semantic(ItemEmbeddings.load(path), runner.split.item_index)


def adjust_run(study: rp.Study, runner: rp.Runner, row: CachedRow, record: dict, grid: Grid,
               semantic: Any = None) -> dict[str, Any]:
    """Choose the adjustment on validation for one cached run and evaluate test with it (cached
    beside the run). Returns ``{"key", "run", "variant", "seed", "beta", "weight", "recency",
    "valid": [{beta, weight, recency, value} per grid point], "test": {protocol: summary}}``; its
    ``key`` names the adjusted per-user results, so ``rp.paired_p`` reads them."""
    runs = study.workdir / study.name / "runs"
    key = f"{record['key']}.{grid.tag}"
    cache = runs / f"{key}.json"
    if cache.exists():
        return read_json(cache)
    s2 = rp.Stage2(**record["stage2"])
    head = row.load_head(study, runner, record)
    # the choice on validation does not depend on the test counts: reuse a cached one
    on_train = runs / f"{record['key']}.{dataclasses.replace(grid, test_counts='train').tag}.json"
    if grid.test_counts != "train" and on_train.exists():
        chosen = read_json(on_train)
        best = _adjustment(chosen)
        values = {_adjustment(p): p["value"] for p in chosen["valid"]}
    else:
        best, values = choose_adjustment(head, runner.split, semantic, grid.betas, grid.weights, grid.recencies,
                                         protocol=grid.protocol, seed=s2.seed + VALID_NEGATIVES_SEED_OFFSET,
                                         tail_exponents=grid.tail_exponents, pseudo_counts=grid.pseudo_counts)
    counts = runner.split.input_popularity("test") if grid.test_counts == "inputs" else None
    adjusted = best.wrap(head, runner.split, semantic, popularity=counts)
    test = {}
    for protocol in PROTOCOLS:
        res = evaluate(adjusted, runner.split, split="test", protocol=protocol, seed=s2.seed)
        res.to_json(runs / f"{key}.{protocol}.json")
        test[protocol] = res.summary()
    out = {"key": key, "run": record["key"], "variant": record["variant"], "seed": s2.seed,
           "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(grid).items()},
           **dataclasses.asdict(best),
           "valid_best": values[best], "valid_plain": values.get(Adjustment()),
           "valid": [{**dataclasses.asdict(p), "value": v} for p, v in values.items()],
           "test": test}
    atomic_write_json(cache, out)
    return out


def popadjust(study: rp.Study, rows: dict[str, Variant], grid: Grid = Grid()) -> dict[str, list[tuple[dict, dict]]]:
    """``{row: [(run record, adjusted record), ...]}`` over the study's seeds, for the loss and grid
    point whose first-seed run validates best (as the harness reports it, ``rp.reported_runs``);
    with a prior in the grid each row comes twice, adjusted for popularity only (``grid.betas``)
    and with the prior (``"<row> +prior"``). A row with no cached run, or whose embeddings are gone, is skipped with a
    message."""
    runner = rp.Runner(dataclasses.replace(study, report_only=True))
    plain = {n: v for n, v in rows.items() if not v.popularity}
    for name in rows.keys() - plain.keys():
        print(f"[popadjust] {name!r} is the popularity model itself; skipped", file=sys.stderr)
    grids = {"": dataclasses.replace(grid, weights=(0.0,), recencies=(0.0,), tail_exponents=(0.0,))}
    semantic = None
    if grid.has_prior:
        grids[PRIOR_SUFFIX] = grid
        semantic = frozen_semantic(study, runner)
    out = {}
    for row in cached_rows(study, runner, plain, "popadjust"):
        # the loss and grid point the harness would report, chosen on validation
        chosen = rp.reported_runs(row.records, study.grid, study.seeds[0])
        for suffix, g in grids.items():
            out[row.name + suffix] = [(rec, adjust_run(study, runner, row, rec, g, semantic)) for rec in chosen]
    return out


def popadjust_by_tau(study: rp.Study, rows: dict[str, Variant], grid: Grid,
                     taus: list[float]) -> dict[str, list[tuple[dict, dict]]]:
    """``popadjust`` for the rows' runs trained with each logit adjustment in ``taus`` (0: the plain
    loss), merged; rows of tau > 0 are named ``"<row> la<tau>"`` (``"<row> la<tau> +prior"``), and
    runs trained with the prior in (``--train-prior``) carry ``" tp<weight>,<recency>,<gamma>"``."""
    results: dict[str, list[tuple[dict, dict]]] = {}
    s2 = study.stage2
    trained = f" tp{s2.prior_weight:g},{s2.prior_recency:g},{s2.prior_tail_exponent:g}" if s2.prior_weight else ""
    for tau in dict.fromkeys(taus):
        at_tau = dataclasses.replace(study, stage2=dataclasses.replace(
            s2, logit_adjustment=tau, validate_with_logit_bias=s2.validate_with_logit_bias and tau > 0))
        for name, pairs in popadjust(at_tau, rows, grid).items():
            base, prior, _ = name.partition(PRIOR_SUFFIX)
            results[f"{base}{tau_label(at_tau.stage2.logit_adjustment, at_tau.stage2.validate_with_logit_bias)}"
                    f"{trained}{prior}"] = pairs
    return results


def tau_label(tau: float, validate_with_logit_bias: bool = False) -> str:
    """The part of a row's name that says how it was trained: ``" la<tau>"`` for the logit-adjusted
    loss (``" la<tau> vb"`` when validated with its bias added back), nothing for the plain loss."""
    if not tau:
        return ""
    return f" la{tau:g}" + (" vb" if validate_with_logit_bias else "")


def _record_tau(record: dict) -> float:
    """A run record's logit adjustment (records from before the field: 0)."""
    return float(record["stage2"].get("logit_adjustment", 0.0))


def _record_tau_label(record: dict) -> str:
    return tau_label(_record_tau(record), bool(record["stage2"].get("validate_with_logit_bias", False)))


def choose_tau(results: dict[str, list[tuple[dict, dict]]]) -> dict[str, list[tuple[dict, dict]]]:
    """The logit adjustment chosen on validation: ``popadjust_by_tau``'s rows that differ only in
    their tau (``"<row> la<tau>"`` and ``"<row>"`` for tau 0) become one row, named ``"<row> [tau
    <per-seed taus>]"``, holding for each seed the run whose adjusted validation N@10 (the
    criterion that chose its adjustment) is highest; ties go to the smaller tau. Rows with a
    single tau are left out: there is nothing to choose."""
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for name, pairs in results.items():
        for rec, adj in pairs:
            # popadjust_by_tau names a row "<variant><tau label><rest>": drop the label at that place
            head = rec["variant"] + _record_tau_label(rec)
            if not name.startswith(head):
                raise ValueError(f"row {name!r} does not start with its run's variant and tau label {head!r}")
            groups.setdefault(rec["variant"] + name[len(head):], []).append((rec, adj))
    out = {}
    for name, pairs in groups.items():
        if len({_record_tau(rec) for rec, _ in pairs}) < 2:
            continue
        best: dict[int, tuple[dict, dict]] = {}
        for rec, adj in sorted(pairs, key=lambda p: _record_tau(p[0])):  # ascending: ties keep the smaller tau
            seed = adj["seed"]
            if seed not in best or adj["valid_best"] > best[seed][1]["valid_best"]:
                best[seed] = (rec, adj)
        chosen = [best[s] for s in sorted(best)]
        label = "/".join(f"{_record_tau(r):g}" for r, _ in chosen)
        out[f"{name} [tau {label}]"] = chosen
    return out


def without_trained_prior(study: rp.Study) -> rp.Study:
    """``study`` with no prior trained in (``--untrained-too``): its runs are the cached runs of the
    same rows trained without ``--train-prior``."""
    return dataclasses.replace(study, stage2=dataclasses.replace(
        study.stage2, prior_weight=0.0, prior_recency=0.0, prior_tail_exponent=0.0))


def report(study: rp.Study, results: dict[str, list[tuple[dict, dict]]],
           train_counts: dict[str, list[tuple[dict, dict]]] | None = None) -> tuple[str, dict]:
    """Markdown (plain and adjusted test N@10 per row, mean over seeds; paired t-tests between rows
    on the adjusted results and of each row's adjusted against its plain results) and its raw data.
    ``train_counts``: the same rows adjusted with training counts on test, for a grid of
    ``test_counts="inputs"``; each row is then also tested against its twin."""
    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    lines = ["| row | seeds | beta (prior weight, recency) chosen | valid plain -> adjusted | "
             + " | ".join(f"{p} {g} plain -> adjusted" for p in PROTOCOLS for g in GROUPS) + " |",
             "|---|---|---|---|" + "---|" * (len(PROTOCOLS) * len(GROUPS))]
    raw: dict[str, Any] = {"rows": {}, "tests": []}
    for name, pairs in results.items():
        plain_valid = mean([_valid_plain(r, a) for r, a in pairs])
        adj_valid = mean([a["valid_best"] for _, a in pairs])
        cells, row_raw = [], {"seeds": [a["seed"] for _, a in pairs], "beta": [a["beta"] for _, a in pairs],
                              "weight": [a["weight"] for _, a in pairs], "recency": [a["recency"] for _, a in pairs],
                              "tail_exponent": [a.get("tail_exponent", 0.0) for _, a in pairs],
                              "pseudo_count": [a.get("pseudo_count", 1.0) for _, a in pairs],
                              "valid": [plain_valid, adj_valid], "test": {}}
        for p, g in itertools.product(PROTOCOLS, GROUPS):
            before = mean([r["test"][p][g]["NDCG@10"] for r, _ in pairs])
            after = mean([a["test"][p][g]["NDCG@10"] for _, a in pairs])
            cells.append(f"{before:.4f} -> {after:.4f} ({after / before - 1:+.1%})" if before > 0 else f"{after:.4f}")
            row_raw["test"][f"{p} {g}"] = [before, after]
        lines.append(f"| {name} | {len(pairs)} | {', '.join(_chosen(a) for _, a in pairs)} | "
                     f"{plain_valid:.4f} -> {adj_valid:.4f} | " + " | ".join(cells) + " |")
        raw["rows"][name] = row_raw
    lines += ["", "Paired t-tests over users (seed-averaged per-user N@10; gain of the first over the second):", "",
              "| comparison | " + " | ".join(f"{p} {g}" for p in PROTOCOLS for g in GROUPS) + " |",
              "|---|" + "---|" * (len(PROTOCOLS) * len(GROUPS))]
    comparisons = [(f"{n} adjusted vs plain", [a for _, a in v], [r for r, _ in v]) for n, v in results.items()]
    comparisons += [(f"{n} input counts vs training counts", [a for _, a in v], [a for _, a in train_counts[n]])
                    for n, v in results.items() if train_counts and n in train_counts]
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


def _valid_plain(record: dict, adjusted: dict) -> float:
    """The unadjusted model's validation N@10 under the grid's protocol: the grid's own value when 0 is
    in it (records before ``valid_plain`` existed were all full-ranking: the run's), else NaN for a
    sampled grid, whose run records hold full-ranking validation only."""
    if adjusted.get("valid_plain") is not None:
        return adjusted["valid_plain"]
    return record["valid"]["Overall"]["NDCG@10"] if adjusted["grid"].get("protocol", "full") == "full" else math.nan


def _adjustment(record: dict) -> Adjustment:
    """The ``Adjustment`` of a cached record (records before the tail exponent or the pseudo count have
    none: 0 and 1)."""
    return Adjustment(record["beta"], record["weight"], record["recency"], record.get("tail_exponent", 0.0),
                      record.get("pseudo_count", 1.0))


def _chosen(adjusted: dict) -> str:
    pseudo = adjusted.get("pseudo_count", 1.0)
    beta = f"{adjusted['beta']:g}" + (f" c{pseudo:g}" if pseudo != 1 else "")
    if adjusted["weight"] == 0:
        return beta
    gamma = adjusted.get("tail_exponent", 0.0)
    return (f"{beta} ({adjusted['weight']:g}, {adjusted['recency']:g}"
            + (f", gamma {gamma:g})" if gamma else ")"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # abbreviations would take the harness's flags
    p.add_argument("--betas", nargs="+", type=float, default=list(DEFAULT_BETAS))
    p.add_argument("--prior-weights", nargs="+", type=float, default=[0.0], metavar="W",
                   help="SemanticPrior weights (0 = none); any other value adds a '<row> +prior' row per row")
    p.add_argument("--prior-recencies", nargs="+", type=float, default=[0.0], metavar="R",
                   help="SemanticPrior recencies (0 = the last item alone)")
    p.add_argument("--prior-tail-exponents", nargs="+", type=float, default=[0.0], metavar="GAMMA",
                   help="SemanticPrior tail exponents (0 = every item alike): item i's prior weight scales as "
                        "(1 + training count_i) ** -GAMMA")
    p.add_argument("--popularity-pseudo-counts", nargs="+", type=float, default=[1.0], metavar="C",
                   help="pseudo counts of the popularity term, beta * log(C + training count) (1 = the plain term)")
    p.add_argument("--choose-on", choices=PROTOCOLS, default="full",
                   help="the validation protocol whose Overall N@10 chooses the adjustment (default full ranking)")
    p.add_argument("--test-counts", choices=TEST_COUNTS, default="train",
                   help="the counts of the popularity term on test: 'train' (those the adjustment was chosen "
                        "on) or 'inputs' (the validation items counted too, SplitData.input_popularity)")
    p.add_argument("--logit-adjustments", nargs="+", type=float, default=None, metavar="TAU",
                   help="the rows' runs trained with each of these logit adjustments (0: the plain loss), "
                        "side by side in one report; rows of tau > 0 are named '<row> la<tau>'")
    p.add_argument("--untrained-too", action="store_true",
                   help="with --train-prior: also the same rows trained without the prior in (cached runs), side by "
                        "side and tested against each other")
    a, rest = p.parse_known_args(argv)
    study, rows = build_study(rest)
    studies = [study]
    if a.untrained_too:
        if not study.stage2.prior_weight:
            p.error("--untrained-too needs --train-prior")
        studies.append(without_trained_prior(study))
    grid = Grid(*(tuple(sorted(set(v))) for v in (a.betas, a.prior_weights, a.prior_recencies)), protocol=a.choose_on,
                test_counts=a.test_counts, tail_exponents=tuple(sorted(set(a.prior_tail_exponents))),
                pseudo_counts=tuple(sorted(set(a.popularity_pseudo_counts))))
    taus = a.logit_adjustments if a.logit_adjustments else [study.stage2.logit_adjustment]
    # with input counts, each row against the same choice scored with training counts: its twin grid, cached or
    # computed first, so that the input-count grid reuses its choice and only test is evaluated twice
    def every_study(g: Grid) -> dict[str, list[tuple[dict, dict]]]:
        return {k: v for st in studies for k, v in popadjust_by_tau(st, rows, g, taus).items()}

    twins = every_study(dataclasses.replace(grid, test_counts="train")) if grid.test_counts == "inputs" else None
    results = every_study(grid)
    text, raw = report(study, results, twins)
    chosen = choose_tau(results)
    if chosen:  # the best-trained version of each row: tau chosen per seed on validation, like the adjustment
        chosen_text, raw["chosen_tau"] = report(study, chosen)
        text += ("\n## The logit adjustment chosen on validation\n\nEach row's runs trained with the taus above, "
                 "taken per seed at the tau whose adjusted validation N@10 is highest (ties: the smaller tau); "
                 "the taus chosen per seed are in the row's name.\n\n" + chosen_text)
    command = "python -m benchmarks.bench_popadjust " + shlex.join(argv)
    prior = (f" Rows named `+prior` add `SemanticPrior` (the cosine to the user's frozen-MiniLM profile), its weight "
             f"from {list(grid.weights)}, recency from {list(grid.recencies)}"
             + (f" and tail exponent gamma from {list(grid.tail_exponents)} (item i's weight times "
                "(1 + count_i) ** -gamma over the geometric mean)" if grid.tail_exponents != (0.0,) else "")
             + " chosen with beta."
             if grid.has_prior else "")
    text = (f"# Post-hoc adjustment on {study.name}\n\nMade by `{command}`. Each run's beta is "
            f"chosen on validation ({_PROTOCOL_NAMES[grid.protocol]} N@10) from {list(grid.betas)}; test N@10, mean "
            f"over seeds.{prior}"
            + (f" The popularity term is beta * log(c + count), its pseudo count c (shown as `c<c>` when not 1) "
               f"chosen with beta from {list(grid.pseudo_counts)}." if grid.pseudo_counts != (1.0,) else "")
            + (" On test the popularity term counts the validation items too (`--test-counts inputs`)."
               if grid.test_counts == "inputs" else "")
            + (" Rows named `la<tau>` were trained with the logit-adjusted loss (`TrainConfig.logit_adjustment`"
               " tau); their plain column is that model's own scores." if any(taus) else "")
            + (" Rows named `vb` chose their best epoch on validation scores with that bias added back "
               "(`TrainConfig.validate_with_logit_bias`)." if study.stage2.validate_with_logit_bias else "")
            + (" Rows named `tp<weight>,<recency>,<gamma>` were trained with that `SemanticPrior` in (`Trainer(..., "
               "prior=...)`, `--train-prior`); their plain column is the model's own scores, without the prior."
               if study.stage2.prior_weight else "") + "\n\n" + text)
    print(text)
    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study.name}_popadjust.md").write_text(text)
    atomic_write_json(out / f"{study.name}_popadjust.json", rp.json_safe({"command": command, **raw}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
