"""Evaluation: full ranking and the 100-sampled-negative protocol, HR@K / NDCG@K, head/tail groups,
per-user metrics and paired t-tests.

Rank convention: the 0-based rank of the target is the number of candidates scoring strictly
higher **plus the number of other candidates with exactly the same score** (pessimistic ties), so a
constant model ranks every target last instead of first. NaN scores count as ``-inf``.
HR@K = 1[r < K]; NDCG@K = 1 / log2(r + 2) if r < K else 0.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from .io import atomic_write_text
from .split import SplitData, as_rng, sample_excluding

__all__ = ["GroupSpec", "EvalResult", "evaluate", "paired_ttest", "metrics_from_ranks", "ranks_from_scores",
           "PopularityModel", "RandomModel", "GROUP_NAMES"]

GROUP_NAMES = ("Overall", "Tail item", "Head item", "Tail user", "Head user")


# --------------------------------------------------------------------------------------------
# ranks and metrics
# --------------------------------------------------------------------------------------------
def ranks_from_scores(scores: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of column ``target_col[b]`` in each row of ``scores`` [B, C]:
    #(score > target) + #(other columns with score == target). NaN scores never count; a NaN
    target gets the worst rank ``C - 1``. One pass over ``scores``."""
    t = scores.gather(1, target_col.view(-1, 1))
    ge = (scores >= t).sum(1) - 1  # the target itself is >= itself (unless NaN)
    return torch.where(t.view(-1).isnan(), torch.full_like(ge, scores.shape[1] - 1), ge).long()


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20)) -> tuple[dict, dict]:
    """``({K: hit array}, {K: ndcg array})`` (float64) from 0-based ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    hit = {int(k): (r < k).astype(np.float64) for k in ks}
    ndcg = {int(k): np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0) for k in ks}
    return hit, ndcg


# --------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupSpec:
    """Head/tail groups, computed from TRAINING data.

    Items: head = popularity >= the popularity of the ``ceil(head_item_fraction * N)``-th most
    popular item (Pareto 20%), or >= ``item_threshold`` when given. Users: head = training
    history length >= the length of the ``ceil(head_user_fraction * U)``-th longest user, or
    >= ``user_threshold`` when given (LLM-ESR style fixed threshold). Tail = not head."""

    head_item_fraction: float = 0.2
    head_user_fraction: float = 0.2
    item_threshold: int | None = None
    user_threshold: int | None = None

    @staticmethod
    def _cut(values: np.ndarray, fraction: float) -> int:
        if not 0 < fraction <= 1:
            raise ValueError(f"head fraction must be in (0, 1], got {fraction}")
        if len(values) == 0:
            return 0
        k = int(np.ceil(fraction * len(values)))
        return int(np.sort(values)[::-1][k - 1])

    def thresholds(self, split: SplitData) -> tuple[int, int]:
        """(item popularity threshold, user history-length threshold)."""
        pop = split.item_popularity[1:]
        it = self.item_threshold if self.item_threshold is not None else self._cut(pop, self.head_item_fraction)
        ut = self.user_threshold if self.user_threshold is not None else self._cut(
            split.train_lengths, self.head_user_fraction)
        return int(it), int(ut)

    def flags(self, split: SplitData, targets: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        it, ut = self.thresholds(split)
        head_item = split.item_popularity[targets] >= it
        head_user = split.train_lengths >= ut
        flags = {"Overall": np.ones(len(targets), bool), "Tail item": ~head_item, "Head item": head_item,
                 "Tail user": ~head_user, "Head user": head_user}
        return flags, {"item_threshold": it, "user_threshold": ut}


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Per-user results of one evaluation run (arrays aligned with ``user_ids``)."""

    user_ids: np.ndarray                      # [U] str
    ranks: np.ndarray                         # [U] int64, 0-based, pessimistic ties
    ks: tuple[int, ...]
    groups: dict[str, np.ndarray]             # name -> bool [U]
    protocol: str = "full"
    split: str = "test"
    info: dict[str, Any] = field(default_factory=dict)
    hit: dict[int, np.ndarray] = field(init=False)
    ndcg: dict[int, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.user_ids = np.asarray(self.user_ids, dtype=object)
        self.ranks = np.asarray(self.ranks, dtype=np.int64)
        self.ks = tuple(int(k) for k in self.ks)
        self.groups = {k: np.asarray(v, dtype=bool) for k, v in self.groups.items()}
        self.hit, self.ndcg = metrics_from_ranks(self.ranks, self.ks)

    def metric(self, name: str) -> np.ndarray:
        """Per-user values of ``"HR@K"`` / ``"NDCG@K"`` (or ``"rank"``)."""
        if name == "rank":
            return self.ranks.astype(np.float64)
        kind, _, k = name.partition("@")
        table = {"HR": self.hit, "NDCG": self.ndcg}.get(kind.upper())
        if table is None or not k.isdigit() or int(k) not in table:
            raise KeyError(f"unknown metric {name!r}; available: "
                           f"{[f'{m}@{k}' for m in ('HR', 'NDCG') for k in self.ks]}")
        return table[int(k)]

    def summary(self) -> dict[str, dict[str, float]]:
        """``{group: {"HR@K": mean, "NDCG@K": mean, ...}}`` (NaN for an empty group)."""
        out: dict[str, dict[str, float]] = {}
        for g, mask in self.groups.items():
            row = {}
            for k in self.ks:
                for m, table in (("HR", self.hit), ("NDCG", self.ndcg)):
                    row[f"{m}@{k}"] = float(table[k][mask].mean()) if mask.any() else float("nan")
            out[g] = row
        return out

    def counts(self) -> dict[str, int]:
        """Number of users per group."""
        return {g: int(m.sum()) for g, m in self.groups.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"format": "cfsr_head.EvalResult", "version": 1, "protocol": self.protocol, "split": self.split,
                "ks": list(self.ks), "user_ids": [str(u) for u in self.user_ids], "ranks": self.ranks.tolist(),
                "groups": {g: m.tolist() for g, m in self.groups.items()}, "info": self.info,
                "summary": self.summary(), "counts": self.counts()}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text (per-user ranks and groups; metrics are recomputed on load); written
        atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), default=_json_default)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "EvalResult":
        """Inverse of :meth:`to_json` (JSON text or a file path)."""
        s = str(text_or_path)
        if not s.lstrip().startswith("{"):
            p = Path(s)
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist")
            s = p.read_text(encoding="utf-8")
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid EvalResult JSON: {exc}") from exc
        if obj.get("format") != "cfsr_head.EvalResult":
            raise ValueError("not an EvalResult JSON (missing format 'cfsr_head.EvalResult')")
        return cls(np.asarray(obj["user_ids"], dtype=object), np.asarray(obj["ranks"], dtype=np.int64),
                   tuple(obj["ks"]), {g: np.asarray(m, bool) for g, m in obj["groups"].items()},
                   obj.get("protocol", "full"), obj.get("split", "test"), obj.get("info", {}))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a model without either."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def model_max_len(model: Any) -> int | None:
    """The input length ``model`` (or its encoder or config) declares as ``max_len``, or None."""
    for obj in (model, getattr(model, "encoder", None), getattr(model, "config", None)):
        v = getattr(obj, "max_len", None) if obj is not None else None
        if isinstance(v, int):
            return v
    return None


