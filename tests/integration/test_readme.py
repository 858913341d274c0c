"""The README's Python quickstart, run as written on the real ml-100k folder and the bundled MiniLM,
with its budget cut to a smoke test (2 CFT steps, 1 epoch) and the Hub replaced by a recorder:
every call it documents must exist with the arguments it shows."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"


def python_block_after(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], flags=re.S)
    assert match, f"no python block after {heading!r} in README.md"
    return match.group(1)


def test_readme_quickstart_snippet_runs(data_dir, tmp_path, monkeypatch, hub, capsys):
    code = python_block_after("## Quickstart")
    cuts = {  # each text must still be in the README: the test follows what it shows
        '"../shared/data/ml-100k/items.csv"': repr(str(data_dir / "ml-100k" / "items.csv")),
        'lr=2e-4)   # stage 1': 'lr=2e-4, max_steps=2)   # stage 1',
        'epochs=50, patience=5)': 'epochs=1, patience=5)',
    }
    for old, new in cuts.items():
        assert old in code, f"README quickstart no longer has {old!r}; update this test"
        code = code.replace(old, new)
    monkeypatch.setenv("CFSR_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)

    assert (tmp_path / "ml100k.safetensors").is_file()
    assert len(namespace["item_embeddings"]) == 1682
    assert namespace["item_embeddings"].metadata["training"]["steps"] == 2  # the CFT ran, cut as above
    recs = namespace["recs"]
    assert len(recs.items[0]) == 10 and not {"50", "172", "133"} & set(recs.items[0])  # seen items left out
    assert [c["repo_id"] for c in hub.created] == ["user/ml100k-cfsr"]
    uploaded = hub.uploads[0]["files"]
    assert "model.safetensors" in uploaded and "config.json" in uploaded
    printed = capsys.readouterr().out
    assert "NDCG@10" in printed
