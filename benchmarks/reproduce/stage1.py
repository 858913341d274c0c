"""Stage 1: the item embeddings of a dataset's items.csv (contrastive LoRA fine-tuning of the item
embedder, or the un-tuned model), cached by their settings and the files' content."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .settings import Stage1, Study, config_hash, file_digest, stage1_key

# Attribute names used in prompts for the columns of the datasets in ../shared/data; any other
# column is used under its own name, so every folder in the uniform layout works unchanged.
ATTRIBUTE_NAMES = {"title": "name", "categories": "category", "brand": "brand", "description": "description",
                   "price": "price", "year": "year", "genres": "genres"}


def item_template(items: pd.DataFrame):
    from llm_item_embed import PromptTemplate

    columns = [c for c in items.columns if c != "item_id"]
    return PromptTemplate(instruction="This item has the following attributes:",
                          fields={c: ATTRIBUTE_NAMES.get(c, c.replace("_", " ")) for c in columns})


def embeddings_path(study: Study, settings: Stage1) -> Path:
    """Where ``stage1_embeddings`` caches the embeddings of these settings (keyed by the settings and
    the content of items.csv, and of interactions.csv when pairs or targets are used)."""
    fingerprint = {"stage1": stage1_key(settings), "items": file_digest(study.dataset / "items.csv")}
    if settings.tuned and (settings.pair_prob > 0 or settings.target is not None):
        fingerprint["interactions"] = file_digest(study.dataset / "interactions.csv")
    return study.workdir / study.name / "embeddings" / f"{config_hash(fingerprint)}.safetensors"


def stage1_embeddings(study: Study, settings: Stage1, items: pd.DataFrame, interactions: pd.DataFrame):
    """Item embeddings of the dataset's items.csv, cached by settings and file content
    (``interactions`` give the positive pairs when ``settings.pair_prob > 0``)."""
    from llm_item_embed import ItemEmbedder, ItemEmbeddings, LoraSettings, cooccurrence_embeddings, sequence_pairs

    path = embeddings_path(study, settings)
    folder, key = path.parent, path.stem
    if path.exists():
        return ItemEmbeddings.load(path)
    embedder = ItemEmbedder(settings.model, template=item_template(items), drop_prob=settings.drop_prob,
                            n_views=settings.n_views, pooling=settings.pooling, lora=LoraSettings(r=8, alpha=16),
                            max_length=settings.max_length, gguf_file=settings.gguf_file,
                            similarity=settings.similarity, bidirectional=settings.bidirectional)
    t0 = time.time()
    if settings.tuned:
        collaborative = {}  # training histories only: leave-one-out's valid/test items are held out
        if settings.pair_prob > 0:
            pairs = sequence_pairs(interactions, holdout_last=2, min_count=settings.pair_min_count,
                                   counts=settings.pair_weighted)
            collaborative = {"positive_pairs": pairs, "pair_prob": settings.pair_prob,
                             "mask_known_positives": settings.mask_known_positives}
        if settings.target == "cooccurrence":
            collaborative = {"targets": cooccurrence_embeddings(interactions, ids=items["item_id"].astype(str),
                                                                dim=settings.target_dim, holdout_last=2),
                             "target_weight": settings.target_weight, "view_weight": settings.view_weight}
        # checkpoints every 50 steps: an interrupted fine-tune resumes from the last one
        embedder.fit(items, id_column="item_id", epochs=settings.epochs, batch_size=settings.batch_size,
                     lr=settings.lr, max_steps=settings.max_steps, seed=settings.seed,
                     output_dir=str(folder / f"{key}-cft"), save_every=50, resume_from="latest", **collaborative)
    fit_s = time.time() - t0
    embeddings = embedder.encode(items, id_column="item_id")
    embeddings.metadata["fit_seconds"] = round(fit_s, 1)
    embeddings.metadata["encode_seconds"] = round(time.time() - t0 - fit_s, 1)
    embeddings.save(path)
    print(f"[stage 1] {study.name} {'CFT' if settings.tuned else 'frozen'} {settings.model or 'MiniLM'} "
          f"r={settings.drop_prob} K={settings.n_views}: fit {fit_s:.0f} s, "
          f"encode {embeddings.metadata['encode_seconds']:.0f} s", flush=True)
    return embeddings
