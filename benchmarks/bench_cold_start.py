"""Cold start: recommending items that no model saw in training (``DualViewHead.add_items``).

A random share of the catalogue (``--cold-fraction``, seeded by ``--cold-seed``) is withheld: every
interaction with those items is removed, the models are trained on what is left (leave-one-out,
early stopping on its validation), and then the withheld items are added to each model without
retraining. The test is the leave-one-out test of the whole data over the whole catalogue, split
into users whose test item is a known item and users whose test item is a new one; the inputs keep
the new items a user met before the test. The new items' rows come from their text alone (the
bundled MiniLM, untuned, over the study's prompt).

Rows, each trained with full-softmax CE and its learning rate chosen on validation
(``cfsr_head.grid_search``), per seed:

- ``Pop`` and ``SASRec`` (ID only): they cannot score a new item (-inf), and drop new items from
  the inputs; the reference for known targets;
- ``Content kNN``: cosine between an item's text embedding and the user's last item's, untrained;
- ``LLM2X`` (frozen PCA table), ``SAID`` (PCA-initialised trainable table), the dual view with the
  concatenation fusion (``dual-concat``) and with the paper's cross-attention (``dual-cross``), each
  extended four ways
  (``add_items(collaborative=...)``): ``projection`` (the PCA projection of the new item's text
  embedding, the paper's init), ``mapping`` (a ridge regression from the known items' text
  embeddings to their trained rows), ``neighbours`` (the mean trained row of its 10 nearest known
  items by text) and ``zeros`` (LLM2X's table is never trained, so it gets only ``projection``);
- with ``--cold-item-dropout Q ...``, SAID and the concatenation dual view trained with
  ``cold_item_dropout=Q`` (each step, an item's row is replaced by its projection with probability
  Q), as ``SAID-coldQ`` and ``dual-concat-coldQ``, extended the same four ways; with
  ``--spare-negatives`` also trained with ``cold_items_as_negatives=False`` (a dropped item keeps
  its trained row where it is a negative), as ``SAID-coldQ-spared`` and ``dual-concat-coldQ-spared``;
- with ``--offset-steps S ...``, each trained row's ``projection`` and ``mapping`` extensions also
  with one score offset added to every new item (``NewItemOffset``), S times the spread of the
  model's scores, S chosen on the whole data's validation split (full ranking, all users: its
  targets include new items, as logged traffic after the items were added would), as
  ``..., projection +offset``: is the level of the new items' scores simply mis-set?

Prints test N@10 (full ranking, and 100 sampled negatives) for all users, known-item targets and
new-item targets, mean ± std over seeds, for each extended row the other extensions against
``projection``, each ``-coldQ`` row against the same model trained without it and each
``-spared`` row against the ``-coldQ`` row it spares, each ``+offset`` row against the same
extension without it (paired t-test on per-user N@10 averaged over the seeds); writes the numbers
to ``<workdir>/<dataset>-cold<fraction>-seed<cold seed>/results.json``. Runs keep their
checkpoints, so a rerun resumes (the offsets are chosen again)::

    python -m benchmarks.bench_cold_start --dataset ml-100k --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import ttest_rel
from torch import nn

from benchmarks.bench_warm_start import D, DROPOUT, HEADS, LAYERS, MAX_LEN, frozen_embeddings, train_row
from benchmarks.reproduce import REPO_ROOT
from cfsr_head import (DualViewHead, InteractionData, PopularityModel, SASRecEncoder, SplitData, align_semantic,
                       default_data_dir, evaluate, leave_one_out, load_dataset)
from cfsr_head.evaluate import full_ranks, metrics_from_ranks, model_max_len
from cfsr_head.io import atomic_write_json

PROTOCOLS = ("full", "sampled")
GROUPS = ("All", "known target", "new target")
EXTENSIONS = ("projection", "mapping", "neighbours", "zeros")


class KnownItemsOnly(nn.Module):
    """A model that knows items ``1..N`` evaluated on a catalogue of ``num_items`` > N: new items
    score ``-inf`` (never recommended; a new target ranks last) and are dropped from the inputs."""

    def __init__(self, model: nn.Module, num_items: int) -> None:
        super().__init__()
        self.model, self.known, self.num_items = model, int(model.num_items), int(num_items)
        self.train(model.training)  # evaluate restores this mode, on the wrapped model too

    def user_state(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        seq = item_seq.masked_fill(item_seq > self.known, 0)
        return self.model.user_state(seq, seq == 0)

    def full_scores(self, states: torch.Tensor) -> torch.Tensor:
        scores = self.model.full_scores(states)
        return torch.cat([scores, scores.new_full((scores.shape[0], self.num_items - self.known), float("-inf"))], 1)

    def score(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        new = candidates > self.known
        scores = self.model.score(states, candidates.masked_fill(new, 1))
        return scores.masked_fill(new, float("-inf"))


class ContentKNN(nn.Module):
    """Scores items by the cosine between their text embedding and the user's last item's."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        rows = nn.functional.normalize(torch.as_tensor(table, dtype=torch.float32), dim=-1)
        self.register_buffer("table", torch.cat([rows.new_zeros(1, rows.shape[1]), rows]))
        self.num_items = rows.shape[0]

    def user_state(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[item_seq[:, -1]]                    # inputs are left-padded: last column = last item

    def full_scores(self, states: torch.Tensor) -> torch.Tensor:
        scores = states @ self.table.T
        scores[:, 0] = float("-inf")
        return scores

    def score(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return (self.table[candidates] * states[:, None]).sum(-1)


class NewItemOffset(nn.Module):
    """``model`` with ``offset`` added to the scores of the items after the first ``known`` (the
    items added after training), so that new items can be lifted or lowered as a whole."""

    def __init__(self, model: nn.Module, known: int, offset: float) -> None:
        super().__init__()
        self.model, self.known, self.offset = model, int(known), float(offset)
        self.num_items = int(model.num_items)
        self.train(model.training)  # evaluate restores this mode, on the wrapped model too

    def user_state(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.user_state(item_seq, padding_mask)

    def full_scores(self, states: torch.Tensor) -> torch.Tensor:
        scores = self.model.full_scores(states)
        return torch.cat([scores[:, : self.known + 1], scores[:, self.known + 1:] + self.offset], 1)

    def score(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.model.score(states, candidates) + self.offset * (candidates > self.known)


@contextlib.contextmanager
def scoring(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients for the block, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def valid_ndcg_by_offset(model: nn.Module, full: SplitData, known: int, offsets: list[float],
                         batch_size: int = 256) -> dict[float, float]:
    """Full-ranking N@10 on ``full``'s validation split of ``NewItemOffset(model, known, o)`` for
    each ``o`` in ``offsets``, in one pass: each batch is scored once and ranked once per offset
    (the ranks ``evaluate`` gives each wrapped model)."""
    seq_all, target_all, _ = full.eval_inputs("valid", model_max_len(model) or full.max_len)
    history = full.history("valid")
    is_new = torch.arange(full.num_items + 1) > known
    totals = dict.fromkeys(offsets, 0.0)
    with scoring(model):
        for b in range(0, len(target_all), batch_size):
            sl = slice(b, b + batch_size)
            scores = model.full_scores(model.user_state(seq_all[sl], seq_all[sl] == 0))
            for offset in offsets:
                ranks = full_ranks(scores + offset * is_new, target_all[sl], history[sl], full.num_items)
                totals[offset] += float(metrics_from_ranks(ranks.numpy(), (10,))[1][10].sum())
    return {offset: total / len(target_all) for offset, total in totals.items()}


def calibrated_offset(model: nn.Module, full: SplitData, known: int, steps: tuple[float, ...]) -> tuple[float, float]:
    """``(offset, valid N@10)``: the new-item offset, from ``steps`` times the spread of the model's
    scores, with the best full-ranking N@10 on ``full``'s validation split (every user, the whole
    catalogue: validation targets include new items, as a period of logged traffic after the items
    were added would); ties go to the smaller offset."""
    seq, _, _ = full.eval_inputs("valid", model_max_len(model) or full.max_len)
    sample = seq[torch.randperm(len(seq), generator=torch.Generator().manual_seed(0))[:256]]
    with scoring(model):
        spread = float(model.full_scores(model.user_state(sample, sample == 0))[:, 1:].std())
    found = valid_ndcg_by_offset(model, full, known, [step * spread for step in steps])
    best = max(found, key=lambda b: (found[b], -abs(b)))
    return best, found[best]


def withhold_items(data: InteractionData, fraction: float, seed: int) -> tuple[InteractionData, list[str]]:
    """The data without the interactions of a random ``fraction`` of its items, and those items."""
    items = np.sort(data.interactions["item_id"].unique())
    n = int(round(fraction * len(items)))
    if not 0 < n < len(items):
        raise ValueError(f"--cold-fraction {fraction} withholds {n} of {len(items)} items; it must leave "
                         "some known and some new")
    cold = np.random.default_rng(seed).choice(items, size=n, replace=False).tolist()
    kept = data.interactions[~data.interactions["item_id"].isin(cold)]
    return InteractionData(kept.reset_index(drop=True), data.items, data.name), cold


def split_pair(data: InteractionData, fraction: float, seed: int) -> tuple[SplitData, SplitData]:
    """(split of the known items' interactions, split of all data whose index appends the new items)."""
    known_data, _ = withhold_items(data, fraction, seed)
    known = leave_one_out(known_data, max_len=MAX_LEN)
    ids = pd.unique(data.interactions["item_id"])
    new_ids = [i for i in ids if i not in known.item_index]
    full = leave_one_out(data, max_len=MAX_LEN, item_index=known.item_index.extended(new_ids))
    return known, full


def with_new_items(model: DualViewHead, new_rows: np.ndarray, how: str) -> DualViewHead:
    """A copy of ``model`` given the new items, their ID rows from ``how``."""
    out = copy.deepcopy(model)
    out.add_items(new_rows, collaborative=how)
    return out.eval()


def cold_suffix(q: float, as_negatives: bool) -> str:
    """The row-name suffix of a model trained with ``cold_item_dropout=q``: ``-cold0.2``, and
    ``-cold0.2-spared`` with ``cold_items_as_negatives=False``."""
    return f"-cold{q:g}" + ("" if as_negatives else "-spared")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-100k", help="dataset folder, or a name under CFSR_DATA_DIR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cold-fraction", type=float, default=0.1, help="share of the items withheld from training")
    p.add_argument("--cold-seed", type=int, default=0, help="seed of the choice of withheld items")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="learning rates searched per row")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--length-buckets", type=int, default=0,
                   help="batches of similar-length sequences (TrainConfig.length_buckets; 16 on the Amazon sets)")
    p.add_argument("--cold-item-dropout", type=float, nargs="*", default=[], metavar="Q",
                   help="also train SAID and the concatenation dual view with DualViewConfig.cold_item_dropout=Q")
    p.add_argument("--spare-negatives", action="store_true",
                   help="with --cold-item-dropout, also train each of those rows with cold_items_as_negatives=False "
                        "(a dropped item keeps its trained row where it is a negative)")
    p.add_argument("--offset-steps", type=float, nargs="*", default=[], metavar="S",
                   help="also give each trained row's projection and mapping extensions a new-item score offset, "
                        "S times the spread of its scores, the S chosen on the whole data's validation split")
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "cold_start"))
    a = p.parse_args(argv)
    folder = Path(a.dataset) if Path(a.dataset).is_dir() else default_data_dir() / a.dataset
    workdir = Path(a.workdir) / f"{folder.name}-cold{a.cold_fraction:g}-seed{a.cold_seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(folder)
    known, full = split_pair(data, a.cold_fraction, a.cold_seed)
    (workdir.parent / folder.name).mkdir(exist_ok=True)
    emb = frozen_embeddings(data, workdir.parent / folder.name)
    semantic = align_semantic(emb, known.item_index)
    whole = align_semantic(emb, full.item_index)
    new_rows = whole[known.num_items:]
    _, targets, _ = full.eval_inputs("test", MAX_LEN)
    is_new = targets.numpy() > known.num_items
    masks = {"All": np.ones(len(is_new), bool), "known target": ~is_new, "new target": is_new}
    print(f"{folder.name}: {full.num_items} items, {known.num_items} known and {full.num_items - known.num_items} "
          f"new (cold fraction {a.cold_fraction:g}, seed {a.cold_seed}); {full.num_users} test users, "
          f"{int(is_new.sum())} with a new test item; seeds {a.seeds}, lr from {a.lrs}, up to {a.epochs} "
          f"epochs (patience {a.patience}), CE")

    def encoder() -> SASRecEncoder:
        return SASRecEncoder(d=D, n_layers=LAYERS, n_heads=HEADS, max_len=MAX_LEN, dropout=DROPOUT)

    builds = {
        "SASRec": lambda: DualViewHead(encoder(), num_items=known.num_items, d=D, use_semantic=False,
                                       collab_init="random"),
        "LLM2X": lambda: DualViewHead(encoder(), semantic, d=D, use_semantic=False, freeze_collaborative=True,
                                      dropout=DROPOUT),
        "SAID": lambda: DualViewHead(encoder(), semantic, d=D, use_semantic=False, dropout=DROPOUT),
        "dual-concat": lambda: DualViewHead(encoder(), semantic, d=D, fusion="concat", dropout=DROPOUT),
        "dual-cross": lambda: DualViewHead(encoder(), semantic, d=D, fusion="cross", dropout=DROPOUT),
    }
    cold_forms = [(q, as_negatives) for q in a.cold_item_dropout
                  for as_negatives in ((True, False) if a.spare_negatives else (True,))]
    for q, as_negatives in cold_forms:
        cold = dict(dropout=DROPOUT, cold_item_dropout=q, cold_items_as_negatives=as_negatives)
        suffix = cold_suffix(q, as_negatives)
        builds[f"SAID{suffix}"] = lambda c=cold: DualViewHead(encoder(), semantic, d=D, use_semantic=False, **c)
        builds[f"dual-concat{suffix}"] = lambda c=cold: DualViewHead(encoder(), semantic, d=D, fusion="concat", **c)
    budget = dict(lrs=a.lrs, workdir=workdir, epochs=a.epochs, patience=a.patience, length_buckets=a.length_buckets)
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, model: nn.Module, seed: int) -> None:
        tests = {pr: evaluate(model, full, split="test", protocol=pr, seed=seed, groups=None) for pr in PROTOCOLS}
        runs.setdefault(name, []).append(tests)

    for seed in a.seeds:
        record("Pop", KnownItemsOnly(PopularityModel(known), full.num_items), seed)
        record("Content kNN", ContentKNN(whole), seed)
        for name, build in builds.items():
            model = train_row(name, known, build, seed, **budget)["model"]
            if name == "SASRec":
                record(name, KnownItemsOnly(model, full.num_items), seed)
                continue
            for how in (("projection",) if name == "LLM2X" else EXTENSIONS):
                extended = with_new_items(model, new_rows, how)
                record(f"{name}, {how}", extended, seed)
                if a.offset_steps and how in ("projection", "mapping") and name != "LLM2X":
                    offset, valid = calibrated_offset(extended, full, known.num_items, tuple(a.offset_steps))
                    print(f"  seed {seed} {name}, {how}: new-item offset {offset:+.3f} (valid {valid:.4f})", flush=True)
                    record(f"{name}, {how} +offset", NewItemOffset(extended, known.num_items, offset), seed)

    def per_user(name: str, protocol: str, group: str) -> np.ndarray:
        return np.mean([t[protocol].metric("NDCG@10")[masks[group]] for t in runs[name]], axis=0)

    columns = [(pr, g) for pr in PROTOCOLS for g in GROUPS]
    print(f"\nTest N@10 over the whole catalogue, mean ± std over {len(a.seeds)} seeds "
          f"(users: {', '.join(f'{g} {int(m.sum())}' for g, m in masks.items())}):")
    print(f"  {'row':<46}" + "".join(f"{pr + ' ' + g:>24}" for pr, g in columns))
    table: dict[str, dict[str, list[float]]] = {}
    for name, tests in runs.items():
        cells = []
        for pr, g in columns:
            values = [float(t[pr].metric("NDCG@10")[masks[g]].mean()) for t in tests]
            table.setdefault(name, {})[f"{pr} {g}"] = values
            cells.append(f"{np.mean(values):.4f} ± {np.std(values):.4f}")
        print(f"  {name:<46}" + "".join(f"{c:>24}" for c in cells))
    def against(row: str, ref_row: str) -> str:
        """``row``'s ratio to ``ref_row`` in every column, with the paired t-test over users."""
        cells = []
        for pr, g in columns:
            ours, ref = per_user(row, pr, g), per_user(ref_row, pr, g)
            ratio = ours.mean() / ref.mean() if ref.mean() > 0 else float("nan")
            cells.append(f"{pr} {g} {ratio:.2f}x (p = {ttest_rel(ours, ref).pvalue:.2g})")
        return "; ".join(cells)

    print("\nAgainst the same model extended by projection (paired t-test over users, seed-averaged N@10):")
    for name in builds:
        for how in EXTENSIONS[1:]:
            if f"{name}, {how}" in runs:
                print(f"  {name}, {how}: " + against(f"{name}, {how}", f"{name}, projection"))
    if a.offset_steps:
        print("\nWith the new-item offset chosen on validation against the same extension without it:")
        for name in builds:
            for how in ("projection", "mapping"):
                if f"{name}, {how} +offset" in runs:
                    print(f"  {name}, {how} +offset: " + against(f"{name}, {how} +offset", f"{name}, {how}"))
    trained_with = [(base + cold_suffix(*form), base) for form in cold_forms for base in ("SAID", "dual-concat")]
    if trained_with:
        print("\nTrained with cold_item_dropout against the same model trained without it, both extended by "
              "projection (same test):")
    for name, base in trained_with:
        print(f"  {name}: " + against(f"{name}, projection", f"{base}, projection"))
    if a.spare_negatives:
        print("\nNegatives spared against the same dropout with cold negatives, both extended by projection:")
        for q in a.cold_item_dropout:
            for name in ("SAID", "dual-concat"):
                spared, cold = name + cold_suffix(q, False), name + cold_suffix(q, True)
                print(f"  {spared}: " + against(f"{spared}, projection", f"{cold}, projection"))
    atomic_write_json(workdir / "results.json", {
        "dataset": folder.name, "cold_fraction": a.cold_fraction, "cold_seed": a.cold_seed, "seeds": a.seeds,
        "lrs": a.lrs, "epochs": a.epochs, "patience": a.patience, "users": {g: int(m.sum()) for g, m in masks.items()},
        "known_items": known.num_items, "new_items": full.num_items - known.num_items, "test_ndcg10": table})
    print(f"\nwrote {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
