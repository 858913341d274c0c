"""Post-hoc popularity adjustment for any model that follows the model protocol.

A scorer trained with a softmax over items learns, roughly, ``log p(i | u) + log prior(i)``: items
that are frequent in training are favoured whether or not they fit the user. Post-hoc logit
adjustment (Menon et al., 2021, "Long-tail learning via logit adjustment") subtracts a multiple of
the log prior at scoring time. Nothing is retrained; the strength ``beta`` is chosen on the
validation split (``choose_popularity_beta``), never on test, and ``beta = 0`` gives the model's own
scores, so a grid that contains 0 can only match or beat the unadjusted model on validation.

>>> beta, valid = choose_popularity_beta(model, split)
>>> result = evaluate(PopularityAdjusted(model, split.item_popularity, beta), split, "test")
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .data import SplitData
from .evaluate import _model_max_len, evaluate

DEFAULT_BETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)


def log_popularity(popularity: Any, num_items: int) -> Tensor:
    """``log(1 + count_i)`` as a float32 ``[N+1]`` tensor (index 0, padding, is 0) from ``[N+1]``
    training counts; raises, naming the item index, on a wrong length or a negative / non-finite
    count. Shared by ``PopularityAdjusted`` and ``TrainConfig.logit_adjustment``."""
    counts = np.asarray(popularity, dtype=np.float64)
    if counts.ndim != 1 or len(counts) != num_items + 1:
        raise ValueError(f"popularity must have num_items + 1 = {num_items + 1} entries (index 0 is padding), "
                         f"got shape {counts.shape}")
    if not np.all(np.isfinite(counts[1:])) or (counts[1:] < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(counts[1:]) | (counts[1:] < 0))[0]) + 1
        raise ValueError(f"popularity must be finite counts >= 0; item index {bad} has {counts[bad]!r}")
    log_pop = np.log1p(np.clip(counts, 0, None))
    log_pop[0] = 0.0
    return torch.as_tensor(log_pop, dtype=torch.float32)


class PopularityAdjusted(nn.Module):
    """``model``'s scores minus ``beta * log(1 + count_i)``, ``count_i`` item i's training count.
    A negative ``beta`` adds popularity back (for a model trained with a logit-adjusted loss,
    ``TrainConfig.logit_adjustment``, whose own scores may under-rank popular items).

    ``popularity``: ``[N+1]`` counts indexed like the model's items (index 0, padding, ignored;
    ``SplitData.item_popularity`` is in this form). Follows the model protocol (``user_state``,
    ``full_scores``, ``score``, ``num_items``), so ``evaluate`` takes it
    as it takes the model; the wrapped model's parameters are its own (``state_dict`` has them
    under ``model.``)."""

    def __init__(self, model: nn.Module, popularity: Any, beta: float) -> None:
        super().__init__()
        if not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number, got {beta!r}")
        self.model, self.beta = model, float(beta)
        self.register_buffer("log_popularity", log_popularity(popularity, int(getattr(model, "num_items"))))
        self.max_len = _model_max_len(model)

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
