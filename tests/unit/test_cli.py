"""``llm-item-embed`` CLI: help, exit codes, one-line errors naming the culprit, and
fit -> encode -> push end to end on a tiny BERT with Hub recorders (no network)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import HfApi

from llm_item_embed.cli import main
from llm_item_embed.embeddings import ItemEmbeddings
from conftest import HubRecorder

TOKEN = "hf_CLItokenMustNotLeak9876543210zyxw"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("llm-item-embed")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def items_csv(tmp_path) -> Path:
    df = pd.DataFrame({
        "item_id": [f"it{i:02d}" for i in range(12)],
        "title": [f"product {i} {c}" for i, c in enumerate(["red lipstick", "blue shampoo", "nail polish"] * 4)],
        "brand": ["OPI", "Dove", None] * 4,
        "price": [9.99, 4.5, 12.0] * 4,
    })
    path = tmp_path / "items.csv"
    df.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------ help
def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "encode", "evaluate", "push"):
        assert cmd in out


@pytest.mark.parametrize("cmd, options", [
    ("fit", ["--id-column", "--model", "--template-json", "--instruction", "--field", "--drop-prob", "--n-views",
             "--epochs", "--batch-size", "--lr", "--max-steps", "--output-dir", "--resume-from", "--seed", "--debug"]),
    ("encode", ["--embedder", "--model", "--output", "--recbole", "--batch-size", "--shard-dir"]),
    ("push", ["--token", "HF_TOKEN", "--private", "--commit-message"]),
    ("evaluate", ["--interactions", "--k", "--held-out", "--holdout-last", "--max-queries", "--json"]),
])
def test_command_help(capsys, cmd, options):
    with pytest.raises(SystemExit) as info:
        main([cmd, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for opt in options:
        assert opt in out, opt


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["fit"], ["bogus"], ["encode", "x.csv"], ["fit", "x.csv", "--output-dir", "o", "--epochs", "two"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
    capsys.readouterr()


def test_console_script_exit_codes(tmp_path):
    """The installed entry point: non-zero exit, one line on stderr, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = Path(sys.executable).parent / "llm-item-embed"  # the pyproject entry point
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "llm_item_embed.cli"]
    proc = subprocess.run([*cmd, "encode", str(tmp_path / "absent.csv"),
                           "-o", str(tmp_path / "e.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"llm-item-embed encode: error: items file {tmp_path / 'absent.csv'} does not exist"


# ------------------------------------------------------------------ reading tables
def test_read_items_formats_keep_string_ids(tmp_path):
    from llm_item_embed.cli import read_items

    df = pd.DataFrame({"item_id": ["007", "010", "1e3"], "title": ["a", "b", "c"], "price": [1.5, None, 3.0]})
    df.to_csv(tmp_path / "i.csv", index=False)
    df.to_csv(tmp_path / "i.tsv", index=False, sep="\t")
    df.to_json(tmp_path / "i.jsonl", orient="records", lines=True)
    df.to_json(tmp_path / "i.json", orient="records")
    for name in ("i.csv", "i.tsv", "i.jsonl", "i.json"):
        got = read_items(tmp_path / name, "item_id")
        assert got["item_id"].tolist() == ["007", "010", "1e3"], name
        assert got["title"].tolist() == ["a", "b", "c"], name


def test_read_items_parquet_or_clear_error(tmp_path):
    from llm_item_embed.cli import CLIError, read_items

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "i.parquet").write_bytes(b"PAR1")
        with pytest.raises(CLIError, match="i.parquet.*pyarrow"):
            read_items(tmp_path / "i.parquet", "item_id")
    else:
        pd.DataFrame({"item_id": ["1", "2"], "title": ["a", "b"]}).to_parquet(tmp_path / "i.parquet")
        assert read_items(tmp_path / "i.parquet", "item_id")["item_id"].tolist() == ["1", "2"]


# ------------------------------------------------------------------ bad input (fails before any model work)
def _write(tmp_path: Path, name: str, df: pd.DataFrame) -> str:
    path = tmp_path / name
    df.to_csv(path, index=False)
    return str(path)


def test_bad_items_files(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "run")]
    cases = []
    cases.append((["fit", str(tmp_path / "nope.csv"), *out], "nope.csv does not exist"))
    (tmp_path / "items.xlsx").write_text("x")
    cases.append((["fit", str(tmp_path / "items.xlsx"), *out], "unknown extension '.xlsx'"))
    no_id = _write(tmp_path, "noid.csv", pd.DataFrame({"id": ["a"], "title": ["x"]}))
    cases.append((["fit", no_id, *out], "has no id column 'item_id'; its columns are ['id', 'title']"))
    dup = _write(tmp_path, "dup.csv", pd.DataFrame({"item_id": ["a", "b", "a"], "title": ["x", "y", "z"]}))
    cases.append((["fit", dup, *out], "1 id(s) in 'item_id' appear more than once, e.g. ['a']"))
    (tmp_path / "empty.csv").write_text("item_id,title\n")
    cases.append((["fit", str(tmp_path / "empty.csv"), *out], "empty.csv has no rows"))
    blank = _write(tmp_path, "blank.csv", pd.DataFrame({"item_id": ["a", None], "title": ["x", "y"]}))
    cases.append((["fit", blank, *out], "1 row(s) have an empty 'item_id'"))
    allempty = _write(tmp_path, "allempty.csv", pd.DataFrame({"item_id": ["a", "ghost"], "title": ["x", "  "],
                                                              "brand": ["b", None]}))
    cases.append((["fit", allempty, *out], "'ghost'"))
    ok = _write(tmp_path, "ok.csv", pd.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"]}))
    cases.append((["fit", ok, *out, "--field", "name=colour"], "'colour'"))
    cases.append((["fit", ok, *out, "--field", "namecolour"], "--field 'namecolour': expected NAME=COLUMN"))
    cases.append((["fit", ok, *out, "--template-json", "{not json"], "not valid JSON"))
    cases.append((["fit", ok, *out, "--template-json", str(tmp_path / "t.json")], "t.json is neither"))
    cases.append((["fit", ok, *out, "--drop-prob", "1.5"], "--drop-prob must be in [0, 1), got 1.5"))
    cases.append((["fit", ok, *out, "--batch-size", "1"], "--batch-size must be at least 2"))
    cases.append((["fit", ok, *out, "--n-views", "1"], "--n-views must be at least 2"))
    cases.append((["fit", ok, *out, "--resume-from", str(tmp_path / "ckpt")], "ckpt does not exist"))
    cases.append((["fit", ok, *out, "--model", str(tmp_path / "no-such-model")], "no-such-model"))
    inter = _write(tmp_path, "inter.csv", pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["a", "zz", "b"]}))
    cases.append((["fit", ok, *out, "--interactions", inter], "1 item id(s) are not in the items table, e.g. ['zz']"))
    cases.append((["fit", ok, *out, "--interactions", str(tmp_path / "none.csv")], "interactions file"))
    nouser = _write(tmp_path, "nouser.csv", pd.DataFrame({"item_id": ["a", "b"]}))
    cases.append((["fit", ok, *out, "--interactions", nouser], "has no column(s) ['user_id']"))
    short = _write(tmp_path, "short.csv", pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"]}))
    cases.append((["fit", ok, *out, "--interactions", short], "no two different consecutive items"))
    cases.append((["fit", ok, *out, "--interactions", short, "--pair-prob", "0"], "--pair-prob must be in (0, 1]"))
    cases.append((["fit", ok, *out, "--interactions", short, "--pair-min-count", "0"],
                  "--pair-min-count must be at least 1"))
    once = _write(tmp_path, "once.csv", pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["a", "b", "a", "b"]}))
    cases.append((["fit", ok, *out, "--interactions", once, "--holdout-last", "0", "--pair-min-count", "4"],
                  "seen at least 4 times"))
    cases.append((["encode", ok, "-o", str(tmp_path / "e.safetensors"), "--embedder", str(tmp_path / "run"),
                   "--field", "name=title"], "do not combine it with --model"))
    cases.append((["encode", ok, "-o", str(tmp_path)], "is a folder"))
    for argv, expected in cases:
        code, _, err = run(capsys, *argv)
        assert code == 1, argv
        line = error_line(err)
        assert line.startswith(f"llm-item-embed {argv[0]}: error: "), line
        assert expected in line, (argv, line)
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_unknown_model_offline_names_it(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    ok = _write(tmp_path, "ok.csv", pd.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"]}))
    code, _, err = run(capsys, "encode", ok, "-o", str(tmp_path / "e.safetensors"), "--model", "someone/not-cached-model")
    assert code == 1
    line = error_line(err)
    assert "'someone/not-cached-model'" in line and "offline" in line


def test_commands_leave_the_library_logger_as_they_found_it(tmp_path, items_csv, tiny_bert_dir, capsys):
    import logging

    log = logging.getLogger("llm_item_embed")
    handlers, level = list(log.handlers), log.level
    code, _, err = run(capsys, "encode", str(items_csv), "--model", tiny_bert_dir, "--no-progress",
                       "-o", str(tmp_path / "e.safetensors"))
    assert code == 0 and "saved" in err  # INFO on stderr while the command runs
    assert run(capsys, "fit", str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "o"))[0] == 1
    assert log.handlers == handlers and log.level == level
    logging.getLogger("llm_item_embed.embeddings").info("after the command")
    assert "after the command" not in capsys.readouterr().err


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception, match="nope.csv"):
        main(["fit", str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "o"), "--debug"])


