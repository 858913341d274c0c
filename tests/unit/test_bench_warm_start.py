"""benchmarks/bench_warm_start.py on a dataset folder written here, with a random semantic table."""
from __future__ import annotations

import numpy as np
import pytest
from cyclic_data import cyclic_interactions, write_dataset_folder

from llm_item_embed import ItemEmbeddings

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_row_is_trained_reported_and_resumed(tmp_path, monkeypatch, capsys):

    from benchmarks import bench_warm_start as bws

    data = tmp_path / "cyclic"
    ids = write_dataset_folder(data, cyclic_interactions(80))  # d = 64 needs at least 64 items for the PCA start
    table = ItemEmbeddings(ids, np.random.default_rng(0).normal(size=(len(ids), 80)).astype(np.float32))
    monkeypatch.setattr(bws, "frozen_embeddings", lambda data, workdir: table)  # no language model here
    argv = ["--dataset", str(data), "--seeds", "0", "1", "--lrs", "1e-2", "--epochs", "2", "--workdir",
            str(tmp_path / "work")]
    assert bws.main(argv) == 0
    out = capsys.readouterr().out
    rows = ["SASRec", "concat, scratch", "concat, warm", "cross, scratch", "cross, warm"]
    for seed in (0, 1):
        for row in rows:
            assert f"seed {seed} {row}" in out
    table_lines = out.split("Test N@10")[1].splitlines()
    assert [ln.split("  ")[1].strip() for ln in table_lines if ln.startswith("  ") and "±" in ln] == rows
    assert "concat: full Overall" in out and "cross: full Overall" in out
    # a rerun finds every run's checkpoints and trains nothing
    assert bws.main(argv) == 0
    again = capsys.readouterr().out
    assert again.split("Test N@10")[1] == out.split("Test N@10")[1]
    assert (tmp_path / "work" / "cyclic" / "concat_warm" / "seed1" / "lr0.01" / "best" / "model.safetensors").is_file()
