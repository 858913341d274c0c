"""cfsr_head.adjust: post-hoc popularity adjustment and its validation-chosen strength."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cfsr_head import DualViewHead, SASRecEncoder, evaluate
from cfsr_head.adjust import Adjustment, PopularityAdjusted, SemanticPrior, choose_adjustment, choose_popularity_beta
from cfsr_head import InteractionData, leave_one_out

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

    def __init__(self, split, signal: float = 0.5, bonus_weight: float = 1.0, pseudo_count: float = 1.0) -> None:
        super().__init__()
        ids = split.item_index.ids
        pos = {raw: n + 1 for n, raw in enumerate(ids)}
        succ = torch.zeros(len(ids) + 1, dtype=torch.long)
        for raw, idx in pos.items():
            succ[idx] = pos.get(f"i{(int(raw[1:]) + 1) % N_RAW}", 0)
        self.register_buffer("succ", succ)
        self.register_buffer("bonus", bonus_weight * torch.log(
            pseudo_count + torch.as_tensor(np.asarray(split.item_popularity), dtype=torch.float32)))
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
    assert choose_popularity_beta(model, split)[0] == -1.0  # the default grid reaches it too


def test_a_pseudo_count_smooths_the_popularity_term_and_validation_finds_the_models_own():
    """beta * log(c + count): c = 1 is the plain term; a model whose bonus is log(10 + count) is
    repaired only by c = 10, which choose_adjustment finds, scoring each point as evaluate does."""
    split = chain_split()
    model = SuccessorPlusPopularity(split, bonus_weight=1.0, pseudo_count=10.0)
    states = model.user_state(torch.tensor([[0, 1, 2], [0, 0, 5]]))
    counts = torch.as_tensor(np.asarray(split.item_popularity), dtype=torch.float32)
    smoothed = PopularityAdjusted(model, split.item_popularity, 0.7, pseudo_count=10.0)
    torch.testing.assert_close(smoothed.full_scores(states)[:, 1:],
                               model.full_scores(states)[:, 1:] - 0.7 * torch.log(10.0 + counts[1:]))
    torch.testing.assert_close(PopularityAdjusted(model, split.item_popularity, 0.7).log_popularity,
                               PopularityAdjusted(model, split.item_popularity, 0.7, pseudo_count=1.0).log_popularity)
    best, values = choose_adjustment(model, split, betas=(0.0, 1.0), pseudo_counts=(1.0, 10.0, 30.0), batch_size=7)
    assert len(values) == 1 + 3  # beta 0 once: its pseudo count does nothing
    assert {p.pseudo_count for p in values if p.beta == 0} == {1.0}
    assert best == Adjustment(beta=1.0, pseudo_count=10.0) and values[best] == pytest.approx(1.0), values
    assert values[Adjustment(beta=1.0)] < 0.9  # the plain term leaves the rare items' bonus in place
    for point, value in values.items():
        wrapped = point.wrap(model, split)
        assert value == pytest.approx(evaluate(wrapped, split, "valid").summary()["Overall"]["NDCG@10"], abs=1e-12)
    assert best.wrap(model, split).pseudo_count == 10.0
    # with every item equally frequent every pseudo count ties: the tie goes to the one closest to 1
    rows = [(f"u{u}", f"i{(u + t) % 6}", t) for u in range(12) for t in range(5)]
    even = leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])))
    tie, tied = choose_adjustment(ConstantScores(even.num_items), even, betas=(0.5,), pseudo_counts=(0.5, 3.0, 1.0))
    assert tie == Adjustment(beta=0.5, pseudo_count=1.0) and len(tied) == 3 and len(set(tied.values())) == 1
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="pseudo_count must be"):
            PopularityAdjusted(model, split.item_popularity, 0.5, pseudo_count=bad)
        with pytest.raises(ValueError, match="pseudo_count must be"):
            Adjustment(beta=0.5, pseudo_count=bad)


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


# ------------------------------------------------------------------ the semantic-neighbour prior
def circle_table(split, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Item i<k> of the chain at angle 2*pi*k/N_RAW on a circle in 8-d: each item's nearest
    neighbours are its predecessor and its successor (rows in index order)."""
    gen = torch.Generator().manual_seed(seed)
    angles = torch.tensor([2 * math.pi * int(raw[1:]) / N_RAW for raw in split.item_index.ids])
    table = torch.zeros(len(angles), 8)
    table[:, 0], table[:, 1] = torch.cos(angles), torch.sin(angles)
    return table + noise * torch.randn(table.shape, generator=gen)


