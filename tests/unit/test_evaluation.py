"""llm_item_embed.evaluation: transitions from histories, and neighbourhoods scored against them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llm_item_embed import ItemEmbeddings
from llm_item_embed.embeddings import MissingIdsError
from llm_item_embed.evaluation import neighbour_scores, next_item_transitions


def twins(n: int = 200, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Items i2j and i2j+1 are near-copies of each other."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n // 2, 16))
    return [f"i{j}" for j in range(n)], np.repeat(base, 2, axis=0) + 0.01 * rng.normal(size=(n, 16))


def test_aligned_neighbourhoods_score_high_and_random_ones_low():
    ids, aligned = twins()
    prev, nxt = np.array(ids[0::2]), np.array(ids[1::2])  # each item is followed by its twin
    good = neighbour_scores(ItemEmbeddings(ids, aligned), prev, nxt, k=1)
    bad = neighbour_scores(ItemEmbeddings(ids, np.random.default_rng(1).normal(size=(200, 16))), prev, nxt, k=1)
    assert good["next@1"] == 1.0 and good["AUC"] > 0.99 and good["cos next"] > good["cos random"]
    assert bad["next@1"] < 0.1 and 0.3 < bad["AUC"] < 0.7
    assert set(good) == {"next@1", "AUC", "cos next", "cos random"}


def test_next_at_k_split_by_the_next_items_group():
    rng = np.random.default_rng(0)
    ids = [f"i{j}" for j in range(40)]
    x = rng.normal(size=(40, 8))
    x[1::2] = x[0::2] + 0.01 * rng.normal(size=(20, 8))  # i2j+1 is i2j's twin
    prev, nxt = np.array(ids[0:20:2] + ids[20:40:2]), np.array(ids[1:20:2] + ids[23:40:2] + ids[21:22])
    tail = set(ids[:20])  # the first ten transitions go to a twin (tail items), the rest to another item
    s = neighbour_scores(ItemEmbeddings(ids, x), prev, nxt, k=1,
                         groups={"tail": tail, "head": set(ids[20:]), "none": set()})
    assert s["next@1 tail"] == 1.0 and s["next@1 head"] == 0.0 and s["next@1"] == 0.5
    assert np.isnan(s["next@1 none"])


def test_self_transitions_are_left_out_and_queries_are_a_seeded_sample():
    ids, aligned = twins()
    emb = ItemEmbeddings(ids, aligned)
    prev, nxt = np.array(ids[0::2] + ids[:50]), np.array(ids[1::2] + ids[:50])  # 50 repeats of one item
    assert neighbour_scores(emb, prev, nxt, k=1)["next@1"] == 1.0  # a repeat would count as a miss
    rand = ItemEmbeddings(ids, np.random.default_rng(1).normal(size=(200, 16)))
    a = neighbour_scores(rand, prev, nxt, k=20, max_queries=30, seed=3)
    assert a == neighbour_scores(rand, prev, nxt, k=20, max_queries=30, seed=3)


def test_bad_inputs_are_named():
    ids, x = twins(20)
    emb = ItemEmbeddings(ids, x)
    with pytest.raises(MissingIdsError, match="nowhere"):
        neighbour_scores(emb, ["i0", "nowhere"], ["i1", "i2"])
    with pytest.raises(ValueError, match="k must be in"):
        neighbour_scores(emb, ["i0"], ["i1"], k=20)
    with pytest.raises(ValueError, match="aligned"):
        neighbour_scores(emb, ["i0", "i1"], ["i1"])
    with pytest.raises(ValueError, match="no transition between two different items"):
        neighbour_scores(emb, ["i0"], ["i0"], k=1)
    with pytest.raises(ValueError, match="max_queries"):
        neighbour_scores(emb, ["i0"], ["i1"], k=1, max_queries=0)


def test_transitions_for_training_and_into_the_held_out_items():
    # u: a b c d e (valid d, test e); v: f a b (valid a, test b); w: g h (too short for a held-out pair)
    df = pd.DataFrame({"user_id": list("uuuuuvvvww"), "item_id": list("eabcdfabgh"),
                       "timestamp": [5, 1, 2, 3, 4, 1, 2, 3, 1, 2]})  # u's last item listed first: time orders
    prev, nxt = next_item_transitions(df, holdout_last=2, held_out=True)
    assert list(zip(prev, nxt)) == [("c", "d"), ("f", "a")]
    prev, nxt = next_item_transitions(df, holdout_last=2)
    assert list(zip(prev, nxt)) == [("a", "b"), ("b", "c")]  # no transition into a valid/test item
    prev, nxt = next_item_transitions(df, holdout_last=0)
    assert len(prev) == 4 + 2 + 1
    prev, nxt = next_item_transitions(df, holdout_last=1, held_out=True)  # into each user's last item
    assert list(zip(prev, nxt)) == [("d", "e"), ("a", "b"), ("g", "h")]
    with pytest.raises(ValueError, match="holdout_last >= 1"):
        next_item_transitions(df, holdout_last=0, held_out=True)
    with pytest.raises(KeyError, match="timestamp"):
        next_item_transitions(df.drop(columns="timestamp"))
