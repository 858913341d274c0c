"""Two CPU processes (gloo, ``torchrun`` + ``Accelerator(cpu=True)``) == one process on the same global batch.

The parent computes the single-process reference in-process, launches this same file as the worker
under ``python -m torch.distributed.run --nproc_per_node 2``, and compares what the workers wrote
(safetensors + JSON): (a) the loss and the DDP-averaged gradients of ``ContrastiveLoss`` with
cross-process negatives; (b) three ``ContrastiveTrainer`` steps, plain, with GradCache, with a
known-positives mask that spans both processes, and with targets (``AlignedContrastiveLoss``; some
items without a target, unevenly spread over the two processes' halves).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
K, B, STEPS = 2, 8, 3


def _texts() -> tuple[list[list[str]], np.ndarray]:
    rng = np.random.default_rng(3)
    words = "red blue green nail hair face soap cream serum polish lotion brush comb towel steel silk".split()
    items = [" ".join(rng.choice(words, 4, replace=False)) for _ in range(B)]
    items[5] = items[1]  # a duplicate prompt, masked through group ids across processes
    views = [[f"item: {t}" for t in items], [f"{t} (view two)" for t in items]]
    groups = np.array([0, 1, 2, 3, 4, 1, 6, 7])
    return views, groups


TARGET_DIM = 4


def _make_views(items: list[str], known_positives: bool = False, targets: bool = False):
    from llm_item_embed.training import ViewBatch

    goal = np.random.default_rng(5).normal(size=(len(items), TARGET_DIM)).astype(np.float32)
    def make_views(idx: np.ndarray, rng: np.random.Generator):
        views = [[" ".join(w for w in items[i].split() if rng.random() > 0.3) or items[i] for i in idx]
                 for _ in range(K)]
        if targets:  # items 0, 1, 2 (mod 8) have no target: a different count on each half of the batch
            return ViewBatch(views, np.asarray(idx), targets=goal[idx], target_mask=idx % 8 > 2)
        if not known_positives:
            return views, np.asarray(idx)
        # a per-view mask that links items across the two processes' halves of the batch
        known = np.stack([(idx[:, None] + idx[None, :] + v) % 3 == 0 for v in range(K)])
        return views, None, known
    return make_views


def run_case(tok_path: str, out: Path) -> None:
    """Compute everything for this process (rank 0 of 1 when not distributed) and write it to ``out``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from llm_item_embed.io import atomic_save_safetensors, atomic_write_json
    from llm_item_embed.losses import AlignedContrastiveLoss, ContrastiveLoss, TargetAlignmentLoss
    from llm_item_embed.training import ContrastiveTrainer, FitConfig
    from tiny_encoder import TinyEncoder

    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {"world": world, "rank": rank}

    # (a) loss-level: local slice, gather with grads, DDP-style gradient averaging
    enc, lf = TinyEncoder(tok_path), ContrastiveLoss()
    views, groups = _texts()
    b = B // world
    sl = slice(rank * b, (rank + 1) * b)
    texts = [t for v in views for t in v[sl]]
    reps = enc(**enc.tokenize(texts))
    loss = lf(reps.view(K, b, -1), torch.as_tensor(groups[sl]))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}
    grads["log_scale"] = lf.log_scale.grad.detach().clone()
    if world > 1:
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= world
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        mean_loss /= world
    else:
        mean_loss = loss.detach()
    info["loss_mean"] = float(mean_loss)
    tensors.update({f"grad.{n}": g for n, g in grads.items()})

    # (b) the trainer, plain and GradCache
    items = [f"{v0}" for v0 in views[0]] * 2  # 16 items -> 2 steps per epoch
    for tag, mini in (("plain", None), ("gc", 3), ("known", None), ("targets", None), ("targets_gc", 3)):
        enc, lf = TinyEncoder(tok_path), ContrastiveLoss()
        if tag.startswith("targets"):
            torch.manual_seed(2)  # the projection starts the same in every process
            lf = AlignedContrastiveLoss(lf, TargetAlignmentLoss(enc.dim, TARGET_DIM, temperature=0.5),
                                        view_weight=0.5)
        cfg = FitConfig(batch_size=B, max_steps=STEPS, lr=5e-2, warmup_ratio=0.0, show_progress_bar=False,
                        mini_batch_size=mini, seed=11)
        hist = ContrastiveTrainer(enc, lf, cfg, accelerator=acc).train(
            _make_views(items, known_positives=tag == "known", targets=tag.startswith("targets")), len(items))
        info[f"hist.{tag}"] = hist
        for n, p in enc.named_parameters():
            if p.requires_grad:
                tensors[f"{tag}.{n}"] = p.detach().clone()
        for n, p in lf.named_parameters():
            tensors[f"{tag}.loss.{n}"] = p.detach().clone()
        GradientState._reset_state()

    atomic_save_safetensors(out / f"rank{rank}.safetensors", tensors)
    atomic_write_json(out / f"rank{rank}.json", info)
    acc.wait_for_everyone()
    if world == 1:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one(tiny_bert_dir: str, tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState, GradientState
    from llm_item_embed.io import load_safetensors, read_json

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    one = tmp_path / "one"
    one.mkdir()
    run_case(tiny_bert_dir, one)

    two = tmp_path / "two"
    two.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    # torchrun (what `accelerate launch` uses for multi-GPU); `accelerate launch --cpu` would need MPI
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(Path(__file__).resolve()), tiny_bert_dir, str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"workers failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    ref, _ = load_safetensors(one / "rank0.safetensors")
    ref_info = read_json(one / "rank0.json")
    for r in (0, 1):
        got, _ = load_safetensors(two / f"rank{r}.safetensors")
        info = read_json(two / f"rank{r}.json")
        assert info["world"] == 2 and info["rank"] == r
        # (a) loss and averaged gradients
        assert info["loss_mean"] == pytest.approx(ref_info["loss_mean"], abs=1e-6)
        for key in ref:
            if key.startswith("grad."):
                torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7,
                                           msg=lambda m, k=key: f"{k}: {m}")
        # (b) trainer: same loss history and final parameters on every rank
        assert ref_info["hist.known"][0]["loss"] != pytest.approx(ref_info["hist.plain"][0]["loss"], abs=1e-3)
        assert ref_info["hist.targets"][0]["loss"] != pytest.approx(ref_info["hist.plain"][0]["loss"], abs=1e-3)
        assert "targets.loss.alignment.projection.weight" in ref  # the projection is trained and compared
        for tag in ("plain", "gc", "known", "targets", "targets_gc"):
            for h1, h2 in zip(ref_info[f"hist.{tag}"], info[f"hist.{tag}"], strict=True):
                assert h2["loss"] == pytest.approx(h1["loss"], abs=1e-5), (tag, h1, h2)
                assert h2["temperature"] == pytest.approx(h1["temperature"], abs=1e-6)
            for key in ref:
                if key.startswith(tag + "."):
                    torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5,
                                               msg=lambda m, k=key: f"{k}: {m}")


if __name__ == "__main__":  # worker entry point under accelerate launch
    torch.set_num_threads(1)
    run_case(sys.argv[1], Path(sys.argv[2]))