def test_push_bad_inputs(tmp_path, capsys, monkeypatch):
    rec = HubRecorder().install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    for argv, expected in [
        (["push", str(tmp_path / "absent"), "user/x"], "absent does not exist"),
        (["push", str(bad), "user/x"], "broken.safetensors"),
        (["push", str(bad), "not a repo"], "'not a repo' is not a valid Hub repo id"),
        (["push", str(tmp_path), "user/x"], "item_embedder_config.json"),  # a folder that is neither
    ]:
        code, out, err = run(capsys, *argv)
        assert code == 1, argv
        line = error_line(err)
        assert expected in line, (argv, line)
        assert TOKEN not in out + err
    assert rec.uploads == []


def test_push_error_redacts_token(tmp_path, capsys, monkeypatch):
    def create_repo(self, repo_id, **kw):
        raise RuntimeError(f"bad credentials {kw.get('token')}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    rng = np.random.default_rng(0)
    ItemEmbeddings(["a", "b"], rng.standard_normal((2, 3)), {}).save(tmp_path / "e.safetensors")
    code, out, err = run(capsys, "push", str(tmp_path / "e.safetensors"), "user/x", "--token", TOKEN)
    assert code == 1
    assert TOKEN not in out + err and "***" in error_line(err)
    # --debug re-raises, and the full traceback is free of the token too
    import traceback

    with pytest.raises(RuntimeError) as info:
        main(["push", str(tmp_path / "e.safetensors"), "user/x", "--token", TOKEN, "--debug"])
    assert TOKEN not in "".join(traceback.format_exception(info.value))


# ------------------------------------------------------------------ end to end
def write_histories(folder: Path) -> Path:
    """interactions.csv with three users of four items each (u0: it00 it01 it02 it03; the last two
    of each history are held out by --holdout-last's default, so each user gives one pair)."""
    inter = folder / "interactions.csv"
    pd.DataFrame({"user_id": [f"u{u}" for u in range(3) for _ in range(4)],
                  "item_id": [f"it{u * 4 + t:02d}" for u in range(3) for t in range(4)],
                  "timestamp": list(range(4)) * 3}).to_csv(inter, index=False)
    return inter


def test_evaluate_scores_each_file_against_the_histories(tmp_path, capsys):
    """Items follow their twin in every history: twin-aligned embeddings find every next item,
    random ones almost none; the JSON holds what was printed."""
    rng = np.random.default_rng(0)
    ids = [f"it{i:02d}" for i in range(60)]
    base = rng.normal(size=(30, 8))
    ItemEmbeddings(ids, (np.repeat(base, 2, axis=0) + 0.01 * rng.normal(size=(60, 8))).astype(np.float32)).save(
        tmp_path / "twins.safetensors")
    ItemEmbeddings(ids, rng.normal(size=(60, 8)).astype(np.float32)).save(tmp_path / "random.safetensors")
    # user u: it(2u) it(2u+1) then two held-out items
    users = [f"u{u}" for u in range(30) for _ in range(4)]
    items = [ids[j] for u in range(30) for j in (2 * u, 2 * u + 1, (2 * u + 7) % 60, (2 * u + 20) % 60)]
    inter = _write(tmp_path, "interactions.csv", pd.DataFrame({"user_id": users, "item_id": items,
                                                               "timestamp": [0, 1, 2, 3] * 30}))
    report = tmp_path / "scores.json"
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "random.safetensors"), str(tmp_path / "twins.safetensors"),
                       "--interactions", inter, "--k", "1", "--json", str(report))
    assert code == 0
    assert "30 transitions within the training histories" in out
    saved = json.loads(report.read_text())
    twins, rand = saved["scores"][str(tmp_path / "twins.safetensors")], saved["scores"][str(tmp_path / "random.safetensors")]
    assert twins["next@1"] == 1.0 and rand["next@1"] < 0.2 and saved["transitions"] == 30
    assert f"next@1 {twins['next@1']:.4f}" in out and "(vs the first file: next@1" in out
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "twins.safetensors"), "--interactions", inter,
                       "--k", "1", "--held-out")
    assert code == 0 and "30 transitions into the held-out items" in out
    # a missing file, and interactions with an item the embeddings lack, are named
    code, _, err = run(capsys, "evaluate", str(tmp_path / "none.safetensors"), "--interactions", inter)
    assert code == 1 and "none.safetensors" in error_line(err)
    unknown = _write(tmp_path, "unknown.csv", pd.DataFrame({"user_id": ["u0", "u0"], "item_id": ["it00", "zz9"]}))
    code, _, err = run(capsys, "evaluate", str(tmp_path / "twins.safetensors"), "--interactions", unknown)
    assert code == 1 and "zz9" in error_line(err)


