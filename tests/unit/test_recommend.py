"""recommend(): top-k next items from histories, seen items left out, raw ids through the item index,
agreement with evaluate()'s full ranking, histories from files and arrays, and `cfsr recommend`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cfsr_head import (Adjustment, DualViewHead, ItemIndex, PopularityModel, align_semantic, choose_adjustment,
                       evaluate, read_histories, recommend)
from cfsr_head.adjust import DEFAULT_PRIOR_WEIGHTS, VALID_NEGATIVES_SEED_OFFSET
from cfsr_head.cli import main, read_embeddings
from cfsr_head import InteractionData, leave_one_out, load_dataset
from tests.unit.test_cfsr_cli import embeddings_file, train_args, write_dataset  # noqa: F401 (fixture)
from tests.unit.test_head import make_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

POPULARITY = np.array([0, 5, 9, 1, 7, 3, 8], dtype=np.float32)  # item 2 most popular, then 6, 4, 1, 5, 3


def popularity_model() -> PopularityModel:
    return PopularityModel(popularity=POPULARITY)


def test_top_k_by_score_with_the_history_left_out() -> None:
    recs = recommend(popularity_model(), {"a": [2, 4], "b": [], "c": [1]}, k=3)
    assert list(recs.users) == ["a", "b", "c"]
    np.testing.assert_array_equal(recs.item_indices, [[6, 1, 5], [2, 6, 4], [2, 6, 4]])
    np.testing.assert_allclose(recs.scores, [[8, 5, 3], [9, 8, 7], [9, 8, 7]])
    kept = recommend(popularity_model(), {"a": [2, 4]}, k=3, exclude_seen=False)
    np.testing.assert_array_equal(kept.item_indices, [[2, 6, 4]])


def test_every_seen_item_is_left_out_not_only_the_window() -> None:
    # with max_len 1 the model sees item 4 only, but items 2 and 6 are in the history too
    recs = recommend(popularity_model(), [[2, 6, 4]], k=2, max_len=1)
    np.testing.assert_array_equal(recs.item_indices, [[1, 5]])
    assert list(recs.users) == [0]


def test_fewer_items_left_than_k_gives_empty_slots() -> None:
    index = ItemIndex([f"sku{i}" for i in range(1, 7)])
    recs = recommend(popularity_model(), {"u": ["sku1", "sku2", "sku3", "sku4", "sku5"]}, k=3, item_index=index)
    np.testing.assert_array_equal(recs.item_indices, [[6, 0, 0]])
    assert recs.items.tolist() == [["sku6", None, None]]
    assert np.isneginf(recs.scores[0, 1:]).all()
    frame = recs.to_frame()
    assert frame.to_dict("records") == [{"user_id": "u", "rank": 1, "item_id": "sku6", "score": 8.0}]
    d = recs.to_dict()
    assert d["recommendations"] == [{"user_id": "u", "items": ["sku6"], "scores": [8.0]}]
    json.dumps(d)  # no -inf, no numpy scalars


def test_raw_ids_unknown_ids_and_bad_input() -> None:
    index = ItemIndex([f"sku{i}" for i in range(1, 7)])
    model = popularity_model()
    with pytest.raises(KeyError, match=r"'new-sku' of user 'b'"):
        recommend(model, {"a": ["sku2"], "b": ["sku1", "new-sku"]}, k=2, item_index=index)
    skipped = recommend(model, {"a": ["sku2"], "b": ["sku1", "new-sku"]}, k=2, item_index=index, unknown="skip")
    assert skipped.items.tolist() == [["sku6", "sku4"], ["sku2", "sku6"]]
    with pytest.raises(ValueError, match=r"item index 7 of user 'b' is outside 1..6"):
        recommend(model, {"a": [1], "b": [7]}, k=2)
    for raw in (["sku1"], ["3"], [2.0]):  # a numeric string or a float is not taken for an index
        with pytest.raises(TypeError, match="integer item indices"):
            recommend(model, {"a": raw}, k=2)
    with pytest.raises(TypeError, match="user 'a'"):
        recommend(model, {"a": "sku1"}, k=2, item_index=index)
    with pytest.raises(ValueError, match=r"k must be in 1..6"):
        recommend(model, [[1]], k=7)
    with pytest.raises(ValueError, match="item_index has 5 items"):
        recommend(model, [[1]], k=2, item_index=ItemIndex(["a", "b", "c", "d", "e"]))


def test_padded_index_arrays_and_tensors_are_histories() -> None:
    index = ItemIndex([f"sku{i}" for i in range(1, 7)])
    # 0 is padding wherever it stands; the item index only names the recommended items
    batch = np.array([[0, 0, 2, 4], [1, 0, 3, 5], [0, 0, 0, 0]])
    expected = recommend(popularity_model(), [[2, 4], [1, 3, 5], []], k=2)
    for given in (batch, torch.from_numpy(batch), batch.astype(np.int32)):
        recs = recommend(popularity_model(), given, k=2, item_index=index)
        np.testing.assert_array_equal(recs.item_indices, expected.item_indices)
        assert recs.users.tolist() == [0, 1, 2] and recs.items.tolist() == [["sku6", "sku1"], ["sku2", "sku6"],
                                                                              ["sku2", "sku6"]]
    # the window is each row's last items after the padding is dropped, as for a list
    seen = []

    class LastItem(PopularityModel):
        def user_state(self, item_seq, padding_mask=None):
            seen.append(item_seq[:, -1].tolist())
            return super().user_state(item_seq, padding_mask)

    recommend(LastItem(popularity=POPULARITY), np.array([[3, 6, 0], [0, 2, 0]]), k=1, max_len=1)
    assert seen == [[6, 2]]
    with pytest.raises(ValueError, match=r"item index 9 of user 1 is outside 1..6"):
        recommend(popularity_model(), np.array([[1, 2], [9, 0]]), k=2)
    with pytest.raises(TypeError, match="integer item indices"):
        recommend(popularity_model(), np.array([[1.0, 2.0]]), k=2)


def test_read_histories_from_csv_and_json(tmp_path) -> None:
    csv = tmp_path / "h.csv"
    csv.write_text("user_id,item_id,timestamp\na,sku1,9\nb,sku3,5\nb,sku2,1\na, sku4 ,2\nb,sku5,5\n")
    # users in order of first appearance in the file; each history by timestamp, ties in file order
    histories = read_histories(csv)
    assert list(histories.items()) == [("a", ["sku4", "sku1"]), ("b", ["sku2", "sku3", "sku5"])]
    no_time = tmp_path / "n.csv"
    no_time.write_text("item_id,user_id\n007,x\n3,x\n")
    assert read_histories(no_time) == {"x": ["007", "3"]}  # file order, ids kept as strings
    js = tmp_path / "h.json"
    js.write_text(json.dumps({"u1": ["sku2", 5], "u2": []}))
    assert read_histories(js) == {"u1": ["sku2", "5"], "u2": []}
    index = ItemIndex([f"sku{i}" for i in range(1, 7)])
    recs = recommend(popularity_model(), histories, k=1, item_index=index)
    assert recs.users.tolist() == ["a", "b"] and recs.items.tolist() == [["sku2"], ["sku6"]]

    def fails(name: str, text: str, match: str) -> None:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_histories(path)

    fails("bad_time.csv", "user_id,item_id,timestamp\na,x,1\na,y,soon\n", r"timestamp.*rows \[1\]")
    fails("empty_item.csv", "user_id,item_id\na,x\na,\n", r"empty value\(s\) in column 'item_id' \(rows \[1\]\)")
    fails("no_item.csv", "user_id,timestamp\na,1\n", r"missing column\(s\) \['item_id'\]")
    fails("list.json", "[1, 2]", "expected an object user id -> list of item ids")
    fails("nested.json", json.dumps({"a": ["x"], "b": "x"}), "history of user 'b' must be a list")
    fails("h.parquet", "", r"\.csv .* or \.json")
    with pytest.raises(FileNotFoundError, match="missing.csv not found"):
        read_histories(tmp_path / "missing.csv")


def tiny_split():
    """Users walk items in order from a random start (no repeats), so the target is never in the input."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        start, length = rng.integers(1, 20), rng.integers(4, 9)
        rows += [(f"u{u}", f"it{start + t}", t) for t in range(length)]
    return leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])), max_len=10)


