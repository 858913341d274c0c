"""cfsr_head.evaluate: metrics against hand-computed cases, masking, sampling, groups, t-test."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import ttest_rel
from torch import nn

from cfsr_head import InteractionData, leave_one_out
from cfsr_head.evaluate import (
    EvalResult, GroupSpec, PopularityModel, RandomModel, evaluate, metrics_from_ranks, paired_ttest,
    ranks_from_scores,
)

A, B, C, D, E = 1, 2, 3, 4, 5


def split_of(seqs: dict[str, str]):
    rows = [(u, it, t) for u, s in seqs.items() for t, it in enumerate(s)]
    return leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])))


# u1: train a b c | valid d | test e ; u2: train a b | valid c | test a (seen before) ;
# u3: train a | c | e ; u4: train b | a | d ; u5: train c | a | b
GROUP_TOY = {"u1": "abcde", "u2": "abca", "u3": "ace", "u4": "bad", "u5": "cab"}


@pytest.fixture
def toy():
    s = split_of(GROUP_TOY)
    assert s.item_index.ids == ["a", "b", "c", "d", "e"]
    return s


class TableModel(nn.Module):
    """Scores looked up by the (unpadded) input sequence: {tuple(seq): [N+1] scores}."""

    def __init__(self, n_items: int, table: dict[tuple, list[float]], default: float = 0.0):
        super().__init__()
        self.num_items = n_items
        self.table = table
        self.default = default
        self.seen_candidates: list[torch.Tensor] = []
        self.lin = nn.Linear(1, 1)  # a parameter so evaluate can find the device / train mode

    def user_state(self, item_seq, padding_mask):
        assert torch.equal(padding_mask, item_seq == 0)
        return item_seq.float()

    def full_scores(self, states):
        rows = []
        for st in states.long().tolist():
            key = tuple(i for i in st if i)
            rows.append(self.table.get(key, [self.default] * (self.num_items + 1)))
        s = torch.tensor(rows, dtype=torch.float32)
        s[:, 0] = float("-inf")
        return s

    def score(self, states, candidates):
        self.seen_candidates.append(candidates.clone())
        return self.full_scores(states).gather(1, candidates)


class OracleModel(TableModel):
    """Knows every target: score 1 for it, 0 elsewhere."""

    def __init__(self, split, split_name):
        seq, tgt, _ = split.eval_inputs(split_name)
        table = {}
        for row, t in zip(seq.tolist(), tgt.tolist()):
            s = [0.0] * (split.num_items + 1)
            s[t] = 1.0
            table[tuple(i for i in row if i)] = s
        super().__init__(split.num_items, table)


# ------------------------------------------------------------------ metric arithmetic
def test_metrics_from_hand_ranks():
    hit, ndcg = metrics_from_ranks(np.array([0, 3, 9, 10]), ks=(5, 10, 20))
    assert hit[5].tolist() == [1, 1, 0, 0]
    assert hit[10].tolist() == [1, 1, 1, 0]
    assert hit[20].tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(ndcg[5], [1, 1 / math.log2(5), 0, 0])
    np.testing.assert_allclose(ndcg[10], [1, 1 / math.log2(5), 1 / math.log2(11), 0])
    np.testing.assert_allclose(ndcg[20], [1, 1 / math.log2(5), 1 / math.log2(11), 1 / math.log2(12)])


def test_ranks_strict_and_pessimistic_ties():
    s = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0],
                      [1.0, 2.0, 2.0, 0.5, 2.0],
                      [7.0, 7.0, 7.0, 7.0, 7.0],
                      [1.0, float("nan"), 3.0, 0.0, 0.0]])
    r = ranks_from_scores(s, torch.tensor([0, 1, 3, 1]))
    # row 0: best; row 1: 0 greater + 2 ties; row 2: constant model -> last; row 3: NaN target -> -inf
    assert r.tolist() == [0, 2, 4, 4]


# ------------------------------------------------------------------ full ranking
def test_full_ranking_masks_history_but_never_the_target(toy):
    #                         pad   a     b     c    d    e
    table = {(A, B, C): [0, 5.0, 10.0, 9.0, 6.0, 1.0],    # u2 test: input a b c, target a (seen before)
             (A, B, C, D): [0, 10.0, 9.0, 8.0, 7.0, 1.0]}  # u1 test: input a b c d, target e
    res = evaluate(TableModel(5, table), toy, split="test", protocol="full", groups=None, ks=(1, 5))
    ranks = dict(zip(res.user_ids.tolist(), res.ranks.tolist()))
    assert ranks["u1"] == 0  # a b c d masked (would be 4 without masking)
    assert ranks["u2"] == 1  # b c masked, target a kept; only d is above it (3 unmasked, >= 2 if a masked)
    assert list(res.groups) == ["Overall"]


def test_valid_split_masks_only_train_items(toy):
    # u1 valid: input a b c, target d; e is NOT history for the validation split
    table = {(A, B, C): [0, 10.0, 9.0, 8.0, 2.0, 3.0]}
    res = evaluate(TableModel(5, table), toy, split="valid", groups=None)
    assert dict(zip(res.user_ids.tolist(), res.ranks.tolist()))["u1"] == 1


def test_perfect_oracle_scores_one():
    s = random_split()
    for split in ("valid", "test"):
        for protocol in ("full", "sampled"):
            res = evaluate(OracleModel(s, split), s, split=split, protocol=protocol, n_negatives=7)
            assert (res.ranks == 0).all()
            for k in (5, 10, 20):
                assert res.summary()["Overall"][f"HR@{k}"] == 1.0
                assert res.summary()["Overall"][f"NDCG@{k}"] == 1.0


def test_constant_model_does_not_score_well():
    s = random_split()  # 40 items, at most 29 per user -> at least 11 unmasked items per user
    res = evaluate(TableModel(s.num_items, {}, default=1.0), s, groups=None)
    hist = s.history("test").toarray()
    # every unmasked non-target item ties with the target -> counted above it
    expected = (s.num_items - hist[:, 1:].sum(1)) - 1 + hist[np.arange(s.num_users), s.targets("test")]
    assert res.ranks.tolist() == expected.tolist()
    assert (expected >= 10).all() and res.summary()["Overall"]["HR@10"] == 0.0


def test_popularity_model_tiny_case(toy):
    # training popularity: a 3, b 3, c 2, d 0, e 0
    assert toy.item_popularity.tolist() == [0, 3, 3, 2, 0, 0]
    res = evaluate(PopularityModel.from_split(toy), toy, split="test", groups=None)
    # u1: only e unmasked -> 0; u2: target a (3) vs d, e -> 0; u3: target e (0) vs b (3) and d (tie) -> 2;
    # u4: target d (0) vs c (2) and e (tie) -> 2; u5: target b (3) vs d, e -> 0
    assert res.ranks.tolist() == [0, 0, 2, 2, 0]
    assert res.summary()["Overall"]["NDCG@10"] == pytest.approx((3 + 2 / math.log2(4)) / 5)


def test_random_model_seeded(toy):
    a = evaluate(RandomModel(5, seed=1), toy).ranks
    b = evaluate(RandomModel(5, seed=1), toy).ranks
    assert a.tolist() == b.tolist()


def test_bad_model_outputs_raise(toy):
    class Wrong(TableModel):
        def full_scores(self, states):
            return super().full_scores(states)[:, 1:]

    with pytest.raises(ValueError, match="full_scores returned shape"):
        evaluate(Wrong(5, {}), toy)
    with pytest.raises(ValueError, match="num_items"):
        evaluate(TableModel(7, {}), toy)


def test_train_mode_restored(toy):
    m = TableModel(5, {})
    m.train()
    evaluate(m, toy)
    assert m.training
    m.eval()
    evaluate(m, toy)
    assert not m.training


# ------------------------------------------------------------------ sampled protocol
def random_split(n_users=30, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{i}", t) for u in range(n_users)
            for t, i in enumerate(rng.choice(n_items, size=int(rng.integers(3, 30)), replace=False))]
    return leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])))


def test_sampled_never_samples_interacted_items_and_is_seeded():
    s = random_split()
    m = TableModel(s.num_items, {})
    evaluate(m, s, protocol="sampled", n_negatives=100, seed=3, batch_size=7)
    cands = torch.cat(m.seen_candidates).numpy()
    assert cands.shape == (s.num_users, 101)
    assert (cands[:, 0] == s.targets("test")).all()
    every = s.history("all").toarray()  # all items each user ever interacted with (incl. valid/test)
    negs = cands[:, 1:]
    assert not every[np.arange(s.num_users)[:, None], negs].any()
    assert (negs >= 1).all() and (negs <= s.num_items).all()
    # same seed -> same candidates, whatever the batch size; another seed -> different ones
    m2 = TableModel(s.num_items, {})
    evaluate(m2, s, protocol="sampled", seed=3, batch_size=64)
    assert np.array_equal(torch.cat(m2.seen_candidates).numpy(), cands)
    m3 = TableModel(s.num_items, {})
    evaluate(m3, s, protocol="sampled", seed=4)
    assert not np.array_equal(torch.cat(m3.seen_candidates).numpy(), cands)


def test_sampled_rank_hand_case_and_impossible_user(toy):
    with pytest.raises(ValueError, match=r"interacted with all 5 items.*'u1'"):
        evaluate(PopularityModel(toy), toy, protocol="sampled")
    # u1: a b c d e f g ; u2: a x y z ; u3: h i a -> training popularity a 2; b c d e x h 1; others 0
    s = split_of({"u1": "abcdefg", "u2": "axyz", "u3": "hia"})
    res = evaluate(PopularityModel(s), s, protocol="sampled", n_negatives=50, seed=0, groups=None)
    # u1 target g (pop 0): negatives from h i x y z; h, x above, i y z tie -> every negative counts
    assert res.ranks[0] == 50
    # u2 target z (pop 0): negatives from b..i; b c d e h above, f g i tie -> rank 50
    assert res.ranks[1] == 50
    # u3 target a (pop 2, the unique maximum): nothing above or tied -> rank 0
    assert res.ranks[2] == 0


# ------------------------------------------------------------------ groups
def test_groups_from_training_data_by_hand(toy):
    res = evaluate(PopularityModel(toy), toy, split="test")
    # training popularity a 3, b 3, c 2, d 0, e 0; top 20% of 5 items = 1 item -> threshold 3 -> head {a, b}
    # test targets e a e d b
    assert res.info["item_threshold"] == 3
    assert res.groups["Head item"].tolist() == [False, True, False, False, True]
    assert res.groups["Tail item"].tolist() == [True, False, True, True, False]
    # training lengths 3 2 1 1 1; top 20% of 5 users = 1 user -> threshold 3 -> head {u1}
    assert res.info["user_threshold"] == 3
    assert res.groups["Head user"].tolist() == [True, False, False, False, False]
    summ = res.summary()
    assert set(summ) == {"Overall", "Tail item", "Head item", "Tail user", "Head user"}
    assert summ["Head user"]["HR@5"] == 1.0  # u1 rank 0
    assert summ["Tail user"]["NDCG@10"] == pytest.approx((2 + 2 * 0.5) / 4)


def test_fixed_thresholds(toy):
    res = evaluate(PopularityModel(toy), toy, split="valid", groups=GroupSpec(item_threshold=2, user_threshold=2))
    # valid targets d c c a a ; popularity d 0, c 2, a 3
    assert res.groups["Head item"].tolist() == [False, True, True, True, True]
    assert res.groups["Head user"].tolist() == [True, True, False, False, False]


# ------------------------------------------------------------------ results and significance
def hand_result(users, ranks):
    return EvalResult(np.array(users, dtype=object), np.array(ranks), (5, 10),
                      {"Overall": np.ones(len(users), bool), "Tail user": np.array([True, True, False, True, False][:len(users)])})


def test_paired_ttest_matches_scipy_on_aligned_users():
    a = hand_result(["x", "y", "z", "w", "v"], [0, 3, 12, 1, 2])
    b = hand_result(["w", "z", "y", "x", "v"], [0, 2, 9, 5, 7])
    na = np.array([1, 1 / math.log2(5), 0, 1 / math.log2(3), 1 / math.log2(4)])
    nb = np.array([1 / math.log2(7), 1 / math.log2(11), 1 / math.log2(4), 1, 1 / math.log2(9)])  # x y z w v
    t, p, diff = paired_ttest(a, b, "NDCG@10")
    ref = ttest_rel(na, nb)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert diff == pytest.approx((na - nb).mean())
    t, p, diff = paired_ttest(a, b, "HR@5", group="Tail user")  # x y w
    ref = ttest_rel([1, 1, 1], [0, 0, 1])
    assert t == pytest.approx(ref.statistic) and diff == pytest.approx(2 / 3)
    with pytest.raises(KeyError, match="unknown metric"):
        paired_ttest(a, b, "MRR@3")
    t, p, diff = paired_ttest(a, a)
    assert math.isnan(t) and diff == 0.0


def test_json_round_trip(tmp_path):
    s = random_split()
    res = evaluate(PopularityModel(s), s, protocol="sampled", n_negatives=3)
    back = EvalResult.from_json(res.to_json(tmp_path / "r.json"))
    back2 = EvalResult.from_json(tmp_path / "r.json")
    for r in (back, back2):
        assert r.user_ids.tolist() == res.user_ids.tolist()
        assert r.ranks.tolist() == res.ranks.tolist()
        assert r.summary() == res.summary()
        assert r.protocol == "sampled" and r.info["n_negatives"] == 3
    with pytest.raises(ValueError, match="EvalResult"):
        EvalResult.from_json('{"a": 1}')
