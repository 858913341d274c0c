"""Collaborative positive pairs for CFT: pairs from histories, their index, and fit's use of them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llm_item_embed import ItemEmbedder, sequence_pairs
from llm_item_embed.pairs import PairIndex


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


def test_fit_makes_partner_prompts_positives(tiny_bert_dir, monkeypatch):
    import llm_item_embed.training as training

    seen = []
    original = training.ContrastiveTrainer.train

    def spy(self, make_views, n_items, **kwargs):
        seen.append(make_views(np.arange(n_items), np.random.default_rng(0)))
        return original(self, make_views, n_items, **kwargs)

    monkeypatch.setattr(training.ContrastiveTrainer, "train", spy)
    df = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["alpha", "bravo", "charlie", "delta"]})
    fit = dict(epochs=1, batch_size=4, lr=5e-3, show_progress_bar=False, seed=0, max_steps=1)
    emb = ItemEmbedder(tiny_bert_dir, max_length=32, drop_prob=0.0, n_views=3)
    emb.fit(df, positive_pairs=[("a", "b"), ("c", "d")], pair_prob=1.0, **fit)
    (views, _), = seen
    a, b, c, d = emb.render(df)  # drop_prob 0: each view is an item's whole prompt
    assert views[0] == [a, b, c, d]
    for v in views[1:]:  # every later view is the partner's prompt
        assert v == [b, a, d, c]
    assert emb.training_summary["positive_pairs"] == 2 and emb.training_summary["pair_prob"] == 1.0
    meta = emb.encode(df).metadata["training"]  # the embeddings file says how it was made
    assert meta["positive_pairs"] == 2 and meta["steps"] == 1


def test_bad_pairs_fail_before_model_work(tiny_bert_dir, no_model):
    df = pd.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"]})
    emb = ItemEmbedder(tiny_bert_dir, max_length=32)
    with pytest.raises(KeyError, match="'c'"):
        emb.fit(df, positive_pairs=[("a", "c")])
    with pytest.raises(ValueError, match="pair_prob"):
        emb.fit(df, positive_pairs=[("a", "b")], pair_prob=0.0)
    with pytest.raises(ValueError, match="2 columns"):
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
    resumed = ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, positive_pairs=[("b", "a")], **more)
    assert resumed.training_summary["steps"] == 1  # same data (a pair is a pair either way): resumed
