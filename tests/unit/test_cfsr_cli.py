"""`cfsr train | evaluate` on a tiny dataset folder written here (item i is followed by i+1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from cfsr_head.cli import main, read_embeddings

N_ITEMS = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def write_dataset(folder: Path, n_items: int = N_ITEMS, n_users: int = 80, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start, length = rng.integers(0, n_items), rng.integers(5, 11)
        rows += [(f"u{u}", f"it{(start + t) % n_items}", 1000 + t) for t in range(length)]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "interactions.csv", index=False)
    pd.DataFrame({"item_id": [f"it{i}" for i in range(n_items)],
                  "title": [f"item number {i}" for i in range(n_items)]}).to_csv(folder / "items.csv", index=False)
    return folder


def semantic_matrix(n_items: int = N_ITEMS, width: int = 16) -> np.ndarray:
    """Item i's vector encodes its position on a circle, so neighbours are similar."""
    ang = 2 * np.pi * np.arange(n_items) / n_items
    cols = [f(ang * k) for k in range(1, width // 2 + 1) for f in (np.cos, np.sin)]
    return np.stack(cols, 1).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def embeddings_file(tmp_path_factory) -> Path:
    """Written with llm_item_embed's own writer (the format the CLI must read), ids shuffled."""
    from llm_item_embed.embeddings import ItemEmbeddings

    order = np.random.default_rng(1).permutation(N_ITEMS)
    path = tmp_path_factory.mktemp("emb") / "items.safetensors"
    ItemEmbeddings([f"it{i}" for i in order], semantic_matrix()[order], {"base_model": "test"}).save(path)
    return path


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(dataset), "--output-dir", str(out), "--d", "8", "--max-len", "10",
            "--n-layers", "1", "--n-heads", "2", "--epochs", "3", "--lr", "5e-3", "--batch-size", "32",
            "--no-progress", *extra]


def test_train_then_evaluate_with_embeddings(dataset, embeddings_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(dataset, out, "--embeddings", str(embeddings_file), "--loss", "ce")) == 0
    printed = capsys.readouterr().out
    assert "best epoch" in printed and "Overall" in printed and "NDCG@10" in printed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors") for p in files), files
    for name in ("config.json", "model.safetensors", "item_index.json", "metrics.json", "run.json",
                 "checkpoints/last/trainer_state.json", "checkpoints/best/model.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["variant"] == "full" and metrics["train"]["epochs_run"] == 3
    assert metrics["train_config"]["loss"] == "ce"
    assert set(metrics["test"]) == {"full", "sampled"}
    full = metrics["test"]["full"]["summary"]["Overall"]
    assert 0 <= full["NDCG@10"] <= 1 and full["HR@20"] >= full["HR@10"] >= full["HR@5"]

    report = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    for col in ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "Tail item", "Head user"):
        assert col in printed
    saved = json.loads(report.read_text())
    # the saved model reproduces the numbers measured right after training
    assert saved["summary"]["Overall"] == pytest.approx(full)
    assert saved["counts"]["Overall"] == 80
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--protocol", "sampled"]) == 0
    assert "sampled" in capsys.readouterr().out


def test_train_prior_trains_the_prior_in_and_evaluate_adds_it_back(dataset, embeddings_file, tmp_path, capsys):
    """--train-prior: the run's test numbers score with the prior added; the saved head is the model
    alone, and evaluate --semantic-prior with the same settings gives the same numbers."""
    out = tmp_path / "tp"
    assert main(train_args(dataset, out, "--train-prior", "1.5", "0", "1", "--quiet")) == 2
    assert "--train-prior needs --embeddings" in capsys.readouterr().err
    assert main(train_args(dataset, out, "--embeddings", str(embeddings_file), "--train-prior", "1", "2", "1",
                           "--quiet")) == 2
    assert "recency must be in [0, 1]" in capsys.readouterr().err and not (out / "run.json").exists()
    assert main(train_args(dataset, out, "--embeddings", str(embeddings_file), "--loss", "ce",
                           "--train-prior", "1.5", "0", "1", "--quiet")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trained_prior"] == {"weight": 1.5, "recency": 0.0, "tail_exponent": 1.0}
    trained = metrics["test"]["full"]["summary"]["Overall"]
    plain, with_prior = tmp_path / "plain.json", tmp_path / "prior.json"
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--json", str(plain)]) == 0
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--json", str(with_prior),
                 "--semantic-prior", "1.5", "--prior-tail-exponent", "1"]) == 0
    assert json.loads(with_prior.read_text())["summary"]["Overall"] == pytest.approx(trained)
    assert json.loads(plain.read_text())["summary"]["Overall"] != pytest.approx(trained)


