"""Fine-tuning throughput and peak memory: our ContrastiveTrainer vs sentence-transformers' own
contrastive training (MultipleNegativesRankingLoss), plus GradCache's overhead.

Same bundled MiniLM, same LoRA (r, alpha, dropout and target modules; applied to the ST model's
underlying transformer with ``peft.get_peft_model``), same batch size, max length, lr, clipping and
the *same texts*: pairs of two attribute-dropped views of the prompts of
``<data>/amazon_scientific/items.csv`` (``CFSR_DATA_DIR``, default ``../shared/data``).

The sentence-transformers side runs ``SentenceTransformer.old_fit`` (its classic fit loop: its
collate, MultipleNegativesRankingLoss, AdamW, warm-up schedule, clipping); the Trainer-based
``fit`` needs the ``datasets`` package, which is not installed here. Each measurement runs in its
own child process so peak memory (max RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is
per method; each times ``--steps`` optimizer steps after ``--warmup`` untimed steps.

    python benchmarks/bench_fit.py --batch-size 32 --steps 10            # full comparison
    python benchmarks/bench_fit.py --batch-size 8 --steps 2 --warmup 1 --items 64   # smoke run
    python benchmarks/bench_fit.py --batch-size 32 --steps 10 --repeats 4 --skip-gradcache  # order alternated
    python benchmarks/bench_fit.py --batch-size 32 --steps 8 --model-level   # the models alone, no loops
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cfsr_head.data import default_data_dir


def make_pairs(n_items: int, drop_prob: float, seed: int) -> list[tuple[str, str]]:
    """Two dropped views of each item's prompt (amazon_scientific), fixed by ``seed``."""
    import pandas as pd

    from llm_item_embed.prompts import PromptTemplate

    path = default_data_dir() / "amazon_scientific" / "items.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found; set CFSR_DATA_DIR to the datasets folder")
    df = pd.read_csv(path).head(n_items)
    tmpl = PromptTemplate(instruction="This scientific product has the following attributes:",
                          fields={"title": "name", "brand": "brand", "categories": "category",
                                  "description": "description"})
    rows = df.to_dict("records")
    v1, v2 = tmpl.render_views(rows, n_views=2, drop_prob=drop_prob, rng=np.random.default_rng(seed))
    return list(zip(v1, v2))


def _peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _lora(args: argparse.Namespace):
    from llm_item_embed.backbone import LoraSettings

    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)


def _our_encoder_and_loss(args: argparse.Namespace):
    """Our LoRA text encoder and the contrastive loss that matches MNRL (cosine, scale 20)."""
    from llm_item_embed.backbone import BackboneSettings, default_model_path, load_text_encoder
    from llm_item_embed.losses import ContrastiveLoss

    enc = load_text_encoder(BackboneSettings(model_name_or_path=args.model or default_model_path(),
                                             max_length=args.max_length), _lora(args))
    return enc, ContrastiveLoss(similarity="cosine", temperature=0.05)  # = MNRL's scale 20


# --------------------------------------------------------------------------------------------- phases
def run_ours(args: argparse.Namespace, mini_batch_size: int | None) -> dict:
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from llm_item_embed.training import ContrastiveTrainer, FitConfig

    pairs = make_pairs(args.items, args.drop_prob, args.seed)
    enc, loss = _our_encoder_and_loss(args)
    n_trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)

    def make_views(idx: np.ndarray, rng: np.random.Generator):
        return [[pairs[i][0] for i in idx], [pairs[i][1] for i in idx]], None

    def fit(steps: int) -> float:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = FitConfig(batch_size=args.batch_size, max_steps=steps, lr=args.lr, warmup_ratio=0.1,
                        mini_batch_size=mini_batch_size, mixed_precision=args.mixed_precision,
                        show_progress_bar=False, seed=args.seed)
        t0 = time.perf_counter()
        ContrastiveTrainer(enc, loss, cfg).train(make_views, len(pairs))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if args.warmup:
        fit(args.warmup)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    secs = fit(args.steps)
    return {"seconds": secs, "pairs_per_s": args.steps * args.batch_size / secs,
            "step_s": secs / args.steps, "peak_mb": _peak_memory_mb(device), "trainable": n_trainable}


