"""Training loop for any model that follows the cfsr_head model protocol.

``Trainer(model, split_data, TrainConfig(...)).fit()`` trains with Adam over
``split_data.train_batches``, evaluates validation NDCG@10 (``config.metric``) every
``eval_every`` epochs, stops early after ``patience`` evaluations without improvement, restores the
best weights at the end and returns a :class:`TrainResult`. ``trainer.test()`` evaluates on the
test split.

Reproducibility: every epoch re-seeds python/numpy/torch and the batch generator from
``(seed, epoch)``, so a run resumed from ``output_dir/last`` follows exactly the same path as an
uninterrupted one, provided it computes the same way. The bits depend on torch's CPU thread count
(two SASRec epochs on ml-100k end up to 5e-5 apart at 1 and 2 threads), the torch version and the
device; :func:`compute_environment` records them in ``trainer_state.json`` and
:class:`TrainResult`, and resuming under a different one warns.

Files (only safetensors and JSON, every write atomic, written by the main process after every
epoch)::

    output_dir/last/model.safetensors       model state_dict
    output_dir/last/optimizer.safetensors   optimizer state, flattened to "state.<param>.<key>"
    output_dir/last/trainer_state.json      epoch, best metric/epoch, patience counter, history,
                                            param groups, config
    output_dir/best/model.safetensors       weights of the best validation epoch
    output_dir/best/info.json               best epoch and metric

``last`` is staged in ``last.new`` and swapped in by renames, so an interruption at any moment
leaves one complete checkpoint; a NaN/inf loss raises ``FloatingPointError`` naming the epoch and
step and leaves the previous epoch's checkpoint untouched.

Runs under Accelerate: the model (wrapped in a small loss module so that DDP sees the forward
pass) and the optimizer go through ``accelerator.prepare``; each process takes every
``num_processes``-th batch; evaluation and checkpoints happen on the main process and the
validation metric is broadcast to the others.
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

LOSSES = ("bpr", "bce", "ce", "sampled_softmax")
# Config fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"epochs", "patience", "output_dir", "resume", "show_progress_bar", "eval_every"}


@dataclass
class TrainConfig:
    """Settings of one training run (every field is JSON-serialisable)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "bpr"  # "bpr" | "bce" | "ce" | "sampled_softmax"
    n_negatives: int = 1
    max_len: int = 50
    patience: int = 20  # evaluations without improvement before stopping (None/0: never stop early)
    eval_every: int = 1
    eval_protocol: str = "full"  # "full" | "sampled"
    metric: str = "NDCG@10"
    metric_group: str = "overall"
    seed: int = 42
    output_dir: str | None = None
    resume: bool = True
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (used when the Trainer builds the Accelerator)
    show_progress_bar: bool = True
    max_grad_norm: float | None = None
    eval_batch_size: int = 512
    extra_loss_weight: float = 1.0
    sliding_windows: bool = False  # cut long training sequences into max_len windows (all positions trained)
    trim_padding: bool = True  # drop all-padding leading columns of each (left-padded) batch
    length_buckets: int = 0  # >0: batches of similar-length sequences (sorted within chunks of this many batches)
    # tau > 0: the logit-adjusted loss (Menon et al., 2021): every training logit of item i gets
    # + tau * log(1 + its training count), so the model learns scores with the popularity prior
    # factored out; evaluation scores are unchanged (model.loss must accept ``logit_bias``)
    logit_adjustment: float = 0.0
    # with logit_adjustment tau > 0: validate (best-epoch choice, early stopping) with the training
    # bias tau * log(1 + count) added back, i.e. the scores the loss was trained on, instead of the
    # model's own scores; test and the saved model are unchanged
    validate_with_logit_bias: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not isinstance(self.length_buckets, int) or self.length_buckets < 0:
            raise ValueError(f"TrainConfig.length_buckets must be an integer >= 0, got {self.length_buckets!r}")
        for name in ("epochs", "batch_size", "max_len", "eval_every", "n_negatives", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.patience is not None and self.patience < 0:
            raise ValueError(f"TrainConfig.patience must be >= 0, got {self.patience!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.eval_protocol not in ("full", "sampled"):
            raise ValueError(f"TrainConfig.eval_protocol must be 'full' or 'sampled', got {self.eval_protocol!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError("TrainConfig.mixed_precision must be 'no', 'fp16' or 'bf16', "
                             f"got {self.mixed_precision!r}")
        if not (math.isfinite(self.logit_adjustment) and self.logit_adjustment >= 0):
            raise ValueError(f"TrainConfig.logit_adjustment must be a finite number >= 0, got {self.logit_adjustment!r}")
        if not isinstance(self.validate_with_logit_bias, bool):
            raise ValueError("TrainConfig.validate_with_logit_bias must be True or False, "
                             f"got {self.validate_with_logit_bias!r}")
        if self.validate_with_logit_bias and self.logit_adjustment == 0:
            raise ValueError("TrainConfig.validate_with_logit_bias needs logit_adjustment > 0 "
                             "(there is no bias to add)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.output_dir is not None:
            self.output_dir = str(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def compute_environment(device: torch.device | str = "cpu", num_processes: int = 1) -> dict[str, Any]:
    """What a seeded run's exact numbers depend on beyond its configuration: the torch version,
    torch's intra-op thread count (CPU reductions split differently across threads), the device
    type (``"cpu"``, ``"cuda"``; not the index, since every process of a run has its own GPU) and
    the number of processes."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": torch.device(device).type,
            "num_processes": int(num_processes)}


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns. ``history`` has one dict per epoch: ``epoch``, ``train_loss``,
    ``valid`` (metric summary, or None on epochs without evaluation), ``metric``, ``epoch_time``,
    ``train_time``, ``eval_time``."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float
    metric: str
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int = 0
    output_dir: str | None = None
    best_valid: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None  # compute_environment() of the run's last epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainBatch:
    """One training batch as given to ``extra_loss``: ``neg`` is ``[B, L]`` or ``[B, L, n]``;
    ``extras`` holds anything ``train_batches`` yields beyond (input_seq, pos, neg); with an
    ``extra_loss`` the Trainer asks for user rows, so ``users`` (``extras[0]``, LongTensor ``[B]``,
    index into ``split_data.user_ids``) is set when the split supports it."""

    input_seq: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    padding_mask: torch.Tensor
    extras: tuple = ()
    epoch: int = 0
    step: int = 0

    @property
    def users(self) -> torch.Tensor | None:
        return self.extras[0] if self.extras else None


ExtraLoss = Callable[[nn.Module, TrainBatch], torch.Tensor]


class _LossModule(nn.Module):
    """Wraps the model so that one ``forward`` computes the whole training loss (DDP needs the
    loss to come out of the prepared module's forward to synchronise gradients)."""

    def __init__(self, model: nn.Module, loss_type: str, extra_loss: ExtraLoss | None, extra_weight: float,
                 logit_bias: torch.Tensor | None = None, prior: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        # the trained-in prior wraps ``model``: kept out of the module tree (a plain tuple), so that
        # the model's parameters are registered once
        self._prior = (prior,)
        self.loss_type = loss_type
        self.extra_loss = extra_loss
        self.extra_weight = extra_weight
        # a buffer, so that accelerate moves it to the model's device (not saved: persistent=False)
        self.register_buffer("logit_bias", logit_bias, persistent=False)

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        kwargs: dict[str, Any] = {} if self.logit_bias is None else {"logit_bias": self.logit_bias}
        if self._prior[0] is not None:
            kwargs["prior"] = self._prior[0]
        loss = self.model.loss(batch.input_seq, batch.pos, batch.neg,
                               padding_mask=batch.padding_mask, loss_type=self.loss_type, **kwargs)
        extra = None
        if self.extra_loss is not None:
            extra = self.extra_loss(self.model, batch)
            loss = loss + self.extra_weight * extra
        return loss, extra


def make_accelerator(mixed_precision: str = "no") -> Any:
    """An ``Accelerator`` for ``mixed_precision`` (DDP with ``find_unused_parameters``, since
    ablations leave parameters without gradients). A launcher's setting (``accelerate launch
    --mixed_precision``) wins over the default ``"no"``; in a single process an Accelerate state
    left by an earlier run with another precision is reset instead of failing."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    mp: str | None = mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mp == "no" and launcher not in (None, "", "no"):
        mp = None

    def build() -> Any:
        return Accelerator(mixed_precision=mp,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])

    try:
        return build()
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        if PartialState().num_processes > 1:
            raise ValueError(f"TrainConfig.mixed_precision={mixed_precision!r}: Accelerate is already set up in "
                             "this process with another precision; set it in the accelerate launch config "
                             "or pass accelerator=...") from exc
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return build()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed derived from (seed, epoch)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**32], dtype=np.uint64)) % (2**63))


def to_jsonable(x: Any) -> Any:
    """``x`` made JSON-safe: dict keys as str, tuples as lists, numpy scalars and tensors as numbers or
    lists, non-finite floats as None."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<key>``) and a JSON part."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state_dict["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = to_jsonable(value)
    meta = {"param_groups": to_jsonable(state_dict["param_groups"]), "scalars": scalars}
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _find_metric(summary: dict[str, Any], group: str, metric: str) -> float:
    """Read ``summary[group][metric]`` with case-insensitive keys; clear error if absent."""
    groups = {str(k).lower(): v for k, v in summary.items()}
    if group.lower() not in groups:
        raise KeyError(f"evaluation summary has no group {group!r} (groups: {list(summary)})")
    values = {str(k).lower(): v for k, v in groups[group.lower()].items()}
    if metric.lower() not in values:
        raise KeyError(f"evaluation summary group {group!r} has no metric {metric!r} "
                       f"(metrics: {list(groups[group.lower()])})")
    return float(values[metric.lower()])


def _accepted_kwargs(fn: Callable) -> set[str]:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return {"n_negatives", "sliding", "with_users", "*"}
    return {p.name for p in params}


def _metric_k(metric: str) -> int | None:
    try:
        return int(metric.split("@", 1)[1])
    except (IndexError, ValueError):
        return None


def trim_leading_padding(seq: torch.Tensor, *aligned: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the leading columns of a left-padded batch that are padding (0) in every row of ``seq``,
    and the same columns of each ``aligned`` tensor (``[B, L, ...]``). Exact up to float rounding for
    the built-in encoders, whose positions count real items only; short-sequence datasets train much
    faster. At least one column is kept."""
    real = (seq != 0).any(0)
    first = int(real.to(torch.int8).argmax()) if bool(real.any()) else seq.shape[1] - 1
    if first <= 0:
        return (seq, *aligned)
    return (seq[:, first:], *(a[:, first:] for a in aligned))


class Trainer:
    """Train a protocol model on a ``SplitData``.

    Args:
        model: implements ``loss(item_seq, pos, neg, padding_mask=None, loss_type=...)`` and what
            ``evaluate`` needs (``user_state``, ``full_scores``, ``score``, ``num_items``).
        split_data: has ``train_batches(batch_size, max_len, rng, ...)`` yielding left-padded
            ``(input_seq, pos, neg[, extras...])`` numpy arrays or tensors.
        config: :class:`TrainConfig`.
        accelerator: an ``accelerate.Accelerator``; built from ``config.mixed_precision`` if None.
        extra_loss: optional ``f(model, batch: TrainBatch) -> scalar`` added to the loss with
            weight ``config.extra_loss_weight`` (e.g. LLM-ESR self-distillation).
        eval_fn: optional replacement for ``cfsr_head.evaluate.evaluate`` with the same signature.
        callbacks: called as ``cb(trainer, record)`` after each epoch's checkpoint is written
            (raising ``KeyboardInterrupt`` there simulates an interruption), or objects with
            ``on_epoch_end(trainer, record)``.
        prior: optional ``SemanticPrior`` around ``model``, trained in: every training logit gets
            its bias (``SemanticPrior.training_bias``; ``model.loss`` must accept ``prior``), so the
            model learns what the prior does not say, and validation, ``test`` and ``scoring_model``
            score with the prior added. Its weight, recency and tail exponent are kept in the
            checkpoint, and a resume with other ones is refused.

    Hooks: ``extra_loss`` and callback objects may define ``on_fit_start(trainer)`` (called once
    the weights are final for the first epoch of this call, i.e. after any resume: the place to
    build state derived from the model, such as a self-distillation teacher bank) and
    ``on_epoch_end(trainer, record)``. ``fit`` leaves the caller's python/numpy/torch RNG state
    as it found it.
    """

    def __init__(self, model: nn.Module, split_data: Any, config: TrainConfig | None = None,
                 accelerator: Any = None, extra_loss: ExtraLoss | None = None,
                 eval_fn: Callable[..., Any] | None = None,
                 callbacks: Iterable[Callable[["Trainer", dict], None]] = (),
                 prior: nn.Module | None = None) -> None:
        self.config = config if config is not None else TrainConfig()
        lacking = [n for n in ("loss", "user_state", "full_scores", "score") if not callable(getattr(model, n, None))]
        if lacking:
            raise TypeError(f"model lacks the protocol method(s) {', '.join(lacking)} (see docs/architecture.md)")
        if not callable(getattr(split_data, "train_batches", None)):
            raise TypeError("split_data must have a train_batches(batch_size, max_len, rng) method")
        if prior is not None:
            if getattr(prior, "model", None) is not model:
                raise ValueError("prior must wrap the model being trained (SemanticPrior(model, ...))")
            if not callable(getattr(prior, "training_bias", None)):
                raise TypeError(f"prior ({type(prior).__name__}) has no training_bias method")
            accepted = _accepted_kwargs(model.loss)
            if "prior" not in accepted and "*" not in accepted:
                raise TypeError(f"a trained-in prior needs model.loss to accept prior "
                                f"({type(model).__name__}.loss does not)")
        self.model = model
        self.prior = prior
        self.split_data = split_data
        self.extra_loss = extra_loss
        self.eval_fn = eval_fn
        self.callbacks = list(callbacks)
        if accelerator is None:
            accelerator = make_accelerator(self.config.mixed_precision)
        self.accelerator = accelerator
        self.output_dir = Path(self.config.output_dir) if self.config.output_dir else None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._prepared = False

    # ------------------------------------------------------------------ setup
    def _prepare(self) -> None:
        if self._prepared:
            return
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if self.prior is not None:
            self.prior.to(self.accelerator.device)
        self.loss_module = _LossModule(self.model, cfg.loss, self.extra_loss, cfg.extra_loss_weight,
                                       self._logit_bias(), self.prior)
        self.prepared_loss, self.prepared_optimizer = self.accelerator.prepare(self.loss_module, self.optimizer)
        self._validation_model()  # a model that cannot be wrapped fails here, before any training step
        self._prepared = True

    def _logit_bias(self) -> torch.Tensor | None:
        """``tau * log(1 + training count)`` per item index (``config.logit_adjustment`` tau > 0), else None."""
        tau = self.config.logit_adjustment
        if tau == 0:
            return None
        accepted = _accepted_kwargs(self.model.loss)
        if "logit_bias" not in accepted and "*" not in accepted:
            raise TypeError(f"TrainConfig.logit_adjustment={tau} needs model.loss to accept logit_bias "
                            f"({type(self.model).__name__}.loss does not)")
        counts = getattr(self.split_data, "item_popularity", None)
        if counts is None:
            raise TypeError("TrainConfig.logit_adjustment > 0 needs split_data.item_popularity "
                            "(training interaction counts per item index)")
        from .adjust import log_popularity

        n_items = getattr(self.model, "num_items", None)
        return tau * log_popularity(counts, int(n_items) if n_items is not None else len(counts) - 1)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def scoring_model(self) -> nn.Module:
        """The model as it scores: ``prior`` (the model with the trained-in prior added) when there
        is one, else the model itself."""
        return self.prior if self.prior is not None else self.model

    @property
    def prior_settings(self) -> dict[str, float] | None:
        """The trained-in prior's weight, recency and tail exponent (None without one): what the
        checkpoint keeps and a resume must match."""
        if self.prior is None:
            return None
        return {k: float(getattr(self.prior, k)) for k in ("weight", "recency", "tail_exponent")}

    # -------------------------------------------------------------- evaluation
    def _evaluate(self, split: str, protocol: str, model: nn.Module | None = None, **kwargs: Any) -> Any:
        fn = self.eval_fn
        if fn is None:
            from .evaluate import evaluate as fn
        accepted = _accepted_kwargs(fn)
        if "*" not in accepted:
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        model = self.scoring_model if model is None else model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model, self.split_data, split=split, protocol=protocol, **kwargs)
        finally:
            model.train(was_training)

    def _valid_metric(self) -> tuple[float, dict[str, Any]]:
        cfg = self.config
        kwargs: dict[str, Any] = {"batch_size": cfg.eval_batch_size, "max_len": cfg.max_len, "seed": cfg.seed}
        k = _metric_k(cfg.metric)
        if k is not None:
            kwargs["ks"] = (k,)
        if cfg.metric_group.lower() == "overall":
            kwargs["groups"] = None  # only "Overall" is needed: skip the group bookkeeping
        result = self._evaluate("valid", cfg.eval_protocol, model=self._validation_model(), **kwargs)
        summary = result.summary() if hasattr(result, "summary") else result
        return _find_metric(summary, cfg.metric_group, cfg.metric), to_jsonable(summary)

    def _validation_model(self) -> nn.Module:
        """The model the best epoch is chosen on: ``scoring_model``, with the logit-adjusted loss's
        training bias added back under ``config.validate_with_logit_bias`` (wrapped anew at each
        call, in the model's current train/eval mode, which ``_evaluate`` restores)."""
        if not self.config.validate_with_logit_bias:
            return self.scoring_model
        from .adjust import PopularityAdjusted

        model = self.scoring_model
        wrapped = PopularityAdjusted(model, self.split_data.item_popularity, beta=-self.config.logit_adjustment)
        return wrapped.to(self.device).train(model.training)

    def test(self, protocol: str = "full", **kwargs: Any) -> Any:
        """Evaluate the current (after ``fit``: best) weights on the test split (all groups, K in
        5/10/20 with the default evaluator); kwargs go to the evaluator."""
        kwargs.setdefault("max_len", self.config.max_len)
        kwargs.setdefault("batch_size", self.config.eval_batch_size)
        return self._evaluate("test", protocol, **kwargs)

    def validate(self, protocol: str | None = None, **kwargs: Any) -> Any:
        """Evaluate the current weights on the validation split."""
        return self._evaluate("valid", protocol or self.config.eval_protocol, **kwargs)

    # -------------------------------------------------------------- checkpoints
    def _checkpoint_dir(self) -> Path | None:
        """The newest complete ``last`` checkpoint (a crash mid-swap leaves ``last.new``/``last.old``)."""
        if self.output_dir is None:
            return None
        for name in ("last", "last.new", "last.old"):
            cand = self.output_dir / name
            if (cand / "trainer_state.json").is_file():
                return cand
        return None

    def _save_last(self, state: dict[str, Any]) -> None:
        """Write the whole checkpoint into ``last.new`` (state JSON last), then swap it in for
        ``last``: an interruption at any point leaves one complete checkpoint."""
        import shutil

        assert self.output_dir is not None
        stage, last, old = (self.output_dir / n for n in ("last.new", "last", "last.old"))
        shutil.rmtree(stage, ignore_errors=True)
        opt_tensors, opt_meta = flatten_optimizer_state(self.prepared_optimizer.state_dict())
        atomic_save_safetensors(stage / "model.safetensors", _cpu_state_dict(self.model))
        atomic_save_safetensors(stage / "optimizer.safetensors", opt_tensors)
        scaler = getattr(self.accelerator, "scaler", None)
        full = dict(state, optimizer=opt_meta, config=self.config.to_dict(), prior=self.prior_settings,
                    environment=self._environment(),
                    scaler=to_jsonable(scaler.state_dict()) if scaler is not None else None)
        atomic_write_json(stage / "trainer_state.json", to_jsonable(full))  # marks the stage complete
        if last.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(last, old)
        os.replace(stage, last)
        shutil.rmtree(old, ignore_errors=True)

    def _save_best(self, epoch: int, metric: float, valid: dict[str, Any]) -> None:
        assert self.output_dir is not None
        atomic_save_safetensors(self.output_dir / "best" / "model.safetensors", _cpu_state_dict(self.model))
        atomic_write_json(self.output_dir / "best" / "info.json",
                          {"epoch": epoch, "metric": self.config.metric, "value": metric, "valid": valid})

    def _load_model(self, path: Path) -> None:
        tensors, _ = load_safetensors(path)
        try:
            self.model.load_state_dict(tensors)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not match this model's architecture: {exc}") from exc

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        old = saved.get("config", {})
        new = self.config.to_dict()
        diff = [k for k in new if k not in _RESUMABLE_CHANGES and k in old and old[k] != new[k]]
        if saved.get("prior") != self.prior_settings:
            diff.append("prior")
            old, new = {**old, "prior": saved.get("prior")}, {**new, "prior": self.prior_settings}
        if diff:
            details = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff)
            raise ValueError(f"{self.output_dir} holds a run with a different configuration ({details}); "
                             "use another output_dir or resume=False")

    def _environment(self) -> dict[str, Any]:
        return compute_environment(self.device, self.accelerator.num_processes)

    def _warn_if_environment_changed(self, saved: dict[str, Any]) -> None:
        """Resuming elsewhere is allowed, but the run then stops being bit-identical to an
        uninterrupted one; say so, naming what changed."""
        old, new = saved.get("environment"), self._environment()
        if not old:  # checkpoints written before the environment was recorded
            return
        changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
        if changed:
            warnings.warn(f"{self.output_dir}: resuming a run saved under a different environment "
                          f"({', '.join(changed)}); the resumed run will not be bit-identical to an "
                          "uninterrupted one", RuntimeWarning, stacklevel=3)

    def _resume(self) -> dict[str, Any] | None:
        last = self._checkpoint_dir() if self.config.resume else None
        if last is None:
            return None
        saved = read_json(last / "trainer_state.json")
        self._check_resumable(saved)
        if self.accelerator.is_main_process:  # once per run, not once per process
            self._warn_if_environment_changed(saved)
        self._load_model(last / "model.safetensors")
        opt_tensors, _ = load_safetensors(last / "optimizer.safetensors")
        opt_state = unflatten_optimizer_state(opt_tensors, saved["optimizer"])
        self.prepared_optimizer.load_state_dict(opt_state)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        return saved

    # -------------------------------------------------------------- training
    def _batches(self, epoch: int) -> tuple[Iterable, int | None]:
        """This process's share of the epoch's batches, from a generator seeded by (seed, epoch)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch])
        fn = self.split_data.train_batches
        accepted = _accepted_kwargs(fn)
        kwargs: dict[str, Any] = {}
        if cfg.n_negatives != 1:
            if "n_negatives" not in accepted:
                raise ValueError(f"n_negatives={cfg.n_negatives} needs a train_batches(..., n_negatives=) "
                                 f"that draws several negatives; {type(self.split_data).__name__} has none")
            kwargs["n_negatives"] = cfg.n_negatives
        if self.extra_loss is not None and "with_users" in accepted:
            kwargs["with_users"] = True  # extra losses (e.g. self-distillation) get batch.users
        if cfg.sliding_windows:
            if "sliding" not in accepted:
                raise ValueError(f"sliding_windows=True needs train_batches(..., sliding=); "
                                 f"{type(self.split_data).__name__} has none")
            kwargs["sliding"] = True
        if cfg.length_buckets:
            if "length_buckets" not in accepted:
                raise ValueError(f"length_buckets={cfg.length_buckets} needs train_batches(..., length_buckets=); "
                                 f"{type(self.split_data).__name__} has none")
            kwargs["length_buckets"] = cfg.length_buckets
        batches = fn(cfg.batch_size, cfg.max_len, rng, **kwargs)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world == 1:
            total = None
            counter = getattr(self.split_data, "num_train_rows", None)
            if callable(counter):
                try:
                    total = math.ceil(counter(cfg.max_len, sliding=cfg.sliding_windows) / cfg.batch_size)
                except TypeError:
                    total = None
            return batches, total
        batches = list(batches)
        usable = (len(batches) // world) * world  # equal step counts, or DDP would hang
        return batches[rank:usable:world], usable // world

    def _to_batch(self, raw: Any, epoch: int, step: int) -> TrainBatch:
        if not isinstance(raw, (tuple, list)) or len(raw) < 3:
            raise ValueError("train_batches must yield (input_seq, pos, neg[, extras...]) tuples")
        dev = self.device

        def t(x: Any) -> torch.Tensor:
            return torch.as_tensor(x).to(dev, non_blocking=True).long()

        seq, pos, neg = t(raw[0]), t(raw[1]), t(raw[2])
        if self.config.trim_padding:
            seq, pos, neg = trim_leading_padding(seq, pos, neg)
        extras = tuple(torch.as_tensor(x).to(dev) if isinstance(x, (np.ndarray, torch.Tensor)) else x
                       for x in raw[3:])
        return TrainBatch(seq, pos, neg, seq == 0, extras, epoch, step)

    def _train_epoch(self, epoch: int) -> float:
        cfg = self.config
        acc = self.accelerator
        batches, total = self._batches(epoch)
        self.prepared_loss.train()
        show = cfg.show_progress_bar and acc.is_main_process
        if show:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        loss_sum, n_steps = 0.0, 0
        for step, raw in enumerate(batches, start=1):
            batch = self._to_batch(raw, epoch, step)
            self.prepared_optimizer.zero_grad(set_to_none=True)
            loss, _ = self.prepared_loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                if show:
                    batches.close()
                good = self._checkpoint_dir()
                where = f"; the last good checkpoint is {good}" if good is not None else ""
                raise FloatingPointError(f"non-finite training loss ({value}) at epoch {epoch}, step {step}{where}")
            acc.backward(loss)
            if cfg.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.prepared_optimizer.step()
            loss_sum += value
            n_steps += 1
            if show and (step % 20 == 0 or step == 1):
                batches.set_postfix(loss=f"{value:.4f}")
        if show:
            batches.close()
        if n_steps == 0:
            raise ValueError("train_batches yielded no batches: no training sequences?")
        return loss_sum / n_steps

    def fit(self, max_epochs_this_run: int | None = None) -> TrainResult:
        """Train until ``epochs`` or early stopping, restore the best weights, return the result.

        With ``output_dir`` set and ``resume`` true, continues from ``output_dir/last`` when it
        exists (a finished run returns at once). ``max_epochs_this_run`` stops after that many
        epochs of this call (the run can be resumed later)."""
        devices = [self.device] if self.device.type == "cuda" else []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):  # leave the caller's RNG untouched
                return self._fit(max_epochs_this_run)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _hooks(self, name: str) -> list[Callable]:
        objs = [self.extra_loss, *self.callbacks]
        return [getattr(o, name) for o in objs if o is not None and callable(getattr(o, name, None))]

    def _fit(self, max_epochs_this_run: int | None) -> TrainResult:
        cfg = self.config
        acc = self.accelerator
        self._prepare()
        seed_everything(cfg.seed)
        saved = self._resume()
        if saved is not None:
            start_epoch = int(saved["epoch"]) + 1
            best_metric = saved["best_metric"]
            best_metric = -math.inf if best_metric is None else float(best_metric)
            best_epoch = int(saved["best_epoch"])
            bad_evals = int(saved["bad_evals"])
            history = list(saved["history"])
            stopped_early = bool(saved.get("stopped_early", False))
            best_valid = saved.get("best_valid")
        else:
            start_epoch, best_metric, best_epoch, bad_evals = 1, -math.inf, 0, 0
            history, stopped_early, best_valid = [], False, None
        resumed_from = start_epoch - 1
        main = acc.is_main_process
        epochs_this_run = 0
        if start_epoch <= cfg.epochs and not stopped_early:
            for hook in self._hooks("on_fit_start"):
                hook(self)
        for epoch in range(start_epoch, cfg.epochs + 1):
            if stopped_early:
                break
            if max_epochs_this_run is not None and epochs_this_run >= max_epochs_this_run:
                break
            seed_everything(_epoch_seed(cfg.seed, epoch))
            t0 = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            t1 = time.perf_counter()
            record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "valid": None, "metric": None}
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                acc.wait_for_everyone()
                payload = [None, None]
                if main:
                    payload = list(self._valid_metric())
                if acc.num_processes > 1:
                    from accelerate.utils import broadcast_object_list

                    payload = broadcast_object_list(payload)
                value, summary = payload
                record["metric"], record["valid"] = value, summary
                if value > best_metric:
                    best_metric, best_epoch, bad_evals, best_valid = value, epoch, 0, summary
                    if main:
                        if self.output_dir:
                            self._save_best(epoch, value, summary)
                        else:
                            self._best_state = _cpu_state_dict(self.model)
                else:
                    bad_evals += 1
                if cfg.patience and bad_evals >= cfg.patience:
                    stopped_early = True
            t2 = time.perf_counter()
            record.update(train_time=t1 - t0, eval_time=t2 - t1, epoch_time=t2 - t0)
            history.append(record)
            epochs_this_run += 1
            if main and self.output_dir:
                self._save_last({"epoch": epoch, "best_metric": best_metric if best_epoch else None,
                                 "best_epoch": best_epoch, "bad_evals": bad_evals, "history": history,
                                 "stopped_early": stopped_early, "best_valid": best_valid})
            acc.wait_for_everyone()
            if main and cfg.show_progress_bar:
                msg = f"epoch {epoch}: loss {train_loss:.4f}"
                if record["metric"] is not None:
                    msg += f", valid {cfg.metric} {record['metric']:.4f} (best {best_metric:.4f} @ {best_epoch})"
                _print(msg)
            for cb in self.callbacks:
                hook = getattr(cb, "on_epoch_end", None)
                (hook if callable(hook) else cb)(self, record)
            if self.extra_loss is not None and callable(getattr(self.extra_loss, "on_epoch_end", None)):
                self.extra_loss.on_epoch_end(self, record)
        self._restore_best()
        return TrainResult(history=history, best_epoch=best_epoch,
                           best_metric=best_metric if best_epoch else float("nan"), metric=cfg.metric,
                           epochs_run=len(history), stopped_early=stopped_early,
                           resumed_from_epoch=resumed_from,
                           output_dir=str(self.output_dir) if self.output_dir else None,
                           best_valid=best_valid, environment=self._environment())

    def _restore_best(self) -> None:
        """Load the best weights into the model (from disk when there is an output_dir)."""
        best_file = self.output_dir / "best" / "model.safetensors" if self.output_dir else None
        if best_file is not None and best_file.is_file():
            self._load_model(best_file)
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        self.accelerator.wait_for_everyone()
        if self.accelerator.num_processes > 1:
            # every process loads the same file; without an output_dir, broadcast from the main one
            if best_file is None or not best_file.is_file():
                for p in self.model.state_dict().values():
                    torch.distributed.broadcast(p, src=0)


def _print(msg: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(msg)
    except Exception:  # pragma: no cover
        print(msg)
