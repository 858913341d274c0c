"""DualViewHead on the Hub: push_to_hub with recorders in place of HfApi (no network), loading back
from the offline Hugging Face cache, and `cfsr push` / `cfsr evaluate --model <repo id>`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from cfsr_head import DualViewHead, ItemIndex
from cfsr_head.cli import main
from cfsr_head.hub import model_card
from conftest import COMMIT, hf_cache_snapshot
from tests.unit.test_cfsr_cli import embeddings_file, train_args, write_dataset  # noqa: F401 (fixture)
from tests.unit.test_head import make_head, pad_batch, random_rows

TOKEN = "hf_TESTtokenNeverLeak0123456789abcdef"


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Put what the recorder saw uploaded into the offline cache, as a download would."""
    snap = hf_cache_snapshot(cache, repo_id)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_push_to_hub_uploads_head_index_and_card(hub) -> None:
    head = make_head()
    index = ItemIndex([f"sku-{i}" for i in range(head.num_items)])
    url = head.push_to_hub("user/beauty-head", token=TOKEN, private=True, item_index=index)
    assert url == "https://huggingface.co/user/beauty-head"
    assert hub.created == [{"repo_id": "user/beauty-head", "exist_ok": True, "private": True, "repo_type": "model"}]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "user/beauty-head"
    assert set(upload["files"]) == {"config.json", "model.safetensors", "item_index.json", "README.md"}
    assert not any(TOKEN.encode() in data for data in upload["files"].values())
    card = upload["files"]["README.md"].decode()
    assert card.startswith("---\n") and "library_name: cfsr-head" in card
    assert 'DualViewHead.from_pretrained("user/beauty-head")' in card
    assert f"Items: {head.num_items}" in card and "semantic, collaborative" in card
    assert not upload["folder"].exists()  # the staging folder is gone


def test_pushed_head_loads_back_from_the_offline_cache(hub, offline_cache) -> None:
    head = make_head().eval()
    head.push_to_hub("user/beauty-head")
    cache_repo(offline_cache, "user/beauty-head", hub.uploads[0]["files"])
    for kwargs in ({}, {"revision": COMMIT}):
        back = DualViewHead.from_pretrained("user/beauty-head", **kwargs).eval()
        seq = pad_batch(random_rows(3, [4, 2, 6]), "left")
        with torch.no_grad():
            assert torch.equal(head(seq), back(seq))
        assert back.state_dict().keys() == head.state_dict().keys()


def test_from_pretrained_names_what_it_could_not_find(offline_cache, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'user/absent'.*HF_HUB_OFFLINE=1") as info:
        DualViewHead.from_pretrained("user/absent", token=TOKEN)
    assert TOKEN not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"no folder '.*nope/a/b'"):
        DualViewHead.from_pretrained(tmp_path / "nope" / "a" / "b")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="weights.bin is a file"):
        DualViewHead.from_pretrained(tmp_path / "weights.bin")


def test_push_checks_the_repo_id_before_uploading(hub) -> None:
    with pytest.raises(ValueError, match="'not a repo' is not a valid Hub repo id"):
        make_head().push_to_hub("not a repo")
    assert hub.created == [] and hub.uploads == []


def test_upload_error_is_reported_without_the_token(monkeypatch) -> None:
    def create_repo(self, repo_id, **kwargs):
        raise RuntimeError(f"401 Unauthorized for token {self.token}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    with pytest.raises(RuntimeError, match="'user/x' failed") as info:
        make_head().push_to_hub("user/x", token=TOKEN)
    assert TOKEN not in str(info.value) and "***" in str(info.value)
    assert info.value.__suppress_context__  # the original error, token and all, is not chained into tracebacks


def test_card_of_a_custom_encoder_says_to_pass_it(tmp_path) -> None:
    make_head().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert "encoder=" not in model_card(meta, repo_id="user/x")  # a built-in encoder rebuilds itself
    meta["encoder"] = {"type": "MyEncoder", "args": None}
    card = model_card(meta, repo_id="user/x")
    assert 'from_pretrained("user/x", encoder=my_encoder)' in card and "`MyEncoder`" in card


@pytest.mark.usefixtures("one_thread")
def test_cli_push_uploads_model_files_only_and_evaluate_reads_the_repo(hub, offline_cache, embeddings_file,
                                                                       tmp_path, capsys) -> None:
    data = write_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(train_args(data, out, "--embeddings", str(embeddings_file), "--loss", "ce", "--quiet")) == 0
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert main(["push", "--model", str(out), "--repo-id", "user/tiny-cfsr"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/user/tiny-cfsr"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # folder unchanged
    files = hub.uploads[0]["files"]
    assert set(files) == {"config.json", "model.safetensors", "item_index.json", "run.json", "metrics.json",
                          "README.md"}

    cache_repo(offline_cache, "user/tiny-cfsr", files)
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    assert main(["evaluate", "--data", str(data), "--model", str(out), "--json", str(local)]) == 0
    assert main(["evaluate", "--data", str(data), "--model", "user/tiny-cfsr", "--json", str(remote)]) == 0
    assert json.loads(remote.read_text())["summary"] == json.loads(local.read_text())["summary"]
    assert json.loads(remote.read_text())["model"] == "user/tiny-cfsr"
    capsys.readouterr()

    assert main(["evaluate", "--data", str(data), "--model", "user/not-cached"]) == 2
    assert "'user/not-cached'" in capsys.readouterr().err
    assert main(["push", "--model", str(tmp_path / "tiny"), "--repo-id", "user/x"]) == 2
    assert "is not a trained model folder" in capsys.readouterr().err
    assert len(hub.uploads) == 1
