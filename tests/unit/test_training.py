"""ContrastiveTrainer: learning, checkpoints (safetensors/JSON, trainable only), resume, NaN guard."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_item_embed.io import load_safetensors, read_json
from llm_item_embed.losses import ContrastiveLoss
from llm_item_embed.training import ContrastiveTrainer, FitConfig, NonFiniteLossError, find_latest_checkpoint
from tiny_encoder import TinyEncoder

WORDS = ("red blue green black white nail hair face body hand soap cream serum polish lotion liner "
         "shampoo lipstick brush comb mirror towel bottle glass steel wood paper cotton silk wool").split()


def make_items(n: int = 24, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[f"{a} is {w}" for a, w in zip(("name", "brand", "color", "kind", "size"),
                                           rng.choice(WORDS, 5, replace=False))] for _ in range(n)]


def make_views_fn(items: list[list[str]], drop: float = 0.3, k: int = 2):
    def make_views(idx: np.ndarray, rng: np.random.Generator):
        views = []
        for _ in range(k):
            v = []
            for i in idx:
                atoms = [a for a in items[i] if rng.random() >= drop] or [items[i][0]]
                v.append("This item has: " + "; ".join(atoms))
            views.append(v)
        return views, np.asarray(idx)
    return make_views


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def tok_path(tiny_bert_dir: str) -> str:
    return tiny_bert_dir


def _cfg(**kw) -> FitConfig:
    base = dict(batch_size=8, lr=5e-2, warmup_ratio=0.1, show_progress_bar=False, seed=7)
    base.update(kw)
    return FitConfig(**base)


def _params(enc: torch.nn.Module, loss: ContrastiveLoss) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}
    out["log_scale"] = loss.log_scale.detach().clone()
    return out


def test_loss_decreases(tok_path: str) -> None:
    items = make_items(32)
    enc, loss = TinyEncoder(tok_path), ContrastiveLoss()
    base_before = enc.base.weight.clone()
    hist = ContrastiveTrainer(enc, loss, _cfg(epochs=6)).train(make_views_fn(items), len(items))
    assert [h["step"] for h in hist] == list(range(1, 25))
    assert {"step", "epoch", "loss", "temperature", "lr"} <= set(hist[0])
    first = np.mean([h["loss"] for h in hist[:4]])
    last = np.mean([h["loss"] for h in hist[-4:]])
    assert last < 0.7 * first, (first, last)
    assert torch.equal(enc.base.weight, base_before)  # frozen base untouched
    assert hist[0]["lr"] < hist[2]["lr"]  # warm-up
    assert hist[-1]["lr"] < hist[5]["lr"]  # decay


def test_views_contract_both_signatures(tok_path: str) -> None:
    items = make_items(8)
    seen = []

    def old_style(idx: np.ndarray, epoch: int, step: int) -> list[list[str]]:
        seen.append((epoch, step))
        return [[" ".join(items[i]) for i in idx], [" ".join(items[i][:3]) for i in idx]]

    hist = ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(), _cfg(batch_size=4, epochs=2)).train(
        old_style, len(items))
    assert len(hist) == 4 and seen == [(0, 0), (0, 1), (1, 2), (1, 3)]


def test_bad_views_and_config_errors(tok_path: str) -> None:
    enc = TinyEncoder(tok_path)
    with pytest.raises(ValueError, match="view 1 has 3 texts"):
        ContrastiveTrainer(enc, ContrastiveLoss(), _cfg(batch_size=4)).train(
            lambda idx, rng: ([["a"] * len(idx), ["b"] * 3], None), 8)
    with pytest.raises(ValueError, match="at least 2"):
        ContrastiveTrainer(enc, ContrastiveLoss(), _cfg()).train(lambda idx, rng: [["a"]], 1)
    with pytest.raises(ValueError, match="batch_size"):
        FitConfig(batch_size=1)
    with pytest.raises(ValueError, match="mixed_precision"):
        FitConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="output_dir"):
        FitConfig(save_every=2)
    for p in enc.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ContrastiveTrainer(enc, ContrastiveLoss(), _cfg()).train(make_views_fn(make_items(8)), 8)


def test_checkpoints_safetensors_json_trainable_only(tok_path: str, tmp_path: Path, umask) -> None:
    items = make_items(16)
    enc, loss = TinyEncoder(tok_path), ContrastiveLoss()
    ContrastiveTrainer(enc, loss, _cfg(epochs=2, output_dir=str(tmp_path), save_every=3)).train(
        make_views_fn(items), len(items))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-3", "checkpoint-4"]  # every 3 steps + the end
    # checkpoint folders are readable by others, like any folder made under umask 022
    assert [oct(p.stat().st_mode & 0o777) for p in sorted(tmp_path.iterdir())] == [oct(0o755)] * 2
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files
    ck = tmp_path / "checkpoint-4"
    adapter, meta = load_safetensors(ck / "adapter.safetensors")
    trainable = {f"encoder.{n}" for n, p in enc.named_parameters() if p.requires_grad} | {"loss.log_scale"}
    assert set(adapter) == trainable
    assert not any("base" in k for k in adapter)  # the frozen table is never written
    for n, p in enc.named_parameters():
        if p.requires_grad:
            assert torch.equal(adapter[f"encoder.{n}"], p.detach())
    opt, _ = load_safetensors(ck / "optimizer.safetensors")
    assert {k.split("::")[0] for k in opt} == trainable
    assert {k.split("::")[1] for k in opt} == {"exp_avg", "exp_avg_sq", "step"}
    state = read_json(ck / "trainer_state.json")
    assert state["step"] == 4 and len(state["history"]) == 4
    assert find_latest_checkpoint(tmp_path) == ck
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


@pytest.mark.parametrize("mini", [None, 3])
def test_resume_equals_uninterrupted(tok_path: str, tmp_path: Path, mini: int | None) -> None:
    items = make_items(20)
    kw = dict(epochs=3, mini_batch_size=mini, save_every=2)  # 20 items / 8 -> 3 steps/epoch, 9 steps

    enc_a, loss_a = TinyEncoder(tok_path, dropout=0.1), ContrastiveLoss()
    hist_a = ContrastiveTrainer(enc_a, loss_a, _cfg(output_dir=str(tmp_path / "a"), **kw)).train(
        make_views_fn(items), len(items))

    # run b crashes inside step 6 (after checkpoint-4 was written), c resumes from "latest"
    mv = make_views_fn(items)
    calls = {"n": 0}

    def crashing(idx: np.ndarray, rng: np.random.Generator):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated pre-emption")
        return mv(idx, rng)

    out_b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        ContrastiveTrainer(TinyEncoder(tok_path, dropout=0.1), ContrastiveLoss(),
                           _cfg(output_dir=str(out_b), **kw)).train(crashing, len(items))
    assert find_latest_checkpoint(out_b).name == "checkpoint-4"

    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    # same frozen base (as a pretrained model), different trainable init: the checkpoint must overwrite it
    enc_c, loss_c = TinyEncoder(tok_path, dropout=0.1), ContrastiveLoss(temperature=2.0)
    with torch.no_grad():
        for p in enc_c.parameters():
            if p.requires_grad:
                p.add_(0.5)
    hist_c = ContrastiveTrainer(enc_c, loss_c, _cfg(output_dir=str(out_b), resume_from="latest", **kw)).train(
        make_views_fn(items), len(items))

    assert [h["step"] for h in hist_c] == list(range(1, 10))
    for ha, hc in zip(hist_a, hist_c):
        assert hc["loss"] == pytest.approx(ha["loss"], abs=1e-6), (hist_a, hist_c)
        assert hc["lr"] == pytest.approx(ha["lr"], abs=1e-12)
        assert hc["temperature"] == pytest.approx(ha["temperature"], abs=1e-6)
    pa, pc = _params(enc_a, loss_a), _params(enc_c, loss_c)
    for name in pa:
        torch.testing.assert_close(pc[name], pa[name], rtol=0, atol=1e-6, msg=name)


def test_checkpoints_record_the_environment_and_a_resume_elsewhere_warns(tok_path: str, tmp_path: Path) -> None:
    items = make_items(16)  # 2 steps per epoch, 4 in all, a checkpoint after steps 2 and 4
    kw = dict(epochs=2, save_every=2, output_dir=str(tmp_path))
    threads = torch.get_num_threads()
    ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(), _cfg(**kw)).train(make_views_fn(items), len(items))
    env = read_json(tmp_path / "checkpoint-2" / "trainer_state.json")["environment"]
    assert env == {"torch": torch.__version__, "threads": threads, "device": "cpu", "num_processes": 1}
    with warnings.catch_warnings():  # the same environment resumes silently
        warnings.simplefilter("error", RuntimeWarning)
        ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(),
                           _cfg(**kw, resume_from=str(tmp_path / "checkpoint-2"))).train(
            make_views_fn(items), len(items))
    other = 1 if threads > 1 else 2
    torch.set_num_threads(other)
    try:
        with pytest.warns(RuntimeWarning, match=rf"threads: {threads} -> {other}.*not be bit-identical"):
            hist = ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(),
                                      _cfg(**kw, resume_from=str(tmp_path / "checkpoint-2"))).train(
                make_views_fn(items), len(items))
    finally:
        torch.set_num_threads(threads)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]


def test_resume_from_explicit_folder_and_mismatch(tok_path: str, tmp_path: Path) -> None:
    items = make_items(16)
    ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(),
                       _cfg(max_steps=2, output_dir=str(tmp_path))).train(make_views_fn(items), len(items))
    with pytest.raises(ValueError, match="n_items"):
        ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(),
                           _cfg(max_steps=2, resume_from=str(tmp_path / "checkpoint-2"))).train(
            make_views_fn(make_items(24)), 24)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(),
                           _cfg(resume_from=str(tmp_path))).train(make_views_fn(items), len(items))


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tok_path: str, tmp_path: Path) -> None:
    items = make_items(40)  # 5 steps per epoch
    enc, loss = TinyEncoder(tok_path), ContrastiveLoss()
    state = {"poison": False}
    mv = make_views_fn(items)

    def views(idx: np.ndarray, rng: np.random.Generator):
        state["poison"] = len(calls) == 4  # the 5th step (1-based)
        calls.append(1)
        return mv(idx, rng)

    calls: list[int] = []
    enc.register_forward_hook(lambda m, i, out: out * float("nan") if state["poison"] else out)
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        ContrastiveTrainer(enc, loss, _cfg(epochs=2, output_dir=str(tmp_path), save_every=2)).train(views, len(items))
    assert info.value.step == 5
    assert Path(info.value.last_checkpoint).name == "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    adapter, _ = load_safetensors(tmp_path / "checkpoint-4" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    # no update was applied at the failing step: parameters still equal the last checkpoint
    for n, p in enc.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), adapter[f"encoder.{n}"]), n
    assert torch.isfinite(loss.log_scale).all()


def test_grad_cache_trainer_matches_plain(tok_path: str) -> None:
    items = make_items(16)
    results = []
    for mini in (None, 5):
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(True)
        enc, loss = TinyEncoder(tok_path, dropout=0.0), ContrastiveLoss()
        hist = ContrastiveTrainer(enc, loss, _cfg(max_steps=3, mini_batch_size=mini)).train(
            make_views_fn(items), len(items))
        results.append((hist, _params(enc, loss)))
    (ha, pa), (hb, pb) = results
    for a, b in zip(ha, hb):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_autocast_runs(tok_path: str) -> None:
    items = make_items(8)
    hist = ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(), _cfg(max_steps=2, mixed_precision="bf16")).train(
        make_views_fn(items), len(items))
    assert all(np.isfinite(h["loss"]) for h in hist)


# ------------------------------------------------------------------ with the real TextEncoder (backbone.py)
def _text_encoder(path: str):
    from llm_item_embed.backbone import BackboneSettings, LoraSettings, load_text_encoder

    torch.manual_seed(0)
    return load_text_encoder(BackboneSettings(model_name_or_path=path, max_length=32),
                             LoraSettings(r=4, alpha=8, dropout=0.1))


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_text_encoder_fit_checkpoint_resume(fixture: str, request, tmp_path: Path) -> None:
    path = request.getfixturevalue(fixture)
    items = make_items(12)
    kw = dict(batch_size=4, max_steps=4, save_every=2, lr=1e-2)
    enc = _text_encoder(path)
    frozen = {n: p.detach().clone() for n, p in enc.named_parameters() if not p.requires_grad}
    hist_a = ContrastiveTrainer(enc, ContrastiveLoss(), _cfg(output_dir=str(tmp_path / "a"), **kw)).train(
        make_views_fn(items), len(items))
    assert all(np.isfinite(h["loss"]) for h in hist_a)
    for n, p in enc.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    adapter, _ = load_safetensors(tmp_path / "a" / "checkpoint-4" / "adapter.safetensors")
    enc_keys = [k for k in adapter if k.startswith("encoder.")]
    assert enc_keys and all("lora_" in k for k in enc_keys)  # adapter-only
    trained = {f"encoder.{n}": p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}

    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    enc_b = _text_encoder(path)
    hist_b = ContrastiveTrainer(enc_b, ContrastiveLoss(), _cfg(
        output_dir=str(tmp_path / "a"), resume_from=str(tmp_path / "a" / "checkpoint-2"), **kw)).train(
        make_views_fn(items), len(items))
    for ha, hb in zip(hist_a, hist_b, strict=True):
        assert hb["loss"] == pytest.approx(ha["loss"], abs=1e-5)
    for n, p in enc_b.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), trained[f"encoder.{n}"], rtol=1e-4, atol=1e-6)


def test_text_encoder_grad_cache_and_checkpointing_match_plain(tiny_bert_dir: str) -> None:
    """Real BERT + LoRA with dropout on: GradCache (+ gradient checkpointing) gives the plain grads."""
    from llm_item_embed.losses import grad_cache_backward

    enc = _text_encoder(tiny_bert_dir)
    enc.train()
    lf = ContrastiveLoss()
    items = make_items(6)
    texts = [" ".join(a) for a in items] + [" ".join(a[:3]) for a in items]
    mini = 4
    chunks = [enc.tokenize(texts[i:i + mini]) for i in range(0, len(texts), mini)]

    def loss_fn(r: torch.Tensor) -> torch.Tensor:
        return lf(r.view(2, 6, -1))

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}
        out["t"] = lf.log_scale.grad.clone()
        enc.zero_grad(set_to_none=True)
        lf.zero_grad(set_to_none=True)
        return out

    torch.manual_seed(1)
    loss_fn(torch.cat([enc(**c) for c in chunks])).backward()
    ref = grads()
    torch.manual_seed(1)
    grad_cache_backward(enc, chunks, loss_fn)
    got = grads()
    enc.gradient_checkpointing_enable()
    torch.manual_seed(1)
    grad_cache_backward(enc, chunks, loss_fn)
    got_ckpt = grads()
    assert any(v.abs().sum() > 0 for v in ref.values())
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m, k=name: f"{k}: {m}")
        torch.testing.assert_close(got_ckpt[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m, k=name: f"{k}: {m}")


def test_gradient_checkpointing_flag(tiny_bert_dir: str) -> None:
    enc = _text_encoder(tiny_bert_dir)
    hist = ContrastiveTrainer(enc, ContrastiveLoss(), _cfg(batch_size=4, max_steps=2, gradient_checkpointing=True)).train(
        make_views_fn(make_items(8)), 8)
    bm = enc.base_model
    on = bm.is_activation_checkpointing if hasattr(bm, "is_activation_checkpointing") else bm.is_gradient_checkpointing
    assert len(hist) == 2 and on
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        ContrastiveTrainer(TinyEncoder(tiny_bert_dir), ContrastiveLoss(),
                           _cfg(max_steps=1, gradient_checkpointing=True)).train(make_views_fn(make_items(8)), 8)


def test_sequential_fits_with_other_precision_and_caller_rng_untouched(tok_path: str) -> None:
    items = make_items(8)
    trainer = ContrastiveTrainer(TinyEncoder(tok_path, dropout=0.2), ContrastiveLoss(), _cfg(max_steps=1))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    trainer.train(make_views_fn(items), 8)
    assert torch.equal(torch.rand(3), expected)  # per-step seeding happens in a forked RNG
    # a second fit in the same process with another precision must not hit accelerate's state error
    hist = ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(),
                              _cfg(max_steps=1, mixed_precision="bf16")).train(make_views_fn(items), 8)
    assert np.isfinite(hist[0]["loss"])


def test_non_finite_gradient_stops(tok_path: str) -> None:
    """A finite loss with an infinite gradient must not reach the weights."""
    items = make_items(8)
    enc = TinyEncoder(tok_path)
    before = enc.lora_B.detach().clone()
    enc.lora_B.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteLossError, match="gradient norm at step 1"):
        ContrastiveTrainer(enc, ContrastiveLoss(), _cfg(max_steps=2)).train(make_views_fn(items), 8)
    assert torch.equal(enc.lora_B.detach(), before)


def test_known_positives_from_make_views_reaches_the_loss(tok_path: str) -> None:
    """A third element of make_views' result is the known-positives mask over the global batch:
    masking every candidate but the positive leaves a loss of exactly 0; a bad mask is named."""
    items = make_items(8)
    plain = make_views_fn(items)

    def all_known(idx: np.ndarray, rng: np.random.Generator):
        views, _ = plain(idx, rng)
        return views, None, np.ones((len(idx), len(idx)), dtype=bool)

    hist = ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(), _cfg(max_steps=2)).train(all_known, 8)
    assert [h["loss"] for h in hist] == [0.0, 0.0]
    ref = ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(), _cfg(max_steps=1)).train(plain, 8)
    assert ref[0]["loss"] > 0.1

    def bad(idx: np.ndarray, rng: np.random.Generator):
        views, _ = plain(idx, rng)
        return views, None, np.ones((len(idx), len(idx) - 1), dtype=bool)

    with pytest.raises(ValueError, match="known_positives must be a bool array"):
        ContrastiveTrainer(TinyEncoder(tok_path), ContrastiveLoss(), _cfg(max_steps=1)).train(bad, 8)
