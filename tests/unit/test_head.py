"""DualViewHead: causality in every configuration, padding invariance, PCA init, cold start,
save/load, losses, bad input."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cfsr_head import (
    DualViewConfig,
    DualViewHead,
    GRU4RecEncoder,
    PmixerSASRecAdapter,
    RecBoleSASRecAdapter,
    SASRecEncoder,
    truncate_sequences,
)

N, D_LLM, D, L = 25, 24, 8, 10


pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "default": {},
    "concat": {"fusion": "concat"},
    "unshared": {"shared_encoder": False},
    "no_semantic": {"use_semantic": False},
    "no_collaborative": {"use_collaborative": False},
    "random_init": {"collab_init": "random"},
    "gelu_residual": {"adapter_activation": "gelu", "cross_residual": True},
    "fallback_frozen": {"missing_item_policy": "fallback", "freeze_collaborative": True},
    "cosine": {"fusion": "concat", "score_temperature": 0.1},
}


def semantic_table(n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_LLM, generator=g)


def make_encoder(kind: str, max_len: int = L) -> torch.nn.Module:
    if kind == "sasrec":
        return SASRecEncoder(d=D, n_layers=2, n_heads=2, max_len=max_len, dropout=0.2)
    return GRU4RecEncoder(d=D, n_layers=1, dropout=0.2)


def make_head(kind: str = "sasrec", seed: int = 0, **cfg) -> DualViewHead:
    torch.manual_seed(seed)
    return DualViewHead(make_encoder(kind), semantic_table(), d=D, n_cross_heads=2, **cfg)


def pad_batch(rows: list[list[int]], side: str, length: int = L) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            if side == "left":
                out[b, length - len(r):] = torch.tensor(r)
            else:
                out[b, : len(r)] = torch.tensor(r)
    return out


def random_rows(n_rows: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, N + 1, (n,), generator=g).tolist() for n in lengths[:n_rows]]


# ---------------------------------------------------------------------------- causality
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", ["sasrec", "gru"])
def test_causal_in_every_configuration(kind: str, config: str, side: str) -> None:
    head = make_head(kind, **CONFIGS[config]).eval()
    n = 8
    rows = random_rows(3, [n, n, n])
    first = L - n if side == "left" else 0
    seq = pad_batch(rows, side)
    with torch.no_grad():
        base = head(seq)
        for t in (0, 3, n - 2):
            changed = seq.clone()
            changed[:, first + t + 1: first + n] = (changed[:, first + t + 1: first + n] + 7) % N + 1
            out = head(changed)
            torch.testing.assert_close(out[:, : first + t + 1], base[:, : first + t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(out[:, first + n - 1], base[:, first + n - 1], atol=1e-4)


def test_causality_check_catches_a_leak() -> None:
    """The causality check above fails for a head whose cross-attention sees the future."""
    head = make_head().eval()
    import cfsr_head.fusion as fusion

    orig = fusion.causal_allowed
    fusion.causal_allowed = lambda m: (~m)[:, None, None, :].expand(-1, 1, m.shape[1], -1) | torch.eye(
        m.shape[1], dtype=torch.bool)
    try:
        seq = pad_batch(random_rows(2, [L, L]), "left")
        changed = seq.clone()
        changed[:, -1] = changed[:, -1] % N + 1
        with torch.no_grad():
            assert not torch.allclose(head(seq)[:, 0], head(changed)[:, 0], atol=1e-5)
    finally:
        fusion.causal_allowed = orig


# ---------------------------------------------------------------------------- padding
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", ["sasrec", "gru"])
def test_left_and_right_padding_give_the_same_user_state(kind: str, config: str) -> None:
    head = make_head(kind, **CONFIGS[config]).eval()
    rows = random_rows(4, [1, 3, 9, L], seed=5)
    with torch.no_grad():
        left = head.user_state(pad_batch(rows, "left"))
        right = head.user_state(pad_batch(rows, "right"))
        alone = torch.cat([head.user_state(torch.tensor([r])) for r in rows])
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    assert left.shape == (4, head.output_dim)


@given(lengths=st.lists(st.integers(0, L), min_size=1, max_size=5), seed=st.integers(0, 99))
@settings(max_examples=10, deadline=None)
def test_padding_invariance_property(lengths: list[int], seed: int) -> None:
    head = make_head().eval()
    rows = random_rows(len(lengths), lengths, seed=seed)
    with torch.no_grad():
        left = head.user_state(pad_batch(rows, "left"))
        right = head.user_state(pad_batch(rows, "right"))
    assert torch.isfinite(left).all()
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sasrec", "gru"])
def test_empty_sequences_give_finite_states_and_losses(kind: str) -> None:
    head = make_head(kind)
    seq = pad_batch([[], [3, 4]], "left")
    for mode in (True, False):
        head.train(mode)
        state = head.user_state(seq)
        assert torch.isfinite(state).all()
    scores = head.full_scores(state)
    assert torch.isfinite(scores[:, 1:]).all() and (scores[:, 0] == float("-inf")).all()
    head.train()
    empty = torch.zeros(2, L, dtype=torch.long)
    loss = head.loss(empty, empty)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()


def test_explicit_padding_mask_and_item_embeddings_duck_typing() -> None:
    class Emb:
        ids = [f"item{k}" for k in range(N)]
        matrix = semantic_table().numpy()

    torch.manual_seed(0)
    head = DualViewHead(make_encoder("sasrec"), Emb(), d=D, n_cross_heads=2).eval()
    seq = pad_batch(random_rows(2, [5, 6]), "right")
    with torch.no_grad():
        a = head.user_state(seq)
        b = head.user_state(seq, seq == 0)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="bool tensor"):
        head.user_state(seq, (seq == 0).long())


# ---------------------------------------------------------------------------- long sequences
def test_long_sequences_are_cut_to_the_most_recent_items() -> None:
    head = make_head().eval()
    rows = random_rows(2, [L + 7, 4], seed=2)
    for side in ("left", "right"):
        long = pad_batch(rows, side, length=L + 9)
        with torch.no_grad():
            state = head.user_state(long)
            recent = head.user_state(pad_batch([r[-L:] for r in rows], "left"))
            out = head(long)
        torch.testing.assert_close(state, recent, atol=1e-5, rtol=1e-5)
        assert out.shape == (2, L, head.output_dim)
    # the loss cuts targets the same way and stays finite
    head.train()
    long = pad_batch(rows, "right", length=L + 9)
    assert torch.isfinite(head.loss(long, (long % N) + (long > 0).long())).item()


def test_truncate_sequences_aligns_extras() -> None:
    seq = torch.tensor([[1, 2, 3, 4, 5, 0, 0], [0, 0, 0, 0, 6, 7, 8]])
    pos = seq * 10
    neg = torch.stack([seq * 100, seq * 1000], dim=-1)
    s, m, (p, n) = truncate_sequences(seq, seq == 0, 3, pos, neg)
    assert s.tolist() == [[3, 4, 5], [6, 7, 8]]
    assert not m.any()
    assert p.tolist() == [[30, 40, 50], [60, 70, 80]]
    assert n[0, :, 1].tolist() == [3000, 4000, 5000]
    s, m, _ = truncate_sequences(torch.tensor([[0, 0, 0, 0, 9]]), torch.tensor([[1, 1, 1, 1, 0]]).bool(), 3)
    assert s.tolist() == [[0, 0, 9]] and m.tolist() == [[True, True, False]]


# ---------------------------------------------------------------------------- items and scores
def test_pca_init_equals_centred_table_times_components() -> None:
    torch.manual_seed(0)
    E = semantic_table()
    head = DualViewHead(make_encoder("sasrec"), E, d=D, n_cross_heads=2, pca_method="exact")
    expected = (E - E.mean(0)) @ head.pca.components
    torch.testing.assert_close(head.item_embedding.weight[1:].detach(), expected, atol=1e-4, rtol=1e-4)
    assert (head.item_embedding.weight[0] == 0).all()
    # the components are the top-d principal directions (sign-invariant comparison to numpy)
    Ec = (E - E.mean(0)).double().numpy()
    vt = np.linalg.svd(Ec, full_matrices=False)[2][:D].T
    ours = head.pca.components.double().numpy()
    np.testing.assert_allclose(np.abs((ours * vt).sum(0)), 1.0, atol=1e-4)
    scaled = DualViewHead(make_encoder("sasrec"), E, d=D, n_cross_heads=2, collab_init_std=0.05)
    assert abs(float(scaled.item_embedding.weight[1:].detach().std()) - 0.05) < 1e-4
    for std, expected in ((None, 0.02), (0.3, 0.3)):  # random init: the std is the normal's
        rand = DualViewHead(make_encoder("sasrec"), d=D, num_items=2000, use_semantic=False,
                            collab_init="random", collab_init_std=std)
        assert abs(float(rand.item_embedding.weight[1:].detach().std()) / expected - 1) < 0.05


def test_pca_adapter_init_starts_the_semantic_view_at_the_collaborative_coordinates(tmp_path) -> None:
    torch.manual_seed(0)
    E = semantic_table()
    for std in (None, 0.05):
        head = DualViewHead(make_encoder("sasrec"), E, d=D, n_cross_heads=2, adapter_init="pca",
                            pca_method="exact", collab_init_std=std)
        with torch.no_grad():
            reps = head.item_representations()[1:]
        torch.testing.assert_close(reps[:, :D], reps[:, D:], atol=1e-4, rtol=1e-4)
        assert reps[:, :D].std(0).min() > 0  # item-specific, not the near-constant default start
    default = DualViewHead(make_encoder("sasrec"), E, d=D, n_cross_heads=2)
    assert not torch.allclose(default.item_representations()[1:, :D], reps[:, :D], atol=1e-2)
    with torch.no_grad():  # a trained adapter is loaded as saved, not re-initialised from PCA
        head.adapter[2].weight.add_(1.0)
    head.save_pretrained(tmp_path / "h")
    loaded = DualViewHead.from_pretrained(tmp_path / "h")
    torch.testing.assert_close(loaded.adapter[2].weight, head.adapter[2].weight)
    with pytest.raises(ValueError, match="adapter_init='pca' needs d=16"):
        DualViewHead(SASRecEncoder(d=16, n_heads=2, max_len=L), E, d=16, n_cross_heads=2, adapter_init="pca")
    with pytest.raises(ValueError, match="adapter_init"):
        DualViewConfig(adapter_init="xavier").validate()
    with pytest.raises(ValueError, match="needs the semantic view"):  # never silently ignored
        DualViewConfig(adapter_init="pca", use_semantic=False).validate()
    with pytest.raises(ValueError, match="collab_init_std must be > 0"):
        DualViewConfig(collab_init_std=0.0).validate()


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_center_semantic_feeds_the_adapter_the_centred_table(tmp_path, activation) -> None:
    E = semantic_table() + 25.0 * torch.randn(D_LLM)  # one shared direction dominates, as decoder LLMs give
    mean = E.mean(0)
    torch.manual_seed(0)
    centred = DualViewHead(make_encoder("sasrec"), E, d=D, n_cross_heads=2, center_semantic=True,
                           adapter_activation=activation).eval()
    torch.manual_seed(0)
    reference = DualViewHead(make_encoder("sasrec"), E - mean, d=D, n_cross_heads=2,
                             adapter_activation=activation).eval()
    torch.testing.assert_close(centred.semantic_mean, mean)
    with torch.no_grad():  # the same function: the adapter sees e - mean (both views, every item)
        reps = centred.item_representations()
        torch.testing.assert_close(reps, reference.item_representations(), atol=1e-4, rtol=1e-4)
        # the semantic rows no longer share the big common component
        se = reps[1:, :D]
        cos = torch.nn.functional.cosine_similarity(se[:, None], se[None], dim=-1)
        plain = DualViewHead(make_encoder("sasrec"), E, d=D, n_cross_heads=2).item_representations()[1:, :D]
        cos_plain = torch.nn.functional.cosine_similarity(plain[:, None], plain[None], dim=-1)
        assert cos.mean() < 0.5 < cos_plain.mean()
    # training takes the same gradient path
    seq = pad_batch(random_rows(4, [5, 3, 7, 2]), "left")
    centred.train()
    centred.loss(seq, (seq % N) + (seq > 0).long()).backward()
    assert centred.adapter[0].weight.grad.abs().sum() > 0 and centred.semantic_mean.grad is None
    # rows added later are centred with the stored mean, not their own
    new_rows = semantic_table(2, seed=5) + 40.0
    centred.eval()
    idx = centred.add_items(new_rows)
    with torch.no_grad():
        torch.testing.assert_close(centred.item_representations()[idx, :D], centred.adapter(new_rows - mean),
                                   atol=1e-4, rtol=1e-4)
    centred.save_pretrained(tmp_path / "c")
    loaded = DualViewHead.from_pretrained(tmp_path / "c").eval()
    assert loaded.config.center_semantic
    torch.testing.assert_close(loaded.semantic_mean, mean)
    with torch.no_grad():
        torch.testing.assert_close(loaded.item_representations(), centred.item_representations())
    with pytest.raises(ValueError, match="center_semantic=True needs the semantic view"):
        DualViewConfig(center_semantic=True, use_semantic=False).validate()


def test_center_semantic_keeps_the_pca_adapter_start() -> None:
    E = semantic_table() + 25.0 * torch.randn(D_LLM)
    heads = [DualViewHead(make_encoder("sasrec"), E, d=D, n_cross_heads=2, adapter_init="pca", pca_method="exact",
                          center_semantic=c) for c in (False, True)]
    with torch.no_grad():
        a, b = (h.item_representations()[1:] for h in heads)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b[:, :D], b[:, D:], atol=1e-3, rtol=1e-3)


def test_item_representations_score_and_full_scores_agree() -> None:
    head = make_head().eval()
    seq = pad_batch(random_rows(3, [4, 7, 2]), "left")
    with torch.no_grad():
        states = head.user_state(seq)
        reps = head.item_representations()
        full = head.full_scores(states)
        cand = torch.randint(1, N + 1, (3, 6))
        sc = head.score(states, cand)
        shared = head.score(states, torch.tensor([1, 5, 9]))
    assert reps.shape == (N + 1, 2 * D) and (reps[0] == 0).all()
    torch.testing.assert_close(sc, full.gather(1, cand))
    torch.testing.assert_close(shared, full[:, [1, 5, 9]])
    # semantic half = adapter(table), collaborative half = the ID table
    torch.testing.assert_close(reps[1:, :D], head.adapter(head.semantic_table[1:]).detach())
    torch.testing.assert_close(reps[1:, D:], head.item_embedding.weight[1:].detach())
    # the same with gradients on (no cache) and per-candidate computation
    sc_grad = head.score(states, cand)
    torch.testing.assert_close(sc_grad.detach(), sc, atol=1e-5, rtol=1e-5)


def test_cached_item_table_follows_weight_updates() -> None:
    head = make_head()
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    with torch.no_grad():
        before = head.item_representations().clone()
        assert head.item_representations().data_ptr() == head.item_representations().data_ptr()  # cached
    seq = pad_batch(random_rows(2, [5, 5]), "left")
    head.loss(seq, (seq % N) + (seq > 0).long()).backward()
    opt.step()
    with torch.no_grad():
        after = head.item_representations()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[1:, D:], head.item_embedding.weight[1:].detach())


@pytest.mark.parametrize("config", ["default", "random_init", "no_semantic"])
def test_cold_start_add_items(config: str) -> None:
    head = make_head(**CONFIGS[config]).eval()
    seq = pad_batch(random_rows(3, [4, 7, 2]), "left")
    with torch.no_grad():
        states = head.user_state(seq)
        old = head.full_scores(states)
    new_rows = semantic_table(3, seed=9)
    idx = head.add_items(new_rows)
    assert idx.tolist() == [N + 1, N + 2, N + 3] and head.num_items == N + 3
    with torch.no_grad():
        states2 = head.user_state(seq)
        new = head.full_scores(states2)
        torch.testing.assert_close(states2, states)
        assert new.shape == (3, N + 4)
        torch.testing.assert_close(new[:, : N + 1], old)
        assert torch.isfinite(new[:, N + 1:]).all()
        reps = head.item_representations()[N + 1:]
        parts = []
        if head.config.use_semantic:
            parts.append(head.adapter(new_rows))
        if head.config.collab_init == "pca":
            parts.append(head.pca.transform(new_rows))
        else:
            parts.append(torch.zeros(3, D))
        torch.testing.assert_close(reps, torch.cat(parts, -1), atol=1e-5, rtol=1e-5)
        # new items can appear in sequences now
        assert torch.isfinite(head.user_state(torch.tensor([[0, 1, N + 2]]))).all()
    # and training still works after the table grew
    head.train()
    head.loss(seq, (seq % N) + (seq > 0).long()).backward()
    if head.item_embedding is not None:
        assert head.item_embedding.weight.grad.shape[0] == N + 4
    with pytest.raises(ValueError, match="width mismatch"):
        head.add_items(torch.randn(1, D_LLM + 1))


@pytest.mark.parametrize("config", ["default", "random_init", "no_semantic"])
def test_add_items_neighbour_rows_average_the_nearest_trained_rows(config: str) -> None:
    head = make_head(**CONFIGS[config]).eval()
    with torch.no_grad():                      # trained rows no longer where PCA put them
        head.item_embedding.weight[1:] += torch.randn(N, D, generator=torch.Generator().manual_seed(5))
    table = head.semantic_table[1:].clone()
    rows = torch.stack([table[3] + 0.01 * torch.randn(D_LLM), 2.0 * table[7], -table[11]])
    trained = head.item_embedding.weight[1:].detach().clone()
    idx = head.add_items(rows, collaborative="neighbours", n_neighbours=3)
    new = head.item_embedding.weight[idx].detach()
    sims = torch.nn.functional.normalize(rows, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    for r in range(3):
        nearest = sims[r].topk(3).indices
        torch.testing.assert_close(new[r], trained[nearest].mean(0))
    assert 3 in sims[0].topk(3).indices.tolist() and 7 in sims[1].topk(3).indices.tolist()
    # the trained rows themselves are untouched, and k larger than the table is capped
    torch.testing.assert_close(head.item_embedding.weight[1: N + 1].detach(), trained)
    idx2 = head.add_items(rows[:1], collaborative="neighbours", n_neighbours=10 * N)
    torch.testing.assert_close(head.item_embedding.weight[idx2].detach()[0],
                               head.item_embedding.weight[1: N + 4].detach().mean(0))


@pytest.mark.parametrize("config", ["default", "random_init", "no_semantic"])
def test_add_items_mapping_is_a_ridge_regression_from_text_to_trained_rows(config: str) -> None:
    from sklearn.linear_model import Ridge

    head = make_head(**CONFIGS[config]).eval()
    table = head.semantic_table[1:].clone()
    g = torch.Generator().manual_seed(6)
    A, b = torch.randn(D_LLM, D, generator=g), torch.randn(D, generator=g)
    with torch.no_grad():                      # trained rows an exact affine function of the text rows
        head.item_embedding.weight[1:] = table @ A + b
    rows = semantic_table(3, seed=12)
    idx = head.add_items(rows, collaborative="mapping", ridge=0.0)
    torch.testing.assert_close(head.item_embedding.weight[idx].detach(), rows @ A + b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():                      # a noisy table: the same fit as scikit-learn's Ridge
        head.item_embedding.weight[1:] += torch.randn(N + 3, D, generator=g)
    known_x, known_y = head.semantic_table[1:].numpy(), head.item_embedding.weight[1:].detach().numpy()
    expected = Ridge(alpha=2.5).fit(known_x, known_y).predict(rows.numpy())
    idx = head.add_items(rows, collaborative="mapping", ridge=2.5)
    np.testing.assert_allclose(head.item_embedding.weight[idx].detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_add_items_collaborative_choices() -> None:
    head = make_head().eval()
    rows = semantic_table(2, seed=4)
    idx = head.add_items(rows, collaborative="zeros")
    assert torch.equal(head.item_embedding.weight[idx], torch.zeros(2, D))
    idx = head.add_items(rows)                                            # PCA table: projection
    torch.testing.assert_close(head.item_embedding.weight[idx].detach(), head.pca.transform(rows))
    with pytest.raises(ValueError, match="collaborative must be one of"):
        head.add_items(rows, collaborative="mean")
    with pytest.raises(ValueError, match="n_neighbours"):
        head.add_items(rows, collaborative="neighbours", n_neighbours=0)
    with pytest.raises(ValueError, match="ridge"):
        head.add_items(rows, collaborative="mapping", ridge=-1.0)
    random_head = make_head(**CONFIGS["random_init"])
    with pytest.raises(ValueError, match="collab_init='pca'"):
        random_head.add_items(rows, collaborative="projection")
    assert head.num_items == N + 4 and random_head.num_items == N      # refused before any change
    semantic_only = make_head(**CONFIGS["no_collaborative"])
    with pytest.raises(ValueError, match="no ID table"):
        semantic_only.add_items(rows, collaborative="mapping")
    assert semantic_only.num_items == N and semantic_only.add_items(rows).tolist() == [N + 1, N + 2]


@pytest.mark.parametrize("config", ["concat", "no_semantic", "random_init"])
def test_cold_item_dropout_draws_the_add_items_rows(config: str) -> None:
    head = make_head(**CONFIGS[config], cold_item_dropout=0.3)
    torch.manual_seed(0)
    dropped, cold = head._cold_item_draw(torch.device("cpu"))
    assert dropped.shape == (N + 1,) and not dropped[0] and 0 < int(dropped.sum()) < N
    rates = torch.stack([head._cold_item_draw(torch.device("cpu"))[0][1:] for _ in range(400)]).float().mean()
    assert abs(float(rates) - 0.3) < 0.02
    new_rows = head.semantic_table[1:].clone()
    probe = copy.deepcopy(head)
    probe.add_items(new_rows)                                   # the rows add_items gives by default
    torch.testing.assert_close(cold[1:], probe.item_embedding.weight[N + 1:].detach())
    assert torch.equal(cold[0], torch.zeros(D))
    assert make_head(**CONFIGS[config])._cold_item_draw(torch.device("cpu")) is None


@pytest.mark.parametrize("loss_type", ["ce", "bpr"])
def test_cold_item_dropout_trains_dropped_items_on_their_cold_rows(monkeypatch, loss_type: str) -> None:
    """With every item dropped the loss is that of a head whose ID rows are the cold rows, and the
    trained rows get no gradient; in eval mode the loss is the plain one."""
    head = make_head(**CONFIGS["concat"], cold_item_dropout=0.5)
    with torch.no_grad():                                 # trained rows, no longer the PCA start
        head.item_embedding.weight[1:] += torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    seq = pad_batch(random_rows(4, [6, 3, 8, 5]), "left")
    pos = (seq % N) + (seq > 0).long()
    neg = torch.randint(1, N + 1, seq.shape, generator=torch.Generator().manual_seed(1))
    plain = copy.deepcopy(head)
    plain.config.cold_item_dropout = 0.0
    cold_rows = head._cold_item_draw(torch.device("cpu"))[1]
    monkeypatch.setattr(head, "_cold_item_draw", lambda device: (torch.arange(N + 1) > 0, cold_rows))
    swapped = copy.deepcopy(plain)
    with torch.no_grad():
        swapped.item_embedding.weight.copy_(cold_rows)

    def loss(model: DualViewHead) -> torch.Tensor:
        torch.manual_seed(3)                                  # the encoder's dropout masks alike
        return model.loss(seq, pos, neg, loss_type=loss_type)

    got = loss(head)
    torch.testing.assert_close(got, loss(swapped))
    assert not torch.allclose(got, loss(plain))
    got.backward()
    grad = head.item_embedding.weight.grad
    assert grad is None or torch.equal(grad, torch.zeros_like(grad))
    head.eval(), plain.eval()
    torch.testing.assert_close(loss(head), loss(plain))


@pytest.mark.parametrize("loss_type", ["ce", "bpr"])
def test_cold_items_spared_as_negatives(monkeypatch, loss_type: str) -> None:
    """With ``cold_items_as_negatives=False`` a dropped item keeps its trained row where it is a
    negative: dropping only items that are neither inputs nor targets leaves the loss unchanged,
    while the default form changes it; dropped targets are scored on their cold rows."""
    seq = pad_batch(random_rows(4, [6, 3, 8, 5]), "left")
    pos = (seq % N) + (seq > 0).long()
    neg = torch.randint(1, N + 1, seq.shape, generator=torch.Generator().manual_seed(1))
    is_input, is_target = torch.zeros(N + 1, dtype=torch.bool), torch.zeros(N + 1, dtype=torch.bool)
    is_input[seq.flatten()] = True
    is_target[pos.flatten()] = True
    is_target[0] = False
    used = is_input | is_target
    used[0] = True
    assert (~used).any() and (neg[pos > 0].unsqueeze(-1) == torch.nonzero(~used).flatten()).any()

    def heads(dropped: torch.Tensor, *, trained_rows_are_cold: bool = False) -> dict[str, DualViewHead]:
        made = {}
        for name, spare in (("default", True), ("spared", False)):
            head = make_head(**CONFIGS["concat"], cold_item_dropout=0.5, cold_items_as_negatives=spare)
            cold_rows = head._cold_item_draw(torch.device("cpu"))[1]
            with torch.no_grad():
                head.item_embedding.weight[1:] += torch.randn(N, D, generator=torch.Generator().manual_seed(2))
                if trained_rows_are_cold:
                    head.item_embedding.weight.copy_(cold_rows)
            monkeypatch.setattr(head, "_cold_item_draw", lambda device, c=cold_rows: (dropped, c))
            made[name] = head
        plain = copy.deepcopy(made["default"])
        plain.config.cold_item_dropout = 0.0
        monkeypatch.setattr(plain, "_cold_item_draw", lambda device: None)
        made["plain"] = plain
        return made

    def loss(model: DualViewHead) -> torch.Tensor:
        torch.manual_seed(3)                                  # the encoder's dropout masks alike
        return model.loss(seq, pos, neg, loss_type=loss_type)

    unused = heads(~used)                                      # only items that appear as negatives
    torch.testing.assert_close(loss(unused["spared"]), loss(unused["plain"]))
    assert not torch.allclose(loss(unused["default"]), loss(unused["plain"]))
    targets_only = heads(is_target & ~is_input)                 # the inputs unchanged: only targets move
    assert (is_target & ~is_input).any()
    assert not torch.allclose(loss(targets_only["spared"]), loss(targets_only["plain"]))
    every = heads(torch.arange(N + 1) > 0)
    assert not torch.allclose(loss(every["spared"]), loss(every["plain"]))
    assert not torch.allclose(loss(every["spared"]), loss(every["default"]))
    got = loss(every["spared"])
    got.backward()                                             # trained rows learn only as negatives
    assert every["spared"].item_embedding.weight.grad[1:].abs().sum() > 0
    consistent = heads(torch.arange(N + 1) > 0, trained_rows_are_cold=True)
    torch.testing.assert_close(loss(consistent["spared"]), loss(consistent["plain"]))


def test_cold_item_dropout_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="cold_item_dropout must be in"):
        make_head(cold_item_dropout=1.0)
    with pytest.raises(ValueError, match="needs the collaborative view"):
        make_head(use_collaborative=False, cold_item_dropout=0.2)
    with pytest.raises(ValueError, match="cold_items_as_negatives=False only applies"):
        make_head(cold_items_as_negatives=False)


def test_add_items_needs_a_semantic_table() -> None:
    head = DualViewHead(make_encoder("sasrec"), None, d=D, num_items=N, use_semantic=False, collab_init="random")
    with pytest.raises(ValueError, match="semantic table"):
        head.add_items(torch.randn(2, D_LLM))


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind,config", [("sasrec", "default"), ("gru", "unshared"),
                                         ("sasrec", "fallback_frozen"), ("gru", "no_collaborative")])
def test_save_load_round_trip(tmp_path, kind: str, config: str) -> None:
    head = make_head(kind, **CONFIGS[config])
    head.add_items(semantic_table(2, seed=3))
    head.eval()
    head.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = DualViewHead.from_pretrained(tmp_path).eval()
    assert loaded.config == head.config and loaded.num_items == head.num_items == N + 2
    sd1, sd2 = head.state_dict(), loaded.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    seq = pad_batch(random_rows(2, [5, 3]), "right")
    with torch.no_grad():
        assert torch.equal(head(seq), loaded(seq))
        assert torch.equal(head.full_scores(head.user_state(seq)), loaded.full_scores(loaded.user_state(seq)))
    # cold start on the loaded head uses the stored PCA projection
    if head.pca is not None:
        r = semantic_table(1, seed=11)
        assert torch.equal(head.add_items(r), loaded.add_items(r))
        assert torch.equal(head.item_embedding.weight, loaded.item_embedding.weight)


def test_save_load_with_user_encoder(tmp_path) -> None:
    from tests.unit.test_encoders import RecBoleStyleSASRec

    torch.manual_seed(0)
    user_model = RecBoleStyleSASRec(N, hidden=D, max_len=L)
    head = DualViewHead(RecBoleSASRecAdapter(user_model), semantic_table(), d=D, n_cross_heads=2).eval()
    head.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder="):
        DualViewHead.from_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = DualViewHead.from_pretrained(tmp_path, encoder=RecBoleSASRecAdapter(RecBoleStyleSASRec(N, hidden=D, max_len=L)))
    seq = pad_batch(random_rows(2, [5, 3]), "right")
    with torch.no_grad():
        assert torch.equal(head(seq), loaded.eval()(seq))
    with pytest.raises(ValueError, match="does not match"):
        DualViewHead.from_pretrained(tmp_path, encoder=SASRecEncoder(d=D, n_heads=2, max_len=L))


def test_from_pretrained_width_mismatch(tmp_path) -> None:
    make_head().save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["config"]["semantic_dim"] = D_LLM * 2
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="embedding width mismatch"):
        DualViewHead.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind,loss_type", [("sasrec", "bpr"), ("sasrec", "bce"), ("sasrec", "ce"),
                                            ("sasrec", "sampled_softmax"), ("gru", "bpr")])
def test_every_loss_is_finite_and_decreases(kind: str, loss_type: str) -> None:
    head = make_head(kind, dropout=0.0)
    head.encoder.emb_dropout.p = 0.0
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, N + 1, (L + 1,), generator=g).tolist() for _ in range(6)]
    full = torch.tensor(rows)
    seq, pos = full[:, :-1].clone(), full[:, 1:].clone()
    seq[:2, :3] = 0  # some left padding
    pos[:2, :3] = 0
    neg = torch.randint(1, N + 1, (6, L, 3), generator=g)
    neg_arg = None if loss_type == "ce" else neg
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = head.loss(seq, pos, neg_arg, loss_type=loss_type)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_definitions() -> None:
    """BPR on hand-computed scores; negatives default to the configured count."""
    head = make_head(dropout=0.0).eval()
    seq = pad_batch([[1, 2, 3]], "left")
    pos = pad_batch([[2, 3, 4]], "left")
    neg = pad_batch([[5, 6, 7]], "left")
    with torch.no_grad():
        out = head(seq)[0, -3:]
        reps = head.item_representations()
        sp = (out * reps[[2, 3, 4]]).sum(-1)
        sn = (out * reps[[5, 6, 7]]).sum(-1)
        expected = -torch.nn.functional.logsigmoid(sp - sn).mean()
        torch.testing.assert_close(head.loss(seq, pos, neg), expected, atol=1e-5, rtol=1e-5)
        bce = torch.nn.functional.softplus(-sp).mean() + torch.nn.functional.softplus(sn).mean()
        torch.testing.assert_close(head.loss(seq, pos, neg, loss_type="bce"), bce, atol=1e-5, rtol=1e-5)
        full = out @ reps.T
        full[:, 0] = float("-inf")
        ce = torch.nn.functional.cross_entropy(full, torch.tensor([2, 3, 4]))
        torch.testing.assert_close(head.loss(seq, pos, loss_type="ce"), ce, atol=1e-5, rtol=1e-5)
        # a sampled negative equal to the positive is masked out
        same = pad_batch([[2, 3, 4]], "left").unsqueeze(-1)
        assert head.loss(seq, pos, torch.cat([same, neg.unsqueeze(-1)], -1), loss_type="sampled_softmax") < 50
    with pytest.raises(ValueError, match="loss_type"):
        head.loss(seq, pos, neg, loss_type="hinge")


def test_cosine_scoring_with_a_temperature() -> None:
    """score_temperature: every score is cos(state, item) / tau, in score, full_scores and every loss,
    so an item's norm no longer ranks it; the default stays the dot product."""
    tau = 0.1
    head = make_head(dropout=0.0, score_temperature=tau).eval()
    seq = pad_batch([[1, 2, 3], [4, 5, 6]], "left")
    pos = pad_batch([[2, 3, 4], [5, 6, 7]], "left")
    neg = pad_batch([[5, 6, 7], [8, 9, 1]], "left")
    F = torch.nn.functional
    with torch.no_grad():
        out = head(seq)[:, -3:].reshape(6, -1)
        reps = head.item_representations()
        cos = F.normalize(out, dim=-1) @ F.normalize(reps, dim=-1).T / tau  # [6, N+1]
        sp = cos.gather(1, pos[:, -3:].reshape(6, 1)).squeeze(1)
        sn = cos.gather(1, neg[:, -3:].reshape(6, 1)).squeeze(1)
        torch.testing.assert_close(head.loss(seq, pos, neg), -F.logsigmoid(sp - sn).mean(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head.loss(seq, pos, neg, loss_type="bce"),
                                   F.softplus(-sp).mean() + F.softplus(sn).mean(), atol=1e-5, rtol=1e-5)
        ce_logits = cos.clone()
        ce_logits[:, 0] = float("-inf")
        torch.testing.assert_close(head.loss(seq, pos, loss_type="ce"),
                                   F.cross_entropy(ce_logits, pos[:, -3:].reshape(6)), atol=1e-5, rtol=1e-5)
        states = head.user_state(seq)
        full = head.full_scores(states)
        assert full[:, 1:].abs().max() <= 1 / tau + 1e-4
        expected = F.normalize(states, dim=-1) @ F.normalize(reps, dim=-1).T / tau
        torch.testing.assert_close(full[:, 1:], expected[:, 1:])
        torch.testing.assert_close(head.score(states, torch.tensor([3, 8])), expected[:, [3, 8]])
        torch.testing.assert_close(head.score(states, torch.tensor([[3, 8], [1, 2]])),
                                   expected.gather(1, torch.tensor([[3, 8], [1, 2]])))
    # an item's norm ranks it under the dot product, not under the cosine (one view, so that the
    # item's whole vector is its ID row)
    for temperature in (None, tau):
        one_view = make_head(dropout=0.0, use_semantic=False, score_temperature=temperature).eval()
        with torch.no_grad():
            st = one_view.user_state(seq)
            before = one_view.full_scores(st)[:, 4].clone()
            one_view.item_embedding.weight[4] *= 10
            after = one_view.full_scores(st)[:, 4]
        if temperature is None:
            torch.testing.assert_close(after, 10 * before)
        else:
            torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="score_temperature"):
        make_head(score_temperature=0.0)


