"""The one contrastive training loop (Accelerate): CPU, one GPU or ``accelerate launch`` unchanged.

``ContrastiveTrainer(encoder, loss, config).train(make_views, n_items) -> history``

* **Data order**: epoch ``e`` visits the items in ``np.random.default_rng([seed, e]).permutation``,
  cut into global batches of ``batch_size`` (a last partial batch is trimmed to a multiple of the
  number of processes, and dropped if it has fewer than 2 items). Step ``s`` (0-based, counted over
  all epochs) renders its views with ``np.random.default_rng([seed, s])`` and seeds torch (dropout)
  from ``(seed, s, rank)``: the run is a pure function of (config, step), so resuming from a
  checkpoint reproduces the uninterrupted run exactly; no RNG state has to be stored. Exactly means
  in the same environment: the bits also depend on the torch version, torch's CPU thread count and
  the device, which the checkpoint records (``environment``); resuming under another one warns.
* **Processes**: every process renders the whole global batch (cheap strings) and encodes its own
  contiguous slice of ``batch_size / num_processes`` items; ``ContrastiveLoss`` gathers the
  embeddings of all processes with gradients, so the loss and (DDP-averaged) gradients equal those
  of one process on the same global batch. The temperature lives outside the DDP module; its
  gradient is averaged across processes by hand.
* **Optimizer**: AdamW over the trainable parameters only (LoRA + temperature; no weight decay on
  the temperature), linear warm-up (``warmup_ratio``) then linear decay to 0, gradient clipping
  (``max_grad_norm``), mixed precision (``"bf16"``/``"fp16"``) through the accelerator; the loss
  is always computed in float32.
* **GradCache**: ``mini_batch_size`` encodes the ``K * B_local`` texts in chunks (see
  ``losses.grad_cache_backward``): same gradients as the plain step, memory of one chunk.
* **Checkpoints** (``output_dir/checkpoint-<step>/``, written to a temporary folder, then renamed):
  ``adapter.safetensors`` (trainable parameters only, keys ``encoder.<name>`` / ``loss.<name>``),
  ``optimizer.safetensors`` (AdamW state flattened: ``<param key>::<state name>``),
  ``optimizer.json`` (hyper-parameters), ``trainer_state.json`` (step, epoch, scheduler state,
  loss history, config, RNG recipe). Only safetensors and JSON; never the frozen base model.
* **NaN guard**: if the loss, any embedding or (without fp16 loss scaling) the gradient norm is
  non-finite, training stops *before* the optimizer step with :class:`NonFiniteLossError` naming
  the step (1-based); checkpoints already on disk are kept untouched.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, make_staging_dir, read_json
from .losses import ContrastiveLoss, grad_cache_backward

__all__ = ["FitConfig", "ContrastiveTrainer", "ViewBatch", "NonFiniteLossError", "find_latest_checkpoint",
           "resume_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_MIXED = ("no", "bf16", "fp16")


class NonFiniteLossError(FloatingPointError):
    """The loss or the embeddings became NaN/inf; ``.step`` is the 1-based step that failed."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


