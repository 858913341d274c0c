"""CFT with collaborative targets: co-occurrence embeddings, the alignment loss, and fit's use of them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from llm_item_embed import ItemEmbedder, ItemEmbeddings, cooccurrence_embeddings
from llm_item_embed.losses import AlignedContrastiveLoss, ContrastiveLoss, TargetAlignmentLoss


def communities(n_users: int = 60, seed: int = 0) -> pd.DataFrame:
    """Users who each stay inside one of two item communities (a0-a4, b0-b4)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        community = [f"{'a' if u % 2 else 'b'}{j}" for j in range(5)]
        rows += [(f"u{u}", item, t) for t, item in enumerate(rng.choice(community, size=6))]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


# ------------------------------------------------------------------ cooccurrence_embeddings
def test_cooccurrence_embeddings_put_each_item_next_to_its_own_community():
    ids = [f"a{j}" for j in range(5)] + [f"b{j}" for j in range(5)] + ["never"]
    emb = cooccurrence_embeddings(communities(), ids=ids, dim=4, window=2)
    x = emb.numpy()
    assert list(emb.ids) == ids and x.shape == (11, 4)
    assert np.allclose(np.linalg.norm(x[:10], axis=1), 1.0, atol=1e-5) and not x[10].any()  # unseen: zero row
    sims = x[:10] @ x[:10].T
    np.fill_diagonal(sims, -np.inf)
    assert (sims.argmax(axis=1) // 5 == np.arange(10) // 5).all()
    assert emb.metadata["collaborative"]["window"] == 2


def test_cooccurrence_embeddings_hold_out_the_last_items_and_check_their_input():
    # u1: a b c d (time order differs from file order); with holdout_last=2 only a-b co-occur
    df = pd.DataFrame({"user_id": ["u1"] * 4, "item_id": ["b", "a", "d", "c"], "timestamp": [2, 1, 4, 3]})
    emb = cooccurrence_embeddings(df, dim=1, holdout_last=2)
    x = emb.numpy()
    assert list(emb.ids) == ["a", "b", "c", "d"]
    assert x[:2].any() and not x[2].any() and not x[3].any()  # c and d are each user's last two
    with pytest.raises(KeyError, match="'d'"):
        cooccurrence_embeddings(df, ids=["a", "b", "c"], dim=1)
    with pytest.raises(KeyError, match="'when'"):
        cooccurrence_embeddings(df, time_column="when")
    with pytest.raises(ValueError, match="dim"):
        cooccurrence_embeddings(df, dim=4)
    with pytest.raises(ValueError, match="co-occur"):
        cooccurrence_embeddings(df, dim=1, holdout_last=4)


# ------------------------------------------------------------------ the losses
def test_alignment_loss_is_the_symmetric_cosine_infonce_over_targeted_rows():
    torch.manual_seed(0)
    views, targets = torch.randn(2, 5, 6), torch.randn(5, 3)
    loss = TargetAlignmentLoss(6, 3, temperature=0.2)
    mask = torch.tensor([True, True, False, True, True])
    got = loss(views, targets, mask)
    keep = mask.nonzero().squeeze(1)
    t = F.normalize(targets[keep], dim=-1)
    expected = 0.0
    for v in views:
        z = F.normalize(loss.projection(v[keep]), dim=-1)
        logits = z @ t.T / 0.2
        labels = torch.arange(len(keep))
        expected += (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(got, expected / 2)
    # an untargeted row is neither anchor nor candidate: changing it changes nothing
    views2, targets2 = views.clone(), targets.clone()
    views2[:, 2] += 5.0
    targets2[2] = -targets2[2]
    torch.testing.assert_close(loss(views2, targets2, mask), got)
    assert float(loss(views, targets)) != pytest.approx(float(got))  # unmasked, row 2 counts


def test_alignment_loss_trains_the_projection_and_is_zero_without_two_targets():
    views = torch.randn(2, 4, 6, requires_grad=True)
    loss = TargetAlignmentLoss(6, 3)
    value = loss(views, torch.randn(4, 3))
    value.backward()
    assert loss.projection.weight.grad is not None and views.grad.abs().sum() > 0
    none = loss(views, torch.randn(4, 3), torch.tensor([True, False, False, False]))
    assert float(none) == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match=r"targets must have shape \[4, 3\]"):
        loss(views, torch.randn(4, 2))


def test_aligned_loss_weighs_its_two_parts():
    torch.manual_seed(0)
    views, targets, groups = torch.randn(2, 6, 8), torch.randn(6, 3), torch.arange(6)
    contrastive, alignment = ContrastiveLoss(), TargetAlignmentLoss(8, 3)
    both = AlignedContrastiveLoss(contrastive, alignment, view_weight=0.5, target_weight=2.0)
    torch.testing.assert_close(both(views, groups, targets=targets),
                               0.5 * contrastive(views, groups) + 2.0 * alignment(views, targets))
    alone = AlignedContrastiveLoss(contrastive, alignment, view_weight=0.0)
    torch.testing.assert_close(alone(views, groups, targets=targets), alignment(views, targets))
    assert both.temperature == contrastive.temperature
    with pytest.raises(ValueError, match="not both 0"):
        AlignedContrastiveLoss(contrastive, alignment, view_weight=0.0, target_weight=0.0)
    with pytest.raises(ValueError, match="targets"):
        both(views, groups)


# ------------------------------------------------------------------ ItemEmbedder.fit(targets=...)
def items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": [f"i{j}" for j in range(8)],
                         "title": [f"{c} product {j}" for j, c in enumerate(["red", "blue"] * 4)]})


