"""Trainer tests on a tiny synthetic dataset where item i is followed by item i+1 (wrapping)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfsr_head import InteractionData, leave_one_out
from cfsr_head.evaluate import RandomModel, evaluate
from cfsr_head.io import load_safetensors
from cfsr_head.train import (TrainBatch, TrainConfig, Trainer, TrainResult, flatten_optimizer_state,
                             unflatten_optimizer_state)

from cyclic_data import cyclic_interactions

N_ITEMS = 30


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyModel(nn.Module):
    """Minimal protocol model: state at t = W e(item_t); scores = state . e(item)."""

    def __init__(self, num_items: int = N_ITEMS, d: int = 16, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.num_items = num_items
        self.emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)
        self.poison = False  # set by tests to make the loss NaN

    def forward(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.drop(self.emb(item_seq)))

    def user_state(self, item_seq: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if padding_mask is None:
            padding_mask = item_seq == 0
        out = self(item_seq, padding_mask)
        pos = torch.arange(item_seq.shape[1], device=item_seq.device)
        last = torch.where(~padding_mask, pos, -1).max(1).values.clamp(min=0)
        return out[torch.arange(len(out)), last]

    def full_scores(self, states: torch.Tensor) -> torch.Tensor:
        s = states @ self.emb.weight.T
        s[:, 0] = -torch.inf
        return s

    def score(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return (states.unsqueeze(1) * self.emb(candidates)).sum(-1)

    def loss(self, item_seq, pos, neg, padding_mask=None, loss_type="bpr"):
        h = self(item_seq, padding_mask)
        m = pos > 0
        if loss_type == "ce":
            logits = h[m] @ self.emb.weight.T
            logits[:, 0] = -torch.inf
            out = F.cross_entropy(logits, pos[m])
        else:
            ps = (h * self.emb(pos)).sum(-1)[m]
            if neg.dim() == 3:
                ns, ps = (h.unsqueeze(2) * self.emb(neg)).sum(-1)[m], ps[:, None]
            else:
                ns = (h * self.emb(neg)).sum(-1)[m]
            out = F.softplus(ns - ps).mean() if loss_type == "bpr" else (F.softplus(-ps) + F.softplus(ns)).mean()
        return out * math.nan if self.poison else out


def ndcg10_eval(model, split_data, split="valid", protocol="full", ks=(10,), **kwargs):
    """Full-ranking NDCG@10 over all items (history not masked: the pattern never repeats)."""
    seq, target, _ = split_data.eval_inputs(split, max_len=10)
    with torch.no_grad():
        scores = model.full_scores(model.user_state(seq, seq == 0))
    rank = (scores > scores.gather(1, target[:, None])).sum(1).float()
    ndcg = torch.where(rank < 10, 1.0 / torch.log2(rank + 2), torch.zeros(())).mean().item()

    class Result:
        def summary(self):
            return {"overall": {"NDCG@10": ndcg}}

    return Result()


def scripted_eval(values):
    """An eval_fn returning the given validation metrics, one per call."""
    it = iter(values)

    def fn(model, split_data, split="valid", protocol="full", **kwargs):
        v = next(it)

        class Result:
            def summary(self):
                return {"Overall": {"NDCG@10": v}}

        return Result()

    return fn


@pytest.fixture(scope="module")
def split():
    return leave_one_out(InteractionData(cyclic_interactions(N_ITEMS)), max_len=10)


def cfg(tmp_path: Path | None = None, **kw) -> TrainConfig:
    base = dict(epochs=6, batch_size=32, lr=1e-2, max_len=10, show_progress_bar=False, patience=20)
    base.update(kw)
    if tmp_path is not None:
        base["output_dir"] = str(tmp_path)
    return TrainConfig(**base)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["bpr", "ce", "bce"])
def test_learns_next_item_pattern(split, loss):
    """With the real evaluator (full ranking, history masked)."""
    model = TinyModel()
    random_ndcg = evaluate(RandomModel(N_ITEMS), split, split="valid").summary()["Overall"]["NDCG@10"]
    trainer = Trainer(model, split, cfg(epochs=12, loss=loss))
    result = trainer.fit()
    assert isinstance(result, TrainResult)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    # chance level for 30 items is about 0.15; the pattern is fully learnable
    assert result.best_metric > 0.6 and result.best_metric > 3 * random_ndcg
    assert result.history[result.best_epoch - 1]["metric"] == result.best_metric
    assert all(h["epoch_time"] >= 0 and "valid" in h for h in result.history)
    # the restored weights are the best ones
    again = evaluate(model, split, split="valid", max_len=10).summary()["Overall"]["NDCG@10"]
    assert again == pytest.approx(result.best_metric)
    test = trainer.test().summary()
    assert {"Overall", "Tail item"} <= set(test) and test["Overall"]["NDCG@10"] > 0.6
    assert trainer.test(protocol="sampled").summary()["Overall"]["HR@10"] > 0.9
    assert TrainResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_early_stopping_and_best_restore(split, tmp_path):
    model = TinyModel()
    snapshots = {}
    metrics = [0.1, 0.3, 0.2, 0.25, 0.2, 0.9, 0.9]
    result = Trainer(model, split, cfg(tmp_path, epochs=7, patience=3), eval_fn=scripted_eval(metrics),
                     callbacks=[lambda tr, rec: snapshots.setdefault(rec["epoch"], weights(tr.model))]).fit()
    assert result.stopped_early and result.epochs_run == 5
    assert result.best_epoch == 2 and result.best_metric == 0.3
    assert same(weights(model), snapshots[2]) and not same(snapshots[2], snapshots[5])
    info = json.loads((tmp_path / "best" / "info.json").read_text())
    assert info["epoch"] == 2
    best, _ = load_safetensors(tmp_path / "best" / "model.safetensors")
    assert same(best, snapshots[2])
    # in memory (no output_dir) too
    model2 = TinyModel()
    snaps2 = {}
    Trainer(model2, split, cfg(epochs=7, patience=3), eval_fn=scripted_eval(metrics),
            callbacks=[lambda tr, rec: snaps2.setdefault(rec["epoch"], weights(tr.model))]).fit()
    assert same(weights(model2), snaps2[2]) and same(snaps2[2], snapshots[2])


def test_eval_every_counts_patience_in_evaluations(split):
    result = Trainer(TinyModel(), split, cfg(epochs=9, eval_every=2, patience=2),
                     eval_fn=scripted_eval([0.5, 0.4, 0.3, 0.9])).fit()
    assert [h["metric"] for h in result.history] == [None, 0.5, None, 0.4, None, 0.3]
    assert result.stopped_early and result.best_epoch == 2


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(split, tmp_path):
    config = dict(epochs=6, patience=20, loss="bpr")
    ref_model = TinyModel(dropout=0.3)  # dropout: the torch RNG must be replayed too
    ref = Trainer(ref_model, split, cfg(tmp_path / "ref", **config), eval_fn=ndcg10_eval).fit()

    def stop_at_3(tr, rec):
        if rec["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(TinyModel(dropout=0.3), split, cfg(tmp_path / "run", **config), eval_fn=ndcg10_eval,
                callbacks=[stop_at_3]).fit()
    state = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == 3
    # a second interruption, through the knob, then the final resume from a fresh model object
    part = Trainer(TinyModel(dropout=0.3, seed=99), split, cfg(tmp_path / "run", **config),
                   eval_fn=ndcg10_eval).fit(max_epochs_this_run=1)
    assert part.epochs_run == 4 and part.resumed_from_epoch == 3
    torch.manual_seed(1234)  # global RNG state must not matter
    model = TinyModel(dropout=0.3, seed=7)
    res = Trainer(model, split, cfg(tmp_path / "run", **config), eval_fn=ndcg10_eval).fit()
    assert res.resumed_from_epoch == 4 and res.epochs_run == 6
    assert same(weights(model), weights(ref_model))
    assert [h["metric"] for h in res.history] == [h["metric"] for h in ref.history]
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in ref.history]
    assert (res.best_epoch, res.best_metric) == (ref.best_epoch, ref.best_metric)
    last_ref, _ = load_safetensors(tmp_path / "ref" / "last" / "model.safetensors")
    last_run, _ = load_safetensors(tmp_path / "run" / "last" / "model.safetensors")
    assert same(last_ref, last_run)


@pytest.mark.parametrize("crash", ["torn_stage", "mid_swap"])
def test_resume_after_a_crash_while_checkpointing(split, tmp_path, crash):
    import shutil

    config = dict(epochs=4, loss="bpr")
    ref_model = TinyModel(dropout=0.2)
    Trainer(ref_model, split, cfg(tmp_path / "ref", **config), eval_fn=ndcg10_eval).fit()
    run = tmp_path / "run"
    Trainer(TinyModel(dropout=0.2), split, cfg(run, **config), eval_fn=ndcg10_eval).fit(max_epochs_this_run=2)
    if crash == "torn_stage":  # died while writing the next checkpoint: a partial last.new
        (run / "last.new").mkdir()
        shutil.copy(run / "last" / "model.safetensors", run / "last.new" / "model.safetensors")
    else:  # died between the two renames: only last.old holds the checkpoint
        (run / "last").rename(run / "last.old")
    model = TinyModel(dropout=0.2, seed=11)
    res = Trainer(model, split, cfg(run, **config), eval_fn=ndcg10_eval).fit()
    assert res.resumed_from_epoch == 2 and same(weights(model), weights(ref_model))
    assert sorted(p.name for p in run.iterdir()) == ["best", "last"]


def test_finished_run_is_not_repeated(split, tmp_path):
    first = Trainer(TinyModel(), split, cfg(tmp_path, epochs=3), eval_fn=ndcg10_eval).fit()
    calls = []
    model = TinyModel(seed=5)
    again = Trainer(model, split, cfg(tmp_path, epochs=3), eval_fn=ndcg10_eval,
                    callbacks=[lambda tr, rec: calls.append(rec)]).fit()
    assert calls == [] and again.best_epoch == first.best_epoch and again.history == first.history
    best, _ = load_safetensors(tmp_path / "best" / "model.safetensors")
    assert same(weights(model), best)
    # more epochs extend the run
    more = Trainer(TinyModel(seed=5), split, cfg(tmp_path, epochs=4), eval_fn=ndcg10_eval).fit()
    assert more.epochs_run == 4 and more.resumed_from_epoch == 3


def test_resume_refuses_a_different_configuration(split, tmp_path):
    Trainer(TinyModel(), split, cfg(tmp_path, epochs=2), eval_fn=ndcg10_eval).fit()
    with pytest.raises(ValueError, match="lr"):
        Trainer(TinyModel(), split, cfg(tmp_path, epochs=3, lr=0.5), eval_fn=ndcg10_eval).fit()
    fresh = Trainer(TinyModel(), split, cfg(tmp_path, epochs=1, lr=0.5, resume=False), eval_fn=ndcg10_eval).fit()
    assert fresh.resumed_from_epoch == 0


def test_the_environment_is_recorded_and_a_resume_elsewhere_warns(split, tmp_path):
    first = Trainer(TinyModel(), split, cfg(tmp_path, epochs=2), eval_fn=ndcg10_eval).fit()
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    expected = {"torch": torch.__version__, "threads": 1, "device": "cpu", "num_processes": 1}
    assert state["environment"] == expected and first.environment == expected
    # the same environment resumes silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Trainer(TinyModel(), split, cfg(tmp_path, epochs=3), eval_fn=ndcg10_eval).fit()
    # another thread count still resumes, but says the bits will differ from an uninterrupted run
    torch.set_num_threads(2)
    try:
        with pytest.warns(RuntimeWarning, match=r"threads: 1 -> 2.*not be bit-identical"):
            res = Trainer(TinyModel(), split, cfg(tmp_path, epochs=4), eval_fn=ndcg10_eval).fit()
    finally:
        torch.set_num_threads(1)
    assert res.resumed_from_epoch == 3 and res.environment["threads"] == 2
    # a checkpoint from before the environment was recorded resumes silently
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    del state["environment"]
    (tmp_path / "last" / "trainer_state.json").write_text(json.dumps(state))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert Trainer(TinyModel(), split, cfg(tmp_path, epochs=5), eval_fn=ndcg10_eval).fit().resumed_from_epoch == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(split, tmp_path):
    model = TinyModel()
    good = {}

    def poison_after_2(tr, rec):
        good[rec["epoch"]] = weights(tr.model)
        if rec["epoch"] == 2:
            tr.model.poison = True

    with pytest.raises(FloatingPointError, match=r"epoch 3, step 1"):
        Trainer(model, split, cfg(tmp_path, epochs=5), eval_fn=ndcg10_eval, callbacks=[poison_after_2]).fit()
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == 2
    last, _ = load_safetensors(tmp_path / "last" / "model.safetensors")
    assert same(last, good[2])
    assert all(torch.isfinite(v).all() for v in last.values())
    # the run resumes from there once the cause is gone
    res = Trainer(TinyModel(), split, cfg(tmp_path, epochs=3), eval_fn=ndcg10_eval).fit()
    assert res.resumed_from_epoch == 2 and res.epochs_run == 3


def test_only_safetensors_and_json_on_disk(split, tmp_path):
    Trainer(TinyModel(), split, cfg(tmp_path, epochs=2), eval_fn=ndcg10_eval).fit()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files
    assert {p.relative_to(tmp_path).as_posix() for p in files} == {
        "last/model.safetensors", "last/optimizer.safetensors", "last/trainer_state.json",
        "best/model.safetensors", "best/info.json"}


def test_optimizer_state_roundtrip():
    model = TinyModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.1)
    model.loss(torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), torch.tensor([[5, 6]])).backward()
    opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(meta)
    opt2 = torch.optim.Adam(TinyModel().parameters(), lr=5.0)
    opt2.load_state_dict(unflatten_optimizer_state(tensors, json.loads(json.dumps(meta))))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-3
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(torch.as_tensor(a["state"][pid][key]), torch.as_tensor(b["state"][pid][key]))


def test_extra_loss_is_added_and_receives_the_batch(split):
    seen = []

    def extra(model, batch: TrainBatch):
        seen.append((batch.epoch, batch.step, batch.input_seq.shape, bool(batch.padding_mask.any())))
        assert torch.equal(batch.padding_mask, batch.input_seq == 0)
        # user rows come with the batch: the user's training sequence ends with the batch's last pos
        assert batch.users is not None and batch.users.shape == (len(batch.input_seq),)
        seqs = split.sequences[batch.users.numpy()]
        train_last = seqs[np.arange(len(seqs)), seqs.shape[1] - 3]
        assert np.array_equal(train_last, batch.pos[:, -1].numpy())
        return torch.tensor(5.0)

    base = Trainer(m1 := TinyModel(), split, cfg(epochs=2, trim_padding=False), eval_fn=ndcg10_eval).fit()
    plus = Trainer(m2 := TinyModel(), split, cfg(epochs=2, trim_padding=False), eval_fn=ndcg10_eval,
                   extra_loss=extra).fit()
    assert seen and seen[0][:2] == (1, 1) and seen[0][2][1] == 10
    for h0, h1 in zip(base.history, plus.history):
        assert h1["train_loss"] == pytest.approx(h0["train_loss"] + 5.0)
    assert same(weights(m1), weights(m2))  # a constant adds no gradient


def test_several_negatives_reach_the_model(split):
    shapes = []

    def probe(model, batch):
        shapes.append(tuple(batch.neg.shape))
        return torch.zeros(())

    res = Trainer(TinyModel(), split, cfg(epochs=1, n_negatives=3, trim_padding=False), eval_fn=ndcg10_eval,
                  extra_loss=probe).fit()
    assert shapes[0][1:] == (10, 3) and math.isfinite(res.history[0]["train_loss"])


def test_length_buckets_narrow_the_trimmed_batches_and_still_learn(split):
    widths = {0: [], 4: []}

    for buckets in widths:
        def probe(model, batch, buckets=buckets):
            widths[buckets].append(batch.input_seq.shape[1])
            return torch.zeros(())

        res = Trainer(TinyModel(), split, cfg(epochs=8, batch_size=8, length_buckets=buckets, loss="ce"),
                      extra_loss=probe).fit()
        assert res.best_metric > 0.6  # the next-item pattern is still learnt
    assert abs(len(widths[4]) - len(widths[0])) <= len(widths[0]) // 4  # about as many steps per epoch
    assert sum(widths[4]) < sum(widths[0])  # less padding left after trimming
    with pytest.raises(ValueError, match="length_buckets"):
        TrainConfig(length_buckets=-2)
    plain = type("S", (), {"train_batches": lambda self, batch_size, max_len, rng: iter(())})()
    with pytest.raises(ValueError, match="length_buckets"):
        Trainer(TinyModel(), plain, cfg(epochs=1, length_buckets=2), eval_fn=ndcg10_eval).fit()


def test_bad_configs_and_inputs(split):
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="eval_protocol"):
        TrainConfig(eval_protocol="weird")
    with pytest.raises(TypeError, match="full_scores"):
        Trainer(nn.Linear(2, 2), split, cfg())
    with pytest.raises(KeyError, match="NDCG@10"):
        Trainer(TinyModel(), split, cfg(epochs=1), eval_fn=lambda *a, **k: {"overall": {"HR@10": 1.0}}).fit()
    for tau in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="logit_adjustment"):
            TrainConfig(logit_adjustment=tau)
    # the model's loss must accept the bias the adjustment passes
    with pytest.raises(TypeError, match="logit_bias"):
        Trainer(TinyModel(), split, cfg(epochs=1, logit_adjustment=1.0), eval_fn=ndcg10_eval).fit()


DDP_SCRIPT = r'''
import sys, numpy as np, pandas as pd, torch
from pathlib import Path
torch.set_num_threads(1)
from accelerate import Accelerator
from cfsr_head import DualViewHead, InteractionData, SASRecEncoder, TrainConfig, Trainer, leave_one_out
from cfsr_head.io import atomic_save_safetensors, atomic_write_json
out = Path(sys.argv[1])
rng = np.random.default_rng(0)
rows = [(f"u{u}", f"i{(s + t) % 30}", t) for u in range(120)
        for s, n in [(rng.integers(0, 30), rng.integers(5, 12))] for t in range(n)]
split = leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])), max_len=10)
acc = Accelerator(cpu=True)
torch.manual_seed(0)
model = DualViewHead(SASRecEncoder(d=16, n_layers=1, n_heads=2, max_len=10), semantic=None, num_items=30,
                     use_semantic=False, collab_init="random", d=16)
trainer = Trainer(model, split, TrainConfig(epochs=3, batch_size=16, lr=1e-2, max_len=10, loss="ce",
                  output_dir=str(out / "ckpt"), show_progress_bar=False), accelerator=acc)
res = trainer.fit()
r = acc.process_index
atomic_save_safetensors(out / f"rank{r}.safetensors", dict(model.state_dict()))
atomic_write_json(out / f"rank{r}.json", {"world": acc.num_processes, "best_epoch": res.best_epoch,
                  "metrics": [h["metric"] for h in res.history],
                  "wrapper": type(trainer.prepared_loss).__name__})
'''


@pytest.mark.multiprocess
def test_two_processes_under_accelerate(tmp_path):
    """DDP on CPU (gloo): every rank ends with the same weights and the broadcast metrics."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={port}", str(script), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert infos[0]["world"] == 2 and infos[0]["wrapper"] == "DistributedDataParallel"
    assert infos[0] == infos[1] and infos[0]["metrics"][-1] > infos[0]["metrics"][0]
    w0, _ = load_safetensors(tmp_path / "rank0.safetensors")
    w1, _ = load_safetensors(tmp_path / "rank1.safetensors")
    assert same(w0, w1)
    assert (tmp_path / "ckpt" / "last" / "trainer_state.json").is_file()


