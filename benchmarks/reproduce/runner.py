"""The ``Runner``: every run of a variant on one dataset, with its grid search on validation, the
seeds of its best loss, and the item embeddings each run needs (from the cache where they are)."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from cfsr_head import align_semantic, leave_one_out, load_dataset

from .settings import Stage1, Stage2, Study, Variant, config_hash, stage1_key
from .stage1 import stage1_embeddings
from .stage2 import run_label, run_stage2
from .stats import best_loss, best_point


class Runner:
    """Runs variants on one dataset, with embeddings and runs cached."""

    def __init__(self, study: Study) -> None:
        self.study = study
        data = load_dataset(study.dataset)
        self.items, self.interactions = data.items, data.interactions
        self.split = leave_one_out(data)
        self._embeddings: dict[str, tuple[np.ndarray, str]] = {}
        self.missing: list[str] = []  # runs a report-only study did not find
        # variant -> loss -> [(grid point, first-seed run)] in grid order: what Runner.run searched
        self.searched: dict[str, dict[str, list[tuple[dict, dict]]]] = {}
        print(f"[data] {study.name}: {self.split.num_users} users, {self.split.num_items} items, "
              f"{len(self.split.items)} interactions", flush=True)

    def stage1_settings(self, variant: Variant) -> Stage1 | None:
        """The stage-1 settings of the variant's item embeddings (None: it uses none)."""
        if variant.semantic is None:
            return None
        return dataclasses.replace(self.study.stage1, tuned=(variant.semantic == "cft"), **dict(variant.stage1))

    def with_seed(self, variant: Variant, seed: int) -> Variant:
        """``variant`` as run with ``seed``: with ``Study.stage1_seed_per_run`` a CFT row's stage 1 is
        seeded with the run's seed (one CFT per seed; a row's own stage-1 seed is replaced);
        otherwise ``variant`` itself."""
        if not self.study.stage1_seed_per_run or variant.semantic != "cft":
            return variant
        return dataclasses.replace(variant, stage1=(*variant.stage1, ("seed", seed)))

    def semantic(self, variant: Variant) -> tuple[np.ndarray | None, str | None]:
        s1 = self.stage1_settings(variant)
        if s1 is None:
            return None, None
        key = config_hash(stage1_key(s1))
        if self.study.report_only:  # cached runs are found by the embeddings' key alone
            return None, key
        if key not in self._embeddings:
            emb = stage1_embeddings(self.study, s1, self.items, self.interactions)
            self._embeddings[key] = (align_semantic(emb, self.split.item_index), key)
        return self._embeddings[key]

    def run(self, variant: Variant, seeds: tuple[int, ...]) -> dict[str, list[dict]]:
        """All runs of one variant. Per loss, the grid is searched with the first seed and the point
        with the best validation NDCG@10 kept; the loss whose kept point validates best is then run
        with every other seed (the other losses keep their first-seed run: every choice is made on
        validation, and seeds are spent on the configuration the claims are about).
        Returns ``{loss: [record per seed]}``."""
        semantic, emb_key = self.semantic(self.with_seed(variant, seeds[0]))
        if variant.popularity:
            rec = self._run(variant, Stage2(seed=0), None, None)
            return {"-": [rec]} if rec is not None else {}
        out: dict[str, list[dict]] = {}
        chosen: dict[str, Stage2] = {}
        grid = [dict(zip(self.study.grid, values)) for values in itertools.product(*self.study.grid.values())]
        for loss in self.study.losses:
            first_seed = dataclasses.replace(self.study.stage2, loss=loss, seed=seeds[0])
            searched = [(point, rec) for point in grid
                        if (rec := self._run(variant, dataclasses.replace(first_seed, **point), semantic, emb_key))
                        is not None]  # None: not cached in a report-only study
            if searched:
                # assigned, not appended: a variant run again (the sensitivity part's paper point) is listed once
                self.searched.setdefault(variant.name, {})[loss] = searched
                point, first = best_point(searched)
                chosen[loss], out[loss] = dataclasses.replace(first_seed, **point), [first]
        if not out:
            return out
        loss = best_loss(out)
        more = [self._run(variant, dataclasses.replace(chosen[loss], seed=s), *self.semantic(self.with_seed(variant, s)))
                for s in seeds[1:]]
        out[loss] += [r for r in more if r is not None]
        return out

    def prior_table(self) -> np.ndarray:
        """The study's frozen (un-tuned) item embeddings in index order: the table of a trained-in
        prior (``Stage2.prior_weight``), as of bench_popadjust's post-hoc one."""
        frozen = Variant("frozen table", semantic="frozen")
        table, _ = self.semantic(frozen)
        if table is None:
            raise FileNotFoundError("a trained-in prior needs the study's frozen embeddings (not cached)")
        return table

    def _run(self, variant: Variant, s2: Stage2, semantic: np.ndarray | None, emb_key: str | None) -> dict | None:
        trains_prior = s2.prior_weight != 0 and not variant.popularity and not self.study.report_only
        prior_table = self.prior_table() if trains_prior else None
        rec = run_stage2(self.study, variant, s2, self.split, semantic, emb_key, prior_table)
        if rec is None:
            self.missing.append(run_label(variant, s2))
        return rec