def targets_for(ids, dim: int = 3, seed: int = 0) -> ItemEmbeddings:
    return ItemEmbeddings(list(ids), np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32))


def test_fit_aligns_views_to_their_items_targets(tiny_bert_dir, monkeypatch, tmp_path):
    import llm_item_embed.training as training
    from sklearn.linear_model import Ridge

    seen = []
    original = training.ContrastiveTrainer.train

    def spy(self, make_views, n_items, **kwargs):
        seen.append(make_views(np.arange(n_items), np.random.default_rng(0)))
        return original(self, make_views, n_items, **kwargs)

    monkeypatch.setattr(training.ContrastiveTrainer, "train", spy)
    df = items()
    target = targets_for(["i7", "i6", "i5", "i4", "i3", "i2", "zz"])  # i0, i1 have none; zz is not an item
    emb = ItemEmbedder(tiny_bert_dir, max_length=32)
    frozen = emb.encode_texts(emb.render(df))
    emb.fit(df, targets=target, view_weight=0.0, epochs=1, batch_size=8, lr=1e-12, warmup_ratio=0.0,
            show_progress_bar=False, max_steps=1, seed=0)
    batch, = seen
    expected = target.numpy()[[5, 4, 3, 2, 1, 0]]
    np.testing.assert_array_equal(batch.target_mask, [False, False] + [True] * 6)
    np.testing.assert_array_equal(batch.targets[2:], expected)
    assert not batch.targets[:2].any()
    # the projection starts at the ridge readout of the targets from the un-tuned embeddings
    ridge = Ridge(alpha=1.0).fit(frozen[2:], expected)
    projection = emb.loss_module.alignment.projection
    np.testing.assert_allclose(projection.weight.detach().numpy(), ridge.coef_, rtol=1e-3, atol=1e-4)
    assert emb.training_summary["targets"] == {"items_with_target": 6, "dim": 3, "target_weight": 1.0,
                                               "view_weight": 0.0, "temperature": 0.05, "init": "ridge"}
    # saved and loaded back with its alignment head and weights
    emb.save_pretrained(tmp_path / "tuned")
    back = ItemEmbedder.from_pretrained(tmp_path / "tuned")
    assert isinstance(back.loss_module, AlignedContrastiveLoss) and back.loss_module.view_weight == 0.0
    torch.testing.assert_close(back.loss_module.alignment.projection.weight, projection.weight)
    np.testing.assert_allclose(back.encode(df).numpy(), emb.encode(df).numpy(), atol=1e-5)