def make_head(seed: int = 0):
    from cfsr_head import DualViewHead, SASRecEncoder

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    semantic = rng.normal(size=(N_ITEMS, 12)).astype(np.float32)
    return DualViewHead(SASRecEncoder(d=8, n_layers=1, n_heads=2, max_len=10, dropout=0.3),
                        semantic=semantic, d=8, dropout=0.3, seed=seed)


def test_real_head_resume_and_best_restore(split, tmp_path):
    """DualViewHead (dropout in encoder and cross-attention, cached item table) with the real evaluator."""
    config = dict(epochs=4, loss="bpr", lr=5e-3)
    ref_model = make_head()
    ref = Trainer(ref_model, split, cfg(tmp_path / "ref", **config)).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_head(), split, cfg(tmp_path / "run", **config),
                callbacks=[lambda tr, rec: (_ for _ in ()).throw(KeyboardInterrupt) if rec["epoch"] == 2 else None]
                ).fit()
    model = make_head(seed=3)  # other initial weights: everything must come from the checkpoint
    res = Trainer(model, split, cfg(tmp_path / "run", **config)).fit()
    assert res.resumed_from_epoch == 2
    assert same(weights(model), weights(ref_model))
    assert [h["metric"] for h in res.history] == [h["metric"] for h in ref.history]
    # the restored best weights give the best validation metric again (no stale cached item table)
    again = evaluate(model, split, split="valid", max_len=10, groups=None).summary()["Overall"]["NDCG@10"]
    assert again == pytest.approx(res.best_metric)