@pytest.mark.parametrize("options, expected", [
    ((), {"positive_pairs": 3, "mask_known_positives": True, "pair_weighted": False}),
    (("--negatives-include-partners",), {"positive_pairs": 3, "mask_known_positives": False}),
    (("--pair-weighting", "count"), {"positive_pairs": 3, "pair_weighted": True}),
])
def test_fit_pair_options_reach_the_training(tiny_bert_dir, items_csv, tmp_path, capsys, options, expected):
    run_dir = tmp_path / "run"
    code, out, err = run(
        capsys, "fit", str(items_csv), "--model", tiny_bert_dir, "--output-dir", str(run_dir),
        "--batch-size", "4", "--max-steps", "1", "--lora-r", "4", "--no-progress", "-q",
        "--interactions", str(write_histories(tmp_path)), "--pair-prob", "1.0", *options,
    )
    assert code == 0, err
    training = json.loads((run_dir / "item_embedder_config.json").read_text())["training"]
    assert {k: training[k] for k in expected} == expected


def test_fit_with_collaborative_targets_reaches_the_training(tiny_bert_dir, items_csv, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["fit", str(items_csv), "--model", tiny_bert_dir, "--output-dir", str(run_dir), "--batch-size", "4",
              "--max-steps", "1", "--lora-r", "4", "--no-progress", "-q", "--interactions",
              str(write_histories(tmp_path)), "--collaborative", "targets", "--holdout-last", "0"]
    code, out, err = run(capsys, *common, "--target-dim", "2", "--view-weight", "0")
    assert code == 0, err
    training = json.loads((run_dir / "item_embedder_config.json").read_text())["training"]
    assert "positive_pairs" not in training
    assert training["targets"]["dim"] == 2 and training["targets"]["view_weight"] == 0.0
    assert training["targets"]["items_with_target"] == 12  # every item of the three histories co-occurs
    code, out, err = run(capsys, *common, "--target-dim", "99")
    assert code == 1 and "dim must be in [1, " in err
    code, out, err = run(capsys, *common, "--view-weight", "0", "--target-weight", "0")
    assert code == 1 and "not both 0" in err
    # target options are refused where they would be ignored, before any model work
    pairs_run = [a for a in common if a not in ("--collaborative", "targets")]
    code, out, err = run(capsys, *pairs_run, "--view-weight", "0", "--target-dim", "2")
    assert code == 1 and "--view-weight, --target-dim only apply with --collaborative targets" in err
    no_histories = common[:common.index("--interactions")] + ["--collaborative", "targets"]
    code, out, err = run(capsys, *no_histories)
    assert code == 1 and "--collaborative targets needs --interactions" in err


def test_fit_encode_push_end_to_end(tiny_bert_dir, items_csv, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"instruction": "This beauty product has the following attributes:",
                                    "fields": {"title": "name", "brand": "brand"}}))
    inter = write_histories(tmp_path)
    code, out, err = run(
        capsys, "fit", str(items_csv), "--model", tiny_bert_dir, "--template-json", str(template),
        "--output-dir", str(run_dir), "--batch-size", "4", "--max-steps", "2", "--seed", "3",
        "--lora-r", "4", "--no-progress", "-q", "--interactions", str(inter), "--pair-prob", "0.3",
    )
    assert code == 0, err
    assert f"saved the fine-tuned embedder to {run_dir}" in out
    cfg = json.loads((run_dir / "item_embedder_config.json").read_text())
    assert cfg["training"]["positive_pairs"] == 3 and cfg["training"]["pair_prob"] == 0.3
    assert cfg["training"]["mask_known_positives"] is True  # partners are left out of the negatives
    from llm_item_embed.prompts import PromptTemplate

    assert PromptTemplate.from_dict(cfg["template"]).fields == {"title": "name", "brand": "brand"}
    assert cfg["lora"]["r"] == 4

    emb_file = tmp_path / "out" / "beauty.safetensors"
    rec_file = tmp_path / "out" / "beauty.itememb"
    code, out, err = run(capsys, "encode", str(items_csv), "--embedder", str(run_dir), "-o", str(emb_file),
                         "--recbole", str(rec_file), "--batch-size", "5", "--no-progress", "-q")
    assert code == 0, err
    E = ItemEmbeddings.load(emb_file)
    df = pd.read_csv(items_csv, dtype={"item_id": str})
    assert E.ids == df["item_id"].tolist()
    assert E.dim == 32 and E.matrix.dtype == np.float32
    assert E.metadata["template"]["instruction"].startswith("This beauty product")
    assert E.metadata["lora"]["r"] == 4
    lines = rec_file.read_text().splitlines()
    assert lines[0] == "iid:token\titem_emb:float_seq" and len(lines) == 13
    first = np.array(lines[1].split("\t")[1].split(), dtype=np.float32)
    np.testing.assert_array_equal(first, E.matrix[0])

    # the same items through the untuned base model with the CLI template flags
    base_file = tmp_path / "out" / "base.safetensors"
    code, _, err = run(capsys, "encode", str(items_csv), "--model", tiny_bert_dir, "--field", "name=title",
                       "--instruction", "Item:", "-o", str(base_file), "--no-progress", "-q")
    assert code == 0, err
    B = ItemEmbeddings.load(base_file)
    assert B.ids == E.ids and PromptTemplate.from_dict(B.metadata["template"]).fields == {"title": "name"}
    assert PromptTemplate.from_dict(B.metadata["template"]).instruction == "Item:"

    # push both, with the token from HF_TOKEN; recorders stand in for the Hub
    rec = HubRecorder().install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = run(capsys, "push", str(emb_file), "user/beauty-emb", "--private", "--commit-message", "v1")
    assert code == 0, err
    assert "https://huggingface.co/user/beauty-emb" in out
    code, out, err = run(capsys, "push", str(run_dir), "user/beauty-embedder")
    assert code == 0, err
    assert [c["repo_id"] for c in rec.created] == ["user/beauty-emb", "user/beauty-embedder"]
    assert [c["private"] for c in rec.created] == [True, False]
    assert all(c["token"] == TOKEN for c in rec.created)
    emb_up, model_up = rec.uploads
    assert sorted(emb_up["files"]) == ["README.md", "embeddings.safetensors"]
    assert emb_up["commit_message"] == "v1"
    assert "item_embedder_config.json" in model_up["files"] and "README.md" in model_up["files"]
    assert any(name.endswith(".safetensors") and "adapter" in name for name in model_up["files"])
    card = model_up["files"]["README.md"].decode()
    assert "library_name: llm-item-embed" in card and "This beauty product" in card
    assert "`title` -> `name`, `brand` -> `brand`" in card and "Dataset size: 12 items" in card
    for up in rec.uploads:
        for name, content in up["files"].items():
            assert TOKEN.encode() not in content, name
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    assert TOKEN not in out + err
    # what was uploaded loads back
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "embeddings.safetensors").write_bytes(emb_up["files"]["embeddings.safetensors"])
    back = ItemEmbeddings.from_pretrained(tmp_path / "hub")
    np.testing.assert_array_equal(back.matrix, E.matrix)
