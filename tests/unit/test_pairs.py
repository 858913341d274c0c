"""Collaborative positive pairs for CFT: pairs from histories, their index, and fit's use of them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llm_item_embed import ItemEmbedder, sequence_pairs
from llm_item_embed.pairs import PairIndex


@pytest.fixture
def first_batch(monkeypatch) -> list:
    """Filled by every ``ContrastiveTrainer.train`` call with what ``make_views`` renders for the whole
    table (item order, seed 0): the views fit trains on and their masks."""
    import llm_item_embed.training as training

    seen: list = []
    original = training.ContrastiveTrainer.train

    def spy(self, make_views, n_items, **kwargs):
        seen.append(make_views(np.arange(n_items), np.random.default_rng(0)))
        return original(self, make_views, n_items, **kwargs)

    monkeypatch.setattr(training.ContrastiveTrainer, "train", spy)
    return seen


def histories() -> pd.DataFrame:
    # u1: a b c d (time order differs from file order), u2: c c e
    return pd.DataFrame({"user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u2"],
                         "item_id": ["b", "a", "d", "c", "c", "c", "e"],
                         "timestamp": [2, 1, 4, 3, 1, 2, 3]})


def as_set(pairs: pd.DataFrame) -> set[tuple[str, str]]:
    return set(map(tuple, pairs[["item_id", "positive_id"]].to_numpy()))


def test_sequence_pairs_follow_time_order_drop_repeats_and_hold_out_the_last_items():
    assert as_set(sequence_pairs(histories())) == {("a", "b"), ("b", "c"), ("c", "d"), ("c", "e")}
    assert as_set(sequence_pairs(histories(), window=2)) == {("a", "b"), ("b", "c"), ("c", "d"), ("c", "e"),
                                                             ("a", "c"), ("b", "d")}
    # leave-one-out keeps the last two items of each user for validation and test: never a positive
    assert as_set(sequence_pairs(histories(), holdout_last=2)) == {("a", "b")}
    with pytest.raises(KeyError, match="'when'"):
        sequence_pairs(histories(), time_column="when")
    with pytest.raises(ValueError, match="window"):
        sequence_pairs(histories(), window=0)


def test_sequence_pairs_count_transitions_and_filter_rare_pairs():
    # u1: a b a b (a-b three times), u2: b c a (b-c once, c-a once), u3: c b (b-c again)
    df = pd.DataFrame({"user_id": ["u1"] * 4 + ["u2"] * 3 + ["u3"] * 2,
                       "item_id": ["a", "b", "a", "b", "b", "c", "a", "c", "b"], "timestamp": range(9)})
    counted = sequence_pairs(df, counts=True)
    assert list(counted.columns) == ["item_id", "positive_id", "count"]
    assert {(x, y): n for x, y, n in counted.to_numpy()} == {("a", "b"): 3, ("b", "c"): 2, ("a", "c"): 1}
    assert as_set(sequence_pairs(df, min_count=2)) == {("a", "b"), ("b", "c")}
    assert list(sequence_pairs(df).columns) == ["item_id", "positive_id"]  # the default stays two columns
    assert sequence_pairs(df, min_count=4).empty
    with pytest.raises(ValueError, match="min_count"):
        sequence_pairs(df, min_count=0)


def test_weighted_pair_index_samples_partners_in_proportion():
    ids = ["a", "b", "c", "d"]
    # (a, b) given twice: weights add up to 6; a's partners b : c : d = 6 : 3 : 1
    pairs = pd.DataFrame({"x": ["a", "b", "a", "d"], "y": ["b", "a", "c", "a"], "count": [2, 4, 3, 1]})
    index = PairIndex.build(pairs, ids)
    assert index.n_pairs == 3
    got = index.sample(np.zeros(20000, np.int64), 1.0, np.random.default_rng(0))
    share = np.bincount(got, minlength=4) / len(got)
    assert share[0] == 0 and np.allclose(share[1:], [0.6, 0.3, 0.1], atol=0.015)
    # rows with one partner always get it, whatever its weight; rows without keep themselves
    assert (index.sample(np.full(50, 2), 1.0, np.random.default_rng(1)) == 0).all()
    assert set(PairIndex.build(pairs.iloc[:, :2], ids).sample(np.zeros(3000, np.int64), 1.0,
                                                             np.random.default_rng(2))) == {1, 2, 3}
    for bad in (0, -1.0, float("nan"), "many"):
        with pytest.raises(ValueError, match="'count'.*row 1"):
            PairIndex.build(pairs.assign(count=[1, bad, 1, 1]), ids)
    with pytest.raises(ValueError, match="3 \\(and a weight\\)"):
        PairIndex.build(pairs.assign(extra=1), ids)


def test_pair_index_is_symmetric_and_samples_only_partners():
    ids = ["a", "b", "c", "d", "lonely"]
    index = PairIndex.build(pd.DataFrame({"x": ["a", "a", "b", "a"], "y": ["b", "c", "a", "a"]}), ids)
    assert index.n_pairs == 2  # (a, b) twice and the self pair collapse
    partners = {i: set(index.neighbours[index.offsets[i]:index.offsets[i + 1]]) for i in range(len(ids))}
    assert partners == {0: {1, 2}, 1: {0}, 2: {0}, 3: set(), 4: set()}
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(len(ids)), 200)
    got = index.sample(rows, 1.0, rng)
    for r in range(len(ids)):
        assert set(got[rows == r]) == (partners[r] or {r})  # every partner comes up; no partner: itself
    half = index.sample(np.zeros(2000, np.int64), 0.5, rng)
    assert 0.4 < (half != 0).mean() < 0.6
    assert (index.sample(np.zeros(50, np.int64), 0.0, rng) == 0).all()
    with pytest.raises(KeyError, match="'zz'"):
        PairIndex.build([("a", "zz")], ids)
    with pytest.raises(ValueError, match="no pair"):
        PairIndex.build([("a", "a")], ids)


def test_linked_marks_exactly_the_partners():
    rng = np.random.default_rng(1)
    n = 30
    raw = rng.integers(0, n, size=(60, 2))
    index = PairIndex.build(raw.astype(str), [str(i) for i in range(n)])
    partners = {(a, b) for a, b in raw if a != b} | {(b, a) for a, b in raw if a != b}
    anchors, candidates = rng.integers(0, n, 12), rng.integers(0, n, 17)
    got = index.linked(anchors, candidates)
    assert got.shape == (12, 17)
    assert got.tolist() == [[(int(a), int(c)) in partners for c in candidates] for a in anchors]
    assert not index.linked(np.arange(n), np.arange(n)).diagonal().any()  # an item is not its own partner
    # per view: partners, the anchor's own row, and (with groups) rows rendering the same prompt
    views = [anchors, rng.integers(0, n, 12)]
    groups = np.arange(n) // 2  # rows 2j and 2j+1 render the same prompt
    by_row = index.known_positives(anchors, views)
    by_group = index.known_positives(anchors, views, groups)
    for b, src in enumerate(views):
        linked = index.linked(anchors, src)
        assert (by_row[b] == (linked | (anchors[:, None] == src[None, :]))).all()
        assert (by_group[b] == (linked | (anchors[:, None] // 2 == src[None, :] // 2))).all()
    assert by_group.sum() > by_row.sum()


def test_partner_conflict_count():
    from benchmarks.bench_pair_conflicts import partner_conflicts

    ids = ["a", "b", "c", "d", "e", "f"]
    every = PairIndex.build([(x, y) for x in ids[:4] for y in ids[:4] if x < y] + [("e", "f")], ids)
    # one batch of the four linked items: every off-diagonal candidate of both views is a partner
    # or the anchor itself
    four = partner_conflicts(every, 4, batch_size=4, pair_prob=0.5, n_views=2, n_batches=20)
    assert four == {"anchors_with_a_partner": 1.0, "masked_logits_per_batch": 2 * 4 * 3}
    # a batch of a and b alone: each is the other's partner
    sparse = PairIndex.build([("a", "b"), ("e", "f")], ids)
    assert partner_conflicts(sparse, 2, batch_size=2, pair_prob=1.0)["anchors_with_a_partner"] == 1.0
    lone = PairIndex.build([("e", "f")], ids)
    assert partner_conflicts(lone, 4, batch_size=4, pair_prob=1.0) == {"anchors_with_a_partner": 0.0,
                                                                        "masked_logits_per_batch": 0.0}


def test_fit_makes_partner_prompts_positives(tiny_bert_dir, first_batch):
    df = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["alpha", "bravo", "charlie", "delta"]})
    fit = dict(epochs=1, batch_size=4, lr=5e-3, show_progress_bar=False, seed=0, max_steps=1)
    emb = ItemEmbedder(tiny_bert_dir, max_length=32, drop_prob=0.0, n_views=3)
    emb.fit(df, positive_pairs=[("a", "b"), ("c", "d")], pair_prob=1.0, **fit)
    (views, groups, known), = first_batch
    a, b, c, d = emb.render(df)  # drop_prob 0: each view is an item's whole prompt
    assert views[0] == [a, b, c, d]
    for v in views[1:]:  # every later view is the partner's prompt
        assert v == [b, a, d, c]
    # partners are not negatives: in view 0 the candidate is the item (a's partner is b), in the
    # later views it is the item's partner (candidate b shows a, a's own prompt)
    pair = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], bool)
    assert groups is None and known.shape == (3, 4, 4)
    assert (known[0] == (pair | np.eye(4, dtype=bool))).all()
    for k in (1, 2):
        assert (known[k] == np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool))).all()
    assert emb.training_summary["positive_pairs"] == 2 and emb.training_summary["pair_prob"] == 1.0
    assert emb.training_summary["mask_known_positives"] is True
    meta = emb.encode(df).metadata["training"]  # the embeddings file says how it was made
    assert meta["positive_pairs"] == 2 and meta["steps"] == 1


def test_partners_can_stay_negatives(tiny_bert_dir, first_batch):
    df = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["alpha", "bravo", "alpha", "delta"]})
    emb = ItemEmbedder(tiny_bert_dir, max_length=32, drop_prob=0.0)
    emb.fit(df, positive_pairs=[("a", "b")], pair_prob=1.0, mask_known_positives=False, epochs=1, batch_size=4,
            show_progress_bar=False, max_steps=1)
    (views, groups), = first_batch  # only identical prompts (a and c) are kept out of the negatives
    assert groups[0] == groups[2] and len(set(groups)) == 3
    assert emb.training_summary["mask_known_positives"] is False


def test_bad_pairs_fail_before_model_work(tiny_bert_dir, no_model):
    df = pd.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"]})
    emb = ItemEmbedder(tiny_bert_dir, max_length=32)
    with pytest.raises(KeyError, match="'c'"):
        emb.fit(df, positive_pairs=[("a", "c")])
    with pytest.raises(ValueError, match="pair_prob"):
        emb.fit(df, positive_pairs=[("a", "b")], pair_prob=0.0)
    with pytest.raises(ValueError, match="2 columns"):
        emb.fit(df, positive_pairs=pd.DataFrame({"x": ["a"], "y": ["b"], "z": [1], "w": [1]}))
    with pytest.raises(ValueError, match="weight column 'z'.*row 0 has 'b'"):
        emb.fit(df, positive_pairs=pd.DataFrame({"x": ["a"], "y": ["b"], "z": ["b"]}))


def test_resume_refuses_a_checkpoint_made_from_other_pairs_or_prompts(tiny_bert_dir, tmp_path):
    df = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["alpha", "bravo", "charlie", "delta"]})
    fit = dict(epochs=1, batch_size=4, lr=5e-3, show_progress_bar=False, seed=0, output_dir=str(tmp_path),
               save_every=1)
    ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, positive_pairs=[("a", "b")], max_steps=1, **fit)
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    more = dict(fit, max_steps=1, resume_from="latest")
    with pytest.raises(ValueError, match="training data differ"):
        ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, positive_pairs=[("c", "d")], **more)
    with pytest.raises(ValueError, match="training data differ"):  # same ids, other prompts
        ItemEmbedder(tiny_bert_dir, max_length=32).fit(df.assign(title=["w", "x", "y", "z"]),
                                                       positive_pairs=[("a", "b")], **more)
    weighted = pd.DataFrame({"x": ["a"], "y": ["b"], "count": [3]})  # same pair, drawn by weight
    with pytest.raises(ValueError, match="training data differ"):
        ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, positive_pairs=weighted, **more)
    resumed = ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, positive_pairs=[("b", "a")], **more)
    assert resumed.training_summary["steps"] == 1  # same data (a pair is a pair either way): resumed