class ConstantScores(nn.Module):
    """Scores every item by a fixed random vector (a model that knows nothing about the user)."""

    def __init__(self, num_items: int, seed: int = 0) -> None:
        super().__init__()
        self.register_buffer("values", torch.randn(num_items + 1, generator=torch.Generator().manual_seed(seed)))
        self.num_items, self.max_len = num_items, 6

    def user_state(self, item_seq, padding_mask=None):
        return torch.zeros(item_seq.shape[0], 3)

    def full_scores(self, states):
        s = self.values.expand(states.shape[0], -1).clone()
        s[:, 0] = float("-inf")
        return s

    def score(self, states, candidates):
        return self.values[candidates.long()].expand(states.shape[0], -1) if candidates.ndim == 1 \
            else self.values[candidates.long()]


def test_semantic_prior_adds_weight_times_the_cosine_to_the_recency_weighted_profile():
    split = chain_split()
    model = ConstantScores(split.num_items)
    table = torch.randn(split.num_items, 5, generator=torch.Generator().manual_seed(1))
    unit = torch.nn.functional.normalize(table, dim=1)
    seq = torch.tensor([[0, 0, 3, 7, 2], [4, 9, 1, 0, 0], [0, 0, 0, 0, 0]])  # left, right padded, empty
    last = SemanticPrior(model, table, 1.5)
    full = last.full_scores(last.user_state(seq))
    own = model.full_scores(model.user_state(seq))
    for row, item in ((0, 2), (1, 1)):
        torch.testing.assert_close(full[row, 1:], own[row, 1:] + 1.5 * unit @ unit[item - 1])
    torch.testing.assert_close(full[2], own[2])  # no history, no prior
    decayed = SemanticPrior(model, table, 2.0, recency=0.5)
    profile = torch.nn.functional.normalize(0.25 * unit[2] + 0.5 * unit[6] + unit[1], dim=0)
    torch.testing.assert_close(decayed.profile(seq)[0], profile)
    torch.testing.assert_close(decayed.profile(seq)[1], torch.nn.functional.normalize(
        0.25 * unit[3] + 0.5 * unit[8] + unit[0], dim=0))
    states = decayed.user_state(seq)
    cands = torch.tensor([[3, 1, 7], [2, 2, 9], [5, 6, 1]])
    torch.testing.assert_close(decayed.score(states, cands), decayed.full_scores(states).gather(1, cands))
    torch.testing.assert_close(SemanticPrior(model, table, 0.0).full_scores(states), own)
    longer = torch.cat([torch.tensor([[5, 5, 5]] * 3), seq], dim=1)  # cut to the model's max_len 6
    torch.testing.assert_close(decayed.user_state(longer)[:2], decayed.user_state(longer[:, -6:])[:2])


