"""Hub uploads with recorders in place of HfApi (no network), model cards, token safety, and loading
back from a local folder and from an offline Hugging Face cache."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi

from llm_item_embed.embeddings import ItemEmbeddings
from llm_item_embed.hub import push_folder, render_model_card
from conftest import COMMIT, hf_cache_snapshot

TOKEN = "hf_TESTtokenNeverLeak0123456789abcdef"
META = {
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "pooling": "mean",
    "template": {"instruction": "This beauty product has the following attributes:",
                 "fields": {"title": "name", "brand": "brand"}},
    "drop_prob": 0.2,
    "n_views": 2,
    "lora": {"r": 8, "alpha": 16, "target_modules": "auto"},
    "training": {"epochs": 1, "batch_size": 64, "lr": 0.0002, "seed": 7},
    "n_items": 1234,
}


def make_embeddings(n: int = 5, d: int = 4) -> ItemEmbeddings:
    rng = np.random.default_rng(0)
    return ItemEmbeddings([f"i{k}" for k in range(n)], rng.standard_normal((n, d)), META)


# ------------------------------------------------------------------ model cards
def test_embeddings_card_front_matter_and_body():
    card = render_model_card("embeddings", make_embeddings().metadata, repo_id="user/beauty-emb")
    assert card.startswith("---\n")
    front, body = card.split("\n---\n", 1)
    assert "library_name: llm-item-embed" in front
    for tag in ("recommendation", "sentence-similarity", "lora", "item-embeddings"):
        assert f"- {tag}\n" in front + "\n"
    assert 'base_model: "sentence-transformers/all-MiniLM-L6-v2"' in front
    assert "This beauty product has the following attributes:" in body
    assert "`title` -> `name`" in body
    assert "Attribute drop probability: `0.2`" in body
    assert "Views per item: `2`" in body
    assert '"r": 8' in body and "batch_size: `64`" in body
    assert "Dataset size: 1234 items" in body
    assert "Embedding dimension: `4`" in body and "Items: 5" in body
    assert 'ItemEmbeddings.from_pretrained("user/beauty-emb")' in body


def test_embedder_card_and_no_lora_tag_when_absent():
    card = render_model_card("embedder", {"base_model": "/local/path/model", "pooling": "last"})
    front = card.split("\n---\n", 1)[0]
    assert "- lora" not in front and "pipeline_tag: feature-extraction" in front
    assert "base_model:" not in front  # a local path is not a valid Hub base_model
    assert "`/local/path/model`" in card and "ItemEmbedder.from_pretrained" in card
    assert "not fine-tuned" in card


def test_card_fields_as_ordered_pairs():
    card = render_model_card("embeddings", {"template": {"instruction": "I:", "fields": [["title", "name"], ["brand", "maker"]]}})
    assert "`title` -> `name`, `brand` -> `maker`" in card


def test_card_never_renders_secret_keys():
    card = render_model_card("embeddings", {"hf_token": TOKEN, "training": {"token": TOKEN, "lr": 0.1}})
    assert TOKEN not in card and "lr: `0.1`" in card


def test_card_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        render_model_card("dataset", {})


# ------------------------------------------------------------------ push
def test_embeddings_push_to_hub_records_upload(hub, tmp_path):
    e = make_embeddings()
    url = e.push_to_hub("user/beauty-emb", token=TOKEN, private=True, commit_message="first upload")
    assert url == "https://huggingface.co/user/beauty-emb"
    assert len(hub.created) == 1 and len(hub.uploads) == 1
    created, up = hub.created[0], hub.uploads[0]
    assert created["repo_id"] == "user/beauty-emb"
    assert created["private"] is True and created["exist_ok"] is True and created["token"] == TOKEN
    assert up["repo_id"] == "user/beauty-emb" and up["commit_message"] == "first upload"
    assert up["token"] == TOKEN
    assert sorted(up["files"]) == ["README.md", "embeddings.safetensors"]
    card = up["files"]["README.md"].decode()
    assert "library_name: llm-item-embed" in card and "user/beauty-emb" in card
    # the uploaded file loads back identically
    tmp = up["folder"]
    assert not tmp.exists()  # the temporary folder is cleaned up
    (tmp_path / "embeddings.safetensors").write_bytes(up["files"]["embeddings.safetensors"])
    back = ItemEmbeddings.from_pretrained(tmp_path)
    assert back.ids == e.ids and back.metadata == e.metadata
    np.testing.assert_array_equal(back.matrix, e.matrix)


def test_push_public_by_default_and_custom_filename(hub):
    make_embeddings().push_to_hub("user/x", filename="beauty.safetensors")
    assert hub.created[0]["private"] is False and hub.created[0]["token"] is None
    files = hub.uploads[0]["files"]
    assert sorted(files) == ["README.md", "beauty.safetensors"]
    assert 'filename="beauty.safetensors"' in files["README.md"].decode()


def test_token_never_leaks(hub, caplog, capsys, tmp_path):
    caplog.set_level(logging.DEBUG)
    for name in ("llm_item_embed", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    make_embeddings().push_to_hub("user/leak-check", token=TOKEN)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x")
    push_folder(folder, "user/leak-check-2", token=TOKEN, card=render_model_card("embedder", {"token": TOKEN}))
    for up in hub.uploads:
        for name, content in up["files"].items():
            assert TOKEN.encode() not in content, name
    assert TOKEN.encode() not in (folder / "README.md").read_bytes()
    out = capsys.readouterr()
    assert TOKEN not in out.out and TOKEN not in out.err
    assert TOKEN not in caplog.text
    assert "user/leak-check" in caplog.text  # logging did happen, just without the token
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes()


def test_upload_error_redacts_token(monkeypatch, tmp_path):
    def create_repo(self, repo_id, **kwargs):
        raise RuntimeError(f"401 Unauthorized for token {kwargs.get('token')}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(RuntimeError) as info:
        push_folder(tmp_path, "user/x", token=TOKEN)
    assert TOKEN not in str(info.value) and "***" in str(info.value)
    assert "user/x" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "user/na me", "user/../x", "-bad/x"])
def test_bad_repo_id_fails_before_upload(hub, repo_id):
    with pytest.raises(ValueError, match="repo id"):
        make_embeddings().push_to_hub(repo_id)
    assert hub.created == [] and hub.uploads == []


def test_push_folder_bad_folder(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        push_folder(tmp_path / "missing", "user/x")
    with pytest.raises(ValueError, match="empty"):
        push_folder(tmp_path, "user/x")
    assert hub.uploads == []


# ------------------------------------------------------------------ load back
def test_from_pretrained_local_file_and_folder(tmp_path):
    e = make_embeddings()
    e.save(tmp_path / "embeddings.safetensors")
    e.save(tmp_path / "other.safetensors")
    for src in (tmp_path, str(tmp_path), tmp_path / "embeddings.safetensors"):
        back = ItemEmbeddings.from_pretrained(src)
        assert back.ids == e.ids
    assert ItemEmbeddings.from_pretrained(tmp_path, filename="other.safetensors").ids == e.ids
    with pytest.raises(FileNotFoundError, match=r"has no missing.safetensors.*embeddings.safetensors"):
        ItemEmbeddings.from_pretrained(tmp_path, filename="missing.safetensors")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        ItemEmbeddings.from_pretrained(tmp_path / "nope" / "x.safetensors")


def build_hf_cache(cache: Path, repo_id: str, e: ItemEmbeddings, filename: str = "embeddings.safetensors") -> Path:
    """The layout huggingface_hub writes: models--user--name/{refs/main, snapshots/<commit>/file}."""
    snap = hf_cache_snapshot(cache, repo_id)
    e.save(snap / filename)
    return snap / filename


def test_from_pretrained_offline_hf_cache(offline_cache):
    e = make_embeddings()
    build_hf_cache(offline_cache, "user/beauty-emb", e)
    back = ItemEmbeddings.from_pretrained("user/beauty-emb")
    assert back.ids == e.ids and back.metadata == e.metadata
    np.testing.assert_array_equal(back.matrix, e.matrix)
    # pinned revision, and explicit cache_dir
    assert ItemEmbeddings.from_pretrained("user/beauty-emb", revision=COMMIT).ids == e.ids
    assert ItemEmbeddings.from_pretrained("user/beauty-emb", cache_dir=offline_cache).ids == e.ids


def test_from_pretrained_offline_not_cached(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"'embeddings.safetensors' in Hub repo 'user/absent'.*not in the local Hugging Face cache"):
        ItemEmbeddings.from_pretrained("user/absent", token=TOKEN)
    with pytest.raises(FileNotFoundError, match="no local file or folder 'user/absent'"):
        ItemEmbeddings.from_pretrained("user/absent")
    build_hf_cache(offline_cache, "user/present", make_embeddings())
    with pytest.raises(FileNotFoundError, match="other.safetensors"):
        ItemEmbeddings.from_pretrained("user/present", filename="other.safetensors")


def test_from_pretrained_offline_cache_fresh_process(tmp_path):
    """Environment variables alone (no patching) configure a fresh interpreter."""
    cache = tmp_path / "home" / "hub"
    cache.mkdir(parents=True)
    e = make_embeddings()
    build_hf_cache(cache, "user/fresh", e)
    code = textwrap.dedent(
        """
        from llm_item_embed.embeddings import ItemEmbeddings
        e = ItemEmbeddings.from_pretrained("user/fresh")
        print("OK", len(e), e.dim, e.ids[0])
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["OK", "5", "4", "i0"]


