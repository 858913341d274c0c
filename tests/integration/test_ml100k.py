"""ml-100k end to end: frozen MiniLM item embeddings (title, year, genres) -> DualViewHead trained
with full-softmax CE and early stopping -> full-ranking test metrics beside a plain SASRec trained
the same way, popularity and random. Asserts only the robust facts (the head beats popularity
and random); prints every number. About 2 minutes on a 2-core CPU (most of it MiniLM encoding
and the head's epochs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cfsr_head import (DualViewHead, PopularityModel, RandomModel, SASRecEncoder, TrainConfig, Trainer,
                       align_semantic, evaluate, leave_one_out, load_dataset)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

D, MAX_LEN, EPOCHS = 64, 50, 10


class _Table:
    def __init__(self, ids, matrix):
        self.ids, self.matrix = ids, matrix


def _minilm_embeddings(items, minilm_path: str) -> _Table:
    from sentence_transformers import SentenceTransformer

    texts = []
    for row in items.itertuples(index=False):
        year = f" ({row.year})" if isinstance(row.year, str) and row.year else ""
        texts.append(f"{row.title}{year}; genres: {row.genres}")
    model = SentenceTransformer(minilm_path, device="cpu")
    matrix = model.encode(texts, batch_size=128, convert_to_numpy=True, show_progress_bar=False)
    return _Table(items["item_id"].astype(str).tolist(), np.asarray(matrix, dtype=np.float32))


def _train(model, split, seed: int = 0):
    config = TrainConfig(epochs=EPOCHS, batch_size=64, lr=3e-3, loss="ce", max_len=MAX_LEN, patience=3,
                         seed=seed, show_progress_bar=False)
    trainer = Trainer(model, split, config)
    result = trainer.fit()
    return result, trainer.test(protocol="full").summary()["Overall"]


def test_head_beats_popularity_and_random_on_ml100k(data_dir, minilm_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster for d=64 models on a shared 2-core machine
    try:
        data = load_dataset(data_dir / "ml-100k")
        split = leave_one_out(data, max_len=MAX_LEN)
        assert (split.num_users, split.num_items) == (943, 1682)
        semantic = align_semantic(_minilm_embeddings(data.items, minilm_path), split.item_index)
        assert semantic.shape == (1682, 384) and np.isfinite(semantic).all()

        pop = evaluate(PopularityModel(split), split, split="test").summary()["Overall"]
        rnd = evaluate(RandomModel(split.num_items, seed=0), split, split="test").summary()["Overall"]

        torch.manual_seed(0)
        head = DualViewHead(SASRecEncoder(d=D, n_layers=2, n_heads=2, max_len=MAX_LEN, dropout=0.2),
                            semantic=semantic, d=D, dropout=0.2, seed=0)
        head_res, head_test = _train(head, split)

        torch.manual_seed(0)
        sasrec = DualViewHead(SASRecEncoder(d=D, n_layers=2, n_heads=2, max_len=MAX_LEN, dropout=0.2),
                              semantic=None, num_items=split.num_items, use_semantic=False,
                              collab_init="random", d=D, dropout=0.2, seed=0)
        sas_res, sas_test = _train(sasrec, split)
    finally:
        torch.set_num_threads(threads)

    print("\nml-100k, full ranking, test (943 users), CE loss, "
          f"{EPOCHS} epochs max, early stopping on valid NDCG@10:")
    print(f"{'model':<24}{'NDCG@10':>9}{'HR@10':>9}{'best epoch':>12}{'s/epoch':>9}")
    for name, test, res in (("DualViewHead (MiniLM)", head_test, head_res), ("SASRec (ID only)", sas_test, sas_res),
                            ("popularity", pop, None), ("random", rnd, None)):
        extra = (f"{res.best_epoch:>12}{np.mean([h['epoch_time'] for h in res.history]):>9.1f}"
                 if res is not None else "")
        print(f"{name:<24}{test['NDCG@10']:>9.4f}{test['HR@10']:>9.4f}{extra}")

    losses = [h["train_loss"] for h in head_res.history]
    assert losses[-1] < losses[0]
    assert head_test["NDCG@10"] > pop["NDCG@10"]
    assert head_test["NDCG@10"] > 3 * rnd["NDCG@10"]
    assert sas_test["NDCG@10"] > 3 * rnd["NDCG@10"]