def test_position_profiles_are_the_profiles_of_every_prefix_and_training_bias_weighs_them():
    """Position t's profile is ``profile`` of the sequence cut after t (left and right padding,
    recency 0 and 0.5, ids outside 1..N counted as padding); ``training_bias`` is ``weight *
    prior`` of the profiles at the valid positions, tail weighting included."""
    split = chain_split()
    model = ConstantScores(split.num_items)
    table = torch.randn(split.num_items, 5, generator=torch.Generator().manual_seed(2))
    seq = torch.tensor([[0, 0, 3, 7, 2, 5], [4, 9, 1, 6, 0, 0], [0, 0, 0, 0, 0, 8]])
    for recency in (0.0, 0.5):
        prior = SemanticPrior(model, table, 1.0, recency)
        profiles = prior.position_profiles(seq)
        assert profiles.shape == (3, 6, 5)
        for b in range(3):
            for t in range(6):
                if seq[b, t] == 0:
                    continue
                torch.testing.assert_close(profiles[b, t], prior.profile(seq[b:b + 1, :t + 1])[0])
        assert profiles[0, :2].abs().sum() == 0 and profiles[2, :5].abs().sum() == 0
    unknown = seq.clone()
    unknown[1, 1] = split.num_items + 3  # an id outside 1..N: no row, treated as padding
    torch.testing.assert_close(SemanticPrior(model, table, 1.0, 0.5).position_profiles(unknown)[1, 2],
                               SemanticPrior(model, table, 1.0, 0.5).profile(torch.tensor([[4, 0, 1]]))[0])
    weighted = SemanticPrior(model, table, 2.5, 0.5, popularity=split.item_popularity, tail_exponent=1.0)
    valid = seq > 0
    bias = weighted.training_bias(seq, None, valid)
    assert bias.shape == (int(valid.sum()), split.num_items + 1)
    torch.testing.assert_close(bias, 2.5 * weighted.prior(weighted.position_profiles(seq)[valid]))
    # against candidates: the same values, gathered; index 0 (padding) gets 0
    cands = torch.randint(0, split.num_items + 1, (int(valid.sum()), 4), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(weighted.training_bias(seq, None, valid, cands), bias.gather(1, cands))
    assert (weighted.training_bias(seq, None, valid, torch.zeros_like(cands)) == 0).all()
    # the last position's bias is the wrapper's prior over the whole sequence
    last = weighted.full_scores(weighted.user_state(seq[:2])) - model.full_scores(model.user_state(seq[:2]))
    torch.testing.assert_close(bias[[3, 7], 1:], last[:, 1:])


def test_choose_adjustment_scores_every_point_as_evaluate_scores_the_wrapped_model():
    split = chain_split()
    model = SuccessorPlusPopularity(split, signal=0.3)
    table = circle_table(split, noise=0.3)
    best, values = choose_adjustment(model, split, table, betas=(0.0, 0.5), weights=(0.0, 1.0, 3.0),
                                     recencies=(0.0, 0.6), batch_size=7)
    assert len(values) == 10  # weight 0 once per beta: its recency does nothing
    for point, value in values.items():
        wrapped = point.wrap(model, split, table)
        assert value == pytest.approx(evaluate(wrapped, split, "valid").summary()["Overall"]["NDCG@10"], abs=1e-12)
    assert values[best] == max(values.values())
    hr, _ = choose_adjustment(model, split, table, weights=(0.0, 3.0), metric="HR@5")
    assert hr in {Adjustment(0.0, 0.0), Adjustment(0.0, 3.0)}


def test_choose_adjustment_on_the_sampled_protocol_matches_evaluate_and_can_choose_differently():
    """protocol="sampled" ranks each validation target among the negatives evaluate draws for the
    same seed: every point's value is the wrapped model's sampled N@10, and another seed draws
    other negatives."""
    split = chain_split()
    model = SuccessorPlusPopularity(split, signal=0.3)
    table = circle_table(split, noise=0.3)
    grid = dict(betas=(-0.5, 0.0, 0.5, 2.0), weights=(0.0, 1.0, 3.0), recencies=(0.0, 0.6))
    best, values = choose_adjustment(model, split, table, **grid, batch_size=7, protocol="sampled",
                                     n_negatives=5, seed=3)
    for point, value in values.items():
        res = evaluate(point.wrap(model, split, table), split, "valid", protocol="sampled", n_negatives=5, seed=3)
        assert value == pytest.approx(res.summary()["Overall"]["NDCG@10"], abs=1e-12), point
    assert values[best] == max(values.values())
    full_best, _ = choose_adjustment(model, split, table, **grid)
    # another ranking problem: against a few random items the prior alone wins, over all items popularity
    assert best == Adjustment(0.0, 3.0, 0.0) and full_best == Adjustment(0.5, 0.0, 0.0)
    _, other_seed = choose_adjustment(model, split, table, **grid, protocol="sampled", n_negatives=5, seed=4)
    assert other_seed != values
    with pytest.raises(ValueError, match="protocol must be"):
        choose_adjustment(model, split, table, protocol="both")


def test_the_prior_finds_semantic_successors_that_a_model_without_them_misses():
    """The next item is the last item's semantic neighbour (its predecessor is in the history and
    left out of the ranking): validation turns the prior on, and test N@10 rises with it."""
    split = chain_split()
    model = ConstantScores(split.num_items)
    table = circle_table(split, noise=0.05)
    best, values = choose_adjustment(model, split, table, weights=(0.0, 0.5, 50.0), recencies=(0.0, 0.9))
    assert best.weight == 50.0 and best.recency == 0.0, values
    plain = evaluate(model, split, "test").summary()["Overall"]["NDCG@10"]
    adjusted = evaluate(best.wrap(model, split, table), split, "test").summary()["Overall"]["NDCG@10"]
    assert adjusted > 0.9 > 0.3 > plain
    sampled = evaluate(best.wrap(model, split, table), split, "test", protocol="sampled").summary()
    assert sampled["Overall"]["NDCG@10"] > 0.9


def test_adjustment_ties_go_to_the_weakest_point_and_wrap_composes_both_parts():
    split = chain_split()
    model = ConstantScores(split.num_items)
    zero = torch.zeros(split.num_items, 4)  # no semantic signal: every weight ties
    best, values = choose_adjustment(model, split, zero, weights=(2.0, 0.0, -1.0), recencies=(0.5, 0.0))
    assert best == Adjustment(0.0, 0.0, 0.0) and len(set(values.values())) == 1
    both = Adjustment(beta=0.5, weight=2.0, recency=0.3).wrap(model, split, zero)
    assert isinstance(both, PopularityAdjusted) and isinstance(both.model, SemanticPrior)
    assert both.model.weight == 2.0 and both.model.recency == 0.3 and both.beta == 0.5
    assert Adjustment().wrap(model, split) is model
    # the popularity term's counts: training counts by default, or the ones given (as of the test inputs)
    assert torch.equal(both.log_popularity, torch.log1p(torch.as_tensor(split.item_popularity, dtype=torch.float32)))
    fresher = Adjustment(beta=0.5).wrap(model, split, popularity=split.input_popularity("test"))
    assert torch.equal(fresher.log_popularity,
                       torch.log1p(torch.as_tensor(split.input_popularity("test"), dtype=torch.float32)))
    assert not torch.equal(fresher.log_popularity, both.log_popularity)


def test_semantic_prior_bad_inputs_are_named():
    split = chain_split()
    model = ConstantScores(split.num_items)
    table = torch.randn(split.num_items, 4)
    with pytest.raises(ValueError, match="one row per item"):
        SemanticPrior(model, table[1:], 1.0)
    with pytest.raises(ValueError, match="recency must be in"):
        SemanticPrior(model, table, 1.0, recency=1.5)
    with pytest.raises(ValueError, match="weight must be"):
        SemanticPrior(model, table, math.nan)
    bad = table.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        SemanticPrior(model, bad, 1.0)
    with pytest.raises(ValueError, match="need the semantic table"):
        choose_adjustment(model, split, None, weights=(0.0, 1.0))
    with pytest.raises(ValueError, match="needs the semantic table"):
        Adjustment(weight=1.0).wrap(model, split)
    with pytest.raises(ValueError, match="metric must be"):
        choose_adjustment(model, split, table, metric="MRR")
    with pytest.raises(ValueError, match="grid is empty"):
        choose_adjustment(model, split, table, betas=())
    with pytest.raises(ValueError, match="recency must be in"):
        choose_adjustment(model, split, table, weights=(1.0,), recencies=(-0.5,))
    for bad_point in ({"beta": math.inf}, {"weight": math.nan}, {"tail_exponent": -math.inf}, {"recency": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad_point))):
            Adjustment(**bad_point)


