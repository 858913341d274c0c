"""The main job, end to end, in a few minutes on a laptop CPU.

1. Stage 1 (CFT): contrastive LoRA fine-tuning of the bundled all-MiniLM-L6-v2 on a dataset's item
   table (masked-prompt views), then encoding every item's full prompt once.
2. Stage 2: a plain SASRec and the DualViewHead in two forms, the paper's (cross-attention between
   the views) and the views fused only in the concatenated scores (same encoder, same loss, same
   budget), each trained at every learning rate of --lrs with early stopping on validation
   NDCG@10; the rate that validates best is kept (the same tuning for every model, never chosen
   on test), then evaluated on the test split with full ranking.
3. Each model again with the semantic-neighbour prior (beyond the paper: the cosine between an item's
   embedding and the user's last items' added to its scores, weight chosen on validation).
4. The last model's top 5 next items for one user, from the whole history (``recommend``).

    python examples/quickstart.py [--dataset ml-100k] [--workdir runs/quickstart]

Embeddings and the fine-tuned embedder are cached in --workdir, so a second run skips stage 1.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from cfsr_head import (
    DualViewHead,
    PopularityModel,
    SASRecEncoder,
    TrainConfig,
    Trainer,
    align_semantic,
    choose_adjustment,
    default_data_dir,
    evaluate,
    grid_search,
    leave_one_out,
    load_dataset,
    recommend,
)
from cfsr_head.io import atomic_write_json
from llm_item_embed import ItemEmbedder, ItemEmbeddings, LoraSettings, PromptTemplate


def stage1(items: pd.DataFrame, workdir: Path, steps: int, seed: int) -> ItemEmbeddings:
    cached = workdir / "item_embeddings.safetensors"
    if cached.exists():
        print(f"[stage 1] using cached embeddings {cached}")
        return ItemEmbeddings.load(cached)
    text_columns = [c for c in items.columns if c != "item_id"]
    template = PromptTemplate(instruction="This item has the following attributes:",
                              fields={c: c for c in text_columns})
    embedder = ItemEmbedder(template=template, drop_prob=0.2, n_views=2,
                            lora=LoraSettings(r=8, alpha=16), max_length=64)
    t0 = time.time()
    embedder.fit(items, id_column="item_id", epochs=1, batch_size=32, lr=2e-4, max_steps=steps,
                 seed=seed, output_dir=str(workdir / "cft"))
    print(f"[stage 1] contrastive fine-tuning: {time.time() - t0:.0f} s")
    embedder.save_pretrained(workdir / "embedder")
    t0 = time.time()
    embeddings = embedder.encode(items, id_column="item_id")
    print(f"[stage 1] encoded {len(embeddings)} items in {time.time() - t0:.0f} s")
    embeddings.save(cached)
    return embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k", help="dataset folder or name under CFSR_DATA_DIR")
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--cft-steps", type=int, default=40, help="contrastive steps (batch 32)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 1e-2], metavar="LR",
                        help="Adam learning rates tried for every model; the one that validates best is kept")
    parser.add_argument("--prior-tail-exponents", nargs="+", type=float, default=[0.0], metavar="GAMMA",
                        help="also choose the prior's tail exponent from these (item i's weight times "
                             "(1 + training count_i) ** -GAMMA); default 0 only: every item alike")
    args = parser.parse_args()

    folder = Path(args.dataset)
    if not folder.is_dir():
        folder = default_data_dir() / args.dataset
    workdir = Path(args.workdir) / folder.name
    workdir.mkdir(parents=True, exist_ok=True)

    data = load_dataset(folder)
    embeddings = stage1(data.items, workdir, args.cft_steps, args.seed)
    split = leave_one_out(data)
    semantic = align_semantic(embeddings, split.item_index)

    results = {"Popularity": evaluate(PopularityModel.from_split(split), split, split="test")}
    # ID-only SASRec; the paper's head (cross-attention between the views); the same head with the
    # views fused only in the concatenated scores ("w/o Cro", the stronger form in docs/results);
    # each with its checkpoint folder under the workdir
    heads = {"SASRec": ("sasrec", dict(num_items=split.num_items, use_semantic=False, collab_init="random")),
             "LLM-CFSR": ("llm_cfsr", dict(semantic=semantic)),
             "LLM-CFSR w/o Cro": ("llm_cfsr_concat", dict(semantic=semantic, fusion="concat"))}
    for name, (folder_name, head) in heads.items():
        def make_trainer(point: dict) -> Trainer:  # called within this iteration
            torch.manual_seed(args.seed)  # the initial weights; Trainer seeds everything after them
            encoder = SASRecEncoder(d=64, n_layers=2, n_heads=4, max_len=50, dropout=0.2)
            config = TrainConfig(loss="ce", lr=point["lr"], epochs=args.epochs, patience=5, max_len=50,
                                 seed=args.seed, output_dir=str(workdir / folder_name / f"lr{point['lr']:g}"))
            return Trainer(DualViewHead(encoder=encoder, d=64, **head), split, config)

        def report(run) -> None:
            print(f"[stage 2] {name}, lr {run.point['lr']:g}: validation NDCG@10 {run.result.best_metric:.4f}, "
                  f"trained in {run.seconds:.0f} s")

        found = grid_search({"lr": args.lrs}, make_trainer, on_run=report)  # keeps the best on validation
        model = found.model
        print(f"[stage 2] {name}: lr {found.best_point['lr']:g} kept (best validation NDCG@10)")
        results[name] = evaluate(model, split, split="test")
        prior, _ = choose_adjustment(model, split, semantic, weights=(0, 0.5, 1, 2, 4, 8), recencies=(0, 0.5),
                                     tail_exponents=args.prior_tail_exponents)
        print(f"[stage 2] {name}: semantic prior weight {prior.weight}, recency {prior.recency}, "
              f"tail exponent {prior.tail_exponent} (chosen on validation)")
        adjusted, adjusted_name = prior.wrap(model, split, semantic), f"{name} + prior"
        results[adjusted_name] = evaluate(adjusted, split, split="test")

    print(f"\nTest, full ranking over {split.num_items} items ({len(split.users)} users)")
    print(f"{'model':<28}{'HR@10':>8}{'NDCG@10':>9}{'tail-item NDCG@10':>19}")
    summary = {}
    for name, result in results.items():
        s = result.summary()
        summary[name] = s
        print(f"{name:<28}{s['Overall']['HR@10']:>8.4f}{s['Overall']['NDCG@10']:>9.4f}"
              f"{s['Tail item']['NDCG@10']:>19.4f}")
    atomic_write_json(workdir / "summary.json", summary)

    # recommend with the last model: the whole history in, raw item ids out, seen items left out
    user = split.users[0]
    history = data.interactions.loc[data.interactions["user_id"] == user, "item_id"].tolist()
    recs = recommend(adjusted, {user: history}, k=5, item_index=split.item_index)
    titles = data.items.set_index("item_id").iloc[:, 0] if data.items is not None else None
    name_of = (lambda i: f"{i} ({titles.get(i, '?')})") if titles is not None else str
    print(f"\n{adjusted_name}, user {user} (last item {name_of(history[-1])}): next 5")
    for rank, item in enumerate(recs.items[0], 1):
        print(f"  {rank}. {name_of(item)}")


if __name__ == "__main__":
    main()