@torch.no_grad()
def evaluate(model: Any, split_data: SplitData, split: Literal["test", "valid"] = "test",
             protocol: Literal["full", "sampled"] = "full", ks: Sequence[int] = (5, 10, 20),
             n_negatives: int = 100, batch_size: int = 256, seed: int = 0,
             groups: GroupSpec | None = GroupSpec(), device: str | torch.device | None = None,
             max_len: int | None = None) -> EvalResult:
    """Evaluate ``model`` (model protocol: ``user_state``, ``full_scores``, ``score``,
    ``num_items``) on every user of ``split_data``.

    - ``protocol="full"``: scores over all items; items in the user's input history are set to
      ``-inf`` except the target; column 0 is ignored.
    - ``protocol="sampled"``: target + ``n_negatives`` items drawn uniformly (with replacement, as
      SASRec/LLM-ESR) from items the user never interacted with (whole sequence), seeded by
      ``seed`` and independent of ``batch_size``.
    ``max_len``: input window (default: the model's ``max_len``, else ``split_data.max_len``).
    ``groups=None`` keeps only "Overall". The model is put in eval mode and restored afterwards."""
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    if protocol not in ("full", "sampled"):
        raise ValueError(f"protocol must be 'full' or 'sampled', got {protocol!r}")
    n_items = split_data.num_items
    if int(getattr(model, "num_items", n_items)) != n_items:
        raise ValueError(f"model has num_items={model.num_items} but the data has {n_items} items")
    dev = torch.device(device) if device is not None else model_device(model)
    L = max_len if max_len is not None else (model_max_len(model) or split_data.max_len)
    seq_all, target_all, user_ids = split_data.eval_inputs(split, L)
    targets_np = target_all.numpy()
    U = len(targets_np)
    history = split_data.history(split) if protocol == "full" else None
    if protocol == "sampled":
        cands_all = sampled_candidates(split_data, target_all, n_negatives, seed)
    was_training = getattr(model, "training", None)
    if isinstance(model, nn.Module):
        model.eval()
    ranks = np.empty(U, dtype=np.int64)
    try:
        for b in range(0, U, batch_size):
            sl = slice(b, min(b + batch_size, U))
            seq = seq_all[sl].to(dev)
            states = model.user_state(seq, seq == 0)
            tgt = target_all[sl].to(dev)
            if protocol == "full":
                scores = model.full_scores(states)
                if scores.shape != (seq.shape[0], n_items + 1):
                    raise ValueError(f"full_scores returned shape {tuple(scores.shape)}, expected "
                                     f"({seq.shape[0]}, {n_items + 1})")
                r = full_ranks(scores, tgt, history[sl], n_items)
            else:
                cands = cands_all[sl].to(dev)
                scores = model.score(states, cands).float()
                if scores.shape != cands.shape:
                    raise ValueError(f"score returned shape {tuple(scores.shape)}, expected {tuple(cands.shape)}")
                r = ranks_from_scores(scores, torch.zeros(len(cands), dtype=torch.long, device=scores.device))
            ranks[sl] = r.cpu().numpy()
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
    info: dict[str, Any] = {"num_items": n_items, "num_users": U, "max_len": L, "seed": seed,
                            "n_negatives": n_negatives if protocol == "sampled" else None,
                            "ties": "pessimistic", "dataset": split_data.name}
    if groups is not None:
        flags, th = groups.flags(split_data, targets_np)
        info.update(th)
    else:
        flags = {"Overall": np.ones(U, bool)}
    return EvalResult(user_ids, ranks, tuple(ks), flags, protocol, split, info)


