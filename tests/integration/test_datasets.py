"""The three real datasets in the data folder: statistics, leave-one-out sizes, baselines."""
from __future__ import annotations

import numpy as np
import pytest

from cfsr_head import ItemIndex, leave_one_out, load_dataset
from cfsr_head.evaluate import PopularityModel, RandomModel, evaluate

pytestmark = pytest.mark.integration

# from ../shared/data/README.md and each SOURCE.txt
STATS = {
    "amazon_beauty": {"users": 22363, "items": 12101, "interactions": 198502},
    "amazon_scientific": {"users": 8317, "items": 4344, "interactions": 58492},
    "ml-100k": {"users": 943, "items": 1682, "interactions": 100000},
}
TOP20_SHARE = {"amazon_beauty": 0.581, "amazon_scientific": 0.519, "ml-100k": 0.647}


@pytest.fixture(scope="module")
def loaded(data_dir):
    return {name: load_dataset(data_dir / name) for name in STATS}


@pytest.mark.parametrize("name", sorted(STATS))
def test_statistics_and_leave_one_out(loaded, name):
    data = loaded[name]
    assert data.stats() == STATS[name]
    assert data.items["item_id"].is_unique
    assert set(data.interactions["item_id"]) <= set(data.items["item_id"])
    split = leave_one_out(data)  # every user has >= 5 interactions: nobody is dropped
    st = STATS[name]
    assert split.num_users == st["users"] and split.num_items == st["items"]
    assert int(split.lengths.sum()) == st["interactions"]
    assert split.targets("valid").shape == split.targets("test").shape == (st["users"],)
    assert int(split.item_popularity.sum()) == st["interactions"] - 2 * st["users"]
    # the last interaction of each user (file order = chronological) is the test target
    last = data.interactions.groupby("user_id", sort=False)["item_id"].last()
    assert split.item_index.id_of(split.targets("test")).tolist() == last.loc[split.user_ids].tolist()
    # README long-tail figure (on all interactions): the top 20% items hold this share
    counts = np.sort(data.interactions["item_id"].value_counts().to_numpy())[::-1]
    share = counts[: int(np.ceil(0.2 * len(counts)))].sum() / counts.sum()
    assert share == pytest.approx(TOP20_SHARE[name], abs=0.01)


def test_numeric_looking_ids_stay_strings(loaded):
    sci = loaded["amazon_scientific"]
    assert sci.interactions["item_id"].map(type).eq(str).all()
    idx = ItemIndex.from_data(sci)
    assert "0" in idx and idx.id_of(idx.index_of(["0"])).tolist() == ["0"]


def test_popularity_beats_random_on_ml100k(loaded):
    split = leave_one_out(loaded["ml-100k"], max_len=50)
    pop = evaluate(PopularityModel(split), split, protocol="full")
    rnd = evaluate(RandomModel(split.num_items, seed=0), split, protocol="full")
    p, r = pop.summary()["Overall"]["NDCG@10"], rnd.summary()["Overall"]["NDCG@10"]
    assert p > r
    # a random ranking of ~1,600 unmasked items puts the target in the top 10 ~0.6% of the time
    assert r < 0.03 and p > 0.02
    # batches of the real data respect the contract
    inp, pos, neg = next(split.train_batches(64, 50, rng=0))
    assert inp.shape == (64, 50) and ((neg > 0) == (pos > 0)).all()
