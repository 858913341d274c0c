"""The atomic writers of both packages (each keeps its own copy): saved files get the permissions a
plain ``open(path, "w")`` would give, and a failed write leaves neither a partial file nor a
temporary one."""
from __future__ import annotations

import os
import stat

import pytest
import torch

import cfsr_head.io
import llm_item_embed.io

MODULES = [llm_item_embed.io, cfsr_head.io]


@pytest.mark.parametrize("io", MODULES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_follow_the_umask(io, mask, mode, umask, tmp_path):
    umask(mask)
    io.atomic_write_json(tmp_path / "a.json", {"x": 1})
    io.atomic_write_text(tmp_path / "a.md", "# x\n")
    io.atomic_save_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    for name in ("a.json", "a.md", "a.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    # the same holds for a file that is overwritten
    io.atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert io.read_json(tmp_path / "a.json") == {"x": 2}


@pytest.mark.parametrize("io", MODULES, ids=lambda m: m.__name__)
def test_failed_write_leaves_no_temporary_file(io, tmp_path):
    io.atomic_write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(TypeError):
        io.atomic_write_json(tmp_path / "a.json", {1j: 1})  # json.dumps rejects a complex key
    assert io.read_json(tmp_path / "a.json") == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("io", MODULES, ids=lambda m: m.__name__)
def test_overwrite_keeps_the_existing_mode(io, umask, tmp_path):
    io.atomic_save_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    os.chmod(tmp_path / "a.safetensors", 0o640)
    io.atomic_save_safetensors(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o640
    tensors, _ = io.load_safetensors(tmp_path / "a.safetensors")
    assert tensors["w"].tolist() == [0.0, 0.0]


def test_move_tree_moves_every_file_with_default_permissions(umask, tmp_path):
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.json").write_text("{}")
    (staging / "sub" / "b.txt").write_text("b")
    os.chmod(staging / "a.json", 0o600)  # as safetensors' writer leaves a file
    llm_item_embed.io.move_tree(staging, tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == ["a.json", "sub/b.txt"]
    assert [p for p in staging.rglob("*") if p.is_file()] == []
    for name in ("a.json", "sub/b.txt"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("io", MODULES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("mask, mode", [(0o022, 0o755), (0o077, 0o700)])
def test_staging_dir_follows_the_umask(io, mask, mode, umask, tmp_path):
    umask(mask)
    first = io.make_staging_dir(tmp_path / "deep" / "ckpt")
    second = io.make_staging_dir(tmp_path / "deep" / "ckpt")
    assert first != second and first.parent == second.parent == tmp_path / "deep"
    assert first.name.startswith(".ckpt.") and list(first.iterdir()) == []
    assert stat.S_IMODE(first.stat().st_mode) == mode
