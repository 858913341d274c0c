"""Post-hoc score adjustments for any model that follows the model protocol: popularity
(``PopularityAdjusted``) and a semantic-neighbour prior (``SemanticPrior``), their strengths chosen
on validation (``choose_popularity_beta``, ``choose_adjustment``).

A scorer trained with a softmax over items learns, roughly, ``log p(i | u) + log prior(i)``: items
that are frequent in training are favoured whether or not they fit the user. Post-hoc logit
adjustment (Menon et al., 2021, "Long-tail learning via logit adjustment") subtracts a multiple of
the log prior at scoring time. Nothing is retrained; the strength ``beta`` is chosen on the
validation split (``choose_popularity_beta``), never on test, and ``beta = 0`` gives the model's own
scores, so a grid that contains 0 can only match or beat the unadjusted model on validation.

>>> beta, valid = choose_popularity_beta(model, split)
>>> result = evaluate(PopularityAdjusted(model, split.item_popularity, beta), split, "test")

A model trained on item IDs, or on LLM embeddings squeezed to a few dozen dimensions, ranks an
item by what it learned about it; a rare item next to the user's last item in the LLM's own space
(another shade of the same lipstick) gets little of that. ``SemanticPrior`` adds the cosine between
each item's semantic embedding and the user's semantic profile (the last item's embedding, or a
recency-weighted sum over the history) to the scores; ``choose_adjustment`` picks its weight and
the popularity ``beta`` together on validation, in one pass over the validation users:

>>> adj, valid = choose_adjustment(model, split, semantic=table, betas=(0, 0.2), weights=(0, 2, 4))
>>> result = evaluate(adj.wrap(model, split, table), split, "test")

A model knows a frequent item from its interactions and a rare one hardly at all, so the prior can
weigh rare items more: ``tail_exponents`` adds the exponent gamma of a per-item factor
``(1 + count_i) ** -gamma`` (relative to the geometric-mean count) to the grid:

>>> adj, valid = choose_adjustment(model, split, table, weights=(0, 0.5, 1, 2), tail_exponents=(0, 0.5, 1))

Counts of a few interactions say little about an item; ``pseudo_counts`` adds a pseudo count c
(``log(c + count_i)``, additive smoothing; 1 is the plain term) to the grid:

>>> adj, valid = choose_adjustment(model, split, betas=(-1, -0.5, 0), pseudo_counts=(1, 3, 10, 30))

Validation is scored with training counts, which run up to every validation target. Test targets
are one interaction later in every sequence, so training counts make them look rarer than the
validation targets they were tuned on; ``SplitData.input_popularity("test")`` counts the validation
items too and puts test on the validation targets' footing:

>>> result = evaluate(adj.wrap(model, split, table, popularity=split.input_popularity("test")), split, "test")
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .evaluate import (evaluate, full_ranks, metrics_from_ranks, model_device, model_max_len, ranks_from_scores,
                       sampled_candidates)
from .split import SplitData

# both signs: a positive beta takes popularity out, a negative one adds it back (a model trained with the
# logit-adjusted loss wants beta near -tau: -0.5 to -1 on Beauty at tau 0.75)
DEFAULT_BETAS = (-1.5, -1.0, -0.75, -0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
# choosing on the sampled protocol: validation negatives from seed + this, test negatives from seed, since
# one seed gives each user the same negatives in both splits and the choice would see test's candidates
VALID_NEGATIVES_SEED_OFFSET = 10_000
# SemanticPrior weights on the scale of the model's scores (a cosine head with temperature 0.1 scores in [-10, 10])
DEFAULT_PRIOR_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# SemanticPrior tail exponents: 0 weighs every item alike; 1 gives an item whose 1 + count is 10x smaller 10x the weight
DEFAULT_TAIL_EXPONENTS = (0.0, 0.5, 1.0, 2.0)
# pseudo counts of the popularity term, log(pseudo_count + count): 1 is the plain log(1 + count); larger ones
# stop it from ordering the many items seen only a few times (Beauty: validation chose 10-30 for the popularity-only
# models and for SASRec with the SemanticPrior, 1-3 for SAID and the dual view with the tail-weighted prior)
DEFAULT_PSEUDO_COUNTS = (1.0, 3.0, 10.0, 30.0)


def log_popularity(popularity: Any, num_items: int, pseudo_count: float = 1.0) -> Tensor:
    """``log(pseudo_count + count_i)`` as a float32 ``[N+1]`` tensor (index 0, padding, is 0) from
    ``[N+1]`` training counts; raises, naming the item index, on a wrong length or a negative /
    non-finite count. Shared by ``PopularityAdjusted`` and ``TrainConfig.logit_adjustment`` (which
    keep the default ``log(1 + count_i)``). A larger ``pseudo_count`` smooths the counts: items seen
    a handful of times then differ little, the most frequent ones as much as before."""
    _check_pseudo_count(pseudo_count)
    counts = np.asarray(popularity, dtype=np.float64)
    if counts.ndim != 1 or len(counts) != num_items + 1:
        raise ValueError(f"popularity must have num_items + 1 = {num_items + 1} entries (index 0 is padding), "
                         f"got shape {counts.shape}")
    if not np.all(np.isfinite(counts[1:])) or (counts[1:] < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(counts[1:]) | (counts[1:] < 0))[0]) + 1
        raise ValueError(f"popularity must be finite counts >= 0; item index {bad} has {counts[bad]!r}")
    log_pop = np.log1p(np.clip(counts, 0, None) + (float(pseudo_count) - 1.0))  # log1p: exact at the default
    log_pop[0] = 0.0
    return torch.as_tensor(log_pop, dtype=torch.float32)


def _check_pseudo_count(pseudo_count: float) -> None:
    if not (math.isfinite(pseudo_count) and pseudo_count > 0):
        raise ValueError(f"pseudo_count must be a finite number > 0, got {pseudo_count!r}")


def prior_item_scale(popularity: Any, num_items: int, tail_exponent: float) -> Tensor:
    """``[N+1]`` per-item factors of ``SemanticPrior``'s weight: ``exp(-tail_exponent * (log(1 + count_i)
    - mean_j log(1 + count_j)))`` over items 1..N (1 at the geometric-mean count; index 0, padding, is 0)."""
    log_pop = log_popularity(popularity, num_items)
    scale = torch.exp(-float(tail_exponent) * (log_pop - log_pop[1:].mean()))
    scale[0] = 0.0
    return scale


def _scaled_prior(similarity: Tensor, scale: Tensor, candidates: Tensor | None) -> Tensor:
    """``similarity`` (``[B, N+1]``, or ``[B, C]`` over ``candidates``) times each item's ``scale``
    (``prior_item_scale``): ``SemanticPrior.prior`` and ``choose_adjustment`` both weigh this way."""
    scale = scale.to(similarity.dtype)
    return similarity * (scale if candidates is None else scale[candidates.long()])


class PopularityAdjusted(nn.Module):
    """``model``'s scores minus ``beta * log(pseudo_count + count_i)``, ``count_i`` item i's training
    count (``pseudo_count`` 1 by default). A negative ``beta`` adds popularity back (for a model
    trained with a logit-adjusted loss, ``TrainConfig.logit_adjustment``, whose own scores may
    under-rank popular items). A larger ``pseudo_count`` (additive smoothing of the counts) keeps the
    term from ordering items seen once, twice or five times, whose counts say little.

    ``popularity``: ``[N+1]`` counts indexed like the model's items (index 0, padding, ignored;
    ``SplitData.item_popularity`` is in this form). Follows the model protocol (``user_state``,
    ``full_scores``, ``score``, ``num_items``), so ``evaluate`` takes it
    as it takes the model; the wrapped model's parameters are its own (``state_dict`` has them
    under ``model.``)."""

    def __init__(self, model: nn.Module, popularity: Any, beta: float, pseudo_count: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number, got {beta!r}")
        self.model, self.beta, self.pseudo_count = model, float(beta), float(pseudo_count)
        self.register_buffer("log_popularity",
                             log_popularity(popularity, int(getattr(model, "num_items")), self.pseudo_count))
        self.max_len = model_max_len(model)

    @property
    def num_items(self) -> int:
        return int(self.model.num_items)

    def user_state(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.model.user_state(item_seq, padding_mask)

    def forward(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.model(item_seq, padding_mask)

    def full_scores(self, states: Tensor) -> Tensor:
        scores = self.model.full_scores(states)
        if self.beta == 0:
            return scores
        return scores - self.beta * self.log_popularity.to(scores.device, scores.dtype)

    def score(self, states: Tensor, candidates: Tensor) -> Tensor:
        scores = self.model.score(states, candidates)
        if self.beta == 0:
            return scores
        return scores - self.beta * self.log_popularity.to(scores.device, scores.dtype)[candidates.long()]


def choose_popularity_beta(model: nn.Module, split_data: SplitData, betas: Sequence[float] = DEFAULT_BETAS,
                           metric: str = "NDCG@10", protocol: str = "full",
                           **evaluate_kwargs: Any) -> tuple[float, dict[float, float]]:
    """The ``beta`` of ``betas`` with the best validation ``metric`` (Overall) of
    ``PopularityAdjusted(model, split_data.item_popularity, beta)``, and every beta's value.
    Ties go to the beta closest to 0 (the smaller one between ``b`` and ``-b``).
    ``evaluate_kwargs`` reach ``evaluate`` (batch size, device ...)."""
    grid = sorted({float(b) for b in betas})
    if not grid:
        raise ValueError("betas is empty")
    values: dict[float, float] = {}
    for beta in grid:
        adjusted = PopularityAdjusted(model, split_data.item_popularity, beta)
        res = evaluate(adjusted, split_data, split="valid", protocol=protocol, groups=None, **evaluate_kwargs)
        values[beta] = float(res.summary()["Overall"][metric])
    return best_beta(values), values


def best_beta(values: dict[float, float]) -> float:
    """The beta with the highest value; ties go to the beta closest to 0, then to the smaller one."""
    if not values:
        raise ValueError("no beta to choose from")
    return max(values, key=lambda b: (values[b], -abs(b), -b))


class SemanticPrior(nn.Module):
    """``model``'s scores plus ``weight * cos(p_u, e_i)``: the cosine between item i's semantic
    embedding ``e_i`` and the user's semantic profile ``p_u = sum_t recency ** age_t * e_t / |e_t|``
    over the input items (age 0 = the most recent item; ``recency=0`` uses the last item alone).

    ``semantic``: one row per item 1..N in index order (an ItemEmbeddings-like object with
    ``.matrix``, a tensor or an array, as ``DualViewHead`` takes it; ``align_semantic`` builds it);
    a zero row leaves that item without a prior. Follows the model protocol, so ``evaluate`` takes
    it as it takes the model; its states are ``[model state : p_u]`` and ``state_dict`` holds the
    wrapped model under ``model.``. ``weight=0`` gives the model's own scores.

    ``tail_exponent`` (gamma, with ``popularity``, ``[N+1]`` counts as ``PopularityAdjusted`` takes
    them) gives rare items more of the prior: item i's weight is
    ``weight * exp(-gamma * (log(1 + count_i) - mean_j log(1 + count_j)))``, i.e. proportional to
    ``(1 + count_i) ** -gamma`` and equal to ``weight`` at the geometric-mean count. A model knows a
    frequent item from its interactions; for a rare one the semantic neighbourhood is most of the
    evidence there is. ``tail_exponent=0`` (the default) weighs every item alike."""

    def __init__(self, model: nn.Module, semantic: Any, weight: float, recency: float = 0.0,
                 popularity: Any = None, tail_exponent: float = 0.0) -> None:
        super().__init__()
        from .head import as_semantic_matrix

        if not math.isfinite(weight):
            raise ValueError(f"weight must be a finite number, got {weight!r}")
        if not 0.0 <= recency <= 1.0:
            raise ValueError(f"recency must be in [0, 1], got {recency!r}")
        if not math.isfinite(tail_exponent):
            raise ValueError(f"tail_exponent must be a finite number, got {tail_exponent!r}")
        if tail_exponent != 0 and popularity is None:
            raise ValueError("tail_exponent != 0 needs the items' counts (popularity=...)")
        table, _ = as_semantic_matrix(semantic)
        n = int(getattr(model, "num_items"))
        if table.shape[0] != n:
            raise ValueError(f"semantic table has {table.shape[0]} rows but the model has num_items={n}; it must "
                             "have one row per item 1..N in index order (align_semantic builds it)")
        self.model, self.weight, self.recency = model, float(weight), float(recency)
        self.tail_exponent = float(tail_exponent)
        unit = F.normalize(table, dim=1)
        self.register_buffer("unit_semantic", torch.cat([unit.new_zeros(1, unit.shape[1]), unit]))
        self.register_buffer("item_scale", prior_item_scale(popularity, n, self.tail_exponent)
                             if popularity is not None else torch.ones(n + 1))
        self.max_len = model_max_len(model)

    @property
    def num_items(self) -> int:
        return int(self.model.num_items)

    def profile(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``[B, d_llm]`` unit-length semantic profiles of the sequences (zero for an empty one).
        Sequences may be left- or right-padded: ages count back from the last real position."""
        real = (item_seq > 0) if padding_mask is None else ~padding_mask
        age = real.flip(1).long().cumsum(1).flip(1) - 1  # 0 at the last real item, 1 before it ...
        rows = self.unit_semantic[item_seq.masked_fill(~real, 0).long()]
        w = torch.pow(rows.new_tensor(self.recency), age.clamp_min(0).to(rows.dtype)) * real  # 0 ** 0 = 1
        return F.normalize((rows * w.unsqueeze(-1)).sum(1), dim=1)

    def position_profiles(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``[B, L, d_llm]`` unit-length profiles at every position: position t's is the profile of the
        sequence cut after t (``profile`` of ``item_seq[:, :t+1]``), the one that scores the item at
        t + 1 in training; zero at padding. Indices outside 1..N count as padding."""
        real = (item_seq > 0) & (item_seq <= self.num_items)
        if padding_mask is not None:
            real = real & ~padding_mask
        rows = self.unit_semantic[item_seq.masked_fill(~real, 0).long()]
        if self.recency == 0:
            return rows  # unit rows, zero at padding
        seen = real.long().cumsum(1)  # real items up to and including each position
        age = seen.unsqueeze(2) - seen.unsqueeze(1)  # [B, t, s]: real items after s, up to t
        steps = torch.arange(item_seq.shape[1], device=item_seq.device)
        before = steps.unsqueeze(1) >= steps.unsqueeze(0)  # s at or before t
        decay = torch.pow(rows.new_tensor(self.recency), age.clamp_min(0).to(rows.dtype)) * before
        return F.normalize(torch.einsum("bts,bsd->btd", decay, rows), dim=-1)

    @torch.no_grad()
    def training_bias(self, item_seq: Tensor, padding_mask: Tensor | None, valid: Tensor,
                      candidates: Tensor | None = None) -> Tensor:
        """The prior trained in (``Trainer(..., prior=self)``): ``weight * prior`` for the training
        positions ``valid`` (``[B, L]`` bool, M true) of ``item_seq``, against every item
        (``[M, N+1]``) or against ``candidates`` (``[M, C]`` indices; index 0 gets 0)."""
        profiles = self.position_profiles(item_seq, padding_mask)[valid]
        return self.weight * self.prior(profiles, candidates)

    def user_state(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        state = self.model.user_state(item_seq, padding_mask)
        seq = item_seq if self.max_len is None or item_seq.shape[1] <= self.max_len else item_seq[:, -self.max_len:]
        mask = None if padding_mask is None else padding_mask[:, -seq.shape[1]:]
        return torch.cat([state, self.profile(seq, mask).to(state.dtype)], dim=1)

    def forward(self, item_seq: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.model(item_seq, padding_mask)

    def _split(self, states: Tensor) -> tuple[Tensor, Tensor]:
        width = self.unit_semantic.shape[1]
        return states[:, :-width], states[:, -width:]

    def similarity(self, profiles: Tensor, candidates: Tensor | None = None) -> Tensor:
        """The unweighted prior: cosines of ``[B, d_llm]`` profiles to every item (``[B, N+1]``) or
        to ``candidates`` (``[C]`` shared, or ``[B, C]`` per user)."""
        if candidates is None:
            return profiles @ self.unit_semantic.T.to(profiles.dtype)
        rows = self.unit_semantic[candidates.long()].to(profiles.dtype)
        return profiles @ rows.T if candidates.ndim == 1 else torch.einsum("bd,bcd->bc", profiles, rows)

    def prior(self, profiles: Tensor, candidates: Tensor | None = None) -> Tensor:
        """``similarity`` times each item's ``item_scale`` (all ones without a ``tail_exponent``):
        the prior before ``weight``."""
        sim = self.similarity(profiles, candidates)
        return sim if self.tail_exponent == 0 else _scaled_prior(sim, self.item_scale, candidates)

    def full_scores(self, states: Tensor) -> Tensor:
        own, prof = self._split(states)
        scores = self.model.full_scores(own)
        if self.weight == 0:
            return scores
        return scores + self.weight * self.prior(prof).to(scores.dtype)

    def score(self, states: Tensor, candidates: Tensor) -> Tensor:
        own, prof = self._split(states)
        scores = self.model.score(own, candidates)
        if self.weight == 0:
            return scores
        return scores + self.weight * self.prior(prof, candidates).to(scores.dtype)


@dataclass(frozen=True)
class Adjustment:
    """One point of ``choose_adjustment``'s grid: popularity ``beta`` (over ``log(pseudo_count +
    count)``) and the ``SemanticPrior``'s ``weight``, ``recency`` and ``tail_exponent``."""

    beta: float = 0.0
    weight: float = 0.0
    recency: float = 0.0
    tail_exponent: float = 0.0
    pseudo_count: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beta", "weight", "tail_exponent"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not 0.0 <= self.recency <= 1.0:
            raise ValueError(f"recency must be in [0, 1], got {self.recency!r}")
        _check_pseudo_count(self.pseudo_count)

    def wrap(self, model: nn.Module, split_data: SplitData, semantic: Any = None,
             popularity: Any = None) -> nn.Module:
        """``model`` with this adjustment: ``PopularityAdjusted(SemanticPrior(model, ...), ...)``,
        leaving out a part whose strength is 0. ``popularity``: ``[N+1]`` counts for the popularity
        term (default ``split_data.item_popularity``, the training counts ``choose_adjustment``
        uses); ``split_data.input_popularity("test")`` counts the validation items too, as of the
        test inputs. The prior's ``tail_exponent`` always weighs by the training counts: it stands
        for how much the model saw of an item, and the model was trained on those alone."""
        if self.weight != 0:
            model = self.semantic_prior(model, split_data, semantic)
        if self.beta != 0:
            counts = split_data.item_popularity if popularity is None else popularity
            model = PopularityAdjusted(model, counts, self.beta, self.pseudo_count)
        return model

    def semantic_prior(self, model: nn.Module, split_data: SplitData, semantic: Any) -> SemanticPrior:
        """This point's ``SemanticPrior`` around ``model`` (weight, recency, and the tail exponent over
        ``split_data``'s training counts), without the popularity term: what ``wrap`` adds, and what
        ``Trainer(..., prior=...)`` trains in."""
        if semantic is None:
            raise ValueError("an adjustment with a semantic prior (weight != 0) needs the semantic table")
        return SemanticPrior(model, semantic, self.weight, self.recency,
                             popularity=split_data.item_popularity if self.tail_exponent != 0 else None,
                             tail_exponent=self.tail_exponent)

    def _strength(self) -> tuple:
        """Orders points from the weakest adjustment up (ties of ``choose_adjustment``)."""
        return (abs(self.weight), abs(self.beta), self.recency, abs(self.tail_exponent),
                abs(math.log(self.pseudo_count)), self.beta, self.weight, self.tail_exponent, self.pseudo_count)