@dataclass
class FitConfig:
    """Settings of :class:`ContrastiveTrainer`.

    Args:
        epochs: passes over the items (ignored when ``max_steps`` is set).
        batch_size: items per contrastive batch, *global* (summed over processes).
        lr, weight_decay, warmup_ratio: AdamW and the linear warm-up/decay schedule.
        max_steps: total optimizer steps (overrides ``epochs``; more than one epoch wraps around).
        mini_batch_size: GradCache chunk size in *texts* (``None``: plain step).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (used when the trainer makes its own
            ``Accelerator``).
        gradient_checkpointing: non-reentrant activation checkpointing in the encoder.
        output_dir: where checkpoints go (``None``: no checkpoints).
        save_every: save every N steps (and always at the end when ``output_dir`` is set).
        resume_from: a checkpoint folder, or ``"latest"`` (newest in ``output_dir``; none there
            means a fresh start, so a pre-empted job can be resubmitted unchanged).
        seed: data order, augmentation and dropout all derive from it (and, in ``ItemEmbedder.fit``,
            the initial LoRA adapter).
        max_grad_norm: gradient clipping (``None`` or 0: off).
        log_every: log (``logging``, INFO) every N steps.
        show_progress_bar: tqdm bar on the main process.
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_steps: int | None = None
    mini_batch_size: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    output_dir: str | None = None
    save_every: int | None = None
    resume_from: str | None = None
    seed: int = 42
    max_grad_norm: float | None = 1.0
    log_every: int = 10
    show_progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.output_dir is not None:
            self.output_dir = str(self.output_dir)
        if self.resume_from is not None:
            self.resume_from = str(self.resume_from)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size must be an int >= 2 (in-batch negatives), got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None, got {self.max_steps!r}")
        if self.mini_batch_size is not None and (not isinstance(self.mini_batch_size, int) or self.mini_batch_size < 1):
            raise ValueError(f"mini_batch_size must be a positive int or None, got {self.mini_batch_size!r}")
        if self.mixed_precision not in _MIXED:
            raise ValueError(f"mixed_precision must be one of {_MIXED}, got {self.mixed_precision!r}")
        if self.save_every is not None and (not isinstance(self.save_every, int) or self.save_every < 1):
            raise ValueError(f"save_every must be a positive int or None, got {self.save_every!r}")
        if self.save_every is not None and self.output_dir is None:
            raise ValueError("save_every needs output_dir")
        if self.resume_from == "latest" and self.output_dir is None:
            raise ValueError("resume_from='latest' needs output_dir")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every must be a positive int, got {self.log_every!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FitConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown FitConfig fields: {unknown}")
        return cls(**d)


# ---------------------------------------------------------------------------------------- helpers
def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-<step>`` folder with the largest step in ``output_dir``, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in root.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and (child / "trainer_state.json").is_file():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return None if best is None else best[1]


def resume_checkpoint(config: FitConfig) -> Path | None:
    """The checkpoint a training with ``config`` resumes from: None when ``resume_from`` is None, or is
    ``"latest"`` and ``output_dir`` holds none yet; a named folder that is not a checkpoint raises."""
    if config.resume_from is None:
        return None
    if config.resume_from == "latest":
        return find_latest_checkpoint(config.output_dir)  # type: ignore[arg-type]
    path = Path(config.resume_from)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume_from={config.resume_from!r} is not a checkpoint folder "
                                "(no trainer_state.json)")
    return path


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _call_make_views(fn: Callable, idx: np.ndarray, rng: np.random.Generator, epoch: int, step: int) -> Any:
    """Support ``fn(item_indices, rng)`` (preferred) and ``fn(item_indices, epoch, step)``."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= 3:
        return fn(idx, epoch, step)
    return fn(idx, rng)


@dataclass
class ViewBatch:
    """What ``make_views`` renders for one global batch of ``B`` items.

    ``views``: ``K`` lists of ``B`` texts; ``group_ids`` [B] (equal ids are not each other's negatives);
    ``known_positives`` bool [B, B] or [K, B, B] (see :class:`ContrastiveLoss`); ``targets`` float [B, t]
    and ``target_mask`` bool [B] (the items' target vectors, for a loss that takes them, e.g.
    :class:`~llm_item_embed.losses.AlignedContrastiveLoss`)."""

    views: list[list[str]]
    group_ids: np.ndarray | None = None
    known_positives: np.ndarray | None = None
    targets: np.ndarray | None = None
    target_mask: np.ndarray | None = None


