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

Modules, one role each: ``settings`` (what a study runs: Stage1, Stage2, Variant, Study),
``stage1`` (item embeddings), ``stage2`` (one training run), ``runner`` (every run of a variant),
``stats`` (reading runs back, significance), ``report`` (the page, JSON and plots), ``cli``.
"""
from .cli import main, parse_args, run_study, seeds_of, stage1_only
from .report import grid_search_table, json_safe, plot_bars, plot_sensitivity, results_table, write_report
from .runner import Runner
from .settings import (
    DECODER_ROW,
    FULL_GRID,
    GROUPS,
    LOSSES,
    PARTS,
    PROTOCOLS,
    REPO_ROOT,
    SENSITIVITY_K,
    SENSITIVITY_R,
    STAGE1_LATER_FIELDS,
    STAGE2_LATER_FIELDS,
    VARIANTS,
    Stage1,
    Stage2,
    Study,
    Variant,
    config_hash,
    file_digest,
    key_fields,
    sensitivity_variant,
    smollm2_variant,
    stage1_key,
    stage2_key,
)
from .stage1 import embeddings_path, item_template, stage1_embeddings
from .stage2 import SelfDistillation, build_model, make_trainer, run_label, run_stage2
from .stats import (
    best_loss,
    best_point,
    load_eval,
    mean_and_std,
    mean_test,
    metric_mean_and_std,
    paired_p,
    per_user_mean,
    reported_runs,
    runs_p,
    valid_ndcg,
)

__all__ = [
    "DECODER_ROW", "FULL_GRID", "GROUPS", "LOSSES", "PARTS", "PROTOCOLS", "REPO_ROOT", "SENSITIVITY_K",
    "SENSITIVITY_R", "STAGE1_LATER_FIELDS", "STAGE2_LATER_FIELDS", "VARIANTS", "Runner", "SelfDistillation",
    "Stage1", "Stage2", "Study", "Variant", "best_loss", "best_point", "build_model", "config_hash",
    "embeddings_path", "file_digest", "grid_search_table", "item_template", "json_safe", "key_fields",
    "load_eval", "main", "make_trainer", "mean_and_std", "mean_test", "metric_mean_and_std", "paired_p",
    "parse_args", "per_user_mean", "plot_bars", "plot_sensitivity", "reported_runs", "results_table", "run_label",
    "run_stage2", "run_study", "runs_p", "seeds_of", "sensitivity_variant", "smollm2_variant",
    "stage1_embeddings", "stage1_key", "stage1_only", "stage2_key", "valid_ndcg", "write_report",
]