def sampled_candidates(split_data: SplitData, targets: torch.Tensor, n_negatives: int = 100,
                       seed: int = 0) -> torch.Tensor:
    """``[U, 1 + n_negatives]`` candidates of the sampled protocol: each user's target (column 0)
    and ``n_negatives`` items drawn uniformly, with replacement, from the items the user never
    interacted with, seeded by ``seed``. ``targets``: ``[U]`` in the order of
    ``split_data.eval_inputs``. Shared by ``evaluate`` and ``choose_adjustment``."""
    if n_negatives < 1:
        raise ValueError("n_negatives must be >= 1")
    split_data.check_negatives("all")
    U = len(targets)
    rows = np.repeat(np.arange(U), n_negatives).reshape(U, n_negatives)
    negs = sample_excluding(as_rng(seed), rows, split_data.num_items, split_data._keys("all"))
    return torch.from_numpy(np.concatenate([targets.numpy()[:, None], negs], axis=1))


def full_ranks(scores: torch.Tensor, tgt: torch.Tensor, history, n_items: int) -> torch.Tensor:
    """Pessimistic ranks over items 1..N with the history items (CSR rows) and column 0 left out,
    the target always kept. Equivalent to setting them to -inf, without copying ``scores``."""
    dev = scores.device
    ar = torch.arange(scores.shape[0], device=dev)
    t = scores[ar, tgt]
    ge = (scores >= t[:, None]).sum(1) - 1
    ge = ge - (scores[:, 0] >= t).long()
    h = history.tocoo()
    if h.nnz:
        rows = torch.as_tensor(h.row, dtype=torch.long, device=dev)
        cols = torch.as_tensor(h.col, dtype=torch.long, device=dev)
        above = (scores[rows, cols] >= t[rows]) & (cols != tgt[rows])
        ge = ge - torch.bincount(rows[above], minlength=scores.shape[0])
    return torch.where(t.isnan(), torch.full_like(ge, n_items - 1), ge).long()


