"""The README's main job, ``examples/quickstart.py``, run as a user runs it (a fresh process, the real
ml-100k folder, the bundled MiniLM), with the smallest budget that still goes through every step:
stage 1 fine-tunes and encodes; stage 2 trains the three models at two learning rates each, keeps
the one that validates best and chooses each prior on validation; the summary is written and a
recommendation printed. About 20 s on an idle 2-core CPU."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_every_step_and_writes_its_summary(data_dir, tmp_path):
    env = {**os.environ, "CFSR_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--dataset", "ml-100k",
           "--workdir", str(tmp_path / "qs"), "--cft-steps", "2", "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((tmp_path / "qs" / "ml-100k" / "summary.json").read_text())
    models = ["SASRec", "LLM-CFSR", "LLM-CFSR w/o Cro"]
    assert set(summary) == {"Popularity", *models, *(f"{m} + prior" for m in models)}
    for name, groups in summary.items():
        for metric in ("HR@10", "NDCG@10"):
            value = groups["Overall"][metric]
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (name, metric, value)
    # one epoch is enough to rank far above chance (10 / 1682 items for HR@10)
    assert all(summary[m]["Overall"]["HR@10"] > 10 / 1682 for m in models), summary
    # the fine-tuned embedder and the embeddings are cached for a second run
    assert (tmp_path / "qs" / "ml-100k" / "item_embeddings.safetensors").is_file()
    assert (tmp_path / "qs" / "ml-100k" / "embedder").is_dir()
    lines = proc.stdout.splitlines()
    # every model is trained at each learning rate of --lrs and keeps the one that validates best
    for m in models:
        tried = {}  # lr -> validation NDCG@10, from "[stage 2] NAME, lr LR: validation NDCG@10 V, ..."
        for line in lines:
            if line.startswith(f"[stage 2] {m}, lr "):
                lr, rest = line[len(f"[stage 2] {m}, lr "):].split(":", 1)
                tried[lr] = float(rest.split("validation NDCG@10 ")[1].split(",")[0])
        assert sorted(tried, key=float) == ["0.001", "0.01"], (m, tried)
        kept = [line for line in lines if line.startswith(f"[stage 2] {m}: lr ") and "kept" in line]
        assert len(kept) == 1, (m, kept)
        kept_lr = kept[0][len(f"[stage 2] {m}: lr "):].split()[0]
        assert tried[kept_lr] == max(tried.values()), (m, tried, kept)
    start = next(i for i, line in enumerate(lines) if line.endswith(": next 5"))
    assert [line.split(".")[0].strip() for line in lines[start + 1:start + 6]] == ["1", "2", "3", "4", "5"]
