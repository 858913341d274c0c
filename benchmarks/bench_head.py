"""Cost of the dual-view head against a plain SASRec, on one dataset, in one run.

    python -m benchmarks.bench_head                                  # amazon_beauty, random [N, 384] table
    python -m benchmarks.bench_head --embeddings emb.safetensors     # a real semantic table
    python -m benchmarks.bench_head --max-steps 20 --eval-users 2000 # a smoke run
    python -m benchmarks.bench_head --loss ce --fusion concat --score-temperature 0.1 --view-loss-weight 1
                                     # the cost of per-view losses: a third model, the same dual head with them

Every model: ``SASRecEncoder(d, n_layers=2, n_heads, max_len)`` with the same d and max_len; the
plain one is ``DualViewHead(use_semantic=False, collab_init="random")`` (one ID table), the dual
one is the full head (adapter, PCA-initialised table, shared encoder, and by default
cross-attention both ways).

``--loss`` and ``--score-temperature`` apply to every model, ``--fusion`` to the dual ones;
with ``--view-loss-weight w > 0`` a third model, "dual+vloss", is the dual head trained with per-view
losses of weight w, and its ratio to "dual" is the cost of those losses.

Measured:
- training time per epoch (``--loss``, default BPR with one negative per position; Adam; batches
  built once up front so that only model work is timed; epochs of the models alternate to share
  machine noise);
- full-ranking throughput in users/s on the test inputs: ``user_state`` + ``full_scores`` +
  top-10, under ``torch.no_grad`` in eval mode.
Goals (issue 3): training-time ratio dual/plain <= 1.6; throughput ratio dual/plain >= 0.8.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cfsr_head import DualViewHead, SASRecEncoder, align_semantic, default_data_dir, leave_one_out, load_dataset
from cfsr_head.train import trim_leading_padding


def build(kind: str, semantic: np.ndarray | None, num_items: int, args: argparse.Namespace) -> DualViewHead:
    torch.manual_seed(args.seed)
    enc = SASRecEncoder(d=args.d, n_layers=args.layers, n_heads=args.heads, max_len=args.max_len,
                        dropout=args.dropout)
    common = dict(d=args.d, dropout=args.dropout, seed=args.seed, loss=args.loss,
                  score_temperature=args.score_temperature)
    if kind == "plain":
        return DualViewHead(enc, None, num_items=num_items, use_semantic=False, collab_init="random", **common)
    return DualViewHead(enc, semantic, n_cross_heads=args.heads, fusion=args.fusion,
                        view_loss_weight=args.view_loss_weight if kind == "dual+vloss" else 0.0, **common)


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read afterwards counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model: DualViewHead, opt: torch.optim.Optimizer, batches: list) -> float:
    model.train()
    t0 = time.perf_counter()
    for seq, pos, neg in batches:
        opt.zero_grad(set_to_none=True)
        model.loss(seq, pos, None if model.config.loss == "ce" else neg).backward()
        opt.step()
    sync_device(seq.device)
    return time.perf_counter() - t0


@torch.no_grad()
def throughput(model: DualViewHead, inputs: torch.Tensor, batch: int) -> float:
    model.eval()
    model.full_scores(model.user_state(inputs[:batch])).topk(10, dim=1)  # warm-up (and table cache)
    sync_device(inputs.device)
    t0 = time.perf_counter()
    for b in range(0, len(inputs), batch):
        model.full_scores(model.user_state(inputs[b:b + batch])).topk(10, dim=1)
    sync_device(inputs.device)
    return len(inputs) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="dataset folder (default: <data dir>/amazon_beauty)")
    p.add_argument("--embeddings", default=None, help="item-embeddings safetensors (default: random [N, 384])")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--loss", choices=["bpr", "ce"], default="bpr", help="training loss of every model")
    p.add_argument("--fusion", choices=["cross", "concat"], default="cross", help="fusion of the dual heads")
    p.add_argument("--score-temperature", type=float, default=None, help="cosine scoring / tau (default: dot)")
    p.add_argument("--view-loss-weight", type=float, default=0.0,
                   help="> 0: also time the dual head with per-view losses of this weight")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--length-buckets", type=int, default=0,
                   help="k > 0: length-bucketed batches with all-padding columns dropped, as the Trainer trains")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per model (alternating)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on batches per epoch (smoke runs)")
    p.add_argument("--eval-users", type=int, default=None, help="cap on users for the throughput test")
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(args.data) if args.data else default_data_dir() / "amazon_beauty"
    split = leave_one_out(load_dataset(folder), max_len=args.max_len)
    N = split.num_items
    if args.embeddings:
        from cfsr_head.cli import read_embeddings

        semantic = align_semantic(read_embeddings(args.embeddings), split.item_index)
    else:
        semantic = np.random.default_rng(args.seed).standard_normal((N, 384)).astype(np.float32)
    dev = torch.device(args.device)

    batches = []
    for i, (seq, pos, neg) in enumerate(split.train_batches(args.batch_size, args.max_len, rng=args.seed,
                                                             length_buckets=args.length_buckets)):
        if args.max_steps is not None and i >= args.max_steps:
            break
        if args.length_buckets:  # as the Trainer trains (TrainConfig.trim_padding)
            seq, pos, neg = trim_leading_padding(seq, pos, neg)
        batches.append((seq.to(dev), pos.to(dev), neg.to(dev)))
    inputs, _, _ = split.eval_inputs("test", args.max_len)
    if args.eval_users is not None:
        inputs = inputs[: args.eval_users]
    inputs = inputs.to(dev)

    models = {"plain": build("plain", None, N, args).to(dev)}
    t_build = time.perf_counter()
    models["dual"] = build("dual", semantic, N, args).to(dev)
    build_dual_s = time.perf_counter() - t_build
    if args.view_loss_weight > 0:
        models["dual+vloss"] = build("dual+vloss", semantic, N, args).to(dev)
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    for k, m in models.items():  # warm-up steps, not timed
        train_epoch(m, opts[k], batches[:2])

    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.epochs):
        for k, m in models.items():
            times[k].append(train_epoch(m, opts[k], batches))
    # per-view losses change training only: "dual+vloss" scores exactly as "dual"
    thr = {k: throughput(models[k], inputs, args.eval_batch) for k in ("plain", "dual")}
    epoch = {k: float(np.median(v)) for k, v in times.items()}
    ratio_t = epoch["dual"] / epoch["plain"]
    ratio_s = thr["dual"] / thr["plain"]

    print(f"dataset {folder.name}: {split.num_users} users, {N} items; d={args.d}, max_len={args.max_len}, "
          f"batch {args.batch_size}, {len(batches)} batches/epoch, semantic width {semantic.shape[1]}, "
          f"threads {torch.get_num_threads()}, device {dev}; loss {args.loss}, fusion {args.fusion}, "
          f"score temperature {args.score_temperature}")
    print(f"dual head build (incl. PCA init): {build_dual_s:.2f} s")
    print(f"{'model':<12}{'s/epoch (median)':>18}{'users/s':>12}")
    for k in models:
        print(f"{k:<12}{epoch[k]:>18.2f}{thr[k] if k in thr else float('nan'):>12.0f}")
    print(f"train time ratio dual/plain: {ratio_t:.2f} (goal <= 1.6: {'met' if ratio_t <= 1.6 else 'NOT met'})")
    print(f"throughput ratio dual/plain: {ratio_s:.2f} (goal >= 0.8: {'met' if ratio_s >= 0.8 else 'NOT met'})")
    if "dual+vloss" in models:
        print(f"train time ratio dual+vloss/dual (cost of the per-view losses): "
              f"{epoch['dual+vloss'] / epoch['dual']:.2f}")
    if args.json:
        from cfsr_head.io import atomic_write_json

        atomic_write_json(args.json, {"epoch_s": epoch, "epoch_s_all": times, "users_per_s": thr,
                                      "train_ratio": ratio_t, "throughput_ratio": ratio_s, "args": vars(args),
                                      "batches_per_epoch": len(batches), "eval_users": len(inputs)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
