"""Stage 2: one training run of one variant (model, trainer, LLM-ESR's self-distillation), evaluated
under both protocols and cached as JSON keyed by a hash of its full configuration."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cfsr_head import (
    Adjustment,
    DualViewHead,
    GRU4RecEncoder,
    PopularityModel,
    SASRecEncoder,
    SplitData,
    TrainConfig,
    Trainer,
    evaluate,
)
from cfsr_head.io import atomic_write_json, read_json
from cfsr_head.train import compute_environment

from .settings import PROTOCOLS, Stage2, Study, Variant, config_hash, stage2_key
from .stats import valid_ndcg


class SelfDistillation:
    """LLM-ESR's retrieval-augmented self-distillation: pull each user's state towards the mean
    state of the ``k`` users most similar by LLM user embedding (mean of the un-tuned item
    embeddings of the training history, cosine), MSE, weight 0.1 (``TrainConfig.extra_loss_weight``).

    The teachers' states come from a bank refreshed after every epoch (one inference pass over all
    users) instead of a second forward pass of 10 users per batch item: the same target up to
    one epoch of staleness, at a small fraction of the cost (documented in docs/results)."""

    def __init__(self, split: SplitData, semantic: np.ndarray, k: int = 10) -> None:
        seq, _, _ = split.eval_inputs("valid", max_len=None)
        seq = seq.numpy()
        counts = np.maximum((seq > 0).sum(1, keepdims=True), 1)
        table = np.concatenate([np.zeros((1, semantic.shape[1]), np.float32), semantic])
        users = torch.from_numpy(table[seq].sum(1) / counts)
        users = F.normalize(users, dim=1)
        neighbours = []
        for start in range(0, len(users), 2048):
            sim = users[start:start + 2048] @ users.T
            sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -float("inf")
            neighbours.append(sim.topk(k, dim=1).indices)
        self.neighbours = torch.cat(neighbours)
        self.split = split
        self.bank: torch.Tensor | None = None

    @torch.no_grad()
    def refresh(self, model: torch.nn.Module) -> None:
        was_training = model.training
        model.eval()
        seq, _, _ = self.split.eval_inputs("valid", max_len=model.max_len)
        device = next(model.parameters()).device
        states = [model.user_state(seq[i:i + 1024].to(device)) for i in range(0, len(seq), 1024)]
        self.bank = torch.cat(states).float()
        model.train(was_training)

    # Trainer hooks: a fresh bank at the start (also after a resume) and after every epoch
    def on_fit_start(self, trainer) -> None:
        self.refresh(trainer.model)

    def on_epoch_end(self, trainer, record) -> None:
        self.refresh(trainer.model)

    def __call__(self, model: torch.nn.Module, batch) -> torch.Tensor:
        if self.bank is None:
            self.refresh(model)
        states = model.user_state(batch.input_seq, batch.padding_mask)
        teacher = self.bank[self.neighbours[batch.users.to(self.bank.device)]].mean(1).to(states.device)
        return F.mse_loss(states, teacher)


def build_model(variant: Variant, s2: Stage2, split: SplitData, semantic: np.ndarray | None) -> DualViewHead:
    if variant.encoder == "sasrec":
        encoder = SASRecEncoder(d=s2.d, n_layers=s2.n_layers, n_heads=s2.n_heads, max_len=s2.max_len,
                                dropout=s2.dropout)
    else:
        encoder = GRU4RecEncoder(d=s2.d, n_layers=1, dropout=s2.dropout, max_len=s2.max_len)
    return DualViewHead(encoder=encoder, semantic=semantic, num_items=split.num_items, d=s2.d,
                        dropout=s2.dropout, seed=s2.seed, **dict(variant.head))


def make_trainer(variant: Variant, s2: Stage2, split: SplitData, semantic: np.ndarray | None,
                 model: DualViewHead, prior_table: np.ndarray | None = None, **config_overrides: Any) -> Trainer:
    """The ``Trainer`` of one stage-2 run: ``s2``'s settings, for LLM-ESR its self-distillation
    (weight 0.1), and with ``s2.prior_weight`` > 0 a ``SemanticPrior`` over ``prior_table`` (the
    study's frozen embeddings in index order) trained in; ``config_overrides`` are further
    ``TrainConfig`` fields (output_dir, mixed_precision ...)."""
    config = TrainConfig(**{"loss": s2.loss, "epochs": s2.epochs, "patience": s2.patience, "lr": s2.lr,
                            "batch_size": s2.batch_size, "max_len": s2.max_len, "seed": s2.seed,
                            "length_buckets": s2.length_buckets, "logit_adjustment": s2.logit_adjustment,
                            "validate_with_logit_bias": s2.validate_with_logit_bias,
                            "show_progress_bar": False, "extra_loss_weight": 0.1 if variant.distill else 1.0,
                            **config_overrides})
    extra = SelfDistillation(split, semantic) if variant.distill else None
    prior = None
    if s2.prior_weight:
        if prior_table is None:
            raise ValueError("Stage2.prior_weight > 0 needs the prior's table (prior_table=...)")
        point = Adjustment(weight=s2.prior_weight, recency=s2.prior_recency, tail_exponent=s2.prior_tail_exponent)
        prior = point.semantic_prior(model, split, prior_table)
    return Trainer(model, split, config, extra_loss=extra, prior=prior)


def run_label(variant: Variant, s2: Stage2) -> str:
    """One run as the progress lines and the report's missing-run list name it."""
    return f"{variant.name} loss={s2.loss} dropout={s2.dropout:g} lr={s2.lr:g} max_len={s2.max_len} seed={s2.seed}"


def run_stage2(study: Study, variant: Variant, s2: Stage2, split: SplitData,
               semantic: np.ndarray | None, embeddings_key: str | None,
               prior_table: np.ndarray | None = None) -> dict[str, Any] | None:
    """Train (or load the cached result of) one run; returns its record (None: not cached and
    ``study.report_only``). ``prior_table``: the trained-in prior's table (``s2.prior_weight`` > 0);
    the run's test results then score with the prior added at its trained weight."""
    key = config_hash({"dataset": study.name, "variant": dataclasses.asdict(variant), "stage2": stage2_key(s2),
                       "embeddings": embeddings_key, "version": 1})
    runs = study.workdir / study.name / "runs"
    record_path = runs / f"{key}.json"
    if record_path.exists():
        return read_json(record_path)
    if study.report_only:
        return None
    torch.manual_seed(s2.seed)
    t0 = time.time()
    history: list = []
    if variant.popularity:
        model = PopularityModel.from_split(split)
        best_valid, environment = evaluate(model, split, split="valid").summary(), compute_environment()
    else:
        model = build_model(variant, s2, split, semantic)
        trainer = make_trainer(variant, s2, split, semantic, model, prior_table, output_dir=str(runs / f"{key}-ckpt"))
        result = trainer.fit()
        model = trainer.scoring_model
        history = [{k: h.get(k) for k in ("epoch", "train_loss", "metric", "epoch_time")} for h in result.history]
        best_valid, environment = result.best_valid, result.environment
    # the seeded numbers are bit-identical only in the same environment (torch version, threads)
    record: dict[str, Any] = {"key": key, "dataset": study.name, "variant": variant.name, "stage2": dataclasses.asdict(s2),
                              "embeddings": embeddings_key, "valid": best_valid, "history": history, "test": {},
                              "environment": environment}
    for protocol in PROTOCOLS:
        res = evaluate(model, split, split="test", protocol=protocol, seed=s2.seed)
        res.to_json(runs / f"{key}.{protocol}.json")
        record["test"][protocol] = res.summary()
    record["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(record_path, record)
    ov = record["test"]["full"]["Overall"]
    print(f"[stage 2] {study.name} {run_label(variant, s2)}: valid N@10 {valid_ndcg(record):.4f}  "
          f"test N@10 {ov['NDCG@10']:.4f}  ({record['seconds']:.0f} s)", flush=True)
    return record