def _st_model(args: argparse.Namespace, device: str):
    """The bundled MiniLM as a SentenceTransformer, with the same LoRA as ours."""
    import peft
    from sentence_transformers import SentenceTransformer

    from llm_item_embed.backbone import default_model_path, resolve_lora_targets

    model = SentenceTransformer(args.model or default_model_path(), device=device)
    model.max_seq_length = args.max_length
    transformer = model[0]
    targets, exclude = resolve_lora_targets(transformer.auto_model, "auto")  # the very same modules as ours
    cfg = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=targets, exclude_modules=exclude or None, bias="none")
    transformer.model = peft.get_peft_model(transformer.auto_model, cfg)  # ST's add_adapter needs peft>=0.22
    return model


def run_model_level(args: argparse.Namespace) -> dict:
    """Forward + backward of the two models alone, on the same batches, alternating in one process.

    No optimizer, scheduler, data loader or training loop: if the two are level here, a gap in the
    full comparison comes from the loops around the models, not from the models.
    """
    import torch
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import batch_to_device

    torch.manual_seed(args.seed)
    pairs = make_pairs(args.items, args.drop_prob, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc, ours_loss = _our_encoder_and_loss(args)
    enc.to(device)
    st = _st_model(args, device)
    enc.train()
    st.train()
    mnrl = MultipleNegativesRankingLoss(st)
    b = args.batch_size

    def step(which: str, i: int) -> float:
        chunk = pairs[(i * b) % len(pairs):][:b]
        first, second = [x for x, _ in chunk], [y for _, y in chunk]
        t0 = time.perf_counter()
        if which == "ours":
            loss = ours_loss(enc.encode_batch(first + second).reshape(2, len(chunk), -1), None)
        elif which == "ours_two_passes":  # our model fed as sentence-transformers feeds its own
            loss = ours_loss(torch.stack([enc.encode_batch(first), enc.encode_batch(second)]), None)
        else:
            feats = [batch_to_device(st.preprocess(t), device) for t in (first, second)]
            loss = mnrl(feats, None)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        (st if which == "st" else enc).zero_grad(set_to_none=True)
        return secs

    names = ("ours", "ours_two_passes", "st")
    for i in range(args.warmup):
        for which in names:
            step(which, i)
    times: dict[str, list[float]] = {which: [] for which in names}
    for i in range(args.steps):
        for which in (names if i % 2 == 0 else names[::-1]):
            times[which].append(step(which, args.warmup + i))
    return {k: {"median_s": float(np.median(v)), "min_s": float(min(v)), "max_s": float(max(v)), "steps": len(v)}
            for k, v in times.items()}


def run_st(args: argparse.Namespace) -> dict:
    import torch
    from sentence_transformers import InputExample
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from torch.utils.data import DataLoader

    torch.manual_seed(args.seed)
    pairs = make_pairs(args.items, args.drop_prob, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _st_model(args, device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loss = MultipleNegativesRankingLoss(model)
    examples = [InputExample(texts=[a, b]) for a, b in pairs]

    def fit(steps: int) -> float:
        loader = DataLoader(examples, batch_size=args.batch_size, shuffle=True, drop_last=True)
        t0 = time.perf_counter()
        model.old_fit(train_objectives=[(loader, loss)], epochs=1, steps_per_epoch=steps,
                      warmup_steps=max(1, steps // 10), optimizer_params={"lr": args.lr}, weight_decay=0.0,
                      max_grad_norm=1.0, use_amp=args.mixed_precision != "no", show_progress_bar=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if args.warmup:
        fit(args.warmup)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    secs = fit(args.steps)
    return {"seconds": secs, "pairs_per_s": args.steps * args.batch_size / secs,
            "step_s": secs / args.steps, "peak_mb": _peak_memory_mb(device), "trainable": n_trainable}


# --------------------------------------------------------------------------------------------- driver
def _child(args: argparse.Namespace, phase: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase]
    for key in ("batch_size", "steps", "warmup", "items", "max_length", "lr", "mini_batch_size", "lora_r",
                "lora_alpha", "lora_dropout", "drop_prob", "seed", "mixed_precision", "model"):
        val = getattr(args, key)
        if val is not None:
            cmd += [f"--{key.replace('_', '-')}", str(val)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["pairs_per_s"])[(len(runs) - 1) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--items", type=int, default=1024)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--mini-batch-size", type=int, default=None,
                   help="GradCache chunk (texts); default: a quarter of the 2*batch texts")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--drop-prob", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--model", default=None, help="default: the bundled MiniLM")
    p.add_argument("--phase", default=None, choices=["ours", "st", "gradcache"], help=argparse.SUPPRESS)
    p.add_argument("--skip-gradcache", action="store_true")
    p.add_argument("--model-level", action="store_true",
                   help="time forward+backward of the two models alone (no training loops), in one process")
    p.add_argument("--repeats", type=int, default=1,
                   help="pairs of measurements, the order alternating (ST first on odd repeats); "
                        "the summary reports each method's median run")
    args = p.parse_args(argv)
    if args.mini_batch_size is None:
        args.mini_batch_size = max(1, (2 * args.batch_size) // 4)

    if args.phase == "ours":
        print(json.dumps(run_ours(args, None)))
        return
    if args.phase == "gradcache":
        print(json.dumps(run_ours(args, args.mini_batch_size)))
        return
    if args.phase == "st":
        print(json.dumps(run_st(args)))
        return
    if args.model_level:
        if args.mixed_precision != "no" or args.repeats != 1:
            p.error("--model-level runs in float32, once: drop --mixed-precision and --repeats")
        got = run_model_level(args)
        print(f"model level, forward+backward of {args.batch_size} pairs ({args.steps} steps each, alternating; "
              f"ours one pass of {2 * args.batch_size} texts, sentence-transformers two of {args.batch_size}):")
        for name, label in (("st", "sentence-transformers"), ("ours", "ours"),
                            ("ours_two_passes", f"ours, two passes of {args.batch_size}")):
            r = got[name]
            print(f"  {label:28s} median {r['median_s']:.3f}s  min {r['min_s']:.3f}s  max {r['max_s']:.3f}s")
        print(f"step-time ratio sentence-transformers / ours: {got['st']['median_s'] / got['ours']['median_s']:.2f}x; "
              f"/ ours in two passes: {got['st']['median_s'] / got['ours_two_passes']['median_s']:.2f}x")
        print(json.dumps({"args": vars(args), "model_level": got}))
        return

    print(f"bench_fit: batch {args.batch_size} pairs, {args.steps} timed steps (+{args.warmup} warm-up), "
          f"max_length {args.max_length}, LoRA r={args.lora_r} alpha={args.lora_alpha}, "
          f"mixed_precision={args.mixed_precision}, {args.items} items of amazon_scientific")
    # alternate the order over repeats: on a shared or boosting CPU the second child of a pair
    # can be slower for reasons of its own
    measured = []
    for rep in range(args.repeats):
        order = ("st", "ours") if rep % 2 == 0 else ("ours", "st")
        got = {phase: _child(args, phase) for phase in order}
        measured.append((got["st"], got["ours"]))
        if args.repeats > 1:
            print(f"repeat {rep + 1} ({' then '.join(order)}): ratio "
                  f"{got['ours']['pairs_per_s'] / got['st']['pairs_per_s']:.2f}x")
    st, ours = (_median_run([pr[i] for pr in measured]) for i in (0, 1))
    print(f"sentence-transformers (old_fit + MNRL): {st['pairs_per_s']:8.2f} pairs/s  "
          f"step {st['step_s']:.3f}s  peak {st['peak_mb']:.0f} MB")
    print(f"ours (ContrastiveTrainer):              {ours['pairs_per_s']:8.2f} pairs/s  "
          f"step {ours['step_s']:.3f}s  peak {ours['peak_mb']:.0f} MB")
    if st["trainable"] != ours["trainable"]:
        print(f"WARNING: trainable parameters differ: ST {st['trainable']} vs ours {ours['trainable']}")
    print(f"throughput ratio ours / sentence-transformers: {ours['pairs_per_s'] / st['pairs_per_s']:.2f}x "
          "(goal >= 1.0x)")
    result = {"args": vars(args), "sentence_transformers": st, "ours": ours,
              "repeats": [{"sentence_transformers": a, "ours": b} for a, b in measured]}
    if not args.skip_gradcache:
        gc = _child(args, "gradcache")
        print(f"ours + GradCache (mini_batch_size={args.mini_batch_size} texts): {gc['pairs_per_s']:8.2f} pairs/s  "
              f"step {gc['step_s']:.3f}s  peak {gc['peak_mb']:.0f} MB")
        print(f"GradCache step-time overhead: {gc['step_s'] / ours['step_s']:.2f}x the plain step (goal <= 1.3x)")
        result["gradcache"] = gc
    print(json.dumps(result))


if __name__ == "__main__":
    main()
