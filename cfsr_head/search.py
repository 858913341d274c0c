"""Choose training settings on validation: train one run per point of a grid, keep the best.

The project's results choose every row's learning rate this way (``docs/results``): a baseline
trained at one untuned rate makes any method look good. ``grid_search`` trains each point with
the caller's :class:`~cfsr_head.train.Trainer` (so checkpoints, resume and early stopping work as
for a single run) and keeps the point whose run reached the highest validation metric
(``TrainConfig.metric``, NDCG@10 by default); the test split is never looked at.

Example::

    def make_trainer(point):
        encoder = SASRecEncoder(d=64, dropout=point["dropout"])
        model = DualViewHead(encoder=encoder, d=64, semantic=semantic)
        config = TrainConfig(loss="ce", lr=point["lr"],
                             output_dir=f"runs/lr{point['lr']:g}-dropout{point['dropout']:g}")
        return Trainer(model, split, config)

    found = grid_search({"lr": [1e-3, 1e-2], "dropout": [0.2, 0.5]}, make_trainer)
    found.best_point                      # e.g. {"lr": 0.01, "dropout": 0.2}
    found.trainer.test()                  # the kept run, on the test split
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .train import Trainer, TrainResult


class NoEvaluatedRunError(ValueError):
    """No run of a grid was evaluated on validation, so there is nothing to keep."""


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of ``grid``'s values, the first key varying slowest (``itertools.product``
    order). Raises ``ValueError`` naming the key for an empty or repeated value list."""
    if not grid:
        raise ValueError("the grid is empty: give at least one setting with one value")
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"grid[{name!r}] must be a list of values, got {values!r}")
        if not values:
            raise ValueError(f"grid[{name!r}] has no values")
        repeated = sorted({repr(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise ValueError(f"grid[{name!r}] lists {', '.join(repeated)} more than once")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


@dataclass
class SearchRun:
    """One point of the grid and how its run went."""

    point: dict[str, Any]
    result: TrainResult
    seconds: float  # wall time of this call's fit (a resumed, finished run takes about none)

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"point": dict(self.point), "best_metric": r.best_metric, "best_epoch": r.best_epoch,
                "epochs_run": r.epochs_run, "stopped_early": r.stopped_early,
                "resumed_from_epoch": r.resumed_from_epoch, "output_dir": r.output_dir, "seconds": self.seconds}


@dataclass
class GridSearchResult:
    """What :func:`grid_search` returns: every run in grid order, and the kept one's trainer (its
    model holds the best validation epoch's weights, ready for ``trainer.test()``)."""

    runs: list[SearchRun]
    best_index: int
    trainer: Trainer
    metric: str = field(default="NDCG@10")

    @property
    def best(self) -> SearchRun:
        return self.runs[self.best_index]

    @property
    def best_point(self) -> dict[str, Any]:
        return dict(self.best.point)

    @property
    def model(self) -> Any:
        return self.trainer.model

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the metric, the kept point and every run."""
        return {"metric": self.metric, "best_point": self.best_point, "best_index": self.best_index,
                "runs": [run.to_dict() for run in self.runs]}


def grid_search(grid: Mapping[str, Sequence[Any]], make_trainer: Callable[[dict[str, Any]], Trainer], *,
                on_run: Callable[[SearchRun], None] | None = None) -> GridSearchResult:
    """Fit ``make_trainer(point)`` for every point of ``grid`` and keep the best on validation.

    Args:
        grid: setting name -> values to try, e.g. ``{"lr": [1e-3, 1e-2]}``; the names are the
            caller's own, ``make_trainer`` decides where each value goes (model or config).
        make_trainer: builds a fresh model and its :class:`Trainer` for one point. Give each point
            its own ``TrainConfig.output_dir`` to make the search resumable: a rerun finds each
            finished point's checkpoint and returns it at once.
        on_run: called with each :class:`SearchRun` as soon as its point is trained (progress).

    The kept point has the highest ``TrainResult.best_metric``, the first of equals in grid order;
    a run that never evaluated (NaN) is never kept. Only the kept trainer stays in memory.
    Raises ``ValueError`` for a malformed grid (before training anything), for points that validate
    on different measures (``metric``, ``metric_group`` or ``eval_protocol`` of their configs), and
    :class:`NoEvaluatedRunError` (a ``ValueError``) when no run evaluated.
    """
    points = grid_points(grid)
    runs: list[SearchRun] = []
    best_index, best_trainer, metric = -1, None, "NDCG@10"
    first_measure: tuple[str, str, str] | None = None
    for point in points:
        trainer = make_trainer(dict(point))
        if not isinstance(trainer, Trainer):
            raise TypeError(f"make_trainer must return a cfsr_head.Trainer, got {type(trainer).__name__}")
        measure = (trainer.config.metric, trainer.config.metric_group, trainer.config.eval_protocol)
        if runs and measure != first_measure:
            raise ValueError(f"point {point} validates on {measure} (metric, group, protocol) but the first point on "
                             f"{first_measure}: a search compares one validation measure")
        first_measure, metric = measure, trainer.config.metric
        t0 = time.perf_counter()
        result = trainer.fit()
        run = SearchRun(point=dict(point), result=result, seconds=time.perf_counter() - t0)
        runs.append(run)
        if on_run is not None:
            on_run(run)
        value = result.best_metric
        if value is not None and not math.isnan(value) and (
                best_index < 0 or value > runs[best_index].result.best_metric):
            best_index, best_trainer = len(runs) - 1, trainer
    if best_trainer is None:
        raise NoEvaluatedRunError("no run of the grid was evaluated on validation (every best_metric is NaN)")
    return GridSearchResult(runs=runs, best_index=best_index, trainer=best_trainer, metric=metric)