def _split_views_result(result: Any, n: int, step: int) -> ViewBatch:
    """Normalise ``views``, ``(views, group_ids)``, ``(views, group_ids, known_positives)`` or a
    :class:`ViewBatch`, and check shapes."""
    if isinstance(result, ViewBatch):
        batch = dataclasses.replace(result)
    else:
        views, groups, known = result, None, None
        if isinstance(result, tuple) and len(result) == 3:
            views, groups, known = result
        elif isinstance(result, tuple) and len(result) == 2 and (
            result[1] is None or isinstance(result[1], (np.ndarray, torch.Tensor))
            or (isinstance(result[1], (list, tuple)) and result[1] and not isinstance(result[1][0], str))
        ):
            views, groups = result
        batch = ViewBatch(views, groups, known)
    views = batch.views = [list(v) for v in batch.views]
    if len(views) < 2:
        raise ValueError(f"make_views returned {len(views)} view(s) at step {step}; need at least 2")
    for k, v in enumerate(views):
        if len(v) != n:
            raise ValueError(f"make_views: view {k} has {len(v)} texts for {n} items at step {step}")
        bad = next((t for t in v if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"make_views: view {k} contains a {type(bad).__name__}, expected str (step {step})")

    def as_array(x: Any) -> np.ndarray:
        return np.asarray(x if not isinstance(x, torch.Tensor) else x.cpu().numpy())

    if batch.group_ids is not None:
        groups = as_array(batch.group_ids)
        if groups.shape != (n,):
            raise ValueError(f"make_views: group_ids has shape {groups.shape}, expected ({n},) at step {step}")
        batch.group_ids = groups.astype(np.int64)
    if batch.known_positives is not None:
        known = batch.known_positives = as_array(batch.known_positives)
        if known.dtype != np.bool_ or known.shape not in ((n, n), (len(views), n, n)):
            raise ValueError(f"make_views: known_positives must be a bool array of shape ({n}, {n}) or "
                             f"({len(views)}, {n}, {n}), got {known.dtype} {known.shape} at step {step}")
    if batch.targets is not None:
        targets = batch.targets = as_array(batch.targets).astype(np.float32)
        if targets.ndim != 2 or targets.shape[0] != n:
            raise ValueError(f"make_views: targets must have shape ({n}, dim), got {targets.shape} at step {step}")
        mask = np.ones(n, dtype=bool) if batch.target_mask is None else as_array(batch.target_mask)
        if mask.dtype != np.bool_ or mask.shape != (n,):
            raise ValueError(f"make_views: target_mask must be a bool array of shape ({n},), got "
                             f"{mask.dtype} {mask.shape} at step {step}")
        batch.target_mask = mask
    elif batch.target_mask is not None:
        raise ValueError(f"make_views: a target_mask without targets at step {step}")
    return batch


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _environment(acc: Any) -> dict[str, Any]:
    """What the exact numbers depend on beyond the config: torch version, threads, device type (not
    the index: every process of a run has its own GPU), processes."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": acc.device.type,
            "num_processes": int(acc.num_processes)}


def _warn_if_environment_changed(path: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resume under another torch, thread count or device is allowed but not bit-identical."""
    if not saved:  # checkpoints written before the environment was recorded
        return
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if changed:
        warnings.warn(f"{path}: resuming a run saved under a different environment ({', '.join(changed)}); "
                      "the resumed run will not be bit-identical to an uninterrupted one",
                      RuntimeWarning, stacklevel=4)


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return None


# ---------------------------------------------------------------------------------------- trainer
class ContrastiveTrainer:
    """Contrastive LoRA fine-tuning of an encoder (``.tokenize`` + ``forward(input_ids, attention_mask)``).

    Args:
        encoder: e.g. :class:`llm_item_embed.backbone.TextEncoder`; only parameters with
            ``requires_grad`` are trained and checkpointed.
        loss: a :class:`ContrastiveLoss` (its temperature is trained too).
        config: :class:`FitConfig`.
        accelerator: an existing ``accelerate.Accelerator``; by default one is made with
            ``config.mixed_precision``.
    """

    def __init__(self, encoder: nn.Module, loss: ContrastiveLoss | None = None, config: FitConfig | None = None,
                 accelerator: Any = None) -> None:
        if not callable(getattr(encoder, "tokenize", None)):
            raise TypeError("encoder must have a .tokenize(list[str]) -> dict of tensors method")
        self.encoder = encoder
        self.loss = loss if loss is not None else ContrastiveLoss()
        self.config = config or FitConfig()
        self.config.validate()
        self.accelerator = accelerator
        self.history: list[dict] = []
        self.last_checkpoint: str | None = None
        self._data_fingerprint: str | None = None  # set by train(); stored in and checked against checkpoints

    # ------------------------------------------------------------------ named trainable params
    def _trainable(self) -> dict[str, nn.Parameter]:
        named = {f"encoder.{n}": p for n, p in self.encoder.named_parameters() if p.requires_grad}
        named.update({f"loss.{n}": p for n, p in self.loss.named_parameters() if p.requires_grad})
        return named

    # ------------------------------------------------------------------ batches
    def _plan(self, n_items: int, num_processes: int) -> tuple[int, int, int]:
        """(global batch size, steps per epoch, total steps)."""
        if n_items < 2:
            raise ValueError(f"need at least 2 items for in-batch contrastive training, got {n_items}")
        cfg = self.config
        b = min(cfg.batch_size, n_items)
        b -= b % num_processes
        if b < 2 or b < num_processes:
            raise ValueError(f"batch of {min(cfg.batch_size, n_items)} items cannot be split over "
                             f"{num_processes} processes with at least 1 item each and 2 in total")
        if cfg.batch_size <= n_items and cfg.batch_size % num_processes:
            raise ValueError(f"batch_size {cfg.batch_size} (global) must be divisible by the number of "
                             f"processes ({num_processes})")
        full, rest = divmod(n_items, b)
        rest -= rest % num_processes
        spe = full + (1 if rest >= max(2, num_processes) else 0)
        total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * spe
        return b, spe, total

    def _batch_indices(self, n_items: int, b: int, spe: int, epoch: int, i: int) -> np.ndarray:
        perm = np.random.default_rng([self.config.seed, epoch]).permutation(n_items)
        idx = perm[i * b:(i + 1) * b]
        if i == spe - 1 and len(idx) < b:  # trimmed last batch
            idx = idx[: len(idx) - len(idx) % self._num_processes]
        return idx

    # ------------------------------------------------------------------ train
    def train(self, make_views: Callable[..., Any], n_items: int, data_fingerprint: str | None = None) -> list[dict]:
        """Run the loop; returns the loss history ``[{"step", "epoch", "loss", "temperature", "lr"}]``
        (1-based steps; on resume, the history loaded from the checkpoint continues).

        ``make_views(item_indices, rng)`` renders the global batch: ``views`` (``K`` lists of texts),
        ``(views, group_ids)`` (items with equal ids are not each other's negatives) or
        ``(views, group_ids, known_positives)`` (bool ``[B, B]`` or ``[K, B, B]``, see
        :class:`ContrastiveLoss`; ``group_ids`` may be ``None``), or a :class:`ViewBatch`, which can
        also carry the items' ``targets`` (passed to the loss as ``targets=`` / ``target_mask=``).

        ``data_fingerprint``: any string that identifies what ``make_views`` draws from (items, prompts,
        positive pairs); it is stored in every checkpoint, and resuming with a different one is refused."""
        cfg = self.config
        self._data_fingerprint = data_fingerprint
        acc = self.accelerator
        if acc is None:
            acc = self.accelerator = _make_accelerator(cfg.mixed_precision)
        if cfg.mini_batch_size is not None and getattr(acc.state, "deepspeed_plugin", None) is not None:
            raise NotImplementedError("GradCache (mini_batch_size) is not supported under DeepSpeed; "
                                      "use DDP or FSDP, or gradient checkpointing instead")
        P, rank = acc.num_processes, acc.process_index
        self._num_processes = P
        b, spe, total = self._plan(int(n_items), P)
        if spe == 0:
            raise ValueError("no training batch could be formed")

        trainable = self._trainable()
        enc_params = [p for k, p in trainable.items() if k.startswith("encoder.")]
        loss_params = [p for k, p in trainable.items() if k.startswith("loss.")]
        if not enc_params:
            raise ValueError("the encoder has no trainable parameters (add LoRA or unfreeze something)")

        if cfg.gradient_checkpointing:
            self._enable_gradient_checkpointing()

        groups = [{"params": enc_params, "weight_decay": cfg.weight_decay}]
        if loss_params:
            groups.append({"params": loss_params, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        warmup = int(math.ceil(cfg.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total))

        was_training = self.encoder.training
        self.loss.to(acc.device)
        start = 0
        self.history = []
        ckpt = self._resolve_resume()
        if ckpt is not None:  # parameters go in before prepare() (FSDP/ZeRO shard them there)
            saved = self._check_resume_state(ckpt, n_items=int(n_items), b=b, spe=spe, total=total)
            if acc.is_main_process:  # once per run, not once per process
                _warn_if_environment_changed(ckpt, saved.get("environment"), _environment(acc))
            self._load_params(ckpt)
        model, acc_opt = acc.prepare(self.encoder, optimizer)
        self._model = model
        # the scheduler is stepped by hand: accelerate's wrapper would step it once per process
        param_keys = list(trainable)
        self._sharded = _is_sharded(acc)
        if ckpt is not None:
            start = self._load_state(ckpt, optimizer, scheduler)
            logger.info("resumed from %s at step %d", ckpt, start)
        self.last_checkpoint = str(ckpt) if ckpt is not None else None

        model.train()
        self.loss.train()
        bar = None
        if cfg.show_progress_bar and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=start, desc="fit", unit="step")
        device = acc.device
        rng_devices = [device] if device.type == "cuda" else []
        rng_guard = torch.random.fork_rng(devices=rng_devices)  # leave the caller's RNG untouched
        rng_guard.__enter__()
        try:
            for step in range(start, total):
                epoch, i = divmod(step, spe)
                idx = self._batch_indices(int(n_items), b, spe, epoch, i)
                bl = len(idx) // P
                rng = np.random.default_rng([cfg.seed, step])
                batch = _split_views_result(_call_make_views(make_views, idx, rng, epoch, step), len(idx), step + 1)
                k = len(batch.views)
                lo, hi = rank * bl, (rank + 1) * bl
                texts = [t for v in batch.views for t in v[lo:hi]]

                def local(x: np.ndarray | None, anchors_axis: int = 0) -> torch.Tensor | None:
                    if x is None:
                        return None
                    return torch.as_tensor(np.take(x, np.arange(lo, hi), axis=anchors_axis), device=device)

                g_local = local(batch.group_ids)
                # this process's anchors against every candidate of the global batch
                known_local = local(batch.known_positives, -2)
                targets_local, target_mask_local = local(batch.targets), local(batch.target_mask)
                torch.manual_seed(_derived_seed(cfg.seed, step, rank))

                def loss_fn(reps: torch.Tensor) -> torch.Tensor:
                    views = reps.reshape(k, bl, -1)
                    if targets_local is not None:
                        return self.loss(views, g_local, known_local, targets=targets_local,
                                         target_mask=target_mask_local)
                    if known_local is None:  # a custom loss may take (views, group_ids) only
                        return self.loss(views, g_local)
                    return self.loss(views, g_local, known_local)

                if cfg.mini_batch_size is None:
                    feats = {kk: v.to(device) for kk, v in self.encoder.tokenize(texts).items()}
                    reps = model(**feats)
                    loss = loss_fn(reps)
                    self._check_finite(acc, loss, reps, step)
                    acc.backward(loss)
                else:
                    m = cfg.mini_batch_size
                    chunks = [{kk: v.to(device) for kk, v in self.encoder.tokenize(texts[j:j + m]).items()}
                              for j in range(0, len(texts), m)]
                    loss, reps = grad_cache_backward(model, chunks, loss_fn, backward=acc.backward,
                                                     no_sync=lambda: acc.no_sync(model))
                    self._check_finite(acc, loss, reps, step)

                if P > 1:
                    for p in loss_params:
                        if p.grad is not None:
                            p.grad = acc.reduce(p.grad, reduction="mean")
                if cfg.max_grad_norm:
                    norm = acc.clip_grad_norm_(enc_params + loss_params, cfg.max_grad_norm)
                    # fp16's gradient scaler handles inf gradients itself (it skips the step)
                    if (norm is not None and acc.mixed_precision != "fp16"
                            and not torch.isfinite(torch.as_tensor(norm)).all()):
                        raise NonFiniteLossError(
                            f"non-finite gradient norm at step {step + 1}; training stopped before the update. "
                            f"Last good checkpoint: {self.last_checkpoint or 'none'}.", step + 1, self.last_checkpoint)
                lr_now = float(scheduler.get_last_lr()[0])
                acc_opt.step()
                scheduler.step()
                acc_opt.zero_grad(set_to_none=True)
                self.loss.clamp_()

                loss_val = float(acc.reduce(loss.detach().float().reshape(1), reduction="mean").item())
                rec = {"step": step + 1, "epoch": epoch, "loss": loss_val,
                       "temperature": self.loss.temperature, "lr": lr_now}
                self.history.append(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_val:.4f}", tau=f"{rec['temperature']:.3g}")
                if (step + 1) % cfg.log_every == 0 and acc.is_main_process:
                    logger.info("step %d/%d epoch %d loss %.5f temperature %.4g lr %.3g",
                                step + 1, total, epoch, loss_val, rec["temperature"], lr_now)
                last = step + 1 == total
                if cfg.output_dir is not None and (last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
                    self._save_checkpoint(acc, optimizer, scheduler, param_keys, step + 1, epoch,
                                          n_items=int(n_items), b=b, spe=spe, total=total)
        finally:
            rng_guard.__exit__(None, None, None)
            if bar is not None:
                bar.close()
            # drop accelerate's autocast/fp32 wrappers so later .encode() runs the plain module
            try:
                acc.unwrap_model(model, keep_fp32_wrapper=False)
            except Exception:  # pragma: no cover - best effort
                pass
            self.encoder.train(was_training)
        acc.wait_for_everyone()
        return self.history

    # ------------------------------------------------------------------ pieces
    def _enable_gradient_checkpointing(self) -> None:
        for name in ("enable_gradient_checkpointing", "gradient_checkpointing_enable"):
            fn = getattr(self.encoder, name, None)
            if callable(fn):
                fn()
                return
        inner = getattr(self.encoder, "model", None)
        for name, kw in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                         ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
            fn = getattr(inner, name, None)
            if callable(fn):
                fn(**{kw: {"use_reentrant": False}})
                return
        raise ValueError(f"gradient_checkpointing=True but {type(self.encoder).__name__} has no "
                         "enable_gradient_checkpointing() / gradient_checkpointing_enable()")

    def _check_finite(self, acc: Any, loss: torch.Tensor, reps: torch.Tensor, step: int) -> None:
        bad = (~torch.isfinite(loss.detach())).any() | (~torch.isfinite(reps.detach())).any()
        flag = bad.float().reshape(1).to(acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        if flag.item() > 0:
            what = "loss" if not torch.isfinite(loss.detach()).all() else "embeddings"
            msg = (f"non-finite {what} (NaN/inf) at step {step + 1}; training stopped before the update. "
                   f"Last good checkpoint: {self.last_checkpoint or 'none'}. Try mixed_precision='bf16' or 'no', "
                   "a lower lr, or similarity='cosine'.")
            raise NonFiniteLossError(msg, step + 1, self.last_checkpoint)

    def _resolve_resume(self) -> Path | None:
        found = resume_checkpoint(self.config)
        if found is None and self.config.resume_from == "latest":
            logger.info("resume_from='latest': no checkpoint in %s, starting fresh", self.config.output_dir)
        return found

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, acc: Any, optimizer: torch.optim.Optimizer, scheduler: Any, keys: list[str],
                         step: int, epoch: int, *, n_items: int, b: int, spe: int, total: int) -> None:
        cfg = self.config
        final = Path(cfg.output_dir) / f"checkpoint-{step}"  # type: ignore[arg-type]
        trainable = self._trainable()
        if self._sharded:  # gather full weights (a collective: every process calls it)
            full_sd = acc.get_state_dict(self._model)
            params = {f"encoder.{n}": t for n, t in full_sd.items() if f"encoder.{n}" in trainable}
            params.update({k: p.detach() for k, p in trainable.items() if k.startswith("loss.")})
        else:
            params = {k: p.detach() for k, p in trainable.items()}
        params = {k: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for k, t in params.items()}
        if acc.is_main_process:
            opt_state = optimizer.state_dict() if not self._sharded else {"state": {}, "param_groups": []}
            pid_to_key = {}
            groups_json = []
            flat_index = 0
            for g in opt_state["param_groups"]:
                names = []
                for pid in g["params"]:
                    names.append(keys[flat_index])
                    pid_to_key[pid] = keys[flat_index]
                    flat_index += 1
                groups_json.append({**{k: _jsonable(v) for k, v in g.items() if k != "params"}, "params": names})
            tensors: dict[str, torch.Tensor] = {}
            scalars: dict[str, dict] = {}
            for pid, st in opt_state["state"].items():
                key = pid_to_key[pid]
                for name, val in st.items():
                    if isinstance(val, torch.Tensor):
                        tensors[f"{key}::{name}"] = val
                    else:
                        scalars.setdefault(key, {})[name] = val
            sched = {k: _jsonable(v) for k, v in scheduler.state_dict().items()}
            state = {
                "format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "steps_per_epoch": spe,
                "total_steps": total, "n_items": n_items, "global_batch_size": b,
                "data_fingerprint": self._data_fingerprint,
                "num_processes": acc.num_processes, "seed": cfg.seed, "scheduler": sched,
                "history": self.history, "config": cfg.to_dict(),
                "rng": {"recipe": "views: np.random.default_rng([seed, step]); torch: seed from (seed, step, rank); "
                                  "order: np.random.default_rng([seed, epoch]).permutation(n_items)",
                        "seed": cfg.seed},
                "trainable": sorted(params), "optimizer_state": not self._sharded,
                "environment": _environment(acc),
            }
            tmp = make_staging_dir(final)
            try:
                atomic_save_safetensors(tmp / "adapter.safetensors", params, metadata={"format": "llm_item_embed.adapter"})
                atomic_save_safetensors(tmp / "optimizer.safetensors", tensors, metadata={"format": "llm_item_embed.adamw"})
                atomic_write_json(tmp / "optimizer.json", {"param_groups": groups_json, "scalars": scalars})
                atomic_write_json(tmp / "trainer_state.json", state)  # written last: marks completeness
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        acc.wait_for_everyone()
        self.last_checkpoint = str(final)

    def _check_resume_state(self, path: Path, *, n_items: int, b: int, spe: int, total: int) -> dict[str, Any]:
        """The checkpoint's trainer state, once it is known to continue this run's data order."""
        state = read_json(path / "trainer_state.json")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
        for field, now in (("n_items", n_items), ("global_batch_size", b), ("seed", self.config.seed),
                           ("total_steps", total), ("steps_per_epoch", spe)):
            if state.get(field) != now:
                raise ValueError(f"cannot resume from {path}: {field} was {state.get(field)!r}, now {now!r} "
                                 "(the data order would differ)")
        saved, now = state.get("data_fingerprint"), self._data_fingerprint
        if saved is not None and now is not None and saved != now:
            raise ValueError(f"cannot resume from {path}: the training data differ from the checkpoint's "
                             f"(items, prompts or positive pairs changed; fingerprint {saved[:12]} vs {now[:12]})")
        return state

    def _load_params(self, path: Path) -> None:
        trainable = self._trainable()
        params, _ = load_safetensors(path / "adapter.safetensors")
        missing = sorted(set(trainable) - set(params))
        extra = sorted(set(params) - set(trainable))
        if missing or extra:
            raise ValueError(f"{path}/adapter.safetensors does not match the trainable parameters: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for k, p in trainable.items():
                if tuple(params[k].shape) != tuple(p.shape):
                    raise ValueError(f"{path}: {k} has shape {tuple(params[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(params[k].to(device=p.device, dtype=p.dtype))

    def _load_state(self, path: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
        """Optimizer moments, scheduler and history; returns the step to continue from."""
        state = read_json(path / "trainer_state.json")
        if state.get("optimizer_state", True) and not self._sharded:
            self._load_optimizer(path, optimizer)
        else:
            warnings.warn(f"{path}: optimizer moments not restored (sharded DeepSpeed/FSDP run or checkpoint); "
                          "the resumed run will not match an uninterrupted one exactly", stacklevel=3)
        sched = {k: v for k, v in state["scheduler"].items() if v is not None or k == "lr_lambdas"}
        sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
        scheduler.load_state_dict(sched)
        for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            g["lr"] = lr
        self.history = list(state.get("history", []))
        return int(state["step"])

    def _load_optimizer(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        opt_json = read_json(path / "optimizer.json")
        tensors, _ = load_safetensors(path / "optimizer.safetensors")
        key_to_pid: dict[str, int] = {}
        groups = []
        pid = 0
        cur_groups = optimizer.state_dict()["param_groups"]
        if len(cur_groups) != len(opt_json["param_groups"]):
            raise ValueError(f"{path}: optimizer has {len(opt_json['param_groups'])} groups, expected {len(cur_groups)}")
        for saved, cur in zip(opt_json["param_groups"], cur_groups):
            if len(saved["params"]) != len(cur["params"]):
                raise ValueError(f"{path}: optimizer group has {len(saved['params'])} parameters, "
                                 f"expected {len(cur['params'])}")
            ids = []
            for name in saved["params"]:
                key_to_pid[name] = pid
                ids.append(pid)
                pid += 1
            g = dict(cur)
            g.update({k: v for k, v in saved.items() if k != "params" and v is not None})
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
            g["params"] = ids
            groups.append(g)
        opt_state: dict[int, dict] = {}
        for full, val in tensors.items():
            key, name = full.split("::", 1)
            if key not in key_to_pid:
                raise ValueError(f"{path}/optimizer.safetensors has state for unknown parameter {key}")
            opt_state.setdefault(key_to_pid[key], {})[name] = val
        for key, vals in opt_json.get("scalars", {}).items():
            opt_state.setdefault(key_to_pid[key], {}).update(vals)
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


def _make_accelerator(mixed_precision: str) -> Any:
    """An ``Accelerator`` for ``mixed_precision``; a launcher's setting (``accelerate launch
    --mixed_precision`` / config file) wins over the default ``"no"``. In a single process an
    Accelerate state left by an earlier run with another precision is reset instead of failing."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    mp: str | None = mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mp == "no" and launcher not in (None, "", "no"):
        mp = None
    try:
        return Accelerator(mixed_precision=mp)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        if PartialState().num_processes > 1:
            raise ValueError(f"Accelerate is already set up in this process with another mixed precision; "
                             f"set mixed_precision={mixed_precision!r} in the accelerate launch config instead "
                             f"or pass your own accelerator") from exc
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Accelerator(mixed_precision=mp)


def _is_sharded(acc: Any) -> bool:
    """DeepSpeed or FSDP: parameters / optimizer state are sharded across processes."""
    kind = str(getattr(acc, "distributed_type", "")).upper()
    return "DEEPSPEED" in kind or "FSDP" in kind