@torch.no_grad()
def choose_adjustment(model: nn.Module, split_data: SplitData, semantic: Any = None,
                      betas: Sequence[float] = (0.0,), weights: Sequence[float] = (0.0,),
                      recencies: Sequence[float] = (0.0,), metric: str = "NDCG@10", batch_size: int = 256,
                      device: str | torch.device | None = None, max_len: int | None = None,
                      protocol: str = "full", n_negatives: int = 100, seed: int = 0,
                      tail_exponents: Sequence[float] = (0.0,), pseudo_counts: Sequence[float] = (1.0,),
                      ) -> tuple[Adjustment, dict[Adjustment, float]]:
    """The grid point (``betas`` x ``weights`` x ``recencies`` x ``tail_exponents`` x
    ``pseudo_counts``) whose adjustment
    (``Adjustment.wrap``) has the best validation ``metric`` (Overall) under ``protocol``, and
    every point's value. ``protocol="sampled"`` ranks the target among the ``n_negatives``
    negatives ``evaluate(..., protocol="sampled", seed=seed)`` draws for the validation split.
    One pass over the validation users: the model's scores are computed once per
    batch and every point is ranked from them, with the ranks ``evaluate`` gives the wrapped model.
    Ties go to the weakest adjustment (smallest ``|weight|``, then ``|beta|``, then recency, then
    ``|tail_exponent|``, then the pseudo count closest to 1); with weight 0 the recency and the tail
    exponent do nothing, so those points are taken once, at 0, and with beta 0 the pseudo count
    (of the popularity term) is taken once, at 1. The tail exponent weighs the prior by training
    counts, always with pseudo count 1.
    ``semantic`` (rows for items 1..N, as ``SemanticPrior`` takes it) is needed when a weight is
    not 0; ``model.num_items`` must match the data. ``max_len``: input window (default: the
    model's, as ``evaluate``)."""
    kind, _, k = metric.partition("@")
    if kind.upper() not in ("HR", "NDCG") or not k.isdigit():
        raise ValueError(f"metric must be 'HR@K' or 'NDCG@K', got {metric!r}")
    if protocol not in ("full", "sampled"):
        raise ValueError(f"protocol must be 'full' or 'sampled', got {protocol!r}")
    grid = list(dict.fromkeys(Adjustment(float(b), float(w), float(r) if w != 0 else 0.0, float(g) if w != 0 else 0.0,
                                         float(c) if b != 0 else 1.0)
                              for b in sorted(set(betas)) for w in sorted(set(weights)) for r in sorted(set(recencies))
                              for g in sorted(set(tail_exponents)) for c in sorted(set(pseudo_counts))))
    if not grid:
        raise ValueError("the grid is empty (betas, weights, recencies, tail_exponents and pseudo_counts each need "
                         "a value)")
    n_items = split_data.num_items
    if int(getattr(model, "num_items", n_items)) != n_items:
        raise ValueError(f"model has num_items={model.num_items} but the data has {n_items} items")
    if any(p.weight != 0 for p in grid) and semantic is None:
        raise ValueError("weights other than 0 need the semantic table (semantic=...)")
    dev = torch.device(device) if device is not None else model_device(model)
    L = max_len if max_len is not None else (model_max_len(model) or split_data.max_len)
    seq_all, target_all, _ = split_data.eval_inputs("valid", L)
    sampled = protocol == "sampled"
    history = None if sampled else split_data.history("valid")
    cands_all = sampled_candidates(split_data, target_all, n_negatives, seed) if sampled else None
    log_pops = {c: log_popularity(split_data.item_popularity, n_items, c).to(dev)
                for c in {p.pseudo_count for p in grid if p.beta != 0}}
    by_prior: dict[tuple[float, tuple[float, float]], list[Adjustment]] = {}
    for point in grid:
        by_prior.setdefault((point.weight, (point.recency, point.tail_exponent)), []).append(point)
    shapes = {shape for weight, shape in by_prior if weight != 0}  # (recency, tail exponent) pairs in use
    # one profile and similarity per recency; a tail exponent only rescales it
    priors = {r: SemanticPrior(model, semantic, 1.0, r).to(dev) for r, _ in shapes}
    scales = {g: prior_item_scale(split_data.item_popularity, n_items, g).to(dev) for _, g in shapes if g != 0}
    was_training = model.training
    model.eval()
    totals = dict.fromkeys(grid, 0.0)
    try:
        for b in range(0, len(target_all), batch_size):
            seq, tgt = seq_all[b:b + batch_size].to(dev), target_all[b:b + batch_size].to(dev)
            states = model.user_state(seq, seq == 0)
            cands = cands_all[b:b + batch_size].to(dev) if sampled else None
            # the scores as the wrapped model's ``score`` (sampled) or ``full_scores`` computes them
            own = model.score(states, cands) if sampled else model.full_scores(states)
            sims = {r: pr.similarity(pr.profile(seq, seq == 0), cands) for r, pr in priors.items()}
            prior = {(r, g): sims[r] if g == 0 else _scaled_prior(sims[r], scales[g], cands)
                     for r, g in shapes}
            pops = {c: (lp[cands] if sampled else lp).to(own.dtype) for c, lp in log_pops.items()}
            if sampled:
                first = torch.zeros(len(cands), dtype=torch.long, device=dev)
            else:
                batch_history = history[b:b + batch_size]
            buffer = torch.empty_like(own)
            for (weight, shape), points in by_prior.items():
                # the wrapped model's operations in its order (own + w * prior, then - beta * log_pop),
                # so that ranks, ties included, are those evaluate gives it
                with_prior = own + weight * prior[shape].to(own.dtype) if weight != 0 else own
                for point in points:
                    scores = with_prior
                    if point.beta != 0:
                        scores = torch.sub(with_prior, point.beta * pops[point.pseudo_count], out=buffer)
                    if sampled:
                        ranks = ranks_from_scores(scores.float(), first).cpu().numpy()
                    else:
                        ranks = full_ranks(scores, tgt, batch_history, n_items).cpu().numpy()
                    hit, ndcg = metrics_from_ranks(ranks, (int(k),))
                    totals[point] += float((ndcg if kind.upper() == "NDCG" else hit)[int(k)].sum())
    finally:
        model.train(was_training)
    values = {p: v / len(target_all) for p, v in totals.items()}
    return max(values, key=lambda p: (values[p], tuple(-x for x in p._strength()))), values
