"""Both stages on one CUDA GPU: do they run (fp32 and bf16), how fast, and do GPU runs reproduce CPU runs?

    CFSR_DATA_DIR=/data python -m benchmarks.bench_gpu --embeddings frozen.safetensors --out gpu.json
    python -m benchmarks.bench_gpu --device cpu --parts stage1 encode decoder --fit-steps 2 \\
        --items 96 --decoder-items 64 --decoder-steps 2 --decoder-hidden 64 --random-weights   # smoke run

Every part runs in its own child process (Accelerate's state is per process, and a crash or a
timeout in one part leaves the others' numbers), on amazon_beauty (``<data dir>/amazon_beauty``):

- ``stage1`` / ``stage1-fp32``: contrastive LoRA fine-tuning (``ItemEmbedder.fit``) over the items
  with the harness's full-mode stage-1 settings (batch 32, max length 128) and bf16 / no mixed precision,
  then ``encode`` of every item; seconds per step and texts/s.
- ``encode``: the un-tuned embedder loaded in float32 and in bfloat16 encodes every item; texts/s
  of each and the cosine between the two encodings of each item (how far bf16 weights move them),
  beside the mean cosine between different items (when that is near 1 too, the agreement says little).
- ``decoder``: a random LLaMA-shaped decoder (``--decoder-hidden``) with bidirectional attention,
  last-token pooling, loaded in bfloat16 and fine-tuned with bf16 mixed precision: finite losses,
  finite and distinct embeddings.
- ``stage2`` / ``stage2-bf16`` / ``stage2-sasrec``: one run of the study's harness settings
  (``--quick``: CE, 20 epochs, patience 3, dropout 0.2, length buckets 16; the harness's own
  ``reproduce.make_trainer``) of ``--variant`` (default
  the study's best dual view, "w/o Cro frozen vloss0.5 cos0.1", on ``--embeddings``, the frozen
  MiniLM table), in fp32 and with bf16 mixed precision, and of "SASRec cos0.1"; per-epoch train and
  validation time, validation N@10 per epoch, test N@10 (full and sampled). The same rows' CPU runs
  are in the study's cache (``runs/reproduce/amazon_beauty/runs``), for the parity check.

``--model`` is the stage-1 model (default the bundled MiniLM); ``--random-weights`` builds a model of
the same configuration with random weights instead (for a machine where the weights cannot be
copied: the timings are the same, the embeddings meaningless).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PARTS = ("stage2", "stage1", "stage1-fp32", "encode", "decoder", "stage2-bf16", "stage2-sasrec")
BEST_ROW = "w/o Cro frozen vloss0.5 cos0.1"
SASREC_ROW = "SASRec cos0.1"


# ----------------------------------------------------------------------------- helpers
def _sync(device: str) -> None:
    import torch

    from benchmarks.bench_head import sync_device

    sync_device(torch.device(device))


def _peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _mean_pair_cosine(m: np.ndarray, limit: int = 2000) -> float:
    """Mean cosine between distinct items (first ``limit`` rows): near 1 means the embeddings hardly
    tell items apart, so agreement between two encodings of them says little."""
    n = m[:limit] / np.linalg.norm(m[:limit], axis=1, keepdims=True)
    sims = n @ n.T
    return round(float(sims[~np.eye(len(n), dtype=bool)].mean()), 4)


def _beauty_items(limit: int | None):
    from cfsr_head import default_data_dir, load_dataset

    data = load_dataset(default_data_dir() / "amazon_beauty")
    items = data.items if limit is None else data.items.iloc[:limit].reset_index(drop=True)
    return items


def _model_path(args: argparse.Namespace, workdir: Path) -> str | None:
    """``--model``, or with ``--random-weights`` a randomly initialised copy of its configuration."""
    if not args.random_weights:
        return args.model
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from llm_item_embed.backbone import default_model_path

    source = args.model or default_model_path()
    out = workdir / "random-model"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


def _embedder(args: argparse.Namespace, model: str | None, items, **kw):
    from benchmarks.reproduce import Stage1, item_template
    from llm_item_embed import ItemEmbedder, LoraSettings

    s1 = Stage1()
    return ItemEmbedder(model, template=item_template(items), drop_prob=s1.drop_prob, n_views=s1.n_views,
                        lora=LoraSettings(r=8, alpha=16), max_length=s1.max_length, device=args.device, **kw)


# ----------------------------------------------------------------------------- parts
def part_stage1(args: argparse.Namespace, workdir: Path, mixed_precision: str) -> dict[str, Any]:
    from benchmarks.reproduce import Stage1

    items = _beauty_items(args.items)
    model = _model_path(args, workdir)
    emb = _embedder(args, model, items)
    t0 = time.perf_counter()
    emb.encoder  # load before timing
    load_s = time.perf_counter() - t0
    s1 = Stage1()
    steps = args.fit_steps if args.fit_steps else None
    t0 = time.perf_counter()
    emb.fit(items, id_column="item_id", epochs=1, batch_size=s1.batch_size, lr=s1.lr, max_steps=steps,
            seed=0, mixed_precision=mixed_precision, show_progress_bar=False)
    _sync(args.device)
    fit_s = time.perf_counter() - t0
    n_steps = int(emb.training_summary.get("steps", 0))
    t0 = time.perf_counter()
    out = emb.encode(items, id_column="item_id", batch_size=128, show_progress_bar=False)
    _sync(args.device)
    enc_s = time.perf_counter() - t0
    m = np.asarray(out.matrix)
    losses = [h["loss"] for h in emb.history]
    return {"mixed_precision": mixed_precision, "model": model or "bundled MiniLM", "items": len(items),
            "load_s": round(load_s, 2), "fit_s": round(fit_s, 2), "steps": n_steps,
            "s_per_step": round(fit_s / max(n_steps, 1), 4), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "losses_finite": bool(np.isfinite(losses).all()),
            "encode_s": round(enc_s, 2), "encode_texts_per_s": round(len(items) / enc_s, 1),
            "embeddings_finite": bool(np.isfinite(m).all()), "peak_gib": _peak_gib(args.device)}


def part_encode(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    items = _beauty_items(args.items)
    model = _model_path(args, workdir)
    res: dict[str, Any] = {"items": len(items)}
    mats = {}
    for dtype in ("float32", "bfloat16"):
        emb = _embedder(args, model, items, torch_dtype=dtype)
        emb.encoder
        emb.encode(items.iloc[:256], id_column="item_id", batch_size=128, show_progress_bar=False)  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        out = emb.encode(items, id_column="item_id", batch_size=128, show_progress_bar=False)
        _sync(args.device)
        secs = time.perf_counter() - t0
        mats[dtype] = np.asarray(out.matrix, dtype=np.float64)
        res[f"{dtype}_texts_per_s"] = round(len(items) / secs, 1)
        del emb
    a, b = mats["float32"], mats["bfloat16"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    res.update(cosine_mean=round(float(cos.mean()), 5), cosine_min=round(float(cos.min()), 5),
               mean_pair_cosine=_mean_pair_cosine(a),
               bf16_speedup=round(res["bfloat16_texts_per_s"] / res["float32_texts_per_s"], 2),
               peak_gib=_peak_gib(args.device))
    return res


def part_decoder(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from llm_item_embed.backbone import default_model_path

    items = _beauty_items(args.decoder_items)
    out = workdir / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(args.model or default_model_path())
    h = args.decoder_hidden
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=4 * h, num_hidden_layers=4,
                      num_attention_heads=max(h // 64, 1), num_key_value_heads=max(h // 128, 1),
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    decoder = LlamaModel(cfg)
    n_params = sum(p.numel() for p in decoder.parameters())
    decoder.save_pretrained(out)
    tok.save_pretrained(out)
    del decoder
    emb = _embedder(args, str(out), items, pooling="last", bidirectional=True, torch_dtype="bfloat16")
    t0 = time.perf_counter()
    emb.fit(items, id_column="item_id", epochs=1, batch_size=32, max_steps=args.decoder_steps, seed=0,
            mixed_precision="bf16" if args.device.startswith("cuda") else "no", show_progress_bar=False)
    _sync(args.device)
    fit_s = time.perf_counter() - t0
    m = np.asarray(emb.encode(items, id_column="item_id", show_progress_bar=False).matrix, dtype=np.float64)
    losses = [x["loss"] for x in emb.history]
    return {"hidden": h, "params_m": round(n_params / 1e6, 1),
            "dtype": str(next(emb.encoder.model.parameters()).dtype), "steps": len(losses),
            "fit_s": round(fit_s, 2), "first_loss": losses[0], "last_loss": losses[-1],
            "losses_finite": bool(np.isfinite(losses).all()), "embeddings_finite": bool(np.isfinite(m).all()),
            "mean_pair_cosine": _mean_pair_cosine(m), "peak_gib": _peak_gib(args.device)}


def part_stage2(args: argparse.Namespace, variant_name: str, mixed_precision: str) -> dict[str, Any]:
    import torch

    from benchmarks import reproduce as rp
    from benchmarks.explore import EXPLORATORY
    from cfsr_head import align_semantic, default_data_dir, evaluate, leave_one_out, load_dataset

    variant = {**rp.VARIANTS, **EXPLORATORY}[variant_name]
    data = load_dataset(default_data_dir() / "amazon_beauty")
    split = leave_one_out(data)
    semantic = None
    if variant.semantic is not None:
        if not args.embeddings:
            raise SystemExit(f"--embeddings is needed for {variant_name!r}")
        from llm_item_embed import ItemEmbeddings

        semantic = align_semantic(ItemEmbeddings.load(args.embeddings), split.item_index)
    # the study's --quick --length-buckets 16 settings (Stage2's defaults: CE, dropout 0.2)
    s2 = dataclasses.replace(rp.Stage2(), epochs=args.epochs, patience=3, length_buckets=16, seed=args.seed)
    torch.manual_seed(s2.seed)
    model = rp.build_model(variant, s2, split, semantic)
    t0 = time.perf_counter()
    result = rp.make_trainer(variant, s2, split, semantic, model, mixed_precision=mixed_precision).fit()
    fit_s = time.perf_counter() - t0
    test = {}
    for protocol in ("full", "sampled"):
        t1 = time.perf_counter()
        summary = evaluate(model, split, split="test", protocol=protocol, seed=s2.seed).summary()
        test[protocol] = {"seconds": round(time.perf_counter() - t1, 2),
                          **{g: summary[g]["NDCG@10"] for g in ("Overall", "Tail item") if g in summary}}
    hist = [{"epoch": h["epoch"], "metric": round(h["metric"], 5), "train_s": round(h["train_time"], 2),
             "valid_s": round(h["eval_time"], 2)} for h in result.history]
    return {"variant": variant_name, "mixed_precision": mixed_precision, "seed": s2.seed, "epochs_run": len(hist),
            "best_epoch": result.best_epoch, "best_valid": round(result.best_metric, 5), "fit_s": round(fit_s, 1),
            "median_train_s": round(float(np.median([h["train_s"] for h in hist])), 2),
            "median_valid_s": round(float(np.median([h["valid_s"] for h in hist])), 2),
            "test_ndcg10": test, "history": hist, "device": str(next(model.parameters()).device),
            "peak_gib": _peak_gib(args.device)}


def run_part(args: argparse.Namespace, part: str, workdir: Path) -> dict[str, Any]:
    if part == "stage1":
        return part_stage1(args, workdir, "bf16" if args.device.startswith("cuda") else "no")
    if part == "stage1-fp32":
        return part_stage1(args, workdir, "no")
    if part == "encode":
        return part_encode(args, workdir)
    if part == "decoder":
        return part_decoder(args, workdir)
    if part == "stage2":
        return part_stage2(args, args.variant, "no")
    if part == "stage2-bf16":
        return part_stage2(args, args.variant, "bf16" if args.device.startswith("cuda") else "no")
    if part == "stage2-sasrec":
        return part_stage2(args, SASREC_ROW, "no")
    raise ValueError(f"unknown part {part!r}")


# ----------------------------------------------------------------------------- driver
def environment() -> dict[str, Any]:
    import accelerate
    import peft
    import torch
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "threads": torch.get_num_threads()}
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="stage-1 model folder (default: the bundled MiniLM)")
    p.add_argument("--random-weights", action="store_true", help="random weights of --model's configuration")
    p.add_argument("--embeddings", default=None, help="semantic table of the stage-2 rows (safetensors)")
    p.add_argument("--variant", default=BEST_ROW, help="the stage-2 dual-view row")
    p.add_argument("--items", type=int, default=None, help="stage 1: first N items only (default: all)")
    p.add_argument("--fit-steps", type=int, default=0, help="stage 1: optimiser steps (0: one epoch)")
    p.add_argument("--decoder-hidden", type=int, default=512)
    p.add_argument("--decoder-steps", type=int, default=20)
    p.add_argument("--decoder-items", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=20, help="stage 2: epochs (the study's quick setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part-timeout", type=float, default=300.0, help="seconds per part")
    p.add_argument("--out", default=None, help="write every part's numbers to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        res = run_part(args, args.child, Path(args.workdir))
        Path(args.child_out).write_text(json.dumps(res))
        return 0

    results: dict[str, Any] = {"environment": environment(), "args": vars(args)}
    print(json.dumps(results["environment"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        passthrough = list(argv if argv is not None else sys.argv[1:])
        for part in args.parts:
            child_out = Path(tmp) / f"{part}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_gpu", *passthrough, "--child", part,
                   "--child-out", str(child_out), "--workdir", tmp]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=args.part_timeout, capture_output=True, text=True)
                ok = proc.returncode == 0 and child_out.exists()
                res = json.loads(child_out.read_text()) if ok else {"error": proc.stderr[-1500:]}
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {args.part_timeout:.0f} s"}
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            results[part] = res
            shown = {k: v for k, v in res.items() if k != "history"}
            print(f"[{part}] {json.dumps(shown)}", flush=True)
            if "history" in res:
                print(f"[{part}] valid N@10 by epoch: " + " ".join(f"{h['metric']:.4f}" for h in res["history"]),
                      flush=True)
            if args.out:
                from cfsr_head.io import atomic_write_json

                atomic_write_json(args.out, results)
    return 0 if all("error" not in results[p] for p in args.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
