"""The study harness's bookkeeping: run keys, model selection on validation, table marks."""
from __future__ import annotations

import dataclasses

from benchmarks.reproduce import VARIANTS, Stage2, best_loss, config_hash, results_table


def record(valid: float, test: float) -> dict:
    groups = ("Overall", "Tail item", "Head item", "Tail user", "Head user")
    summary = {g: {"HR@10": test * 2, "NDCG@10": test} for g in groups}
    return {"valid": {"Overall": {"NDCG@10": valid}}, "test": {"full": summary, "sampled": summary}}


def test_run_key_changes_with_every_setting_and_not_otherwise():
    base = {"variant": dataclasses.asdict(VARIANTS["LLM-CFSR"]), "stage2": dataclasses.asdict(Stage2())}
    assert config_hash(base) == config_hash(dict(reversed(list(base.items()))))
    changed = {**base, "stage2": dataclasses.asdict(Stage2(dropout=0.5))}
    assert config_hash(changed) != config_hash(base)


def test_loss_is_chosen_on_validation_never_on_test():
    runs = {"bpr": [record(valid=0.05, test=0.09)], "ce": [record(valid=0.07, test=0.01)]}
    assert best_loss(runs) == "ce"


def test_table_marks_best_bold_and_second_italic():
    table = results_table([("A", [record(0, 0.1)]), ("B", [record(0, 0.3)]), ("C", [record(0, 0.2)])], "full")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "**0.3000**" in rows["B"] and "*0.2000*" in rows["C"]
    assert "*" not in rows["A"]