def test_tail_exponent_weighs_each_items_prior_by_its_count_relative_to_the_geometric_mean():
    split = chain_split()
    model = ConstantScores(split.num_items)
    table = circle_table(split, noise=0.2)
    unit = torch.nn.functional.normalize(table, dim=1)
    counts = np.asarray(split.item_popularity, dtype=np.float64)
    assert counts[1:].min() < counts[1:].max()  # a skewed catalogue: the factors differ
    seq = torch.tensor([[0, 0, 3, 7, 2], [4, 9, 1, 0, 0]])
    prior = SemanticPrior(model, table, 2.0, popularity=counts, tail_exponent=0.7)
    own = model.full_scores(model.user_state(seq))
    log_c = np.log1p(counts[1:])
    factor = torch.as_tensor(np.exp(-0.7 * (log_c - log_c.mean())), dtype=torch.float32)
    full = prior.full_scores(prior.user_state(seq))
    for row, item in ((0, 2), (1, 1)):
        torch.testing.assert_close(full[row, 1:], own[row, 1:] + 2.0 * factor * (unit @ unit[item - 1]))
    # rarer items get more of the prior; the geometric-mean count gets the plain weight
    order = np.argsort(counts[1:])
    assert factor[order[0]] > 1.0 > factor[order[-1]]
    states = prior.user_state(seq)
    cands = torch.tensor([[3, 1, 7], [2, 2, 9]])
    torch.testing.assert_close(prior.score(states, cands), full.gather(1, cands))
    # exponent 0 weighs every item alike, counts or not
    torch.testing.assert_close(SemanticPrior(model, table, 2.0, popularity=counts, tail_exponent=0.0)
                               .full_scores(states), SemanticPrior(model, table, 2.0).full_scores(states))