def test_semantic_view_beats_chance_on_the_pattern(dataset, embeddings_file, tmp_path):
    """Item i+1 follows i and the embeddings place neighbours together: the head must learn it."""
    out = tmp_path / "run"
    assert main(train_args(dataset, out, "--embeddings", str(embeddings_file), "--loss", "ce",
                           "--epochs", "8", "--lr", "1e-2", "--quiet")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # chance NDCG@10 with 24 items (history masked) is about 0.25
    assert metrics["test"]["full"]["summary"]["Overall"]["NDCG@10"] > 0.5


@pytest.mark.parametrize("variant", ["sasrec", "no-semantic", "concat"])
def test_variants(dataset, embeddings_file, tmp_path, variant, capsys):
    extra = [] if variant == "sasrec" else ["--embeddings", str(embeddings_file)]
    out = tmp_path / variant
    assert main(train_args(dataset, out, "--variant", variant, "--epochs", "1", "--quiet", *extra)) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    if variant in ("sasrec", "no-semantic"):
        assert config["use_semantic"] is False
    if variant == "concat":
        assert config["fusion"] == "concat"
    assert main(["evaluate", "--data", str(dataset), "--model", str(out)]) == 0
    assert "Overall" in capsys.readouterr().out


def test_scoring_options_reach_the_model(dataset, embeddings_file, tmp_path, capsys):
    """--score-temperature, --view-loss-weight, --collab-anchor-weight and --center-semantic land in
    the saved config; defaults stay off."""
    out = tmp_path / "cos"
    assert main(train_args(dataset, out, "--variant", "concat", "--embeddings", str(embeddings_file),
                           "--score-temperature", "0.1", "--view-loss-weight", "0.5", "--collab-anchor-weight",
                           "2", "--center-semantic", "--epochs", "1", "--quiet")) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["score_temperature"] == 0.1 and config["view_loss_weight"] == 0.5
    assert config["collab_anchor_weight"] == 2.0 and config["center_semantic"] is True
    plain = tmp_path / "dot"
    assert main(train_args(dataset, plain, "--variant", "sasrec", "--epochs", "1", "--quiet")) == 0
    config = json.loads((plain / "config.json").read_text())["config"]
    assert config["score_temperature"] is None and config["view_loss_weight"] == 0.0
    assert config["collab_anchor_weight"] == 0.0 and config["center_semantic"] is False
    with pytest.raises(SystemExit):
        main(train_args(dataset, tmp_path / "bad", "--variant", "sasrec", "--score-temperature", "0"))
    capsys.readouterr()
    assert main(train_args(dataset, tmp_path / "one", "--variant", "sasrec", "--view-loss-weight", "1")) == 2
    assert "--view-loss-weight needs both views; --variant sasrec" in capsys.readouterr().err
    assert not (tmp_path / "one" / "checkpoints").exists()
    assert main(train_args(dataset, tmp_path / "rnd", "--variant", "sasrec", "--collab-anchor-weight", "1")) == 2
    assert "PCA-initialised ID table" in capsys.readouterr().err
    assert main(train_args(dataset, tmp_path / "ns", "--variant", "no-semantic", "--embeddings", str(embeddings_file),
                           "--center-semantic")) == 2
    assert "--center-semantic needs the semantic view; --variant no-semantic" in capsys.readouterr().err



def test_logit_adjustment_and_popularity_beta(dataset, tmp_path, capsys):
    """--logit-adjustment reaches the training config; evaluate --popularity-beta wraps the model in
    PopularityAdjusted (0 gives the plain numbers; 'auto' chooses on validation, as the API does)."""
    from cfsr_head import DualViewHead, PopularityAdjusted, choose_adjustment, choose_popularity_beta, evaluate
    from cfsr_head.adjust import DEFAULT_BETAS, DEFAULT_PSEUDO_COUNTS
    from cfsr_head import ItemIndex, leave_one_out, load_dataset

    out = tmp_path / "la"
    assert main(train_args(dataset, out, "--variant", "sasrec", "--loss", "ce", "--logit-adjustment", "0.5",
                           "--quiet")) == 0
    assert json.loads((out / "metrics.json").read_text())["train_config"]["logit_adjustment"] == 0.5
    vb = tmp_path / "la_vb"
    assert main(train_args(dataset, vb, "--variant", "sasrec", "--loss", "ce", "--logit-adjustment", "0.5",
                           "--validate-with-logit-bias", "--quiet")) == 0
    assert json.loads((vb / "metrics.json").read_text())["train_config"]["validate_with_logit_bias"] is True
    assert main(train_args(dataset, tmp_path / "vb_alone", "--variant", "sasrec", "--validate-with-logit-bias",
                           "--quiet")) != 0
    assert "needs --logit-adjustment" in capsys.readouterr().err
    assert not (tmp_path / "vb_alone" / "metrics.json").exists()
    reports = {}
    for beta in (None, "0", "0.7", "auto"):
        report = tmp_path / f"eval_{beta}.json"
        extra = [] if beta is None else ["--popularity-beta", beta]
        assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--json", str(report), *extra]) == 0
        printed = capsys.readouterr().out
        assert ("popularity beta" in printed) == (beta is not None)
        reports[beta] = json.loads(report.read_text())
    assert reports["0"]["summary"] == reports[None]["summary"] and "popularity_beta" not in reports[None]
    # the same numbers through the API
    model = DualViewHead.from_pretrained(out)
    split = leave_one_out(load_dataset(dataset), max_len=10, item_index=ItemIndex.load(out / "item_index.json"))
    expected = evaluate(PopularityAdjusted(model, split.item_popularity, 0.7), split, "test", max_len=10).summary()
    assert reports["0.7"]["popularity_beta"] == 0.7
    assert reports["0.7"]["summary"]["Overall"] == pytest.approx(expected["Overall"])
    beta, _ = choose_popularity_beta(model, split, max_len=10)
    assert reports["auto"]["popularity_beta"] == beta
    # --popularity-counts inputs: on test the counts include every user's validation item
    report = tmp_path / "eval_inputs.json"
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--popularity-beta", "0.7",
                 "--popularity-counts", "inputs", "--json", str(report)]) == 0
    assert "popularity counted over the test inputs" in capsys.readouterr().out
    got = json.loads(report.read_text())
    expected = evaluate(PopularityAdjusted(model, split.input_popularity("test"), 0.7), split, "test",
                        max_len=10).summary()
    assert got["popularity_counts"] == "inputs" and reports["0.7"]["popularity_counts"] == "train"
    assert got["summary"]["Overall"] == pytest.approx(expected["Overall"])
    # --popularity-pseudo-count: beta * log(C + count), fixed or chosen on validation with beta
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--popularity-beta", "0.7",
                 "--popularity-pseudo-count", "10", "--json", str(report)]) == 0
    assert "popularity beta 0.7 pseudo count 10.0" in capsys.readouterr().out
    got = json.loads(report.read_text())
    expected = evaluate(PopularityAdjusted(model, split.item_popularity, 0.7, pseudo_count=10.0), split, "test",
                        max_len=10).summary()
    assert got["popularity_pseudo_count"] == 10.0 and reports["0.7"]["popularity_pseudo_count"] == 1.0
    assert got["summary"]["Overall"] == pytest.approx(expected["Overall"])
    assert got["summary"]["Overall"] != pytest.approx(reports["0.7"]["summary"]["Overall"])
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--popularity-beta", "auto",
                 "--popularity-pseudo-count", "auto", "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    best, _ = choose_adjustment(model, split, betas=DEFAULT_BETAS, pseudo_counts=DEFAULT_PSEUDO_COUNTS, max_len=10)
    assert (got["popularity_beta"], got["popularity_pseudo_count"]) == (best.beta, best.pseudo_count)
    # counts without a popularity term would be ignored: refused, naming the missing option
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--popularity-counts", "inputs"]) == 2
    assert "needs --popularity-beta" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--popularity-pseudo-count", "3"]) == 2
    assert "--popularity-pseudo-count needs --popularity-beta" in capsys.readouterr().err
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            main(["evaluate", "--data", str(dataset), "--model", str(out), "--popularity-beta", "0.5",
                  "--popularity-pseudo-count", bad])
    with pytest.raises(SystemExit):
        main(["evaluate", "--data", str(dataset), "--model", str(out), "--popularity-beta", "strong"])
    with pytest.raises(SystemExit):
        main(train_args(dataset, tmp_path / "bad", "--variant", "sasrec", "--logit-adjustment", "-1"))