def test_mixed_precision_switch_in_one_process(split):
    from accelerate import Accelerator

    from cfsr_head.train import make_accelerator

    Accelerator()  # this process already runs Accelerate in full precision
    try:
        trainer = Trainer(TinyModel(), split, cfg(epochs=1, mixed_precision="bf16"), eval_fn=ndcg10_eval)
        assert trainer.accelerator.mixed_precision == "bf16"
        assert math.isfinite(trainer.fit().history[0]["train_loss"])
    finally:
        make_accelerator("no")  # leave full precision to the rest of the session
    assert Accelerator().mixed_precision == "no"


def test_hooks_and_the_callers_rng(split, tmp_path):
    events = []

    class Extra:
        def __call__(self, model, batch):
            return torch.zeros(())

        def on_fit_start(self, trainer):
            events.append(("start", trainer.model.emb.weight.detach().clone()))

        def on_epoch_end(self, trainer, record):
            events.append(("end", record["epoch"]))

    trainer = Trainer(TinyModel(), split, cfg(tmp_path, epochs=3), eval_fn=ndcg10_eval, extra_loss=Extra())
    torch.manual_seed(5)
    np.random.seed(5)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(5)
    np.random.seed(5)
    trainer.fit(max_epochs_this_run=2)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert [e[0] if e[0] == "start" else e for e in events] == ["start", ("end", 1), ("end", 2)]
    events.clear()
    Trainer(TinyModel(seed=9), split, cfg(tmp_path, epochs=3), eval_fn=ndcg10_eval, extra_loss=Extra()).fit()
    last, _ = load_safetensors(tmp_path / "last" / "model.safetensors")
    assert events[0][0] == "start" and events[1:] == [("end", 3)]
    # on_fit_start saw the resumed (epoch 2) weights, not the fresh model's
    assert not torch.equal(events[0][1], TinyModel(seed=9).emb.weight.detach())
    events.clear()
    Trainer(TinyModel(), split, cfg(tmp_path, epochs=3), eval_fn=ndcg10_eval, extra_loss=Extra()).fit()
    assert events == []  # a finished run starts nothing


