"""cfsr_head.adjust: post-hoc popularity adjustment and its validation-chosen strength."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cfsr_head import DualViewHead, SASRecEncoder, evaluate
from cfsr_head.adjust import PopularityAdjusted, choose_popularity_beta
from cfsr_head.data import InteractionData, leave_one_out

N_RAW = 20


def chain_split(seed: int = 0):
    """Users walk a chain i0 -> i1 -> ... (wrapping); most walks start early in the chain, so
    early items are frequent and late ones rare, while the next item is always the successor."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(120):
        start = int(rng.integers(0, 5)) if u < 100 else int(rng.integers(0, N_RAW))
        length = int(rng.integers(4, 9))
        rows += [(f"u{u}", f"i{(start + t) % N_RAW}", t) for t in range(length)]
    return leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])))


class SuccessorPlusPopularity(nn.Module):
    """Knows the true next item but adds a popularity bonus that drowns it: the model a softmax
    over a skewed catalogue tends to learn."""

    def __init__(self, split, signal: float = 0.5, bonus_weight: float = 1.0) -> None:
        super().__init__()
        ids = split.item_index.ids
        pos = {raw: n + 1 for n, raw in enumerate(ids)}
        succ = torch.zeros(len(ids) + 1, dtype=torch.long)
        for raw, idx in pos.items():
            succ[idx] = pos.get(f"i{(int(raw[1:]) + 1) % N_RAW}", 0)
        self.register_buffer("succ", succ)
        self.register_buffer("bonus", bonus_weight * torch.log1p(
            torch.as_tensor(np.asarray(split.item_popularity), dtype=torch.float32)))
        self.num_items, self.signal, self.max_len = len(ids), signal, 8

    def user_state(self, item_seq, padding_mask=None):
        return item_seq[:, -1:].float()  # left-padded: the last column is the last item

    def full_scores(self, states):
        s = self.bonus.expand(states.shape[0], -1).clone()
        s[torch.arange(len(s)), self.succ[states[:, 0].long()]] += self.signal
        s[:, 0] = float("-inf")
        return s

    def score(self, states, candidates):
        return self.full_scores(states).gather(1, candidates.long())


def test_adjusted_scores_subtract_beta_log1p_count_and_beta_zero_is_the_model():
    split = chain_split()
    model = SuccessorPlusPopularity(split)
    states = model.user_state(torch.tensor([[0, 1, 2], [0, 0, 5]]))
    log_pop = torch.log1p(torch.as_tensor(np.asarray(split.item_popularity), dtype=torch.float32))
    log_pop[0] = 0
    torch.testing.assert_close(PopularityAdjusted(model, split.item_popularity, 0.0).full_scores(states),
                               model.full_scores(states))
    adjusted = PopularityAdjusted(model, split.item_popularity, 0.7)
    full = adjusted.full_scores(states)
    torch.testing.assert_close(full[:, 1:], model.full_scores(states)[:, 1:] - 0.7 * log_pop[1:])
    cands = torch.tensor([[3, 1, 7], [2, 2, 9]])
    torch.testing.assert_close(adjusted.score(states, cands), full.gather(1, cands))
    assert adjusted.num_items == model.num_items and adjusted.max_len == 8


def test_validation_chooses_a_beta_that_removes_the_popularity_bonus():
    """beta = 1 cancels the bonus exactly: validation picks it, and test N@10 rises with it."""
    split = chain_split()
    model = SuccessorPlusPopularity(split)
    beta, values = choose_popularity_beta(model, split, betas=(0.0, 0.5, 1.0, 2.0))
    assert set(values) == {0.0, 0.5, 1.0, 2.0}
    assert beta == 1.0 and values[1.0] == pytest.approx(1.0) and values[0.0] < 0.9, values
    plain = evaluate(model, split, "test").summary()["Tail item"]["NDCG@10"]
    adjusted = evaluate(PopularityAdjusted(model, split.item_popularity, beta), split, "test").summary()
    assert adjusted["Overall"]["NDCG@10"] == pytest.approx(1.0)
    assert adjusted["Tail item"]["NDCG@10"] > plain


def test_a_negative_beta_adds_popularity_back_to_a_model_that_under_ranks_it():
    """A model whose scores carry popularity with the wrong sign (as a logit-adjusted loss can
    overshoot) is repaired by beta = -1."""
    split = chain_split()
    model = SuccessorPlusPopularity(split, bonus_weight=-1.0)
    beta, values = choose_popularity_beta(model, split, betas=(-1.0, -0.5, 0.0, 0.5, 1.0))
    assert beta == -1.0 and values[-1.0] == pytest.approx(1.0) and values[0.0] < 0.9, values


def test_ties_go_to_the_beta_closest_to_zero_and_a_head_wraps_like_any_model():
    """With every item equally frequent the adjustment shifts all scores alike: every beta ties and
    the tie goes to the one closest to 0 (the negative one of a +-pair). A DualViewHead is wrapped
    like any model."""
    rows = [(f"u{u}", f"i{(u + t) % 6}", t) for u in range(12) for t in range(5)]
    split = leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])))
    assert len(set(np.asarray(split.item_popularity)[1:].tolist())) == 1
    torch.manual_seed(0)
    head = DualViewHead(SASRecEncoder(d=4, n_layers=1, n_heads=2, max_len=5), torch.randn(6, 16), d=4,
                        n_cross_heads=2)
    beta, values = choose_popularity_beta(head, split, betas=(0.5, 0.0, -1.0, 1.0))
    assert beta == 0.0 and len(set(values.values())) == 1
    assert choose_popularity_beta(head, split, betas=(0.5, 1.0, -0.5))[0] == -0.5
    assert set(dict(PopularityAdjusted(head, split.item_popularity, 1.0).state_dict())) == \
        {f"model.{k}" for k in head.state_dict()} | {"log_popularity"}


def test_bad_inputs_are_named():
    split = chain_split()
    model = SuccessorPlusPopularity(split)
    with pytest.raises(ValueError, match="beta must be"):
        PopularityAdjusted(model, split.item_popularity, math.nan)
    with pytest.raises(ValueError, match="beta must be"):
        PopularityAdjusted(model, split.item_popularity, math.inf)
    with pytest.raises(ValueError, match="num_items \\+ 1"):
        PopularityAdjusted(model, np.asarray(split.item_popularity)[1:], 0.5)
    counts = np.asarray(split.item_popularity, dtype=float).copy()
    counts[3] = -2
    with pytest.raises(ValueError, match="item index 3"):
        PopularityAdjusted(model, counts, 0.5)
    with pytest.raises(ValueError, match="betas is empty"):
        choose_popularity_beta(model, split, betas=())