def test_semantic_prior_from_the_models_table_or_from_embeddings(dataset, embeddings_file, tmp_path, capsys):
    """evaluate --semantic-prior adds SemanticPrior with the model's own semantic table (a SASRec needs
    --embeddings); 'auto' chooses weight and beta together on validation, as choose_adjustment does;
    the numbers match the API's."""
    from cfsr_head import Adjustment, DualViewHead, align_semantic, choose_adjustment, evaluate
    from cfsr_head.adjust import DEFAULT_BETAS, DEFAULT_PRIOR_WEIGHTS, DEFAULT_TAIL_EXPONENTS, VALID_NEGATIVES_SEED_OFFSET
    from cfsr_head import ItemIndex, leave_one_out, load_dataset

    sasrec, dual = tmp_path / "sasrec", tmp_path / "dual"
    assert main(train_args(dataset, sasrec, "--variant", "sasrec", "--loss", "ce", "--epochs", "2", "--quiet")) == 0
    assert main(train_args(dataset, dual, "--embeddings", str(embeddings_file), "--variant", "concat", "--loss", "ce",
                           "--epochs", "2", "--quiet")) == 0
    base = ["evaluate", "--data", str(dataset)]
    assert main([*base, "--model", str(sasrec), "--semantic-prior", "2"]) == 2
    assert "pass --embeddings" in capsys.readouterr().err
    split = leave_one_out(load_dataset(dataset), max_len=10, item_index=ItemIndex.load(dual / "item_index.json"))
    table = align_semantic(read_embeddings(embeddings_file), split.item_index)
    for folder, extra in ((dual, []), (sasrec, ["--embeddings", str(embeddings_file)])):
        model = DualViewHead.from_pretrained(folder)
        report = tmp_path / f"{folder.name}.json"
        assert main([*base, "--model", str(folder), "--semantic-prior", "3", "--prior-recency", "0.5",
                     "--json", str(report), *extra]) == 0
        assert "semantic prior weight 3.0 recency 0.5" in capsys.readouterr().out
        got = json.loads(report.read_text())
        expected = evaluate(Adjustment(0.0, 3.0, 0.5).wrap(model, split, table), split, "test", max_len=10).summary()
        assert got["semantic_prior"] == {"weight": 3.0, "recency": 0.5, "tail_exponent": 0.0}
        assert got["summary"]["Overall"] == pytest.approx(expected["Overall"])
        assert main([*base, "--model", str(folder), "--semantic-prior", "auto", "--popularity-beta", "auto",
                     "--json", str(report), *extra]) == 0
        got = json.loads(report.read_text())
        best, _ = choose_adjustment(model, split, table, DEFAULT_BETAS, DEFAULT_PRIOR_WEIGHTS, max_len=10)
        assert got["semantic_prior"]["weight"] == best.weight and got["popularity_beta"] == best.beta
        # with --protocol sampled, 'auto' chooses on the sampled validation N@10 (negatives from another seed)
        assert main([*base, "--model", str(folder), "--semantic-prior", "auto", "--popularity-beta", "auto",
                     "--protocol", "sampled", "--seed", "3", "--json", str(report), *extra]) == 0
        assert "chosen on validation sampled NDCG@10" in capsys.readouterr().out
        got = json.loads(report.read_text())
        best, _ = choose_adjustment(model, split, table, DEFAULT_BETAS, DEFAULT_PRIOR_WEIGHTS, max_len=10,
                                    protocol="sampled", seed=3 + VALID_NEGATIVES_SEED_OFFSET)
        assert got["semantic_prior"]["weight"] == best.weight and got["popularity_beta"] == best.beta
        expected = evaluate(best.wrap(model, split, table), split, "test", "sampled", seed=3, max_len=10).summary()
        assert got["summary"]["Overall"] == pytest.approx(expected["Overall"])
    # --prior-tail-exponent: the prior weighed by (1 + count) ** -gamma, fixed or chosen with the rest
    model = DualViewHead.from_pretrained(dual)
    own_table = model.semantic_table[1: model.num_items + 1]
    assert main([*base, "--model", str(dual), "--semantic-prior", "3", "--prior-tail-exponent", "1",
                 "--json", str(report)]) == 0
    assert "tail exponent 1.0" in capsys.readouterr().out
    got = json.loads(report.read_text())
    expected = evaluate(Adjustment(0.0, 3.0, 0.0, 1.0).wrap(model, split, own_table), split, "test", max_len=10)
    assert got["semantic_prior"] == {"weight": 3.0, "recency": 0.0, "tail_exponent": 1.0}
    assert got["summary"]["Overall"] == pytest.approx(expected.summary()["Overall"])
    uniform = evaluate(Adjustment(0.0, 3.0, 0.0).wrap(model, split, own_table), split, "test", max_len=10)
    assert got["summary"]["Overall"] != uniform.summary()["Overall"]  # the exponent reached the prior
    assert main([*base, "--model", str(dual), "--semantic-prior", "auto", "--prior-tail-exponent", "auto",
                 "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    best, _ = choose_adjustment(model, split, own_table, weights=DEFAULT_PRIOR_WEIGHTS,
                                tail_exponents=DEFAULT_TAIL_EXPONENTS, max_len=10)
    assert got["semantic_prior"] == {"weight": best.weight, "recency": 0.0, "tail_exponent": best.tail_exponent}
    assert main([*base, "--model", str(dual), "--prior-tail-exponent", "1"]) == 2
    assert "needs --semantic-prior" in capsys.readouterr().err
    assert main([*base, "--model", str(dual), "--semantic-prior", "0", "--json", str(report)]) == 0
    plain = tmp_path / "plain.json"
    assert main([*base, "--model", str(dual), "--json", str(plain)]) == 0
    assert json.loads(report.read_text())["summary"] == json.loads(plain.read_text())["summary"]


def test_gru4rec_encoder(dataset, tmp_path):
    out = tmp_path / "gru"
    assert main(train_args(dataset, out, "--variant", "sasrec", "--encoder", "gru4rec", "--epochs", "1",
                           "--quiet")) == 0
    assert json.loads((out / "config.json").read_text())["encoder"]["type"] == "GRU4RecEncoder"


def test_sampled_softmax_with_several_negatives(dataset, tmp_path):
    out = tmp_path / "ss"
    assert main(train_args(dataset, out, "--variant", "sasrec", "--loss", "sampled_softmax", "--n-negatives", "4",
                           "--epochs", "1", "--quiet")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_config"]["n_negatives"] == 4 and metrics["train_config"]["loss"] == "sampled_softmax"


def test_rerun_resumes_and_extends(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(dataset, out, "--variant", "sasrec", "--epochs", "2", "--quiet")) == 0
    assert main(train_args(dataset, out, "--variant", "sasrec", "--epochs", "3", "--quiet")) == 0
    train = json.loads((out / "metrics.json").read_text())["train"]
    assert train["resumed_from_epoch"] == 2 and train["epochs_run"] == 3
    # a different setting in the same folder is refused, naming it
    assert main(train_args(dataset, out, "--variant", "sasrec", "--lr", "0.1", "--quiet")) == 2
    assert "lr: 0.005 -> 0.1" in capsys.readouterr().err


def test_search_over_lr_dropout_and_loss_keeps_the_best_on_validation(dataset, embeddings_file, tmp_path, capsys):
    """--lr, --dropout and --loss with several values: every combination trained with its own
    checkpoints, the best on validation saved at the top of --output-dir and tested; a rerun with a
    longer list trains only the new points."""
    out = tmp_path / "search"
    base = train_args(dataset, out, "--embeddings", str(embeddings_file))
    lr_at = base.index("--lr")
    del base[lr_at:lr_at + 2]
    assert main([*base, "--lr", "1e-5", "5e-3", "--dropout", "0.1", "0.3", "--loss", "ce"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    runs = metrics["search"]["runs"]
    assert [r["point"] for r in runs] == [{"lr": lr, "dropout": p, "loss": "ce"}
                                          for lr in (1e-5, 5e-3) for p in (0.1, 0.3)]
    valid = [r["best_metric"] for r in runs]
    kept = int(np.argmax(valid))
    assert kept != len(runs) - 1  # the test below tells "the best" from "the last"
    assert metrics["search"]["best_index"] == kept and metrics["search"]["best_point"] == runs[kept]["point"]
    assert metrics["train"]["best_metric"] == valid[kept]
    assert metrics["train_config"]["lr"] == runs[kept]["point"]["lr"]
    for r in runs:
        text = f"lr {r['point']['lr']:g}, dropout {r['point']['dropout']:g}, loss ce"
        folder = out / "checkpoints" / f"lr{r['point']['lr']:g}-dropout{r['point']['dropout']:g}-lossce"
        assert (folder / "best" / "model.safetensors").is_file() and r["output_dir"] == str(folder)
        assert f"{text}: best epoch" in printed
    kept_point = runs[kept]["point"]
    assert f"kept lr {kept_point['lr']:g}, dropout {kept_point['dropout']:g}, loss ce: best on validation" in printed
    # the kept model is the one saved and tested: evaluate reproduces the recorded test numbers,
    # and its saved config carries the kept dropout
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["dropout"] == saved["encoder"]["args"]["dropout"] == kept_point["dropout"]
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(dataset), "--model", str(out), "--json", str(report)]) == 0
    capsys.readouterr()
    assert json.loads(report.read_text())["summary"]["Overall"] == pytest.approx(
        metrics["test"]["full"]["summary"]["Overall"])

    # a longer list: the finished points resume at once, only the new ones train (here a second
    # loss, whose model and training both change)
    assert main([*base, "--lr", "1e-5", "5e-3", "--dropout", "0.1", "0.3", "--loss", "ce", "bpr", "--quiet"]) == 0
    search = json.loads((out / "metrics.json").read_text())["search"]
    again = search["runs"]
    assert [r["point"]["loss"] for r in again] == ["ce", "bpr"] * 4
    assert [r["resumed_from_epoch"] for r in again] == [3, 0] * 4
    assert [r["best_metric"] for r in again[0::2]] == valid
    assert search["best_index"] == int(np.argmax([r["best_metric"] for r in again]))
    kept_config = json.loads((out / "metrics.json").read_text())["train_config"]
    assert kept_config["loss"] == again[search["best_index"]]["point"]["loss"]

    # a search folder does not take a one-setting run, nor the other way round; nor a list with repeats
    assert main([*base, "--lr", "5e-3", "--quiet"]) == 2
    assert "holds a search over several settings" in one_line_error(capsys)
    single = tmp_path / "single"
    assert main(train_args(dataset, single, "--variant", "sasrec", "--epochs", "1", "--quiet")) == 0
    assert main([*train_args(dataset, single, "--variant", "sasrec", "--epochs", "1", "--quiet"),
                 "--dropout", "0.1", "0.2"]) == 2
    assert "holds a run of one setting" in one_line_error(capsys)
    assert main([*base, "--lr", "1e-3", "1e-3", "--output-dir", str(tmp_path / "rep")]) == 2
    assert "grid['lr'] lists 0.001 more than once" in one_line_error(capsys)
    assert main([*base, "--loss", "ce", "ce", "--output-dir", str(tmp_path / "rep")]) == 2
    assert "grid['loss'] lists 'ce' more than once" in one_line_error(capsys)
    assert not (tmp_path / "rep").exists()  # refused before anything is written


def test_generic_safetensors_with_header_ids(tmp_path, dataset):
    path = tmp_path / "plain.safetensors"
    mat = semantic_matrix()
    save_file({"vectors": torch.from_numpy(mat)}, str(path),
              metadata={"ids": json.dumps([f"it{i}" for i in range(N_ITEMS)])})
    table = read_embeddings(path)
    assert table.ids[3] == "it3" and np.array_equal(table.matrix, mat)
    assert main(train_args(dataset, tmp_path / "run", "--embeddings", str(path), "--epochs", "1", "--quiet")) == 0


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_exit_nonzero_naming_the_culprit(dataset, embeddings_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    # full variant without embeddings
    assert main(train_args(dataset, tmp_path / "a", "--variant", "full")) != 0
    assert "--embeddings" in one_line_error(capsys)
    # dataset that does not exist
    assert main(train_args(tmp_path / "nowhere", tmp_path / "b", "--variant", "sasrec")) != 0
    assert "nowhere" in one_line_error(capsys)
    # dataset folder missing a file
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "items.csv").write_text("item_id,title\nit0,x\n")
    assert main(train_args(broken, tmp_path / "c", "--variant", "sasrec")) != 0
    assert "interactions.csv" in one_line_error(capsys)
    # dataset folder missing a column
    nocol = tmp_path / "nocol"
    nocol.mkdir()
    (nocol / "items.csv").write_text("item_id,title\nit0,x\n")
    (nocol / "interactions.csv").write_text("user_id,item_id\nu1,it0\n")
    assert main(train_args(nocol, tmp_path / "c2", "--variant", "sasrec")) != 0
    assert "timestamp" in one_line_error(capsys)
    # embeddings file that does not exist / is not safetensors
    assert main(train_args(dataset, tmp_path / "d", "--embeddings", str(tmp_path / "none.safetensors"))) != 0
    assert "none.safetensors" in one_line_error(capsys)
    assert main(train_args(dataset, tmp_path / "e", "--embeddings", str(dataset / "items.csv"))) != 0
    assert "items.csv" in one_line_error(capsys)
    # embeddings lacking some of the dataset's items: count and examples
    from llm_item_embed.embeddings import ItemEmbeddings

    partial = tmp_path / "partial.safetensors"
    ItemEmbeddings([f"it{i}" for i in range(N_ITEMS - 3)], semantic_matrix()[: N_ITEMS - 3]).save(partial)
    assert main(train_args(dataset, tmp_path / "f", "--embeddings", str(partial))) != 0
    err = one_line_error(capsys)
    assert "3 of 24" in err and "it23" in err
    # ... unless told how to fill them
    with pytest.warns(UserWarning, match="3 of 24"):
        assert main(train_args(dataset, tmp_path / "f2", "--embeddings", str(partial), "--missing-embeddings",
                               "mean", "--epochs", "1", "--quiet")) == 0
    capsys.readouterr()
    # NaN in the semantic table
    nan = semantic_matrix()
    nan[5, 0] = np.nan
    bad = tmp_path / "nan.safetensors"
    save_file({"embeddings": torch.from_numpy(nan)}, str(bad),
              metadata={"ids": json.dumps([f"it{i}" for i in range(N_ITEMS)])})
    assert main(train_args(dataset, tmp_path / "g", "--embeddings", str(bad))) != 0
    assert "NaN" in one_line_error(capsys)
    # a setting the trainer refuses, before anything is written
    assert main(train_args(dataset, tmp_path / "h", "--variant", "sasrec", "--patience", "-2")) != 0
    assert "patience" in one_line_error(capsys) and not (tmp_path / "h").exists()
    # a number that is not one
    with pytest.raises(SystemExit) as exc:
        main(train_args(dataset, out, "--lr", "-1"))
    assert exc.value.code != 0 and "--lr" in capsys.readouterr().err
    # evaluate: a folder that is not a model, and a dataset the model was not trained on
    assert main(["evaluate", "--data", str(dataset), "--model", str(tmp_path)]) != 0
    assert str(tmp_path) in one_line_error(capsys)
    model_dir = tmp_path / "m"
    assert main(train_args(dataset, model_dir, "--variant", "sasrec", "--epochs", "1", "--quiet")) == 0
    other = write_dataset(tmp_path / "other", n_items=N_ITEMS + 6)
    assert main(["evaluate", "--data", str(other), "--model", str(model_dir)]) != 0
    err = one_line_error(capsys)
    assert "it2" in err and "not know" in err


def test_add_items_extends_a_trained_model_that_then_recommends_the_new_items(dataset, embeddings_file, tmp_path,
                                                                             capsys):
    from cfsr_head import DualViewHead, ItemIndex
    from cfsr_head.cli import COLD_START_ROWS
    from cfsr_head.head import COLD_START_ROWS as HEAD_CHOICES
    from llm_item_embed.embeddings import ItemEmbeddings

    assert COLD_START_ROWS == HEAD_CHOICES
    trained = tmp_path / "run"
    assert main(train_args(dataset, trained, "--embeddings", str(embeddings_file), "--loss", "ce", "--quiet")) == 0
    # new items it25..it27 whose vectors sit next to it3, it10, it17 on the circle; it3 is known
    near = semantic_matrix()[[3, 10, 17]] + 0.01
    new_file = tmp_path / "new.safetensors"
    ItemEmbeddings(["it3", "it25", "it26", "it27"], np.concatenate([semantic_matrix()[[3]], near])).save(new_file)
    out = tmp_path / "extended"
    assert main(["add-items", "--model", str(trained), "--embeddings", str(new_file), "--collaborative", "mapping",
                 "--output-dir", str(out)]) == 0
    assert "added 3 item(s) (ID rows: mapping) to the 24" in capsys.readouterr().out
    index = ItemIndex.load(out / "item_index.json")
    assert index.ids == ItemIndex.load(trained / "item_index.json").ids + ["it25", "it26", "it27"]
    before, after = DualViewHead.from_pretrained(trained), DualViewHead.from_pretrained(out)
    assert after.num_items == 27
    torch.testing.assert_close(after.semantic_table[25:], torch.from_numpy(near))
    sd_before = before.state_dict()
    for name, value in after.state_dict().items():                # the trained model itself is unchanged
        if name not in ("semantic_table", "item_embedding.weight"):
            assert torch.equal(value, sd_before[name]), name
    assert torch.equal(after.item_embedding.weight[:25], before.item_embedding.weight)
    run = json.loads((out / "run.json").read_text())
    assert run["settings"] == json.loads((trained / "run.json").read_text())["settings"]
    assert run["added_items"][0]["count"] == 3 and run["added_items"][0]["collaborative"] == "mapping"
    # the extended folder recommends the new items, and takes them in histories
    hist = tmp_path / "h.json"
    hist.write_text(json.dumps({"a": ["it23", "it0", "it26"], "b": ["it1", "it2"]}))
    recs = tmp_path / "recs.json"
    assert main(["recommend", "--model", str(out), "--histories", str(hist), "--k", "27", "--include-seen",
                 "--output", str(recs), "--quiet"]) == 0
    ranked = json.loads(recs.read_text())["recommendations"]
    assert all(len(r["items"]) == 27 and {"it25", "it26", "it27"} <= set(r["items"]) for r in ranked)
    assert all(np.isfinite(r["scores"]).all() for r in ranked)
    # --ids picks some; what the model knows, what the file lacks, an ID-only model and the same folder are refused
    assert main(["add-items", "--model", str(trained), "--embeddings", str(new_file), "--ids", "it26",
                 "--output-dir", str(tmp_path / "one"), "--quiet"]) == 0
    assert ItemIndex.load(tmp_path / "one" / "item_index.json").ids[-1] == "it26"
    assert DualViewHead.from_pretrained(tmp_path / "one").num_items == 25
    for extra, message in ((["--ids", "it3"], "already knows"), (["--ids", "it99"], "not in --embeddings"),
                           ([], "is the --model folder")):
        target = str(trained) if message == "is the --model folder" else str(tmp_path / "x")
        assert main(["add-items", "--model", str(trained), "--embeddings", str(new_file), *extra,
                     "--output-dir", target]) == 2
        assert message in capsys.readouterr().err
    assert main(["add-items", "--model", str(out), "--embeddings", str(new_file), "--output-dir",
                 str(tmp_path / "y")]) == 2
    assert "no item the model does not know" in capsys.readouterr().err
    id_only = tmp_path / "sasrec"
    assert main(train_args(dataset, id_only, "--variant", "sasrec", "--epochs", "1", "--quiet")) == 0
    assert main(["add-items", "--model", str(id_only), "--embeddings", str(new_file), "--output-dir",
                 str(tmp_path / "z")]) == 2
    assert "no semantic table" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_cold_item_dropout_reaches_the_saved_head(dataset, embeddings_file, tmp_path, capsys):
    plain, cold = tmp_path / "plain", tmp_path / "cold"
    for out, extra in ((plain, []), (cold, ["--cold-item-dropout", "0.3"])):
        assert main(train_args(dataset, out, "--embeddings", str(embeddings_file), "--variant", "concat",
                               "--loss", "ce", "--epochs", "2", "--quiet", *extra)) == 0
    config = json.loads((cold / "config.json").read_text())["config"]
    assert config["cold_item_dropout"] == 0.3
    assert json.loads((plain / "config.json").read_text())["config"]["cold_item_dropout"] == 0.0
    from safetensors.torch import load_file
    assert not torch.equal(load_file(plain / "model.safetensors")["item_embedding.weight"],
                           load_file(cold / "model.safetensors")["item_embedding.weight"])
    assert main(train_args(dataset, tmp_path / "x", "--variant", "sasrec", "--cold-item-dropout", "0.3")) == 2
    assert "--cold-item-dropout needs the ID table and a semantic table" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(train_args(dataset, tmp_path / "y", "--cold-item-dropout", "1"))


def test_console_script_help():
    exe = Path(sys.executable).with_name("cfsr")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfsr_head.cli"]
    res = subprocess.run([*cmd, "train", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0 and "--embeddings" in res.stdout and "--variant" in res.stdout


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code != 0 and "frobnicate" in capsys.readouterr().err