# ---------------------------------------------------------------------------- ablation shapes
def test_ablation_shapes_and_plain_sasrec() -> None:
    seq = pad_batch(random_rows(2, [4, 6]), "left")
    for name, cfg in CONFIGS.items():
        head = make_head(**cfg).eval()
        with torch.no_grad():
            out = head(seq)
        single = cfg.get("use_semantic", True) is False or cfg.get("use_collaborative", True) is False
        assert out.shape == (2, L, D if single else 2 * D), name
        assert (head.cross_to_co is None) == (single or cfg.get("fusion") == "concat"), name
        assert (head.encoder_co is not None) == (name == "unshared"), name
    plain = DualViewHead(make_encoder("sasrec"), None, d=D, num_items=N, use_semantic=False, collab_init="random")
    assert plain.user_state(seq).shape == (2, D) and plain.semantic_table is None
    frozen = make_head(freeze_collaborative=True)
    assert not frozen.item_embedding.weight.requires_grad


# ---------------------------------------------------------------------------- bad input
def test_bad_semantic_tables() -> None:
    enc = make_encoder("sasrec")
    bad = semantic_table()
    bad[[3, 7, 8]] = float("nan")
    bad[10, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/inf in 4 of 25 rows, e.g. rows \[3, 7, 8, 10\]"):
        DualViewHead(enc, bad, d=D, n_cross_heads=2)
    with pytest.raises(ValueError, match="embedding width mismatch"):
        DualViewHead(enc, semantic_table(), d=D, n_cross_heads=2, semantic_dim=D_LLM + 1)
    with pytest.raises(ValueError, match="25 rows but num_items=24"):
        DualViewHead(enc, semantic_table(), d=D, num_items=24, n_cross_heads=2)
    with pytest.raises(ValueError, match="padding row 0"):
        DualViewHead(enc, semantic_table(), d=D, num_items=24 - 0 if False else 24, n_cross_heads=2) \
            if False else DualViewHead(enc, semantic_table(N + 1), d=D, num_items=N, n_cross_heads=2)
    with pytest.raises(ValueError, match="hidden_size=8 differs"):
        DualViewHead(enc, semantic_table(), d=16)
    with pytest.raises(ValueError, match="needs a semantic table"):
        DualViewHead(enc, None, d=D, num_items=N)
    with pytest.raises(ValueError, match="collab_init='pca' needs"):
        DualViewHead(enc, None, d=D, num_items=N, use_semantic=False)
    with pytest.raises(TypeError, match="unknown DualViewHead options"):
        DualViewHead(enc, semantic_table(), d=D, fusoin="concat")
    with pytest.raises(ValueError, match="fusion"):
        DualViewConfig(fusion="sum").validate()


def test_unknown_item_ids_error_or_fallback() -> None:
    head = make_head()
    seq = torch.tensor([[0, 0, 3, N + 1, N + 5], [1, 2, N + 5, -1, 4]])
    with pytest.raises(ValueError, match=rf"4 sequence item indices are outside 1..{N}.*e.g. \[-1, {N + 1}, {N + 5}\]"):
        head.user_state(seq)
    with pytest.raises(ValueError, match="candidate"):
        head.score(torch.zeros(1, 2 * D), torch.tensor([[1, N + 1]]))
    ok = torch.tensor([[0, 0, 3, 4, 5]])
    with pytest.raises(ValueError, match="target"):
        head.loss(ok, torch.tensor([[0, 0, 4, 5, N + 9]]))
    fb = make_head(missing_item_policy="fallback")
    state = fb.user_state(seq)
    assert torch.isfinite(state).all()
    fb.loss(seq, torch.tensor([[0, 0, N + 1, 2, 3], [2, N + 3, 4, 5, 6]])).backward()
    assert fb.fallback_co.grad is not None and fb.fallback_co.grad.abs().sum() > 0
    assert fb.fallback_se.grad is not None and fb.fallback_se.grad.abs().sum() > 0
    fb.eval()
    with torch.no_grad():  # CE: the fallback row is one more candidate, and an unknown target's class
        tgt = torch.tensor([[0, 0, 3, 4, N + 4]])
        out = fb(ok)[0, 2:]
        cand = torch.cat([fb.item_representations()[1:], torch.cat([fb.fallback_se, fb.fallback_co])[None]])
        expected = torch.nn.functional.cross_entropy(out @ cand.T, torch.tensor([2, 3, N]))
        torch.testing.assert_close(fb.loss(ok, tgt, loss_type="ce"), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # cached table path: unknown ids share one fallback row
        a = fb.user_state(torch.tensor([[0, 3, N + 1]]))
        b = fb.user_state(torch.tensor([[0, 3, N + 7]]))
    torch.testing.assert_close(a, b)
    # ids at padded positions are ignored
    with torch.no_grad():
        masked = torch.tensor([[N + 9, 3, 4]])
        head.eval().user_state(masked, torch.tensor([[True, False, False]]))


def test_pmixer_adapter_inside_the_head_is_causal() -> None:
    from tests.unit.test_encoders import PmixerStyleSASRec

    torch.manual_seed(0)
    head = DualViewHead(PmixerSASRecAdapter(PmixerStyleSASRec(N, hidden=D, maxlen=L)), semantic_table(), d=D,
                        n_cross_heads=2).eval()
    seq = pad_batch(random_rows(2, [L, L]), "left")
    changed = seq.clone()
    changed[:, 6:] = changed[:, 6:] % N + 1
    with torch.no_grad():
        torch.testing.assert_close(head(seq)[:, :6], head(changed)[:, :6], atol=1e-5, rtol=0)
    head.train()
    assert torch.isfinite(head.loss(seq, (seq % N) + 1))


def test_plain_sasrec_round_trip_and_sampled_negatives(tmp_path) -> None:
    torch.manual_seed(0)
    plain = DualViewHead(make_encoder("gru"), None, d=D, num_items=N, use_semantic=False, collab_init="random",
                         n_negatives=3)
    seq = pad_batch(random_rows(2, [5, 3]), "right")
    loss = plain.loss(seq, (seq % N) + (seq > 0).long())  # negatives sampled inside
    assert torch.isfinite(loss)
    plain.save_pretrained(tmp_path)
    loaded = DualViewHead.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(plain.eval().user_state(seq), loaded.user_state(seq))
    assert loaded.semantic_table is None and loaded.num_items == N


@pytest.mark.parametrize("tau", [None, 0.1])
def test_view_loss_weight_adds_each_views_own_loss(tau: float | None) -> None:
    """view_loss_weight=w: loss = fused loss + w * (semantic view's loss + collaborative view's loss),
    each view scored on its own half (cosine within the half when tau is set); w=0 is the fused loss."""
    F = torch.nn.functional
    w = 0.7
    head = make_head(dropout=0.0, fusion="concat", score_temperature=tau, view_loss_weight=w).eval()
    plain = make_head(dropout=0.0, fusion="concat", score_temperature=tau).eval()
    plain.load_state_dict(head.state_dict())
    seq = pad_batch([[1, 2, 3], [4, 5, 6]], "left")
    pos = pad_batch([[2, 3, 4], [5, 6, 7]], "left")
    neg = pad_batch([[5, 6, 7], [8, 9, 1]], "left")

    def scores(out: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
        if tau is None:
            return out @ reps.T
        return F.normalize(out, dim=-1) @ F.normalize(reps, dim=-1).T / tau

    with torch.no_grad():
        out = head(seq)[:, -3:].reshape(6, -1)
        reps = head.item_representations()
        target, negs = pos[:, -3:].reshape(6, 1), neg[:, -3:].reshape(6, 1)
        expected = {"ce": 0.0, "bpr": 0.0}
        for k, cols in enumerate([slice(None), slice(0, D), slice(D, 2 * D)]):
            s = scores(out[:, cols], reps[:, cols])
            ce_logits = s.clone()
            ce_logits[:, 0] = float("-inf")
            weight = 1.0 if k == 0 else w
            expected["ce"] += weight * F.cross_entropy(ce_logits, target.squeeze(1))
            expected["bpr"] += weight * -F.logsigmoid(s.gather(1, target) - s.gather(1, negs)).mean()
        for loss_type, value in expected.items():
            torch.testing.assert_close(head.loss(seq, pos, neg, loss_type=loss_type), value, atol=1e-5, rtol=1e-5)
            fused_only = plain.loss(seq, pos, neg, loss_type=loss_type)
            assert head.loss(seq, pos, neg, loss_type=loss_type) > fused_only + 1e-3
        # evaluation scores ignore the weight
        states = head.user_state(seq)
        torch.testing.assert_close(head.full_scores(states), plain.full_scores(states))


def test_view_loss_weight_trains_each_view_to_rank_alone() -> None:
    """With the per-view losses each half of the state predicts the next item on its own."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, N + 1, (L + 1,), generator=g).tolist() for _ in range(8)]
    full = torch.tensor(rows)
    seq, pos = full[:, :-1], full[:, 1:]
    view_losses = {}
    for w in (0.0, 1.0):
        head = make_head(dropout=0.0, fusion="concat", view_loss_weight=w, seed=1)
        head.encoder.emb_dropout.p = 0.0
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            head.loss(seq, pos, loss_type="ce").backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            out, reps = head(seq), head.item_representations()
            per_view = []
            for cols in (slice(0, D), slice(D, 2 * D)):
                logits = out[..., cols] @ reps[:, cols].T
                logits[..., 0] = float("-inf")
                per_view.append(F.cross_entropy(logits.reshape(-1, N + 1), pos.reshape(-1)).item())
        view_losses[w] = per_view
    assert all(a < b for a, b in zip(view_losses[1.0], view_losses[0.0])), view_losses


def test_view_loss_weight_is_checked() -> None:
    with pytest.raises(ValueError, match="view_loss_weight must be >= 0"):
        make_head(view_loss_weight=-0.1)
    with pytest.raises(ValueError, match="needs both views"):
        make_head(view_loss_weight=0.5, use_semantic=False)


def test_collab_anchor_weight_adds_the_mean_squared_drift_from_the_pca_init() -> None:
    """collab_anchor_weight=a: loss = plain loss + a * mean_i ||E_co[i] - E_co0[i]||^2 (items 1..N);
    zero at initialisation, scoring unchanged."""
    a = 3.0
    plain = make_head(dropout=0.0, fusion="concat").eval()
    head = make_head(dropout=0.0, fusion="concat", collab_anchor_weight=a).eval()
    head.load_state_dict(plain.state_dict())
    assert head.collab_anchor_penalty().item() == pytest.approx(0.0, abs=1e-10)
    init = head.item_embedding.weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for h in (plain, head):
            h.item_embedding.weight[1:] += torch.randn(N, D, generator=g.manual_seed(5)) * 0.1
    expected = (head.item_embedding.weight[1:] - init[1:]).pow(2).sum(-1).mean()
    torch.testing.assert_close(head.collab_anchor_penalty(), expected)
    seq = pad_batch([[1, 2, 3], [4, 5, 6, 7]], "left")
    pos = pad_batch([[2, 3, 8], [5, 6, 7, 9]], "left")
    for loss_type in ("ce", "bpr"):
        torch.manual_seed(0)
        base = plain.loss(seq, pos, loss_type=loss_type)
        torch.manual_seed(0)
        torch.testing.assert_close(head.loss(seq, pos, loss_type=loss_type), base + a * expected)
    states = head.user_state(seq)
    torch.testing.assert_close(head.full_scores(states), plain.full_scores(states))


def test_collab_anchor_weight_keeps_unseen_items_near_their_semantic_rows() -> None:
    """Under full-softmax CE with Adam, items that never occur in training still move (their rows
    get the softmax's negative gradient); the anchor keeps them near their PCA coordinates."""
    g = torch.Generator().manual_seed(0)
    seen = 10  # training uses items 1..10 only; 11..N are never positives nor inputs
    full = torch.randint(1, seen + 1, (8, L + 1), generator=g)
    seq, pos = full[:, :-1], full[:, 1:]
    drift = {}
    for a in (0.0, 10.0):
        head = make_head(dropout=0.0, use_semantic=False, collab_anchor_weight=a, seed=1)
        head.encoder.emb_dropout.p = 0.0
        init = head.item_embedding.weight.detach().clone()
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(40):
            opt.zero_grad()
            head.loss(seq, pos, loss_type="ce").backward()
            opt.step()
        moved = (head.item_embedding.weight.detach() - init).norm(dim=-1)
        drift[a] = moved[seen + 1:].mean().item()
    assert drift[10.0] < 0.5 * drift[0.0], drift


def test_collab_anchor_follows_loaded_weights_and_added_items(tmp_path) -> None:
    """The anchor target is recomputed from the stored PCA after a state dict is loaded (no stale
    cache), survives save/load, and new rows from add_items start at zero penalty."""
    head = make_head(use_semantic=False, collab_anchor_weight=1.0)
    assert head.collab_anchor_penalty().item() == pytest.approx(0.0, abs=1e-10)
    other = DualViewHead(make_encoder("sasrec"), semantic_table(seed=7), d=D, use_semantic=False,
                         collab_anchor_weight=1.0)
    with torch.no_grad():
        other.item_embedding.weight[1:] += 0.2
    expected = other.collab_anchor_penalty().item()
    assert expected > 0
    head.load_state_dict(other.state_dict())  # in-place copies: the cached target must not be reused
    assert head.collab_anchor_penalty().item() == pytest.approx(expected, rel=1e-5)
    head.save_pretrained(tmp_path / "h")
    loaded = DualViewHead.from_pretrained(tmp_path / "h")
    assert loaded.config.collab_anchor_weight == 1.0
    assert loaded.collab_anchor_penalty().item() == pytest.approx(expected, rel=1e-5)
    loaded.add_items(semantic_table(3, seed=9))
    assert loaded.collab_anchor_penalty().item() == pytest.approx(expected * N / (N + 3), rel=1e-5)


def test_collab_anchor_weight_is_checked() -> None:
    with pytest.raises(ValueError, match="collab_anchor_weight must be >= 0"):
        make_head(collab_anchor_weight=-1.0)
    with pytest.raises(ValueError, match="collab_init='pca'"):
        make_head(collab_anchor_weight=1.0, collab_init="random")
    with pytest.raises(ValueError, match="collab_init='pca'"):
        make_head(collab_anchor_weight=1.0, use_collaborative=False)


# ------------------------------------------------------------------- logit adjustment
def biased_losses(out: torch.Tensor, reps: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                  negs: torch.Tensor, view_weight: float) -> dict[str, torch.Tensor]:
    """CE / BPR / sampled-softmax losses of a concatenation head by hand: the fused score plus
    ``view_weight`` times each view's own, every logit shifted by ``bias`` (``[N+1]`` per item, or
    ``[M, N+1]`` per position); CE over items 1..N, the others over (target, one negative)."""
    F = torch.nn.functional
    expected = {"ce": 0.0, "bpr": 0.0, "sampled_softmax": 0.0}
    for k, cols in enumerate([slice(None), slice(0, D), slice(D, 2 * D)]):
        s = out[:, cols] @ reps[:, cols].T + bias
        ce_logits = s.clone()
        ce_logits[:, 0] = float("-inf")
        weight = 1.0 if k == 0 else view_weight
        expected["ce"] += weight * F.cross_entropy(ce_logits, target.squeeze(1))
        pair = torch.cat([s.gather(1, target), s.gather(1, negs)], 1)
        expected["bpr"] += weight * -F.logsigmoid(pair[:, 0] - pair[:, 1]).mean()
        expected["sampled_softmax"] += weight * F.cross_entropy(pair, torch.zeros(len(out), dtype=torch.long))
    return expected


def concat_batch(view_weight: float) -> tuple[DualViewHead, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A concatenation head with per-view losses (eval mode) and a two-user batch: seq, pos, neg."""
    head = make_head(dropout=0.0, fusion="concat", view_loss_weight=view_weight).eval()
    seq = pad_batch([[1, 2, 3], [4, 5, 6]], "left")
    pos = pad_batch([[2, 3, 4], [5, 6, 7]], "left")
    neg = pad_batch([[5, 6, 7], [8, 9, 1]], "left")
    return head, seq, pos, neg


def test_logit_bias_shifts_each_items_training_logit_in_every_loss_and_view() -> None:
    """loss(..., logit_bias=b) is the loss of the logits plus b[item] (fused and per view; CE over
    the full catalogue, BPR and sampled softmax over the candidates); evaluation scores ignore it."""
    w = 0.5
    head, seq, pos, neg = concat_batch(w)
    bias = torch.linspace(0.0, 3.0, N + 1)
    bias[0] = 99.0  # padding's entry is ignored
    with torch.no_grad():
        out = head(seq)[:, -3:].reshape(6, -1)
        reps = head.item_representations()
        target, negs = pos[:, -3:].reshape(6, 1), neg[:, -3:].reshape(6, 1)
        b = bias.clone()
        b[0] = 0.0
        expected = biased_losses(out, reps, b, target, negs, w)
        for loss_type, value in expected.items():
            got = head.loss(seq, pos, neg, loss_type=loss_type, logit_bias=bias)
            torch.testing.assert_close(got, value, atol=1e-5, rtol=1e-5)
            assert not torch.isclose(got, head.loss(seq, pos, neg, loss_type=loss_type))
            torch.testing.assert_close(head.loss(seq, pos, neg, loss_type=loss_type, logit_bias=torch.zeros(N + 1)),
                                       head.loss(seq, pos, neg, loss_type=loss_type))
    with pytest.raises(ValueError, match="logit_bias must be"):
        head.loss(seq, pos, neg, logit_bias=torch.zeros(N))


def test_logit_bias_with_fallback_rows_gives_them_no_bias() -> None:
    """Unknown ids take the fallback row and a bias of 0: the CE target column of an unknown item,
    and unknown negatives, do not index past the bias vector."""
    F = torch.nn.functional
    head = make_head(dropout=0.0, missing_item_policy="fallback").eval()
    seq = pad_batch([[1, 2, 3]], "left")
    pos = pad_batch([[2, N + 5, 4]], "left")
    neg = pad_batch([[N + 7, 6, 7]], "left")
    bias = torch.rand(N + 1)
    with torch.no_grad():
        for loss_type in ("ce", "bpr"):
            assert torch.isfinite(head.loss(seq, pos, neg, loss_type=loss_type, logit_bias=bias))
        # CE by hand: columns 1..N carry the bias, the fallback column (last) none
        out = head(seq)[0, -3:]
        table = head._table(with_fallback=True)[1:]
        logits = out @ table.T + torch.cat([bias[1:], torch.zeros(1)])
        expected = F.cross_entropy(logits, torch.tensor([1, N, 3]))
        torch.testing.assert_close(head.loss(seq, pos, loss_type="ce", logit_bias=bias), expected,
                                   atol=1e-5, rtol=1e-5)


def test_a_trained_in_prior_adds_its_bias_per_position_in_every_loss_and_view() -> None:
    """loss(..., prior=SemanticPrior(head, ...)) is the loss of the logits plus the prior of the
    profile up to each position (fused and per view; CE over the catalogue, BPR and sampled
    softmax over the candidates); a prior of weight 0 changes nothing."""
    from cfsr_head import SemanticPrior

    w = 0.5
    head, seq, pos, neg = concat_batch(w)
    table = semantic_table(seed=5)
    counts = torch.arange(N + 1) % 7
    prior = SemanticPrior(head, table, 2.0, recency=0.5, popularity=counts, tail_exponent=1.0)
    with torch.no_grad():
        out = head(seq)[:, -3:].reshape(6, -1)
        reps = head.item_representations()
        bias = 2.0 * prior.prior(prior.position_profiles(seq)[:, -3:].reshape(6, -1))  # [6, N+1]
        assert bias[:, 1:].std() > 0
        target, negs = pos[:, -3:].reshape(6, 1), neg[:, -3:].reshape(6, 1)
        expected = biased_losses(out, reps, bias, target, negs, w)
        for loss_type, value in expected.items():
            got = head.loss(seq, pos, neg, loss_type=loss_type, prior=prior)
            torch.testing.assert_close(got, value, atol=1e-5, rtol=1e-5)
            assert not torch.isclose(got, head.loss(seq, pos, neg, loss_type=loss_type))
            torch.testing.assert_close(head.loss(seq, pos, neg, loss_type=loss_type,
                                                 prior=SemanticPrior(head, table, 0.0)),
                                       head.loss(seq, pos, neg, loss_type=loss_type))


def test_a_trained_in_prior_gives_fallback_rows_no_bias() -> None:
    """Unknown ids in the input count as padding for the prior, and the CE fallback column and
    unknown negatives get a bias of 0."""
    from cfsr_head import SemanticPrior

    F = torch.nn.functional
    head = make_head(dropout=0.0, missing_item_policy="fallback").eval()
    prior = SemanticPrior(head, semantic_table(seed=5), 3.0)
    seq = pad_batch([[1, N + 4, 3]], "left")
    pos = pad_batch([[N + 4, 3, 4]], "left")
    neg = pad_batch([[N + 7, 6, 7]], "left")
    with torch.no_grad():
        assert torch.isfinite(head.loss(seq, pos, neg, loss_type="bpr", prior=prior))
        out = head(seq)[0, -3:]
        table = head._table(with_fallback=True)[1:]
        profiles = prior.position_profiles(seq)[0, -3:]
        assert profiles[1].abs().sum() == 0  # the unknown input item has no semantic row
        bias = 3.0 * prior.prior(profiles)[:, 1:]
        logits = out @ table.T + torch.cat([bias, torch.zeros(3, 1)], 1)
        expected = F.cross_entropy(logits, torch.tensor([N, 2, 3]))
        torch.testing.assert_close(head.loss(seq, pos, loss_type="ce", prior=prior), expected, atol=1e-5, rtol=1e-5)


def test_init_collaborative_from_a_trained_table_reaches_the_scores_and_the_saved_head(tmp_path) -> None:
    """A trained SASRec's item table (with or without its padding row) becomes the head's ID table:
    the collaborative half of every item's representation and of a saved and reloaded head."""
    trained = torch.randn(N + 1, D, generator=torch.Generator().manual_seed(3))
    trained[0] = 5.0  # a padding row that must not be copied
    head = make_head(fusion="concat", collab_init="random").eval()
    before = head.item_representations().clone()
    head.init_collaborative_from(trained)
    assert torch.equal(head.item_embedding.weight[1:], trained[1:])
    assert torch.equal(head.item_embedding.weight[0], torch.zeros(D))
    reps = head.item_representations()  # rows 0..N; the cache was dropped: [e_se : e_co] with the new e_co
    assert torch.equal(reps[1:, D:], trained[1:]) and torch.equal(reps[:, :D], before[:, :D])
    other = make_head(fusion="concat", collab_init="random")
    other.init_collaborative_from(trained[1:].numpy())  # rows 1..N only, as an array
    assert torch.equal(other.item_embedding.weight, head.item_embedding.weight)
    head.save_pretrained(tmp_path)
    loaded = DualViewHead.from_pretrained(tmp_path, encoder=make_encoder("sasrec")).eval()
    assert torch.equal(loaded.item_embedding.weight[1:], trained[1:])


def test_init_collaborative_from_refuses_what_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="collab_init='random'"):
        make_head().init_collaborative_from(torch.zeros(N, D))  # a PCA-initialised table
    with pytest.raises(ValueError, match="use_collaborative"):
        make_head(use_collaborative=False).init_collaborative_from(torch.zeros(N, D))
    head = make_head(collab_init="random")
    with pytest.raises(ValueError, match=rf"shape \(24, 8\); this head needs \[{N}, {D}\]"):
        head.init_collaborative_from(torch.zeros(N - 1, D))
    bad = torch.zeros(N, D)
    bad[4, 0] = float("nan")
    with pytest.raises(ValueError, match="collaborative table contains NaN"):
        head.init_collaborative_from(bad)
