"""grid_search: one run per grid point, the best on validation kept, resumable from checkpoints."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from cfsr_head import DualViewHead, InteractionData, SASRecEncoder, TrainConfig, Trainer, evaluate, leave_one_out
from cfsr_head.search import GridSearchResult, NoEvaluatedRunError, grid_points, grid_search
from cfsr_head.train import TrainResult

from cyclic_data import cyclic_interactions

N_ITEMS = 30

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split():
    """Item i is followed by item i+1: learnable at a sensible rate, not at 1e-6."""
    return leave_one_out(InteractionData(cyclic_interactions(N_ITEMS)), max_len=10)


def trainer_factory(split, output_root=None, epochs=4, made=None):
    def make_trainer(point):
        if made is not None:
            made.append(dict(point))
        torch.manual_seed(0)
        encoder = SASRecEncoder(d=8, n_layers=1, n_heads=2, max_len=10, dropout=point.get("dropout", 0.1))
        model = DualViewHead(encoder, d=8, num_items=split.num_items, use_semantic=False, collab_init="random",
                             loss="ce")
        out = None if output_root is None else str(output_root / f"lr{point['lr']:g}-{point.get('tag', '')}")
        config = TrainConfig(epochs=epochs, batch_size=32, lr=point["lr"], loss="ce", max_len=10, seed=0,
                             show_progress_bar=False, output_dir=out)
        return Trainer(model, split, config)
    return make_trainer


def test_grid_points_in_product_order_and_bad_grids_named():
    assert grid_points({"lr": [1, 2], "dropout": [0.1, 0.2]}) == [
        {"lr": 1, "dropout": 0.1}, {"lr": 1, "dropout": 0.2}, {"lr": 2, "dropout": 0.1}, {"lr": 2, "dropout": 0.2}]
    with pytest.raises(ValueError, match="empty"):
        grid_points({})
    with pytest.raises(ValueError, match=re.escape("grid['lr'] has no values")):
        grid_points({"lr": []})
    with pytest.raises(ValueError, match=re.escape("grid['lr'] lists 0.01 more than once")):
        grid_points({"lr": [0.01, 0.001, 0.01]})
    with pytest.raises(ValueError, match=re.escape("grid['lr'] must be a list")):
        grid_points({"lr": 0.01})


def test_keeps_the_point_that_validates_best_and_its_weights(split):
    seen = []
    found = grid_search({"lr": [1e-6, 3e-2]}, trainer_factory(split), on_run=seen.append)
    assert isinstance(found, GridSearchResult)
    assert [r.point for r in found.runs] == [{"lr": 1e-6}, {"lr": 3e-2}]
    assert [r.point for r in seen] == [{"lr": 1e-6}, {"lr": 3e-2}]  # progress, in grid order
    metrics = [r.result.best_metric for r in found.runs]
    assert metrics[1] > metrics[0]  # 1e-6 barely moves the weights
    assert found.best_index == 1 and found.best_point == {"lr": 3e-2}
    assert found.trainer.config.lr == 3e-2
    # the kept model holds its best epoch's weights: validation reproduces the recorded best metric
    valid = evaluate(found.model, split, split="valid").summary()["Overall"]["NDCG@10"]
    assert valid == pytest.approx(metrics[1], abs=1e-6)
    record = found.to_dict()
    assert record["best_point"] == {"lr": 3e-2} and len(record["runs"]) == 2
    assert record["runs"][1]["best_metric"] == metrics[1] and record["metric"] == "NDCG@10"


def test_first_of_equals_is_kept_and_each_point_gets_a_fresh_model(split):
    made = []
    found = grid_search({"lr": [1e-2], "tag": ["a", "b"]}, trainer_factory(split, epochs=2, made=made))
    assert made == [{"lr": 1e-2, "tag": "a"}, {"lr": 1e-2, "tag": "b"}]
    a, b = (r.result.best_metric for r in found.runs)
    assert a == b  # same seed, same settings: the same run twice
    assert found.best_index == 0


def test_rerun_resumes_every_finished_point_and_trains_only_new_ones(split, tmp_path):
    first = grid_search({"lr": [1e-3, 1e-2]}, trainer_factory(split, tmp_path))
    assert all(r.result.resumed_from_epoch == 0 for r in first.runs)
    again = grid_search({"lr": [1e-3, 1e-2, 3e-2]}, trainer_factory(split, tmp_path))
    assert [r.result.resumed_from_epoch for r in again.runs] == [4, 4, 0]  # finished points return at once
    assert [r.result.best_metric for r in again.runs[:2]] == [r.result.best_metric for r in first.runs]
    metrics = [r.result.best_metric for r in again.runs]
    assert again.best_index == int(np.argmax(metrics))


def test_a_run_that_never_evaluated_is_never_kept(split):
    class NoEvaluation(Trainer):
        def fit(self, max_epochs_this_run=None):
            return TrainResult(history=[], best_epoch=0, best_metric=math.nan, metric="NDCG@10", epochs_run=0,
                               stopped_early=False)

    make = trainer_factory(split, epochs=1)

    def make_trainer(point):
        real = make(point)
        return NoEvaluation(real.model, split, real.config) if point["lr"] == 1e-2 else real

    found = grid_search({"lr": [1e-2, 1e-3]}, make_trainer)
    assert found.best_index == 1
    with pytest.raises(NoEvaluatedRunError, match="no run of the grid was evaluated"):
        grid_search({"lr": [1e-2]}, make_trainer)
    with pytest.raises(ValueError, match="a search compares one validation measure"):
        grid_search({"protocol": ["full", "sampled"]}, lambda point: Trainer(
            make({"lr": 1e-2}).model, split, TrainConfig(epochs=1, max_len=10, show_progress_bar=False,
                                                          eval_protocol=point["protocol"])))
    with pytest.raises(TypeError, match="must return a cfsr_head.Trainer"):
        grid_search({"lr": [1e-2]}, lambda point: object())