def test_agrees_with_evaluates_full_ranking_and_is_batch_independent() -> None:
    split = tiny_split()
    torch.manual_seed(0)
    head = DualViewHead(make_encoder("sasrec"), torch.randn(split.num_items, 24), d=8, n_cross_heads=2)
    inputs, targets, users = split.eval_inputs("test")
    histories = {u: [int(i) for i in row[row > 0]] for u, row in zip(users, inputs.numpy())}
    k = 10
    recs = recommend(head, histories, k=k, batch_size=7)
    assert recs.item_indices.shape == (split.num_users, k)
    # the target's position in the list is evaluate()'s full-ranking rank, wherever that is < k
    ranks = evaluate(head, split, split="test", protocol="full").ranks
    found = 0
    for row, target, rank in zip(recs.item_indices, targets.numpy(), ranks):
        if rank < k:
            assert row[rank] == target
            found += 1
        else:
            assert target not in row
    assert found > 0
    for row, u in zip(recs.item_indices, users):
        assert not set(row.tolist()) & set(histories[u])
    same = recommend(head, histories, k=k, batch_size=1000)
    np.testing.assert_array_equal(same.item_indices, recs.item_indices)
    np.testing.assert_allclose(same.scores, recs.scores, rtol=1e-5, atol=1e-6)
    assert head.training  # the mode is restored