def paired_ttest(run_a: EvalResult, run_b: EvalResult, metric: str = "NDCG@10",
                 group: str = "Overall") -> tuple[float, float, float]:
    """Paired t-test (``scipy.stats.ttest_rel``) of per-user ``metric`` of ``run_a`` vs ``run_b``
    over the users both runs share, restricted to ``group`` (flags of ``run_a``).
    Returns ``(t, p, mean(a - b))``; t and p are NaN when every difference is identical."""
    from scipy.stats import ttest_rel

    if group not in run_a.groups:
        raise KeyError(f"group {group!r} not in run_a (has {list(run_a.groups)})")
    a_ids = np.asarray(run_a.user_ids, dtype=str)
    b_pos = {u: i for i, u in enumerate(np.asarray(run_b.user_ids, dtype=str))}
    ia = np.array([i for i, u in enumerate(a_ids) if u in b_pos and run_a.groups[group][i]], dtype=np.int64)
    if len(ia) < 2:
        raise ValueError(f"runs share fewer than 2 users in group {group!r}")
    ib = np.array([b_pos[u] for u in a_ids[ia]], dtype=np.int64)
    a, b = run_a.metric(metric)[ia], run_b.metric(metric)[ib]
    diff = a - b
    if np.all(diff == diff[0]):
        return float("nan"), float("nan"), float(diff.mean())
    res = ttest_rel(a, b)
    return float(res.statistic), float(res.pvalue), float(diff.mean())


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------
class PopularityModel(nn.Module):
    """Scores every user's items by TRAINING popularity (model protocol, no parameters)."""

    def __init__(self, split_data: SplitData | None = None, popularity: np.ndarray | None = None):
        super().__init__()
        pop = split_data.item_popularity if popularity is None else np.asarray(popularity)
        if pop is None:
            raise ValueError("give split_data or popularity")
        pop = torch.as_tensor(np.asarray(pop, dtype=np.float32))
        pop[0] = float("-inf")
        self.register_buffer("popularity", pop)
        self.num_items = len(pop) - 1

    @classmethod
    def from_split(cls, split_data: SplitData) -> "PopularityModel":
        """Popularity from ``split_data``'s training sequences."""
        return cls(split_data)

    def user_state(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(item_seq.shape[0], 1, device=item_seq.device)

    def forward(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(*item_seq.shape, 1, device=item_seq.device)

    def full_scores(self, states: torch.Tensor) -> torch.Tensor:
        return self.popularity.to(states.device).expand(states.shape[0], -1).clone()

    def score(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.popularity.to(candidates.device)[candidates]


class RandomModel(nn.Module):
    """Uniform random scores (seeded; model protocol)."""

    def __init__(self, num_items: int, seed: int = 0):
        super().__init__()
        self.num_items = int(num_items)
        self.generator = torch.Generator().manual_seed(seed)

    def user_state(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(item_seq.shape[0], 1, device=item_seq.device)

    def forward(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(*item_seq.shape, 1, device=item_seq.device)

    def full_scores(self, states: torch.Tensor) -> torch.Tensor:
        s = torch.rand(states.shape[0], self.num_items + 1, generator=self.generator).to(states.device)
        s[:, 0] = float("-inf")
        return s

    def score(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return torch.rand(candidates.shape, generator=self.generator).to(candidates.device)