def test_choose_adjustment_with_tail_exponents_matches_evaluate_and_wrap_passes_the_counts():
    split = chain_split()
    model = SuccessorPlusPopularity(split, signal=0.3)
    table = circle_table(split, noise=0.3)
    best, values = choose_adjustment(model, split, table, betas=(0.0, 0.5), weights=(0.0, 1.0, 3.0),
                                     recencies=(0.0, 0.6), tail_exponents=(0.0, 0.5, 1.0), batch_size=7)
    assert len(values) == 2 * (1 + 2 * 2 * 3)  # weight 0 once per beta: recency and exponent do nothing
    assert {p.tail_exponent for p in values if p.weight == 0} == {0.0}
    for point, value in values.items():
        wrapped = point.wrap(model, split, table)
        assert value == pytest.approx(evaluate(wrapped, split, "valid").summary()["Overall"]["NDCG@10"], abs=1e-12)
    assert values[best] == max(values.values())
    # given the counts of the test inputs, wrap uses them for the popularity term only: the prior keeps
    # weighing by the training counts, what the model saw of each item
    point = Adjustment(beta=0.5, weight=1.0, tail_exponent=1.0)
    inputs = split.input_popularity("test")
    wrapped = point.wrap(model, split, table, popularity=inputs)
    assert torch.equal(wrapped.log_popularity, torch.log1p(torch.as_tensor(inputs, dtype=torch.float32)))
    log_c = np.log1p(np.asarray(split.item_popularity, dtype=np.float64)[1:])
    torch.testing.assert_close(wrapped.model.item_scale[1:],
                               torch.as_tensor(np.exp(-(log_c - log_c.mean())), dtype=torch.float32))
    assert not np.array_equal(np.asarray(inputs), np.asarray(split.item_popularity))
    with pytest.raises(ValueError, match="needs the items' counts"):
        SemanticPrior(model, table, 1.0, tail_exponent=0.5)
    with pytest.raises(ValueError, match="tail_exponent must be"):
        SemanticPrior(model, table, 1.0, popularity=inputs, tail_exponent=math.inf)
