"""benchmarks/bench_cold_start.py: the withheld-item split, the two untrained reference models, and
the whole script on a dataset folder written here, with a random semantic table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from cyclic_data import cyclic_interactions, write_dataset_folder

from cfsr_head import DualViewHead, InteractionData, SASRecEncoder, evaluate
from llm_item_embed import ItemEmbeddings

pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_pair_withholds_every_interaction_of_the_new_items() -> None:
    from benchmarks.bench_cold_start import split_pair, withhold_items

    data = InteractionData(cyclic_interactions(40, n_users=150))
    known_data, cold = withhold_items(data, 0.2, seed=3)
    assert len(cold) == 8 and withhold_items(data, 0.2, seed=3)[1] == cold != withhold_items(data, 0.2, seed=4)[1]
    assert not known_data.interactions["item_id"].isin(cold).any()
    known, full = split_pair(data, 0.2, seed=3)
    n = known.num_items
    assert full.item_index.ids[:n] == known.item_index.ids
    new = set(full.item_index.ids[n:])
    assert set(cold) <= new and not new & set(known.item_index.ids)
    assert full.num_users == 150                       # the whole data, over the whole catalogue
    # a new test target is exactly a withheld item; inputs keep the new items a user met before
    _, targets, users = full.eval_inputs("test")
    raw = full.item_index.id_of(targets.numpy())
    assert [t > n for t in targets.tolist()] == [r in new for r in raw]
    assert (full.items > n).sum() == data.interactions["item_id"].isin(new).sum()
    with pytest.raises(ValueError, match="--cold-fraction"):
        withhold_items(data, 0.001, seed=0)


def test_known_items_only_never_ranks_a_new_item_and_drops_it_from_the_inputs() -> None:
    from benchmarks.bench_cold_start import KnownItemsOnly

    torch.manual_seed(0)
    model = DualViewHead(SASRecEncoder(d=8, n_layers=1, n_heads=2, max_len=6), num_items=10, d=8,
                         use_semantic=False, collab_init="random").eval()
    wrapped = KnownItemsOnly(model, 13)
    with_new = torch.tensor([[0, 3, 12, 5, 11], [0, 0, 2, 4, 7]])
    without = torch.tensor([[0, 3, 0, 5, 0], [0, 0, 2, 4, 7]])
    with torch.no_grad():
        states = wrapped.user_state(with_new, with_new == 0)
        torch.testing.assert_close(states, model.user_state(without, without == 0))
        scores = wrapped.full_scores(states)
        assert scores.shape == (2, 14) and torch.isneginf(scores[:, 11:]).all()
        torch.testing.assert_close(scores[:, :11], model.full_scores(states))
        cands = torch.tensor([[1, 11, 4], [13, 2, 10]])
        got = wrapped.score(states, cands)
        assert torch.isneginf(got[0, 1]) and torch.isneginf(got[1, 0])
        torch.testing.assert_close(got[0, [0, 2]], model.score(states, torch.tensor([[1, 4], [2, 10]]))[0])


def test_content_knn_scores_by_cosine_to_the_last_item() -> None:
    from benchmarks.bench_cold_start import ContentKNN

    table = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    knn = ContentKNN(table)
    seq = torch.tensor([[0, 0, 2, 5], [1, 3, 4, 6]])
    states = knn.user_state(seq, seq == 0)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    scores = knn.full_scores(states)
    np.testing.assert_allclose(scores[:, 1:].numpy(), unit[[4, 5]] @ unit.T, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(scores[:, 0]).all()
    np.testing.assert_allclose(knn.score(states, torch.tensor([[5, 1], [6, 2]])).numpy(),
                               [[1.0, unit[4] @ unit[0]], [1.0, unit[5] @ unit[1]]], rtol=1e-5)
    assert int(scores[0, 1:].argmax()) + 1 == 5                                  # the last item itself


def test_every_row_is_reported_written_and_resumed(tmp_path, monkeypatch, capsys) -> None:
    from benchmarks import bench_cold_start as bcs

    data = tmp_path / "cyclic"
    ids = write_dataset_folder(data, cyclic_interactions(90, n_users=200))  # d = 64: >= 64 known items for PCA
    table = ItemEmbeddings(ids, np.random.default_rng(0).normal(size=(len(ids), 80)).astype(np.float32))
    monkeypatch.setattr(bcs, "frozen_embeddings", lambda data, workdir: table)   # no language model here
    argv = ["--dataset", str(data), "--seeds", "0", "--lrs", "1e-2", "--epochs", "2", "--cold-fraction", "0.2",
            "--cold-item-dropout", "0.5", "--spare-negatives", "--offset-steps", "-1", "0", "1",
            "--workdir", str(tmp_path / "work")]
    assert bcs.main(argv) == 0
    out = capsys.readouterr().out
    rows = ["Pop", "Content kNN", "SASRec", "LLM2X, projection"]
    for m in ("SAID", "dual-concat", "dual-cross", "SAID-cold0.5", "dual-concat-cold0.5", "SAID-cold0.5-spared",
              "dual-concat-cold0.5-spared"):
        rows += [f"{m}, {how}" for how in bcs.EXTENSIONS[:1]] + [f"{m}, projection +offset"]
        rows += [f"{m}, {how}" for how in bcs.EXTENSIONS[1:2]] + [f"{m}, mapping +offset"]
        rows += [f"{m}, {how}" for how in bcs.EXTENSIONS[2:]]
    lines = out.split("Test N@10")[1].split("Against")[0].splitlines()
    assert [ln[2:48].strip() for ln in lines[1:] if "±" in ln] == rows
    assert "dual-cross, neighbours: full All" in out
    assert "SAID-cold0.5-spared: full All" in out and "dual-concat, mapping +offset: full All" in out
    result = json.loads((tmp_path / "work" / "cyclic-cold0.2-seed0" / "results.json").read_text())
    assert set(result["test_ndcg10"]) == set(rows) and result["new_items"] == 18
    # ID-only rows never reach a new target; the text rows can
    for name in ("Pop", "SASRec"):
        assert result["test_ndcg10"][name]["full new target"] == [0.0]
    assert result["test_ndcg10"]["Content kNN"]["sampled new target"][0] > 0
    # the cold-dropout rows train from the same start as their plain rows, and end elsewhere
    work = tmp_path / "work" / "cyclic-cold0.2-seed0"
    for plain in ("SAID", "dual-concat"):
        weights = [load_file(work / name / "seed0" / "lr0.01" / "last" / "model.safetensors")
                   for name in (plain, f"{plain}-cold0.5")]
        assert weights[0].keys() == weights[1].keys()
        assert not torch.equal(weights[0]["item_embedding.weight"], weights[1]["item_embedding.weight"])
    assert bcs.main(argv) == 0                                             # a rerun trains nothing
    assert capsys.readouterr().out.split("Test N@10")[1] == out.split("Test N@10")[1]


def test_new_item_offset_moves_only_the_new_items_and_is_chosen_on_validation() -> None:
    from benchmarks.bench_cold_start import NewItemOffset, calibrated_offset, split_pair

    data = InteractionData(cyclic_interactions(40, n_users=150))
    known, full = split_pair(data, 0.2, seed=1)
    n = known.num_items
    torch.manual_seed(0)
    model = DualViewHead(SASRecEncoder(d=8, n_layers=1, n_heads=2, max_len=12), num_items=full.num_items, d=8,
                         use_semantic=False, collab_init="random").eval()
    shifted = NewItemOffset(model, n, 2.5)
    seq = torch.tensor([[0, 3, n + 2, 5], [0, 0, 2, 4]])
    with torch.no_grad():
        states = shifted.user_state(seq, seq == 0)
        torch.testing.assert_close(states, model.user_state(seq, seq == 0))
        base, got = model.full_scores(states), shifted.full_scores(states)
        torch.testing.assert_close(got[:, : n + 1], base[:, : n + 1])
        torch.testing.assert_close(got[:, n + 1:], base[:, n + 1:] + 2.5)
        cands = torch.tensor([[1, n + 1, 4], [full.num_items, 2, n]])
        torch.testing.assert_close(shifted.score(states, cands) - model.score(states, cands),
                                   2.5 * (cands > n).float())
    # one pass over validation gives every offset the N@10 evaluate gives it; the best is kept
    from benchmarks.bench_cold_start import valid_ndcg_by_offset

    def valid_ndcg(m) -> float:
        return evaluate(m, full, split="valid", groups=None).summary()["Overall"]["NDCG@10"]

    found = valid_ndcg_by_offset(model, full, n, [-4.0, -0.5, 0.0, 0.5, 4.0], batch_size=32)
    for offset, value in found.items():
        assert value == pytest.approx(valid_ndcg(NewItemOffset(model, n, offset)))
        assert not model.training                        # evaluating the wrapper leaves the model in eval
    assert len(set(found.values())) > 1                               # the offsets move the ranks
    offset, valid = calibrated_offset(model, full, n, (-4.0, 0.0, 4.0))
    assert valid == pytest.approx(valid_ndcg(NewItemOffset(model, n, offset))) and valid >= valid_ndcg(model)
    assert calibrated_offset(model, full, n, (0.0,)) == (0.0, pytest.approx(valid_ndcg(model)))


def test_known_items_only_evaluates_like_the_model_on_known_targets() -> None:
    """Through ``evaluate``: a new target ranks last under both protocols."""
    from benchmarks.bench_cold_start import KnownItemsOnly, split_pair

    data = InteractionData(cyclic_interactions(40, n_users=150))
    known, full = split_pair(data, 0.2, seed=1)
    torch.manual_seed(0)
    model = DualViewHead(SASRecEncoder(d=8, n_layers=1, n_heads=2, max_len=12), num_items=known.num_items, d=8,
                         use_semantic=False, collab_init="random")
    wrapped = KnownItemsOnly(model, full.num_items)
    _, targets, _ = full.eval_inputs("test")
    new = targets.numpy() > known.num_items
    assert new.any() and (~new).any()
    full_run = evaluate(wrapped, full, protocol="full", groups=None)
    assert (full_run.ranks[new] >= full.num_items - 12).all()            # below every known item not seen
    assert (full_run.metric("HR@20")[new] == 0).all() and full_run.metric("HR@20")[~new].mean() > 0
    sampled = evaluate(wrapped, full, protocol="sampled", groups=None)
    assert (sampled.ranks[new] == 100).all()