def test_fit_with_targets_changes_the_embeddings_reproducibly(tiny_bert_dir):
    df = items()
    target = targets_for(df["item_id"])
    fit = dict(targets=target, epochs=1, batch_size=4, lr=5e-3, show_progress_bar=False, seed=3)
    runs = [ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, target_init="random", **fit).encode(df).numpy()
            for _ in range(2)]
    frozen = ItemEmbedder(tiny_bert_dir, max_length=32).encode(df).numpy()
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], frozen, atol=1e-4)


def test_bad_targets_fail_before_model_work(tiny_bert_dir, no_model):
    df = items()
    emb = ItemEmbedder(tiny_bert_dir, max_length=32)
    with pytest.raises(TypeError, match="ItemEmbeddings"):
        emb.fit(df, targets=np.zeros((8, 3)))
    bad = targets_for(df["item_id"])
    bad.numpy()[3, 1] = np.nan
    with pytest.raises(ValueError, match="'i3'"):
        emb.fit(df, targets=bad)
    with pytest.raises(ValueError, match="cover 1 of the table's 8"):
        emb.fit(df, targets=targets_for(["i0", "x", "y"]))
    with pytest.raises(ValueError, match="not both 0"):
        emb.fit(df, targets=targets_for(df["item_id"]), view_weight=0.0, target_weight=0.0)
    with pytest.raises(ValueError, match="target_init"):
        emb.fit(df, targets=targets_for(df["item_id"]), target_init="pca")
    with pytest.raises(ValueError, match="positive_pairs"):
        emb.fit(df, targets=targets_for(df["item_id"]), positive_pairs=[("i0", "i1")])


def test_resume_refuses_a_checkpoint_made_with_other_targets(tiny_bert_dir, tmp_path):
    df = items()
    fit = dict(epochs=1, batch_size=4, lr=5e-3, show_progress_bar=False, seed=0, output_dir=str(tmp_path),
               save_every=1, target_init="random")
    ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, targets=targets_for(df["item_id"]), max_steps=2, **fit)
    more = dict(fit, max_steps=2, resume_from="latest")
    with pytest.raises(ValueError, match="training data differ"):
        ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, targets=targets_for(df["item_id"], seed=1), **more)
    with pytest.raises(ValueError, match="training data differ"):
        ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, targets=targets_for(df["item_id"]), view_weight=0.5,
                                                       **more)
    resumed = ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, targets=targets_for(df["item_id"]), **more)
    assert resumed.training_summary["steps"] == 2


def test_the_ridge_start_is_computed_once_and_a_resumed_fit_loads_its_projection(tiny_bert_dir, tmp_path,
                                                                                  monkeypatch):
    import llm_item_embed.embedder as embedder_module

    calls = []
    original = embedder_module._ridge_init
    monkeypatch.setattr(embedder_module, "_ridge_init", lambda *a, **k: (calls.append(1), original(*a, **k)))
    df = items()
    fit = dict(targets=targets_for(df["item_id"]), epochs=1, batch_size=4, lr=5e-3, show_progress_bar=False,
               seed=0, output_dir=str(tmp_path), save_every=1, max_steps=2)
    first = ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, resume_from="latest", **fit)  # no checkpoint yet
    assert len(calls) == 1
    resumed = ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, resume_from="latest", **fit)
    assert len(calls) == 1  # no second ridge pass: the projection comes from checkpoint-2
    torch.testing.assert_close(resumed.loss_module.alignment.projection.weight,
                               first.loss_module.alignment.projection.weight, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ItemEmbedder(tiny_bert_dir, max_length=32).fit(df, resume_from=str(tmp_path / "nope"), **fit)
    assert len(calls) == 1  # refused before the ridge pass