def test_trim_padding_is_exact_for_built_in_encoders():
    """Dropping all-padding leading columns changes neither the loss nor its gradients."""
    from cfsr_head import DualViewHead, SASRecEncoder

    torch.manual_seed(0)
    head = DualViewHead(SASRecEncoder(d=16, n_layers=2, n_heads=2, max_len=12, dropout=0.0),
                        semantic=torch.randn(N_ITEMS, 24), d=16, dropout=0.0)
    seq = torch.zeros(3, 12, dtype=torch.long)
    seq[0, -4:] = torch.tensor([1, 2, 3, 4])
    seq[1, -3:] = torch.tensor([5, 6, 7])
    seq[2, -2:] = torch.tensor([8, 9])
    pos = torch.roll(seq, -1, 1).masked_fill(seq == 0, 0)
    pos[:, -1] = torch.tensor([5, 8, 10])
    neg = torch.randint(1, N_ITEMS + 1, seq.shape).masked_fill(seq == 0, 0)
    raw = (seq, pos, neg)
    out = {}
    for trim in (False, True):
        trainer = Trainer(head, split_data=type("S", (), {"train_batches": lambda *a, **k: iter(())})(),
                          config=TrainConfig(trim_padding=trim, show_progress_bar=False))
        batch = trainer._to_batch(raw, 0, 1)
        head.zero_grad()
        loss = head.loss(batch.input_seq, batch.pos, batch.neg, batch.padding_mask, loss_type="bpr")
        loss.backward()
        out[trim] = (batch.input_seq.shape[1], loss.detach(), head.adapter[0].weight.grad.clone())
    assert out[True][0] == 4 and out[False][0] == 12
    torch.testing.assert_close(out[True][1], out[False][1])
    torch.testing.assert_close(out[True][2], out[False][2])


