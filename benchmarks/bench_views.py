"""Each view alone against the fused score, for cached dual-view runs.

A dual-view head scores an item by ``[e_se : e_co] . [u_se : u_co]`` (or its cosine / tau). This
script reloads the best checkpoint of cached ``benchmarks.reproduce`` / ``benchmarks.explore`` runs
and ranks all items (full ranking) three ways: with the fused score, with the semantic half alone and
with the collaborative half alone, each half scored as the head scores (cosine within the half when
the head uses a temperature). It shows whether each view recommends on its own
(``DualViewConfig.view_loss_weight``) or the halves only work together. Options are those of
``benchmarks.explore`` (they select the cached runs and embeddings; nothing is trained or
encoded)::

    python -m benchmarks.bench_views --dataset amazon_beauty --quick --cft-steps 200 --length-buckets 16 \\
        --seeds 0 --names "w/o Cro frozen cos0.1" "w/o Cro frozen vloss1.0 cos0.1"
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from benchmarks import reproduce as rp
from benchmarks.explore import build_study
from benchmarks.reproduce import Variant
from cfsr_head import DualViewHead, align_semantic, evaluate
from cfsr_head.io import read_json
from llm_item_embed import ItemEmbeddings

VIEWS = ("fused", "semantic", "collaborative")


class OneView(nn.Module):
    """One half of a dual-view head's state and item vectors, scored as the head scores them."""

    def __init__(self, head: DualViewHead, view: str) -> None:
        super().__init__()
        if not (head.config.use_semantic and head.config.use_collaborative):
            raise ValueError("OneView needs a head with both views")
        d = head.config.d
        self.head, self.half = head, {"semantic": slice(0, d), "collaborative": slice(d, 2 * d)}[view]
        self.max_len = head.max_len

    @property
    def num_items(self) -> int:
        return self.head.num_items

    def user_state(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.head.user_state(item_seq, padding_mask)[:, self.half]

    # the head's own scoring functions, so that a temperature is applied exactly as in training
    def _items(self) -> Tensor:
        return self.head._scored_items(self.head.item_representations()[:, self.half])

    def full_scores(self, states: Tensor) -> Tensor:
        scores = self.head._scored_states(states) @ self._items().T
        scores[:, 0] = float("-inf")
        return scores

    def score(self, states: Tensor, candidates: Tensor) -> Tensor:
        rows = self._items()[candidates.long()]
        states = self.head._scored_states(states)
        return states @ rows.T if candidates.ndim == 1 else torch.einsum("bd,bcd->bc", states, rows)


def finished_runs(study: rp.Study) -> list[dict]:
    """Every finished run record of the study's dataset (read once; per-protocol result files skipped)."""
    folder = study.workdir / study.name / "runs"
    return [read_json(p) for p in sorted(folder.glob("*.json")) if p.name.count(".") == 1]


def matching_runs(records: list[dict], study: rp.Study, name: str, embeddings_key: str | None) -> list[dict]:
    """``name``'s records on these embeddings (the run cache's key, as ``Runner.semantic`` gives it;
    None: no embeddings) for the study's seeds and losses, any point of its grid, and otherwise the
    study's stage-2 settings exactly (epoch budget, logit adjustment, batching ...)."""
    def same_settings(saved: dict) -> bool:
        s2 = rp.Stage2(**saved)  # fields added later take their defaults, as in the run keys
        if any(getattr(s2, k) not in values for k, values in study.grid.items()):
            return False
        expected = dataclasses.replace(study.stage2, seed=s2.seed, loss=s2.loss,
                                       **{k: getattr(s2, k) for k in study.grid})
        return s2 == expected and s2.seed in study.seeds and s2.loss in study.losses

    out = [r for r in records if r.get("variant") == name and r.get("embeddings") == embeddings_key
           and same_settings(r["stage2"])]
    return sorted(out, key=lambda r: (r["stage2"]["loss"], r["stage2"]["seed"]))


@dataclasses.dataclass
class CachedRow:
    """One named row's cached runs on the study's embeddings, and how to reload a run's best head."""

    name: str
    variant: Variant
    records: list[dict]
    semantic: Any  # aligned semantic table, or None for rows without one

    def load_head(self, study: rp.Study, runner: rp.Runner, record: dict) -> DualViewHead:
        head = rp.build_model(self.variant, rp.Stage2(**record["stage2"]), runner.split, self.semantic)
        ckpt = study.workdir / study.name / "runs" / f"{record['key']}-ckpt" / "best" / "model.safetensors"
        head.load_state_dict(load_file(str(ckpt)))
        return head


def cached_rows(study: rp.Study, runner: rp.Runner, rows: dict[str, Variant], tag: str) -> list[CachedRow]:
    """The rows that have cached runs and, when they use one, a cached embedding table; the others
    are skipped with a message prefixed ``[tag]``. Nothing is trained or encoded."""
    all_runs, out = finished_runs(study), []
    for name, variant in rows.items():
        _, embeddings_key = runner.semantic(variant)
        records = matching_runs(all_runs, study, name, embeddings_key)
        if not records:
            print(f"[{tag}] no cached run of {name!r} for these settings", file=sys.stderr)
            continue
        semantic = None
        if embeddings_key is not None:
            path = rp.embeddings_path(study, runner.stage1_settings(variant))
            if not path.exists():
                print(f"[{tag}] {name!r}: its embeddings {path} are not cached", file=sys.stderr)
                continue
            semantic = align_semantic(ItemEmbeddings.load(path), runner.split.item_index)
        out.append(CachedRow(name, variant, records, semantic))
    return out


def view_scores(study: rp.Study, rows: dict[str, Variant]) -> list[dict[str, Any]]:
    """Full-ranking N@10 (Overall and Tail item) of every cached run of ``rows``, per split, for the
    fused score and each view alone. Runs or embeddings that are not cached are skipped with a
    message: nothing is trained or encoded."""
    runner = rp.Runner(dataclasses.replace(study, report_only=True))  # report-only: never trains embeddings
    out = []
    for row in cached_rows(study, runner, rows, "views"):
        for rec in row.records:
            s2 = rp.Stage2(**rec["stage2"])
            head = row.load_head(study, runner, rec)
            models = {"fused": head, **{v: OneView(head, v) for v in VIEWS[1:]}}
            for split in ("valid", "test"):
                r: dict[str, Any] = {"variant": row.name, "loss": s2.loss, "dropout": s2.dropout, "seed": s2.seed,
                                     "split": split}
                for view in VIEWS:
                    res = evaluate(models[view], runner.split, split=split, protocol="full").summary()
                    r[view] = {g: res[g]["NDCG@10"] for g in ("Overall", "Tail item")}
                out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    study, rows = build_study(argv)
    print("| variant | loss | dropout | seed | split | " + " | ".join(f"{v} N@10 (tail)" for v in VIEWS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(VIEWS))
    for r in view_scores(study, rows):
        cells = [f"{r[v]['Overall']:.4f} ({r[v]['Tail item']:.4f})" for v in VIEWS]
        print(f"| {r['variant']} | {r['loss']} | {r['dropout']} | {r['seed']} | {r['split']} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