# ------------------------------------------------------------------ the embedder through the Hub
def test_embedder_push_and_load_from_offline_cache(tiny_bert_dir, items_df, hub, offline_cache, caplog):
    """ItemEmbedder.push_to_hub uploads adapter + config + card; the uploaded files, laid out as an
    offline HF cache snapshot, load back by repo id and encode identically."""
    from llm_item_embed import ItemEmbedder, LoraSettings, PromptTemplate

    caplog.set_level(logging.DEBUG)
    tmpl = PromptTemplate("This product has the following attributes:", {"title": "name", "brand": "brand"})
    emb = ItemEmbedder(tiny_bert_dir, template=tmpl, lora=LoraSettings(r=4, alpha=8))
    emb.fit(items_df, batch_size=4, max_steps=1, seed=0, show_progress_bar=False)
    url = emb.push_to_hub("user/tiny-embedder", token=TOKEN, private=True)
    assert url == "https://huggingface.co/user/tiny-embedder"
    assert hub.created[0]["private"] is True and hub.uploads[0]["token"] == TOKEN
    files = hub.uploads[0]["files"]
    assert {"README.md", "item_embedder_config.json"} <= set(files)
    assert any(n.endswith(".safetensors") for n in files)
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".pickle")) for n in files)
    card = files["README.md"].decode()
    assert "library_name: llm-item-embed" in card and "- lora" in card
    assert "This product has the following attributes:" in card and "Dataset size: 8 items" in card
    for name, content in files.items():
        assert TOKEN.encode() not in content, name
    assert TOKEN not in caplog.text

    snap = offline_cache / "models--user--tiny-embedder" / "snapshots" / COMMIT
    for name, content in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(content)
    (offline_cache / "models--user--tiny-embedder" / "refs").mkdir()
    (offline_cache / "models--user--tiny-embedder" / "refs" / "main").write_text(COMMIT)
    loaded = ItemEmbedder.from_pretrained("user/tiny-embedder")
    a = emb.encode(items_df, show_progress_bar=False)
    b = loaded.encode(items_df, show_progress_bar=False)
    assert a.ids == b.ids
    np.testing.assert_allclose(b.matrix, a.matrix, rtol=1e-5, atol=1e-6)