def test_trim_leading_padding_cuts_aligned_columns_and_keeps_one():
    from cfsr_head.train import trim_leading_padding

    seq = torch.tensor([[0, 0, 0, 3, 4], [0, 0, 1, 2, 3]])
    neg = torch.arange(30).view(2, 5, 3)
    s, n = trim_leading_padding(seq, neg)
    assert s.tolist() == [[0, 3, 4], [1, 2, 3]] and torch.equal(n, neg[:, 2:])
    full = torch.tensor([[1, 2], [0, 3]])
    assert trim_leading_padding(full)[0] is full
    assert trim_leading_padding(torch.zeros(2, 4, dtype=torch.long))[0].shape == (2, 1)


class BiasedTinyModel(TinyModel):
    """TinyModel whose loss takes a logit bias and records it."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen_bias: list[torch.Tensor | None] = []

    def loss(self, item_seq, pos, neg, padding_mask=None, loss_type="bpr", logit_bias=None):
        self.seen_bias.append(None if logit_bias is None else logit_bias.detach().clone())
        return super().loss(item_seq, pos, neg, padding_mask, loss_type)


def test_logit_adjustment_passes_tau_log1p_training_counts_to_the_loss(split):
    plain = BiasedTinyModel()
    Trainer(plain, split, cfg(epochs=1), eval_fn=ndcg10_eval).fit()
    assert plain.seen_bias and all(b is None for b in plain.seen_bias)
    model = BiasedTinyModel()
    Trainer(model, split, cfg(epochs=1, logit_adjustment=0.5), eval_fn=ndcg10_eval).fit()
    expected = 0.5 * np.log1p(np.asarray(split.item_popularity, dtype=np.float64))
    expected[0] = 0.0
    assert len(model.seen_bias) == len(plain.seen_bias)
    for b in model.seen_bias:
        np.testing.assert_allclose(b.numpy(), expected, rtol=1e-6)
    assert expected[1:].std() > 0  # the toy catalogue is not uniform: the bias carries information


def test_logit_adjustment_lowers_popular_items_in_the_learned_scores():
    """On a catalogue where a few items are far more frequent, CE training with the logit-adjusted
    loss ranks the frequent items lower for the same users than plain CE does."""
    rng = np.random.default_rng(1)
    rows = []
    for u in range(200):  # most users walk from a few popular starting items; the next item is the successor
        start = int(rng.integers(0, 3)) if u < 160 else int(rng.integers(0, N_ITEMS))
        rows += [(f"u{u}", f"i{(start + t) % N_ITEMS}", t) for t in range(int(rng.integers(4, 8)))]
    skewed = leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])),
                           max_len=10)
    counts = np.asarray(skewed.item_popularity)
    popular = torch.as_tensor(np.argsort(-counts[1:])[:3] + 1)

    def popular_rank(tau: float) -> float:
        model = make_head()
        Trainer(model, skewed, cfg(epochs=8, loss="ce", logit_adjustment=tau)).fit()
        model.eval()
        seqs = torch.as_tensor(skewed.sequences[:, :-2][:, -10:])
        with torch.no_grad():
            scores = model.full_scores(model.user_state(seqs))[:, 1:]
        ranks = scores.argsort(1, descending=True).argsort(1) + 1  # rank of each item per user
        return float(ranks[:, popular - 1].float().mean())

    assert popular_rank(1.0) > popular_rank(0.0) + 1.0


def test_validate_with_logit_bias_chooses_epochs_on_the_scores_the_loss_trained():
    """With the flag, every epoch's validation scores are the model's own plus tau * log(1 + count)
    (the best epoch and early stopping follow them); the saved model and test are the model's own."""
    from cfsr_head import PopularityAdjusted

    rng = np.random.default_rng(2)
    rows = []
    for u in range(120):  # a skewed catalogue, so that adding the bias back changes the ranking
        start = int(rng.integers(0, 3)) if u < 90 else int(rng.integers(0, N_ITEMS))
        rows += [(f"u{u}", f"i{(start + t) % N_ITEMS}", t) for t in range(int(rng.integers(4, 8)))]
    skewed = leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])),
                           max_len=10)

    def valid_ndcg(m) -> float:
        return evaluate(m, skewed, split="valid", groups=None).summary()["Overall"]["NDCG@10"]

    seen = []

    def recording_eval(m, split_data, **kwargs):
        seen.append(m)
        return evaluate(m, split_data, **kwargs)

    model = make_head()
    trainer = Trainer(model, skewed, cfg(epochs=1, loss="ce", logit_adjustment=1.0, validate_with_logit_bias=True),
                      eval_fn=recording_eval)
    result = trainer.fit()
    assert seen and all(isinstance(m, PopularityAdjusted) and m.model is model and m.beta == -1.0 for m in seen)
    assert model.training  # the wrapper hands the model back in the mode it found it
    model.eval()
    with_bias = valid_ndcg(PopularityAdjusted(model, skewed.item_popularity, beta=-1.0))
    assert result.best_metric == pytest.approx(with_bias)
    assert abs(with_bias - valid_ndcg(model)) > 1e-4  # not the model's own scores
    own_test = evaluate(model, skewed, split="test").summary()["Overall"]["NDCG@10"]
    assert trainer.test().summary()["Overall"]["NDCG@10"] == pytest.approx(own_test)
    plain = make_head()
    same = Trainer(plain, skewed, cfg(epochs=1, loss="ce", logit_adjustment=1.0)).fit()
    plain.eval()
    assert same.best_metric == pytest.approx(valid_ndcg(plain))  # without the flag: the model's own scores
    assert torch.allclose(plain.item_embedding.weight, model.item_embedding.weight)  # the flag leaves training alone
    uncountable = BiasedTinyModel()  # without num_items it cannot be wrapped: refused before any training step
    del uncountable.num_items
    with pytest.raises(AttributeError, match="num_items"):
        Trainer(uncountable, skewed, cfg(epochs=1, logit_adjustment=1.0, validate_with_logit_bias=True),
                eval_fn=ndcg10_eval).fit()
    assert uncountable.seen_bias == []
    with pytest.raises(ValueError, match="needs logit_adjustment"):
        TrainConfig(validate_with_logit_bias=True)
    with pytest.raises(ValueError, match="True or False"):
        TrainConfig(logit_adjustment=0.5, validate_with_logit_bias="yes")