def test_interaction_data_histories_are_ordered_by_timestamp() -> None:
    index = ItemIndex([f"sku{i}" for i in range(1, 7)])
    data = InteractionData(pd.DataFrame({"user_id": ["x", "y", "x"], "item_id": ["sku3", "sku6", "sku2"],
                                         "timestamp": [2, 1, 1]}))
    recs = recommend(popularity_model(), data, k=1, item_index=index)
    assert recs.users.tolist() == ["x", "y"] and recs.items.tolist() == [["sku6"], ["sku2"]]
    # the window of length 1 is the latest item (sku3 at t=2), whatever the file order
    seen = []

    class LastItem(PopularityModel):
        def user_state(self, item_seq, padding_mask=None):
            seen.append(item_seq[:, -1].tolist())
            return super().user_state(item_seq, padding_mask)

    recommend(LastItem(popularity=POPULARITY), data, k=1, item_index=index, max_len=1)
    assert seen == [[3, 6]]


def test_cfsr_recommend_cli(tmp_path, capsys) -> None:
    data = write_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(train_args(data, out, "--variant", "sasrec", "--loss", "ce", "--quiet")) == 0
    capsys.readouterr()
    assert main(["recommend", "--model", str(out), "--data", str(data), "--k", "5",
                 "--output", str(tmp_path / "recs.json")]) == 0
    assert capsys.readouterr().out.startswith("wrote the top 5 items of 80 users to ")
    report = json.loads((tmp_path / "recs.json").read_text())
    interactions = pd.read_csv(data / "interactions.csv", dtype=str)
    histories = interactions.groupby("user_id")["item_id"].apply(set)
    rows = report["recommendations"]
    assert report["k"] == 5 and len(rows) == interactions["user_id"].nunique()
    for row in rows:
        assert len(row["items"]) == 5 and not set(row["items"]) & histories[row["user_id"]]
        assert row["scores"] == sorted(row["scores"], reverse=True)
    # the same lists as the Python API on the loaded model
    model, index = DualViewHead.from_pretrained(out), ItemIndex.load(out / "item_index.json")
    api = recommend(model, {"u3": api_history(interactions, "u3")}, k=5, item_index=index)
    assert [r for r in rows if r["user_id"] == "u3"][0]["items"] == api.items[0].tolist()

    assert main(["recommend", "--model", str(out), "--data", str(data), "--k", "3", "--users", "u3", "u7"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed] == ["u3", "u7"]
    assert printed[0].split("\t")[1].split() == api.items[0][:3].tolist()

    assert main(["recommend", "--model", str(out), "--data", str(data), "--users", "nobody"]) == 2
    assert "--users: 1 user(s) not in --data" in capsys.readouterr().err
    # histories from a file: users outside the dataset, raw ids through the model's item index
    histories = tmp_path / "sessions.json"
    histories.write_text(json.dumps({"new-user": ["it3", "it4"], "u3": api_history(interactions, "u3")}))
    assert main(["recommend", "--model", str(out), "--histories", str(histories), "--k", "3"]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    expected = recommend(model, {"new-user": ["it3", "it4"]}, k=3, item_index=index)
    assert printed["new-user"].split() == expected.items[0].tolist()
    assert printed["u3"].split() == api.items[0][:3].tolist()
    assert main(["recommend", "--model", str(out), "--histories", str(histories), "--users", "u3"]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["u3"]
    histories.write_text(json.dumps({"x": ["it3", "not-an-item"]}))
    assert main(["recommend", "--model", str(out), "--histories", str(histories)]) == 2
    assert f"--histories {histories}: 1 history item(s) are not in the model's item index" in capsys.readouterr().err
    assert main(["recommend", "--model", str(out), "--histories", str(tmp_path / "nope.csv")]) == 2
    assert "--histories: histories file" in capsys.readouterr().err
    assert main(["recommend", "--model", str(out)]) == 2
    assert "give --data" in capsys.readouterr().err
    assert main(["recommend", "--model", str(out), "--histories", str(histories), "--popularity-beta", "1"]) == 2
    assert "--popularity-beta and --semantic-prior need --data" in capsys.readouterr().err

    (out / "item_index.json").unlink()
    assert main(["recommend", "--model", str(out), "--data", str(data)]) == 2
    assert "has no item_index.json" in capsys.readouterr().err


def api_history(interactions: pd.DataFrame, user: str) -> list[str]:
    return interactions.loc[interactions.user_id == user, "item_id"].tolist()


def test_cfsr_recommend_with_adjustments(tmp_path, embeddings_file, capsys) -> None:  # noqa: F811
    data = write_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(train_args(data, out, "--variant", "sasrec", "--loss", "ce", "--quiet")) == 0
    capsys.readouterr()
    base = ["recommend", "--model", str(out), "--data", str(data), "--k", "5"]

    def lists(*flags: str) -> dict[str, list[str]]:
        assert main([*base, *flags, "--output", str(tmp_path / "recs.json")]) == 0
        rows = json.loads((tmp_path / "recs.json").read_text())["recommendations"]
        return {r["user_id"]: r["items"] for r in rows}

    plain, penalised = lists(), lists("--popularity-beta", "5")
    assert plain != penalised
    # the same as the Python API: popularity counted over every interaction, the history whole
    model, index = DualViewHead.from_pretrained(out), ItemIndex.load(out / "item_index.json")
    dataset = load_dataset(data)
    split = leave_one_out(dataset, max_len=10, item_index=index)
    counts = np.bincount(index.index_of(dataset.interactions["item_id"].to_numpy()), minlength=model.num_items + 1)
    adjusted = Adjustment(beta=5.0).wrap(model, split, popularity=counts)
    api = recommend(adjusted, dataset, k=5, item_index=index)
    assert {u: list(row) for u, row in zip(api.users, api.items)} == penalised

    capsys.readouterr()
    chosen = lists("--semantic-prior", "auto", "--embeddings", str(embeddings_file))
    assert "chosen on validation full NDCG@10" in capsys.readouterr().out
    # the same weight and lists as choosing it with the Python API on the validation split
    semantic = align_semantic(read_embeddings(embeddings_file), index, missing="zeros")
    adjustment, _ = choose_adjustment(model, split, semantic, weights=DEFAULT_PRIOR_WEIGHTS, max_len=10,
                                      seed=VALID_NEGATIVES_SEED_OFFSET)
    assert adjustment.weight != 0  # the embeddings are informative, so the check below can fail
    api = recommend(adjustment.wrap(model, split, semantic), dataset, k=5, item_index=index)
    assert {u: list(row) for u, row in zip(api.users, api.items)} == chosen != plain
    assert main([*base, "--semantic-prior", "auto"]) == 2  # a plain SASRec has no table of its own
    assert "--semantic-prior needs item embeddings" in capsys.readouterr().err
    assert main([*base, "--prior-tail-exponent", "1"]) == 2
    assert "--prior-tail-exponent needs --semantic-prior" in capsys.readouterr().err
