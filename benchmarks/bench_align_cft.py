"""Can CFT pull item texts towards collaborative neighbourhoods? CFT with a collaborative target, scored
by the neighbourhood check of ``bench_neighbours``.

A probe beyond the paper, in the spirit of LLMEmb's recommendation-adaptation stage: besides (or instead
of) the paper's masked-view InfoNCE, each masked view's pooled embedding, through a linear projection,
is matched to its item's collaborative vector among the batch's (symmetric InfoNCE, cosine, temperature
``--align-temperature``). The collaborative vectors are ``bench_neighbours.cooccurrence_embeddings`` of
the training histories (last two items per user held out), so the held-out transitions stay unseen.
``--ridge-init`` starts the projection at the ridge readout from the frozen embeddings (otherwise the
alignment term spends its first steps on the projection alone).

The loop is the plain one (AdamW, linear warm-up and decay, clipping, one process, no checkpoints: a
few hundred steps); the embeddings it writes are cached under ``runs/align_cft/`` by their settings, and
the run ends with ``bench_neighbours``' held-out scores by next-item group against the frozen model::

    python -m benchmarks.bench_align_cft --dataset amazon_beauty --steps 200 --cft-weight 1 --align-weight 1
    python -m benchmarks.bench_align_cft --dataset amazon_beauty --steps 200 --cft-weight 0 --align-weight 1 --ridge-init
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import reproduce as rp
from benchmarks.bench_neighbours import (cooccurrence_embeddings, fit_linear_map, held_out_transitions, linear_map,
                                         neighbour_scores, tail_items, training_histories)
from cfsr_head import load_dataset
from llm_item_embed import ItemEmbedder, ItemEmbeddings, LoraSettings
from llm_item_embed.backbone import seed_untrained_lora
from llm_item_embed.losses import ContrastiveLoss


def _embedder(items, model: str | None = None, max_length: int = 64) -> ItemEmbedder:
    """The study's stage-1 embedder (LoRA r=8 / alpha=16; ``model`` None: bundled MiniLM; max_length 64
    as the quick study's, whose cached frozen embeddings ``--frozen`` may then name)."""
    return ItemEmbedder(model, template=rp.item_template(items), lora=LoraSettings(r=8, alpha=16),
                        max_length=max_length)


def frozen_embeddings(items, out_dir: Path, path: str | None = None, model: str | None = None,
                      max_length: int = 64) -> ItemEmbeddings:
    """The un-tuned model's embeddings: ``path`` when given (e.g. the study's cached file; its
    ``max_length`` must be this one), else encoded once and cached in ``out_dir``."""
    if path is not None:
        emb = ItemEmbeddings.load(path)
        used = emb.metadata.get("backbone", {}).get("max_length")
        if used is not None and int(used) != max_length:
            raise ValueError(f"{path} was encoded with max_length={used}, this run uses {max_length}")
        return emb
    cached = out_dir / f"frozen-{max_length}.safetensors"
    if not cached.exists():
        _embedder(items, model, max_length).encode(items, id_column="item_id").save(cached)
    return ItemEmbeddings.load(cached)