# ------------------------------------------------------------------- trained-in semantic prior
def successor_table(split) -> torch.Tensor:
    """Rows in index order; item i's nearest neighbour is its successor i+1 (the toy's next item)."""
    angles = torch.tensor([2 * math.pi * int(raw[1:]) / N_ITEMS for raw in split.item_index.ids])
    return torch.stack([torch.cos(angles), torch.sin(angles)], 1)


def test_a_trained_in_prior_shapes_training_and_scores_validation_and_test(split, tmp_path):
    from cfsr_head import SemanticPrior

    table = successor_table(split)
    plain = make_head()
    Trainer(plain, split, cfg(epochs=1, loss="ce")).fit()  # one epoch each: the same best epoch
    model = make_head()
    prior = SemanticPrior(model, table, 2.0, popularity=split.item_popularity, tail_exponent=0.5)
    seen = []

    def recording_eval(m, split_data, **kwargs):
        seen.append(m)
        return evaluate(m, split_data, **kwargs)

    trainer = Trainer(model, split, cfg(tmp_path, epochs=1, loss="ce"), eval_fn=recording_eval, prior=prior)
    result = trainer.fit()
    assert seen and all(m is prior for m in seen)  # validation scored with the prior added
    assert trainer.scoring_model is prior
    # the bias reached the loss: same seed and batches, other weights than plain training
    assert not torch.allclose(model.item_embedding.weight, plain.item_embedding.weight)
    valid = evaluate(prior, split, split="valid", groups=None).summary()["Overall"]["NDCG@10"]
    assert result.best_metric == pytest.approx(valid)
    test = trainer.test().summary()["Overall"]["NDCG@10"]
    assert test == pytest.approx(evaluate(prior, split, split="test").summary()["Overall"]["NDCG@10"])
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert state["prior"] == {"weight": 2.0, "recency": 0.0, "tail_exponent": 0.5}


def test_a_trained_in_prior_is_checked_and_a_resume_must_keep_it(split, tmp_path):
    from cfsr_head import SemanticPrior

    table = successor_table(split)
    model = make_head()
    with pytest.raises(ValueError, match="must wrap the model"):
        Trainer(model, split, cfg(), prior=SemanticPrior(make_head(1), table, 1.0))
    tiny = TinyModel()
    with pytest.raises(TypeError, match="accept prior"):
        Trainer(tiny, split, cfg(), prior=SemanticPrior(tiny, table, 1.0))
    Trainer(model, split, cfg(tmp_path, epochs=1), prior=SemanticPrior(model, table, 1.0)).fit()
    again = make_head()
    with pytest.raises(ValueError, match="prior"):
        Trainer(again, split, cfg(tmp_path, epochs=2), prior=SemanticPrior(again, table, 4.0)).fit()
    with pytest.raises(ValueError, match="prior"):
        Trainer(again, split, cfg(tmp_path, epochs=2)).fit()
    resumed = Trainer(again, split, cfg(tmp_path, epochs=2), prior=SemanticPrior(again, table, 1.0)).fit()
    assert resumed.resumed_from_epoch == 1
