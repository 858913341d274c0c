"""ItemEmbedder end to end on tiny random models: fit, encode, shards, save/load, Hub, ST export, bad input."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llm_item_embed import ItemEmbedder, ItemEmbeddings, LoraSettings, PromptTemplate
from llm_item_embed.backbone import ModelNotFoundError, seed_untrained_lora
from llm_item_embed.embedder import CONFIG_NAME

TEMPLATE = PromptTemplate("This beauty product has the following attributes:",
                          {"title": "name", "brand": "brand", "categories": "category", "price": "price"})
FIT = dict(epochs=1, batch_size=4, lr=5e-3, show_progress_bar=False, seed=0)


def catalogue(n: int = 24) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    words = ["red", "blue", "nail", "hair", "serum", "cream", "soap", "lotion", "matte", "gloss", "dry", "oily"]
    return pd.DataFrame({
        "item_id": [f"B{i:04d}" for i in range(n)],
        "title": [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(n)],
        "brand": [["OPI", "Dove", None, "Nivea"][i % 4] for i in range(n)],
        "categories": [["Beauty", ["Hair", "Skin", "Nails"][i % 3]] for i in range(n)],
        "price": [float(rng.integers(100, 3000)) / 100 if i % 5 else np.nan for i in range(n)],
    })


@pytest.fixture(scope="module")
def fitted_bert(tiny_bert_dir):
    emb = ItemEmbedder(tiny_bert_dir, template=TEMPLATE, lora=LoraSettings(r=4, dropout=0.0), max_length=64)
    before = emb.encode(catalogue()).matrix.copy()
    emb.fit(catalogue(), **FIT)
    return emb, before


@pytest.fixture(scope="module")
def fitted_llama(tiny_llama_dir):
    emb = ItemEmbedder(tiny_llama_dir, template=TEMPLATE, lora=LoraSettings(r=4), bidirectional=True,
                       pooling="last", max_length=128, similarity="cos", temperature=0.1)
    emb.fit(catalogue(16), **dict(FIT, batch_size=8))
    return emb


def test_fit_then_encode_bert(fitted_bert):
    emb, before = fitted_bert
    df = catalogue()
    E = emb.encode(df, batch_size=5)
    assert isinstance(E, ItemEmbeddings)
    assert E.ids == df["item_id"].tolist()
    assert E.matrix.dtype == np.float32 and E.matrix.shape == (24, 32)
    assert np.isfinite(E.matrix).all()
    assert not np.allclose(E.matrix, before, atol=1e-4)  # LoRA moved the embeddings
    again = emb.encode()  # the table fit() was given
    assert again.ids == E.ids
    np.testing.assert_allclose(again.matrix, E.matrix, rtol=1e-5, atol=1e-6)
    assert len(emb.history) == 6 and emb.training_summary["steps"] == 6
    assert emb.training_summary["n_items"] == 24
    meta = E.metadata
    assert meta["base_model"] == emb.settings.model_name_or_path and meta["pooling"] == "mean"
    assert meta["template"]["instruction"] == TEMPLATE.instruction and meta["drop_prob"] == 0.2
    assert meta["lora"]["r"] == 4 and meta["dim"] == 32 and meta["library_version"]


def test_fit_then_encode_llama_decoder(fitted_llama):
    E = fitted_llama.encode(catalogue(16))
    assert E.matrix.shape == (16, 32) and np.isfinite(E.matrix).all()
    assert fitted_llama.training_summary["steps"] == 2
    assert fitted_llama.temperature != pytest.approx(0.1, abs=1e-9)  # the temperature was trained


def test_training_uses_identical_prompts_as_one_group(tiny_bert_dir, monkeypatch):
    import llm_item_embed.training as training

    seen = []
    original = training.ContrastiveTrainer.train

    def spy(self, make_views, n_items, **kwargs):
        views, groups = make_views(np.arange(n_items), np.random.default_rng(0))
        seen.append((views, groups))
        return original(self, make_views, n_items, **kwargs)

    monkeypatch.setattr(training.ContrastiveTrainer, "train", spy)
    df = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["same", "same", "other", "x"]})
    ItemEmbedder(tiny_bert_dir, max_length=32, drop_prob=0.5, n_views=3).fit(df, **dict(FIT, max_steps=1))
    views, groups = seen[0]
    assert len(views) == 3 and all(len(v) == 4 for v in views)
    assert groups[0] == groups[1] and len({groups[0], groups[2], groups[3]}) == 3


def test_encode_order_and_batching_invariance(fitted_bert):
    emb, _ = fitted_bert
    df = catalogue()
    E = emb.encode(df, batch_size=64)
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    S = emb.encode(shuffled, batch_size=3)
    assert S.ids == shuffled["item_id"].tolist()
    np.testing.assert_allclose(S.lookup(E.ids), E.matrix, atol=1e-5, rtol=1e-5)
    texts = emb.render(df)
    one_by_one = np.concatenate([emb.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(one_by_one, E.matrix, atol=1e-5, rtol=1e-5)


def test_encode_texts_like_sentence_transformers(fitted_bert):
    emb, _ = fitted_bert
    out = emb.encode_texts(["red nail polish", "a"], batch_size=1, normalize_embeddings=True)
    assert out.shape == (2, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert emb.encode_texts([]).shape == (0, 32)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        emb.encode_texts(["ok", 3])


def test_sharded_encode_equals_in_memory(fitted_llama, tmp_path):
    df = catalogue(16)
    E = fitted_llama.encode(df, batch_size=4)
    S = fitted_llama.encode(df, batch_size=3, shard_dir=tmp_path, shard_size=5)
    assert S.ids == E.ids
    np.testing.assert_allclose(S.matrix, E.matrix, atol=1e-5, rtol=1e-5)
    assert isinstance(S.matrix, np.memmap) or isinstance(S.matrix.base, np.memmap)
    shards = sorted(p.name for p in tmp_path.glob("shard-*.safetensors"))
    assert shards == [f"shard-{i:05d}-of-00004.safetensors" for i in range(4)]
    # a repeated call reuses the finished shards instead of encoding again
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    again = fitted_llama.encode(df, shard_dir=tmp_path, shard_size=5)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")} == stamp
    np.testing.assert_array_equal(np.asarray(again.matrix), np.asarray(S.matrix))
    # the assembled matrix is a valid safetensors file
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(tmp_path / "embeddings.safetensors")["embeddings"], np.asarray(S.matrix))


def test_save_load_round_trip_identical(fitted_bert, tmp_path, umask):
    emb, _ = fitted_bert
    emb.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    # every file readable by others, as a plain open() leaves it (safetensors' writer alone would
    # leave the adapter owner-only)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "m").iterdir()} == \
        {name: oct(0o644) for name in files}
    assert {"adapter_model.safetensors", "adapter_config.json", CONFIG_NAME, "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    back = ItemEmbedder.from_pretrained(tmp_path / "m")
    df = catalogue()
    np.testing.assert_array_equal(back.encode(df).matrix, emb.encode(df).matrix)
    with pytest.raises(ValueError, match="needs the items table: pass df"):
        back.encode()  # loaded, never fitted here: no table to default to
    assert back.template == emb.template and back.lora == emb.lora and back.drop_prob == emb.drop_prob
    assert back.temperature == pytest.approx(emb.temperature)
    cfg = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert cfg["training"]["n_items"] == 24 and cfg["backbone"]["max_length"] == 64


def test_bidirectional_flag_persisted_and_reapplied(fitted_llama, tmp_path):
    fitted_llama.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert cfg["backbone"]["bidirectional"] is True and cfg["backbone"]["pooling"] == "last"
    back = ItemEmbedder.from_pretrained(tmp_path / "m")
    assert back.encoder.config.is_causal is False
    df = catalogue(16)
    np.testing.assert_array_equal(back.encode(df).matrix, fitted_llama.encode(df).matrix)
    # the flag matters: the same weights run causally give other embeddings
    cfg["backbone"]["bidirectional"] = None
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(cfg))
    causal = ItemEmbedder.from_pretrained(tmp_path / "m")
    assert not np.allclose(causal.encode(df).matrix, back.encode(df).matrix, atol=1e-4)


def test_fit_can_continue_after_loading(fitted_bert, tmp_path):
    emb, _ = fitted_bert
    emb.save_pretrained(tmp_path / "m")
    back = ItemEmbedder.from_pretrained(tmp_path / "m")
    before = back.encode(catalogue()).matrix.copy()
    by_sku = catalogue().rename(columns={"item_id": "sku"})
    back.fit(by_sku, id_column="sku", **dict(FIT, max_steps=1))
    after = back.encode()  # the fitted table and its id column
    assert after.ids == by_sku["sku"].tolist()
    assert not np.allclose(after.matrix, before, atol=1e-6)


def test_fit_is_a_function_of_the_seed(tiny_bert_dir, fitted_bert):
    """The same seed gives the same embeddings whatever torch's global generator did before the
    adapter was attached (peft draws it from there); another seed gives other embeddings; a trained
    adapter is never drawn again."""
    df = catalogue(8)

    def fitted(seed: int, global_seed: int) -> np.ndarray:
        torch.manual_seed(global_seed)
        emb = ItemEmbedder(tiny_bert_dir, template=TEMPLATE, lora=LoraSettings(r=4, dropout=0.0), max_length=64)
        emb.encode(df)  # attaches the adapter before fit
        emb.fit(df, **dict(FIT, max_steps=2, seed=seed))
        return emb.encode(df).matrix

    first = fitted(0, global_seed=1)
    np.testing.assert_array_equal(fitted(0, global_seed=2), first)
    assert not np.allclose(fitted(1, global_seed=1), first, atol=1e-4)

    trained, _ = fitted_bert
    weights = {k: v.clone() for k, v in trained.encoder.model.state_dict().items() if "lora_" in k}
    assert weights and not seed_untrained_lora(trained.encoder.model, 0)
    assert all(torch.equal(v, trained.encoder.model.state_dict()[k]) for k, v in weights.items())


def test_full_fine_tuning_without_lora_round_trip(tiny_bert_dir, tmp_path):
    emb = ItemEmbedder(tiny_bert_dir, template=TEMPLATE, lora=None, max_length=64)
    before = emb.encode(catalogue(8)).matrix.copy()
    emb.fit(catalogue(8), **dict(FIT, max_steps=1, lr=1e-2))
    after = emb.encode(catalogue(8)).matrix
    assert not np.allclose(after, before, atol=1e-5)
    emb.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "full" / "adapter_model.safetensors").exists()
    back = ItemEmbedder.from_pretrained(tmp_path / "full")
    assert back.lora is None
    np.testing.assert_array_equal(back.encode(catalogue(8)).matrix, after)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_sentence_transformers_export_reproduces(which, fitted_bert, fitted_llama, tmp_path):
    from sentence_transformers import SentenceTransformer

    emb = fitted_bert[0] if which == "bert" else fitted_llama
    emb.save_sentence_transformer(tmp_path / "new" / "st")  # a parent that does not exist yet
    assert list((tmp_path / "new").iterdir()) == [tmp_path / "new" / "st"]  # no staging folder left
    st = SentenceTransformer(str(tmp_path / "new" / "st"), device="cpu")
    texts = emb.render(catalogue(16)) + ["a brand new item: name is glitter nail polish"]
    np.testing.assert_allclose(st.encode(texts, batch_size=4), emb.encode_texts(texts, batch_size=7),
                               atol=1e-5, rtol=1e-4)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "new" / "st").rglob("*"))


def test_push_to_hub_records_upload(fitted_bert, hub):
    emb, _ = fitted_bert
    token = "hf_SECRETtoken1234567890"
    url = emb.push_to_hub("user/beauty-embedder", token=token, private=True)
    assert "user/beauty-embedder" in url
    assert hub.created[0]["repo_id"] == "user/beauty-embedder" and hub.created[0]["private"] is True
    files = hub.uploads[0]["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", CONFIG_NAME, "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "This beauty product has the following attributes:" in card
    assert all(token.encode() not in blob for blob in files.values())


def test_from_pretrained_offline_hf_cache(fitted_bert, offline_cache):
    from conftest import hf_cache_snapshot  # here: this file also runs as a script (the two-process worker)

    emb, _ = fitted_bert
    emb.save_pretrained(hf_cache_snapshot(offline_cache, "user/emb"))
    back = ItemEmbedder.from_pretrained("user/emb")
    np.testing.assert_array_equal(back.encode(catalogue()).matrix, emb.encode(catalogue()).matrix)
    with pytest.raises(ModelNotFoundError, match=r"'user/absent'.*HF_HUB_OFFLINE=1"):
        ItemEmbedder.from_pretrained("user/absent")


# ------------------------------------------------------------------------------------- bad input
def test_bad_tables_fail_before_model_work(tiny_bert_dir, items_df, no_model):
    emb = ItemEmbedder(tiny_bert_dir, template=TEMPLATE)
    with pytest.raises(KeyError, match="'sku'"):
        emb.fit(items_df, id_column="sku")
    with pytest.raises(KeyError, match="'sku'"):
        emb.encode(items_df, id_column="sku")
    dup = pd.concat([items_df, items_df.iloc[[1]]])
    with pytest.raises(ValueError, match="'b2'"):
        emb.fit(dup)
    with pytest.raises(ValueError, match="empty"):
        emb.encode(items_df.iloc[:0])
    blank = items_df.copy()
    blank.loc[2, ["title", "brand", "categories", "price"]] = [" ", None, None, np.nan]
    with pytest.raises(ValueError, match="'c3'"):
        emb.fit(blank)
    with pytest.raises(KeyError, match="'colour'"):
        ItemEmbedder(tiny_bert_dir, template=PromptTemplate("x", {"colour": "colour"})).encode(items_df)
    with pytest.raises(ValueError, match="batch_size"):
        emb.fit(items_df, batch_size=1)
    with pytest.raises(TypeError, match="DataFrame"):
        emb.fit([{"item_id": "a"}])


def test_bad_settings_and_models_fail_at_construction(tmp_path, monkeypatch, no_model):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nope")):
        ItemEmbedder(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"'acme/llm-7b'.*HF_HUB_OFFLINE=1"):
        ItemEmbedder("acme/llm-7b")
    with pytest.raises(ValueError, match="n_views"):
        ItemEmbedder(n_views=1)
    with pytest.raises(ValueError, match="drop_prob"):
        ItemEmbedder(drop_prob=1.0)
    with pytest.raises(ValueError, match="similarity"):
        ItemEmbedder(similarity="l2")
    with pytest.raises(ValueError, match="pooling"):
        ItemEmbedder(pooling="cls")


def test_long_texts_are_truncated_with_one_counted_warning(tiny_bert_dir, items_df):
    emb = ItemEmbedder(tiny_bert_dir, template=TEMPLATE, max_length=48)
    long = items_df.copy()
    long.loc[0, "title"] = "very long " * 50
    long.loc[3, "title"] = "another long title " * 40
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        E = emb.encode(long)
    msgs = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert msgs == ["2 of 8 texts are longer than max_length=48 tokens and were truncated; "
                    "raise max_length or shorten the template"]
    assert np.isfinite(E.matrix).all()
    short = ItemEmbedder(tiny_bert_dir, template=TEMPLATE, max_length=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short.encode(items_df)
    assert not [w for w in caught if "truncated" in str(w.message)]


# ------------------------------------------------------------------------------------- several processes
def _worker(model_dir: str, out: str) -> None:
    """Run under ``torch.distributed.run --nproc_per_node 2``: encode in memory and sharded."""
    from llm_item_embed.io import atomic_save_safetensors

    emb = ItemEmbedder(model_dir, template=TEMPLATE, lora=None, max_length=64)
    df = catalogue(11)  # not divisible by 2: uneven slices
    plain = emb.encode(df, batch_size=4)
    sharded = emb.encode(df, batch_size=4, shard_dir=Path(out) / "shards", shard_size=3)
    rank = torch.distributed.get_rank()
    atomic_save_safetensors(Path(out) / f"rank{rank}.safetensors",
                            {"plain": torch.from_numpy(plain.matrix),
                             "sharded": torch.from_numpy(np.asarray(sharded.matrix).copy())},
                            metadata={"ids": json.dumps(plain.ids), "world": str(torch.distributed.get_world_size())})


@pytest.mark.multiprocess
@pytest.mark.slow
def test_encode_under_two_processes_gathers_in_order(tiny_bert_dir, tmp_path):
    import os
    import socket
    import subprocess

    from safetensors import safe_open

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, tiny_bert_dir, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    emb = ItemEmbedder(tiny_bert_dir, template=TEMPLATE, lora=None, max_length=64)
    ref = emb.encode(catalogue(11))
    for rank in (0, 1):
        with safe_open(str(tmp_path / f"rank{rank}.safetensors"), framework="np") as f:
            assert json.loads(f.metadata()["ids"]) == ref.ids and f.metadata()["world"] == "2"
            np.testing.assert_allclose(f.get_tensor("plain"), ref.matrix, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(f.get_tensor("sharded"), ref.matrix, atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "shards").glob("shard-*.safetensors"))) == 4


if __name__ == "__main__":  # the worker of test_encode_under_two_processes_gathers_in_order
    _worker(sys.argv[1], sys.argv[2])