def align_cft(items, target: ItemEmbeddings, frozen: ItemEmbeddings | None, *, steps: int, batch_size: int,
              lr: float, cft_weight: float, align_weight: float, align_temperature: float, drop_prob: float,
              seed: int, model: str | None = None, max_length: int = 64) -> tuple[ItemEmbeddings, list[dict]]:
    """Fine-tune a fresh embedder on ``cft_weight`` x paper InfoNCE + ``align_weight`` x alignment to
    ``target``; returns the encoded items and the loss history. ``frozen``: start the projection at the
    ridge readout of ``target`` from these embeddings."""
    embedder = _embedder(items, model, max_length)
    template = embedder.template
    columns = [c for c, _ in template.columns()]
    atoms = [template.atoms(r) for r in items[columns].to_dict("records")]
    ids = items["item_id"].astype(str).tolist()
    goal = torch.from_numpy(target.numpy()[np.asarray(target.index_of(ids))].astype(np.float32))
    has_goal = np.flatnonzero(goal.norm(dim=1).numpy() > 0)  # items seen in training histories

    torch.manual_seed(seed)
    encoder = embedder.encoder
    seed_untrained_lora(encoder.model, seed)
    encoder.train()
    projection = torch.nn.Linear(encoder.dim, goal.shape[1])
    if frozen is not None:
        readout = fit_linear_map(frozen, target)
        with torch.no_grad():
            projection.weight.copy_(torch.from_numpy(readout.coef_).float())
            projection.bias.copy_(torch.from_numpy(readout.intercept_).float())
    infonce = ContrastiveLoss("dot")
    lora = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": lr}, {"params": projection.parameters(), "lr": 5 * lr},
                                   {"params": infonce.parameters(), "lr": lr, "weight_decay": 0.0}])
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup)))
    rng = np.random.default_rng(seed)
    labels = torch.arange(batch_size)
    history = []
    for step in range(steps):
        batch = rng.choice(has_goal, batch_size, replace=False)
        views = torch.stack([encoder(**encoder.tokenize([template.join(template.drop(atoms[i], drop_prob, rng))
                                                         for i in batch])) for _ in range(2)])
        paper = infonce(views) if cft_weight > 0 else views.new_zeros(())
        aligned = goal[batch]
        align = views.new_zeros(())
        for view in views:  # each view against the batch's collaborative vectors, both directions
            logits = F.normalize(projection(view), dim=-1) @ aligned.T / align_temperature
            align = align + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 4
        loss = cft_weight * paper + align_weight * align
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*lora, *projection.parameters()], 1.0)
        optimizer.step()
        scheduler.step()
        infonce.clamp_()
        history.append({"step": step + 1, "paper": float(paper.detach()), "align": float(align.detach())})
        if (step + 1) % 20 == 0 or step + 1 == steps:
            print(f"  step {step + 1}/{steps}: paper InfoNCE {history[-1]['paper']:.3f}  "
                  f"alignment {history[-1]['align']:.3f} (chance {np.log(batch_size):.3f})", flush=True)
    embeddings = embedder.encode(items, id_column="item_id")
    return embeddings, history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset folder, or a name under CFSR_DATA_DIR")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--cft-weight", type=float, default=1.0, help="weight of the paper's masked-view InfoNCE")
    p.add_argument("--align-weight", type=float, default=1.0, help="weight of the alignment to the collaborative target")
    p.add_argument("--align-temperature", type=float, default=0.05)
    p.add_argument("--drop-prob", type=float, default=0.2)
    p.add_argument("--ridge-init", action="store_true", help="start the projection at the frozen model's ridge readout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=64, help="token limit per prompt (the quick study's: 64)")
    p.add_argument("--queries", type=int, default=30000, help="held-out transitions sampled for next@10")
    p.add_argument("--frozen", default=None, help="the un-tuned model's embeddings of the same items (default: "
                   "encoded once and cached under runs/align_cft/<dataset>/)")
    a = p.parse_args(argv)
    name = Path(a.dataset).name
    out_dir = rp.REPO_ROOT / "runs" / "align_cft" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    items = load_dataset(a.dataset).items
    frozen = frozen_embeddings(items, out_dir, a.frozen, max_length=a.max_length)
    users, histories = training_histories(a.dataset)
    target = cooccurrence_embeddings(users, histories, list(frozen.ids))
    settings = {k: v for k, v in vars(a).items() if k not in ("dataset", "queries", "frozen")}
    path = out_dir / f"{rp.config_hash(settings)}.safetensors"
    if not path.exists():
        t0 = time.time()
        tuned, history = align_cft(items, target, frozen if a.ridge_init else None, steps=a.steps,
                                   batch_size=a.batch_size, lr=a.lr, cft_weight=a.cft_weight,
                                   align_weight=a.align_weight, align_temperature=a.align_temperature,
                                   drop_prob=a.drop_prob, seed=a.seed, max_length=a.max_length)
        tuned.metadata["training"] = {"align_cft": settings, "steps": a.steps, "history": history[-1:],
                                      "seconds": round(time.time() - t0)}
        tuned.save(path)
    tuned = ItemEmbeddings.load(path)
    prev, nxt = held_out_transitions(a.dataset)
    tail = tail_items(a.dataset)
    print(f"{name}: {len(prev)} held-out transitions; settings {settings}; last losses "
          f"{tuned.metadata['training'].get('history')}")
    rows = [("frozen MiniLM", frozen), ("collaborative target", target),
            ("linear map of frozen onto the target", linear_map(frozen, target)), ("CFT with the target", tuned)]
    base = None
    for label, emb in rows:
        s = neighbour_scores(emb, prev, nxt, k=10, n_queries=a.queries, tail=tail)
        base = base or s
        keys = ("next@10", "next@10 tail", "next@10 head", "AUC")
        print(f"  {label:<38} " + "  ".join(f"{k} {s[k]:.4f} ({s[k] / base[k]:.2f}x)" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
