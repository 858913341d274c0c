"""``cfsr`` command line: train a DualViewHead (or a plain SASRec/GRU4Rec) on a dataset folder,
evaluate it, publish it and recommend with it.

    cfsr train --data ml-100k --embeddings items.safetensors --output-dir runs/ml100k
    cfsr evaluate --data ml-100k --model runs/ml100k --protocol sampled --json out.json
    cfsr push --model runs/ml100k --repo-id user/ml100k-cfsr     # token: HF_TOKEN or a stored login
    cfsr recommend --model runs/ml100k --data ml-100k --k 10 --output recs.json
    cfsr add-items --model runs/ml100k --embeddings new.safetensors --output-dir runs/ml100k-new

``train`` writes into ``--output-dir``: ``config.json`` + ``model.safetensors`` (the head, with
``save_pretrained``), ``item_index.json`` (raw item id -> index), ``run.json`` (the command's
settings), ``metrics.json`` (training history, best epoch, test metrics under both protocols) and
``checkpoints/{last,best}`` (rerunning the same command resumes an interrupted run). With several
``--lr``, ``--dropout`` or ``--loss`` values every combination is trained into
``checkpoints/lr<LR>-dropout<P>-loss<LOSS>/``, the one with the best validation NDCG@10 is saved and
tested as above, and ``metrics.json`` gets a ``search`` entry listing every point (a rerun with a
longer list trains only the new ones). ``push``
uploads the folder's model files (not the checkpoints) with a model card; ``evaluate --model``
takes such a Hub repo id as well as a folder. ``recommend`` prints (or writes as JSON) every user's top-k
next items, leaving out what each user has already seen. ``add-items`` gives a trained model the
items of an embeddings file it does not know (``DualViewHead.add_items``) and writes the extended
model and item index to a new folder.

Embeddings file: the ``llm_item_embed`` safetensors format (tensor ``embeddings`` float [N, d],
``ids_utf8`` uint8 bytes and ``ids_offsets`` int64 [N + 1]), or any safetensors file holding one
2-D float tensor plus either that id pair or a JSON list of ids under the header key ``ids``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# DualViewHead.add_items's choices (cfsr_head.head.COLD_START_ROWS; not imported, so that --help stays fast)
COLD_START_ROWS = ("projection", "mapping", "neighbours", "zeros")
VARIANTS = ("full", "no-semantic", "no-collaborative", "concat", "unshared", "sasrec")
NEEDS_EMBEDDINGS = ("full", "no-collaborative", "concat", "unshared")
ONE_VIEW_VARIANTS = ("no-semantic", "no-collaborative", "sasrec")
# settings that may differ when a run is resumed with the same command
_RESUME_FREE = {"epochs", "patience", "no_progress", "quiet"}
# train options that take several values; more than one value in any of them makes a search
SEARCHABLE = ("lr", "dropout", "loss")


class CLIError(Exception):
    """A bad input: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------- embeddings
class SemanticTable:
    """Raw ids + float32 matrix (duck-types ``ItemEmbeddings`` for ``align_semantic``)."""

    def __init__(self, ids: list[str], matrix: np.ndarray) -> None:
        self.ids = ids
        self.matrix = matrix


def read_embeddings(path: str | Path) -> SemanticTable:
    """Read an item-embeddings safetensors file (see the module docstring) without importing
    ``llm_item_embed``."""
    from .io import load_safetensors

    path = Path(path)
    if path.is_dir():
        candidate = path / "embeddings.safetensors"
        if not candidate.is_file():
            raise CLIError(f"--embeddings {path} is a folder without embeddings.safetensors")
        path = candidate
    if not path.is_file():
        raise CLIError(f"--embeddings file {path} does not exist")
    try:
        tensors, header = load_safetensors(path)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    import torch

    ids: list[str] | None = None
    if "ids_utf8" in tensors and "ids_offsets" in tensors:
        blob = tensors.pop("ids_utf8").numpy().tobytes()
        offsets = tensors.pop("ids_offsets").numpy().astype(np.int64)
        if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
            raise CLIError(f"{path}: ids_offsets do not match the {len(blob)} id bytes (corrupted file?)")
        try:
            ids = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
        except UnicodeDecodeError as exc:
            raise CLIError(f"{path}: item ids are not valid UTF-8 ({exc})") from exc
    elif "ids" in header:
        try:
            ids = [str(x) for x in json.loads(header["ids"])]
        except (json.JSONDecodeError, TypeError) as exc:
            raise CLIError(f"{path}: header 'ids' is not a JSON list of ids ({exc})") from exc
    if "embeddings" in tensors:
        matrix = tensors["embeddings"]
    else:
        floats = {k: v for k, v in tensors.items() if v.ndim == 2 and v.is_floating_point()}
        if len(floats) != 1:
            raise CLIError(f"{path}: expected one 2-D float tensor (or one named 'embeddings'), found "
                           f"{sorted(floats) or 'none'} among {sorted(tensors)}")
        matrix = next(iter(floats.values()))
    if matrix.ndim != 2 or not matrix.is_floating_point():
        raise CLIError(f"{path}: 'embeddings' must be a 2-D float tensor, got {matrix.dtype} {tuple(matrix.shape)}")
    if ids is None:
        raise CLIError(f"{path} has no item ids (need tensors ids_utf8 + ids_offsets, or a JSON list "
                       "under the header key 'ids')")
    if len(ids) != matrix.shape[0]:
        raise CLIError(f"{path}: {len(ids)} ids but the matrix has {matrix.shape[0]} rows")
    return SemanticTable(ids, matrix.to(torch.float32).numpy())


# ---------------------------------------------------------------------------------- model
def build_model(variant: str, encoder_name: str, num_items: int, semantic: np.ndarray | None, *, d: int,
                max_len: int, n_layers: int, n_heads: int, dropout: float, loss: str, seed: int,
                score_temperature: float | None = None, view_loss_weight: float = 0.0,
                collab_anchor_weight: float = 0.0, center_semantic: bool = False, cold_item_dropout: float = 0.0):
    """The DualViewHead of one CLI variant ("sasrec": ID-only with a random table)."""
    import torch

    from .encoders import GRU4RecEncoder, SASRecEncoder
    from .head import DualViewHead

    torch.manual_seed(seed)
    if encoder_name == "sasrec":
        encoder = SASRecEncoder(d=d, n_layers=n_layers, n_heads=n_heads, max_len=max_len, dropout=dropout)
    else:
        encoder = GRU4RecEncoder(d=d, n_layers=1, dropout=dropout)
    opts: dict[str, Any] = dict(d=d, dropout=dropout, loss=loss, seed=seed, score_temperature=score_temperature,
                                view_loss_weight=view_loss_weight, collab_anchor_weight=collab_anchor_weight,
                                cold_item_dropout=cold_item_dropout)
    if variant == "sasrec" or (variant == "no-semantic" and semantic is None):
        return DualViewHead(encoder, semantic=None, num_items=num_items, use_semantic=False,
                            collab_init="random", **opts)
    if center_semantic:
        opts["center_semantic"] = True
    if variant == "no-semantic":  # ID view only, table initialised by PCA of the semantic table
        opts["use_semantic"] = False
    elif variant == "no-collaborative":
        opts["use_collaborative"] = False
    elif variant == "concat":
        opts["fusion"] = "concat"
    elif variant == "unshared":
        opts["shared_encoder"] = False
    return DualViewHead(encoder, semantic=semantic, num_items=num_items, **opts)


# ---------------------------------------------------------------------------------- printing
def format_summary(result: Any) -> str:
    """A table: one row per group, columns users and HR/NDCG@K."""
    summary, counts = result.summary(), result.counts()
    cols = [f"{m}@{k}" for k in result.ks for m in ("HR", "NDCG")]
    width = max(12, *(len(g) + 2 for g in summary))
    lines = [f"{'group':<{width}}{'users':>7}" + "".join(f"{c:>10}" for c in cols)]
    for g, row in summary.items():
        lines.append(f"{g:<{width}}{counts.get(g, 0):>7}" + "".join(f"{row[c]:>10.4f}" for c in cols))
    return "\n".join(lines)


def _load_split(data: str, max_len: int | None, item_index: Any = None):
    from .data import load_dataset
    from .split import leave_one_out

    dataset = load_dataset(data)
    return leave_one_out(dataset, max_len=max_len, item_index=item_index)


# ---------------------------------------------------------------------------------- commands
def _check_train_args(args: argparse.Namespace) -> Any:
    """Refuse contradictory ``train`` options (naming them); returns the ``--train-prior``
    Adjustment or None."""
    from .adjust import Adjustment

    trained_prior = None
    if args.train_prior is not None:
        if not args.embeddings:
            raise CLIError("--train-prior needs --embeddings (the prior's item table; --variant sasrec takes none, "
                           "--variant no-semantic is its counterpart with a table)")
        weight, recency, gamma = args.train_prior
        try:
            trained_prior = Adjustment(weight=weight, recency=recency, tail_exponent=gamma)
        except ValueError as e:
            raise CLIError(f"--train-prior WEIGHT RECENCY GAMMA: {e}") from None
    if args.variant in NEEDS_EMBEDDINGS and not args.embeddings:
        raise CLIError(f"--variant {args.variant} needs --embeddings (a semantic item table)")
    if args.variant == "sasrec" and args.embeddings:
        raise CLIError("--variant sasrec uses no semantic table; drop --embeddings or use --variant no-semantic")
    if args.view_loss_weight and args.variant in ONE_VIEW_VARIANTS:
        raise CLIError(f"--view-loss-weight needs both views; --variant {args.variant} has one")
    if args.center_semantic and args.variant in ("sasrec", "no-semantic"):
        raise CLIError(f"--center-semantic needs the semantic view; --variant {args.variant} has none")
    if args.collab_anchor_weight and args.variant in ("sasrec", "no-collaborative"):
        raise CLIError(f"--collab-anchor-weight needs a PCA-initialised ID table; --variant {args.variant} "
                       + ("has a random one" if args.variant == "sasrec" else "has no ID table"))
    if args.cold_item_dropout and args.variant in ("sasrec", "no-collaborative"):
        raise CLIError(f"--cold-item-dropout needs the ID table and a semantic table; --variant {args.variant} "
                       + ("has no semantic table" if args.variant == "sasrec" else "has no ID table"))
    if args.validate_with_logit_bias and not args.logit_adjustment:
        raise CLIError("--validate-with-logit-bias needs --logit-adjustment TAU "
                       "(there is no training bias to add back)")
    return trained_prior


def _check_resumable_folder(out: Path, settings: dict[str, Any], searching: bool) -> None:
    """Refuse an ``--output-dir`` that holds a run with other settings, or the other kind of run
    (one setting vs a search); a search may change its --lr / --dropout / --loss lists."""
    from .io import read_json

    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {out} exists and is not a folder")
    run_file = out / "run.json"
    if not run_file.is_file():
        return
    old = read_json(run_file).get("settings", {})
    old_searching = any(isinstance(old.get(name), list) for name in SEARCHABLE)
    if old_searching != searching:
        held = "a search over several settings" if old_searching else "a run of one setting"
        given = ", ".join(f"--{name} {old[name]}" for name in SEARCHABLE if name in old)
        raise CLIError(f"--output-dir {out} holds {held} ({given}); use a new --output-dir")
    free = _RESUME_FREE | (set(SEARCHABLE) if searching else set())
    diff = sorted(k for k in settings if k not in free and k in old and old[k] != settings[k])
    if diff:
        raise CLIError(f"--output-dir {out} holds a run with other settings ("
                       + ", ".join(f"{k}: {old[k]!r} -> {settings[k]!r}" for k in diff)
                       + "); use a new --output-dir")


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _point_folder(point: dict[str, Any]) -> str:
    """``lr0.01-dropout0.2-lossce``: a search point's checkpoint folder."""
    return "-".join(f"{name}{_value(value)}" for name, value in point.items())


def _point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{name} {_value(value)}" for name, value in point.items())


def cmd_train(args: argparse.Namespace) -> int:
    """Train one setting, or every --lr x --dropout x --loss combination and keep the best on validation."""
    from .io import atomic_write_json
    from .search import NoEvaluatedRunError, grid_points, grid_search
    from .split import align_semantic
    from .train import TrainConfig, Trainer, to_jsonable

    out = Path(args.output_dir)
    grid = {name: list(getattr(args, name)) for name in SEARCHABLE}
    searching = math.prod(len(values) for values in grid.values()) > 1
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if not searching:  # a run of one setting records plain values, as before searches existed
        settings.update({name: values[0] for name, values in grid.items()})
    _check_resumable_folder(out, settings, searching)
    trained_prior = _check_train_args(args)

    def config_for(point: dict[str, Any]) -> Any:
        checkpoints = out / "checkpoints" / _point_folder(point) if searching else out / "checkpoints"
        return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=point["lr"],
                           weight_decay=args.weight_decay, loss=point["loss"], n_negatives=args.n_negatives,
                           max_len=args.max_len, patience=args.patience, seed=args.seed,
                           output_dir=str(checkpoints), show_progress_bar=not args.no_progress,
                           sliding_windows=args.sliding, eval_protocol=args.eval_protocol,
                           logit_adjustment=args.logit_adjustment or 0.0,
                           validate_with_logit_bias=args.validate_with_logit_bias)

    try:  # every point's settings (and repeated values) are checked before anything is loaded or written
        configs = {_point_folder(p): config_for(p) for p in grid_points(grid)}
    except ValueError as e:
        raise CLIError(str(e)) from None
    split = _load_split(args.data, args.max_len)
    semantic = None
    if args.embeddings:
        table = read_embeddings(args.embeddings)
        semantic = align_semantic(table, split.item_index, missing=args.missing_embeddings)
        if args.d > min(semantic.shape) and args.variant != "no-collaborative":
            raise CLIError(f"--d {args.d} is larger than the embeddings allow for PCA "
                           f"(min(items, width) = {min(semantic.shape)})")

    def make_trainer(point: dict[str, Any]) -> Trainer:
        model = build_model(args.variant, args.encoder, split.num_items, semantic, d=args.d, max_len=args.max_len,
                            n_layers=args.n_layers, n_heads=args.n_heads, dropout=point["dropout"], loss=point["loss"],
                            seed=args.seed, score_temperature=args.score_temperature,
                            view_loss_weight=args.view_loss_weight or 0.0,
                            collab_anchor_weight=args.collab_anchor_weight or 0.0,
                            center_semantic=args.center_semantic, cold_item_dropout=args.cold_item_dropout or 0.0)
        prior = None if trained_prior is None else trained_prior.semantic_prior(model, split, semantic)
        return Trainer(model, split, configs[_point_folder(point)], prior=prior)

    def report(run: Any) -> None:
        if searching and not args.quiet:
            print(f"{_point_text(run.point)}: best epoch {run.result.best_epoch}, "
                  f"valid {run.result.metric} {run.result.best_metric:.4f} ({run.seconds:.0f} s)")

    atomic_write_json(out / "run.json", {"format": "cfsr.run", "settings": settings})
    split.item_index.save(out / "item_index.json")
    try:
        found = grid_search(grid, make_trainer, on_run=report)
    except NoEvaluatedRunError:
        raise CLIError("training produced no evaluated epoch") from None
    trainer, result = found.trainer, found.best.result  # the kept run has evaluated (NoEvaluatedRunError)
    trainer.model.save_pretrained(out)
    tests = {p: trainer.test(protocol=p) for p in ("full", "sampled")}
    metrics = {"format": "cfsr.metrics", "dataset": split.name, "variant": args.variant, "encoder": args.encoder,
               "train": result.to_dict(), "train_config": trainer.config.to_dict(),
               "trained_prior": trainer.prior_settings,
               "test": {p: {"summary": r.summary(), "counts": r.counts()} for p, r in tests.items()}}
    if searching:
        metrics["search"] = found.to_dict()
    atomic_write_json(out / "metrics.json", to_jsonable(metrics))  # NaN (empty group) -> null
    if not args.quiet:
        kept = f" (kept {_point_text(found.best_point)}: best on validation)" if searching else ""
        print(f"best epoch {result.best_epoch}: valid {trainer.config.metric} {result.best_metric:.4f}"
              f"{' (stopped early)' if result.stopped_early else ''}{kept}")
        for p, r in tests.items():
            print(f"\ntest, {p} ranking:")
            print(format_summary(r))
        print(f"\nsaved model and metrics to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .io import atomic_write_json

    if args.popularity_counts != "train" and args.popularity_beta is None:
        raise CLIError(f"--popularity-counts {args.popularity_counts} needs --popularity-beta (there is no "
                       "popularity term to count for)")
    _check_adjustment_args(args)
    model, item_index, trained_len = _load_trained(args.model)
    max_len = args.max_len or trained_len or getattr(model, "max_len", None) or 50
    try:
        split = _load_split(args.data, max_len, item_index)
    except KeyError as exc:
        raise CLIError(f"--data {args.data} has items the model at {args.model} does not know: "
                       f"{exc.args[0] if exc.args else exc}") from exc
    if split.num_items != model.num_items:
        raise CLIError(f"--model {args.model} scores {model.num_items} items but --data {args.data} has "
                       f"{split.num_items}; evaluate on the dataset the model was trained on")
    model, note, adjustment = _adjusted(model, split, args, max_len)
    result = evaluate(model, split, split=args.split, protocol=args.protocol, max_len=max_len, seed=args.seed)
    print(f"{split.name or args.data}: {args.split} split, {args.protocol} ranking{note}")
    print(format_summary(result))
    if args.json:
        from .train import to_jsonable

        report = {"format": "cfsr.evaluation", "model": str(args.model), "data": str(args.data), "split": args.split,
                  "protocol": args.protocol, "summary": result.summary(), "counts": result.counts()}
        if args.popularity_beta is not None:
            report["popularity_beta"] = adjustment.beta
            report["popularity_counts"] = args.popularity_counts
            report["popularity_pseudo_count"] = adjustment.pseudo_count
        if args.semantic_prior is not None:
            report["semantic_prior"] = {"weight": adjustment.weight, "recency": adjustment.recency,
                                        "tail_exponent": adjustment.tail_exponent}
        atomic_write_json(args.json, to_jsonable(report))
    return 0


def _trained_folder(given: str | Path) -> Path:
    """The local folder behind ``--model`` (a folder written by ``cfsr train``, or a Hub repo id it
    was pushed to, fetched once), checked to hold a model."""
    from .hub import resolve_model_dir

    try:
        model_dir = resolve_model_dir(given)
    except FileNotFoundError as exc:
        raise CLIError(f"--model: {exc}") from None
    _require_model_folder(model_dir, str(given))
    return model_dir


def _load_trained(given: str | Path) -> tuple[Any, Any, int | None]:
    """``(model, ItemIndex or None, max_len it was trained with or None)`` from ``--model``: a
    folder written by ``cfsr train`` or a Hub repo id it was pushed to."""
    from .head import DualViewHead
    from .io import read_json
    from .split import ItemIndex

    model_dir = _trained_folder(given)
    item_index = None
    if (model_dir / "item_index.json").is_file():
        item_index = ItemIndex.load(model_dir / "item_index.json")
    trained_len = None
    if (model_dir / "run.json").is_file():
        trained_len = read_json(model_dir / "run.json").get("settings", {}).get("max_len")
    return DualViewHead.from_pretrained(model_dir), item_index, trained_len


def cmd_recommend(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .io import atomic_write_json
    from .recommend import read_histories, recommend
    from .split import leave_one_out

    _check_adjustment_args(args)
    adjusting = args.popularity_beta is not None or args.semantic_prior is not None
    if args.data is None and args.histories is None:
        raise CLIError("give --data (a dataset folder whose interactions are the histories) or --histories FILE")
    if adjusting and args.data is None:
        raise CLIError("--popularity-beta and --semantic-prior need --data: the popularity counts and the "
                       "validation split that chooses 'auto' strengths come from it")
    histories = None
    if args.histories is not None:
        try:
            histories = read_histories(args.histories)
        except (FileNotFoundError, ValueError) as exc:
            raise CLIError(f"--histories: {exc}") from None
    model, item_index, trained_len = _load_trained(args.model)
    if item_index is None:
        raise CLIError(f"--model {args.model} has no item_index.json (the raw item ids it was trained on); "
                       "train it with `cfsr train`, or push it with item_index=")
    if args.k > model.num_items:
        raise CLIError(f"--k {args.k} is larger than the {model.num_items} items the model scores")
    max_len = args.max_len or trained_len or getattr(model, "max_len", None) or 50
    data = load_dataset(args.data) if args.data is not None and (histories is None or adjusting) else None
    source = f"--histories {args.histories}" if histories is not None else f"--data {args.data}"
    if args.users:
        present = set(histories) if histories is not None else set(data.interactions["user_id"])
        missing = [u for u in args.users if u not in present]
        if missing:
            raise CLIError(f"--users: {len(missing)} user(s) not in {source}, e.g. {missing[:5]}")
    adjust_note = ""
    if adjusting:
        # strengths ('auto': chosen on this data's validation split) and, for the popularity term, the
        # counts of every interaction: the histories recommended from are whole, as test inputs are
        try:
            split = leave_one_out(data, max_len=max_len, item_index=item_index)  # the table read above
        except KeyError as exc:
            raise CLIError(f"--data {args.data} has items the model at {args.model} does not know, and an "
                           f"adjustment needs them all: {exc.args[0] if exc.args else exc}") from None
        indices = item_index.index_of(data.interactions["item_id"].to_numpy())
        counts = np.bincount(indices, minlength=model.num_items + 1)
        model, adjust_note, _ = _adjusted(model, split, args, max_len, popularity=counts)
    if histories is None:
        histories = data
        if args.users:
            data.interactions = data.interactions[data.interactions["user_id"].isin(set(args.users))]
    elif args.users:
        histories = {u: histories[u] for u in dict.fromkeys(args.users)}
    try:
        recs = recommend(model, histories, k=args.k, item_index=item_index, exclude_seen=not args.include_seen,
                         unknown=args.unknown_items, max_len=max_len)
    except KeyError as exc:
        raise CLIError(f"{source}: {exc.args[0] if exc.args else exc} (--unknown-items skip)") from None
    if args.output:
        atomic_write_json(args.output, recs.to_dict())
        if not args.quiet:
            print(f"wrote the top {args.k} items of {len(recs)} users to {args.output}{adjust_note}")
    else:
        for user, row in zip(recs.users, recs.items):
            print(f"{user}\t" + " ".join(str(i) for i in row if i is not None))
    return 0


def cmd_add_items(args: argparse.Namespace) -> int:
    from .io import atomic_write_json, read_json
    from .split import ItemIndex, align_semantic

    out = Path(args.output_dir)
    source = _trained_folder(args.model)
    if out.resolve() == source.resolve():
        raise CLIError("--output-dir is the --model folder; write the extended model to a new folder "
                       "(the model's metrics.json describes the model as trained)")
    model, item_index, _ = _load_trained(source)
    if item_index is None:
        raise CLIError(f"--model {args.model} has no item_index.json (the raw item ids it was trained on)")
    if model.semantic_table is None:
        raise CLIError(f"--model {args.model} has no semantic table (an ID-only model cannot score an item "
                       "it never saw); add items to a model trained with --embeddings")
    table = read_embeddings(args.embeddings)
    if args.ids:
        in_file = set(table.ids)
        absent = [i for i in args.ids if i not in in_file]
        if absent:
            raise CLIError(f"--ids: {len(absent)} id(s) not in --embeddings {args.embeddings}, e.g. {absent[:5]}")
        known = [i for i in args.ids if i in item_index]
        if known:
            raise CLIError(f"--ids: {len(known)} id(s) the model already knows, e.g. {known[:5]}")
        new_ids = list(dict.fromkeys(args.ids))
    else:
        new_ids = [i for i in table.ids if i not in item_index]
    if not new_ids:
        raise CLIError(f"--embeddings {args.embeddings} has no item the model does not know already")
    extended = item_index.extended(new_ids)
    rows = align_semantic(table, ItemIndex(new_ids))
    model.add_items(rows, collaborative=args.collaborative, n_neighbours=args.n_neighbours)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    extended.save(out / "item_index.json")
    run = read_json(source / "run.json") if (source / "run.json").is_file() else {"format": "cfsr.run",
                                                                                   "settings": {}}
    run.setdefault("added_items", []).append({"count": len(new_ids), "embeddings": str(args.embeddings),
                                              "collaborative": args.collaborative or "default",
                                              "from_model": str(args.model)})
    atomic_write_json(out / "run.json", run)
    if not args.quiet:
        print(f"added {len(new_ids)} item(s) (ID rows: {args.collaborative or 'default'}) to the "
              f"{item_index.num_items} of {args.model}; wrote {out}")
    return 0


def _require_model_folder(model_dir: Path, given: str) -> None:
    """A ``CLIError`` naming ``--model`` unless ``model_dir`` holds what ``cfsr train`` writes."""
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise CLIError(f"--model {given} is not a trained model folder (config.json and model.safetensors "
                       "expected; write one with `cfsr train`)")


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    _require_model_folder(Path(args.model), args.model)
    try:
        url = push_folder(args.model, args.repo_id, private=args.private, commit_message=args.commit_message)
    except RuntimeError as exc:
        raise CLIError(str(exc)) from None
    if not args.quiet:
        print(url)
    return 0


def _check_adjustment_args(args: argparse.Namespace) -> None:
    if args.popularity_pseudo_count is not None and args.popularity_beta is None:
        raise CLIError("--popularity-pseudo-count needs --popularity-beta (it smooths the popularity term's counts)")
    if args.prior_tail_exponent is not None and args.semantic_prior is None:
        raise CLIError("--prior-tail-exponent needs --semantic-prior (it shapes the prior's weight)")


def _adjusted(model: Any, split: Any, args: argparse.Namespace, max_len: int,
              popularity: np.ndarray | None = None) -> tuple[Any, str, Any]:
    """``(model, note, Adjustment)``: the model with ``--popularity-beta`` / ``--semantic-prior``
    applied (an 'auto' strength chosen on validation, both together when both are 'auto').
    ``popularity``: the popularity term's counts (default: as ``--popularity-counts`` says)."""
    from .adjust import (DEFAULT_BETAS, DEFAULT_PRIOR_WEIGHTS, DEFAULT_PSEUDO_COUNTS, DEFAULT_TAIL_EXPONENTS,
                         VALID_NEGATIVES_SEED_OFFSET, Adjustment, choose_adjustment)
    from .split import align_semantic

    beta, weight, gamma = args.popularity_beta, args.semantic_prior, args.prior_tail_exponent
    pseudo = args.popularity_pseudo_count
    semantic = None
    if weight is not None:
        if args.embeddings:
            semantic = align_semantic(read_embeddings(args.embeddings), split.item_index, missing="zeros")
        elif getattr(model, "semantic_table", None) is not None:
            semantic = model.semantic_table[1: model.num_items + 1]
        else:
            raise CLIError(f"--semantic-prior needs item embeddings: the model at {args.model} has no semantic "
                           "table, so pass --embeddings")
    note = ""
    if "auto" in (beta, weight, gamma, pseudo):
        betas = DEFAULT_BETAS if beta == "auto" else (float(beta or 0.0),)
        weights = DEFAULT_PRIOR_WEIGHTS if weight == "auto" else (float(weight or 0.0),)
        gammas = DEFAULT_TAIL_EXPONENTS if gamma == "auto" else (float(gamma or 0.0),)
        pseudos = DEFAULT_PSEUDO_COUNTS if pseudo == "auto" else (float(pseudo or 1.0),)
        # chosen under the protocol evaluated; sampled validation negatives come from another seed than test's
        adjustment, values = choose_adjustment(model, split, semantic, betas, weights, (args.prior_recency,),
                                               max_len=max_len, protocol=args.protocol,
                                               seed=args.seed + VALID_NEGATIVES_SEED_OFFSET, tail_exponents=gammas,
                                               pseudo_counts=pseudos)
        note = f" (chosen on validation {args.protocol} NDCG@10 {values[adjustment]:.4f} from {len(values)} points)"
    else:
        adjustment = Adjustment(float(beta or 0.0), float(weight or 0.0), args.prior_recency, float(gamma or 0.0),
                                float(pseudo or 1.0))
    if beta is not None:
        note = (f", popularity beta {adjustment.beta}"
                + (f" pseudo count {adjustment.pseudo_count}" if pseudo is not None else "") + note)
    if weight is not None:
        note = (f", semantic prior weight {adjustment.weight} recency {adjustment.recency}"
                + (f" tail exponent {adjustment.tail_exponent}" if gamma is not None else "") + note)
    counts = popularity
    if popularity is None and args.popularity_counts == "inputs":
        counts = split.input_popularity(args.split)
        if adjustment.beta != 0:
            note += f", popularity counted over the {args.split} inputs"
    return adjustment.wrap(model, split, semantic, popularity=counts), note, adjustment


# ---------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _beta(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number or 'auto', got {text!r}")
    return value


def _pseudo_count(text: str) -> str | float:
    value = _beta(text)
    if value != "auto" and not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'auto', got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _add_adjustment_args(parser: argparse.ArgumentParser) -> None:
    """The post-hoc adjustment flags of ``evaluate`` and ``recommend`` (beyond the paper). An 'auto'
    strength is chosen on the validation split of --data, under --protocol (recommend: full ranking)."""
    parser.add_argument("--popularity-beta", type=_beta, default=None, metavar="BETA",
                        help="subtract BETA * log(1 + count) from every score (post-hoc popularity adjustment; "
                             "evaluate counts the training part, see --popularity-counts, recommend every "
                             "interaction of --data); 'auto' chooses BETA on validation from -1.5, -1, ..., 0, ..., "
                             "1; a negative BETA adds popularity back, as a model trained with --logit-adjustment "
                             "wants (beyond the paper)")
    parser.add_argument("--popularity-pseudo-count", type=_pseudo_count, default=None, metavar="C",
                        help="with --popularity-beta: the term is BETA * log(C + count) (default C = 1); a larger "
                             "C smooths the counts of rarely seen items; 'auto' chooses C on validation from 1, 3, "
                             "10, 30 with the other 'auto's (beyond the paper)")
    parser.add_argument("--semantic-prior", type=_beta, default=None, metavar="WEIGHT",
                        help="add WEIGHT * cosine(item embedding, user's last item embedding) to every score "
                             "(cfsr_head.SemanticPrior); 'auto' chooses WEIGHT on validation from 0, 0.5, 1, 2, 4, "
                             "8, 16, together with --popularity-beta when that is 'auto' too (beyond the paper)")
    parser.add_argument("--prior-recency", type=_fraction, default=0.0, metavar="R",
                        help="with --semantic-prior: weight R ** age of the history's items in the user's profile "
                             "(default 0: the last item alone)")
    parser.add_argument("--prior-tail-exponent", type=_beta, default=None, metavar="GAMMA",
                        help="with --semantic-prior: item i's prior weight times (1 + training count_i) ** -GAMMA "
                             "(always the training counts: what the model saw), relative to the geometric-mean "
                             "count (rare items lean more on their semantic neighbours); 'auto' chooses GAMMA on "
                             "validation from 0, 0.5, 1, 2 with the other 'auto's")
    parser.add_argument("--embeddings", default=None,
                        help="with --semantic-prior: item embeddings for the prior (default: the model's own "
                             "semantic table; needed for a model without one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfsr", description="Train, evaluate, publish and recommend with "
                                                              "LLM-CFSR dual-view heads.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,push,recommend,add-items}")
    sub.required = True

    t = sub.add_parser("train", help="train a head on a dataset folder; save it with metrics",
                       description="Train a DualViewHead (or plain SASRec/GRU4Rec) with early stopping on "
                                   "validation NDCG@10; rerun the same command to resume an interrupted run.")
    t.add_argument("--data", required=True, help="dataset folder (items.csv + interactions.csv) or a name "
                                                 "under the data folder (e.g. ml-100k)")
    t.add_argument("--embeddings", help="item embeddings (safetensors, llm_item_embed format)")
    t.add_argument("--encoder", choices=("sasrec", "gru4rec"), default="sasrec")
    t.add_argument("--variant", choices=VARIANTS, default="full",
                   help="full: LLM-CFSR head; no-semantic / no-collaborative / concat / unshared: the "
                        "paper's ablations; sasrec: ID-only baseline (random table)")
    t.add_argument("--loss", choices=("bpr", "ce", "bce", "sampled_softmax"), nargs="+", default=["bpr"],
                   help="training loss; several (e.g. --loss bpr ce) are searched like --lr, each with its own "
                        "early stopping, and the one that validates best is kept")
    t.add_argument("--n-negatives", type=_positive_int, default=1,
                   help="sampled negatives per position (bpr, bce, sampled_softmax)")
    t.add_argument("--d", type=_positive_int, default=64, help="hidden size per view")
    t.add_argument("--max-len", type=_positive_int, default=50)
    t.add_argument("--n-layers", type=_positive_int, default=2)
    t.add_argument("--n-heads", type=_positive_int, default=4)
    t.add_argument("--epochs", type=_positive_int, default=200)
    t.add_argument("--patience", type=int, default=20, help="evaluations without improvement before stopping")
    t.add_argument("--lr", type=_positive_float, nargs="+", default=[1e-3], metavar="LR",
                   help="learning rate; with several (here, in --dropout or in --loss), every combination is trained, "
                        "each with its own checkpoints under OUTPUT_DIR/checkpoints/, and the one with the best "
                        "validation NDCG@10 is kept and tested (e.g. --lr 1e-3 3e-3 1e-2)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--dropout", type=_fraction, nargs="+", default=[0.2], metavar="P",
                   help="dropout of the encoder and head; several values are searched like --lr")
    t.add_argument("--score-temperature", type=_positive_float, default=None, metavar="TAU",
                   help="score items by cosine similarity / TAU instead of the dot product (beyond the paper)")
    t.add_argument("--view-loss-weight", type=_positive_float, default=None, metavar="W",
                   help="add W times the loss of each view's own score to the fused loss (beyond the paper; "
                        "variants with both views)")
    t.add_argument("--collab-anchor-weight", type=_positive_float, default=None, metavar="A",
                   help="add A times the mean squared distance of the ID table from its PCA initialisation "
                        "to the loss (beyond the paper; variants with a PCA-initialised ID table)")
    t.add_argument("--cold-item-dropout", type=_fraction, default=None, metavar="Q",
                   help="at each training step, train each item with probability Q on the ID row it would get as a "
                        "new item (its PCA projection), so that items added later with `cfsr add-items` rank better "
                        "(beyond the paper; DropoutNet-style; measured in benchmarks/bench_cold_start.py)")
    t.add_argument("--center-semantic", action="store_true",
                   help="subtract the mean item vector from the semantic table before the adapter (beyond the "
                        "paper; for decoder LLM embeddings that share one direction)")
    t.add_argument("--logit-adjustment", type=_positive_float, default=None, metavar="TAU",
                   help="train with the logit-adjusted loss: every training logit of an item gets "
                        "+ TAU * log(1 + its training count), so that scores learn what popularity does "
                        "not explain (beyond the paper; Menon et al., 2021)")
    t.add_argument("--validate-with-logit-bias", action="store_true",
                   help="with --logit-adjustment: choose the best epoch on validation scores with the training "
                        "bias added back (the scores the loss trained), not the model's own")
    t.add_argument("--train-prior", type=float, nargs=3, default=None, metavar=("WEIGHT", "RECENCY", "GAMMA"),
                   help="train with the semantic prior in (Trainer(..., prior=SemanticPrior(...))) over --embeddings: "
                        "every training logit gets WEIGHT * the tail-weighted cosine to the profile so far; validation "
                        "and the test numbers score with it added (beyond the paper). The saved head holds the "
                        "model alone: evaluate it with --semantic-prior WEIGHT (or auto)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--sliding", action="store_true", help="train on every max_len window of long sequences")
    t.add_argument("--eval-protocol", choices=("full", "sampled"), default="full",
                   help="protocol of the validation metric used for early stopping")
    t.add_argument("--missing-embeddings", choices=("error", "zeros", "mean"), default="error",
                   help="what to do with dataset items that the embeddings file lacks")
    t.add_argument("--output-dir", required=True)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--quiet", action="store_true", help="print nothing on success")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a trained model; print HR/NDCG@5/10/20 per group",
                       description="Evaluate a model folder written by `cfsr train` (leave-one-out test split).")
    e.add_argument("--data", required=True, help="dataset folder or name (the one the model was trained on)")
    e.add_argument("--model", required=True, help="folder written by `cfsr train`, or a Hub repo id it was pushed to")
    e.add_argument("--protocol", choices=("full", "sampled"), default="full",
                   help="full ranking over all items, or the target plus 100 sampled negatives")
    e.add_argument("--split", choices=("test", "valid"), default="test")
    e.add_argument("--max-len", type=_positive_int, default=None,
                   help="input window (default: the one it was trained with)")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampled negatives")
    _add_adjustment_args(e)
    e.add_argument("--popularity-counts", choices=("train", "inputs"), default="train",
                   help="with --popularity-beta: the counts on the evaluated split, 'train' (the training "
                        "part, which 'auto' chooses on) or 'inputs' (everything before the split's targets: "
                        "on test the validation items too, SplitData.input_popularity)")
    e.add_argument("--json", help="also write the summary to this JSON file")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("push", help="upload a trained model folder to the Hugging Face Hub",
                       description="Upload the model files of a folder written by `cfsr train` (config.json, "
                                   "model.safetensors, item_index.json, run.json, metrics.json; not the "
                                   "checkpoints) with a generated model card. The token comes from HF_TOKEN or a "
                                   "stored `huggingface-cli login`.")
    p.add_argument("--model", required=True, help="folder written by `cfsr train`")
    p.add_argument("--repo-id", required=True, help="Hub model repo, 'user/name' (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_push)

    a = sub.add_parser("add-items", help="add new items (cold start) to a trained model from their embeddings",
                       description="Give a trained model the items of an embeddings file it does not know yet, "
                                   "without retraining (DualViewHead.add_items), and write the extended model "
                                   "and item index to a new folder that `cfsr recommend` and `cfsr push` take. "
                                   "The embeddings must come from the same embedder as the model's semantic table.")
    a.add_argument("--model", required=True, help="folder written by `cfsr train`, or a Hub repo id it was pushed to")
    a.add_argument("--embeddings", required=True, help="item embeddings (safetensors) holding the new items")
    a.add_argument("--ids", nargs="+", metavar="ID", help="only these new ids (default: every id of --embeddings "
                                                          "the model does not know)")
    a.add_argument("--collaborative", choices=COLD_START_ROWS, default=None,
                   help="where a new item's ID-table row comes from: the PCA projection of its embedding (the "
                        "default for a PCA-initialised table), a ridge regression from the known items' "
                        "embeddings to their trained rows, the mean trained row of its nearest known items, or "
                        "zeros (the default for a random table); measured in benchmarks/bench_cold_start.py")
    a.add_argument("--n-neighbours", type=_positive_int, default=10, help="with --collaborative neighbours")
    a.add_argument("--output-dir", required=True, help="new folder for the extended model")
    a.add_argument("--quiet", action="store_true", help="print nothing on success")
    a.set_defaults(func=cmd_add_items)

    r = sub.add_parser("recommend", help="each user's top-k next items, printed or written as JSON",
                       description="Recommend the next items for the users of a dataset folder from their whole "
                                   "histories (by timestamp), or for the histories of a --histories file, with a "
                                   "model written by `cfsr train` (or a Hub repo id it was pushed to). Prints one "
                                   "line per user (user id, tab, the items best first), or writes --output as JSON "
                                   "(items and scores per user).")
    r.add_argument("--model", required=True, help="folder written by `cfsr train`, or a Hub repo id it was pushed to")
    r.add_argument("--data", help="dataset folder or name whose interactions are the histories (and, with an "
                   "adjustment, its popularity counts and validation split)")
    r.add_argument("--histories", metavar="FILE",
                   help="histories to recommend for instead of --data's: a .csv with user_id,item_id[,timestamp] "
                        "or a .json object user -> [items, oldest first]")
    r.add_argument("--k", type=_positive_int, default=10, help="items per user")
    r.add_argument("--users", nargs="+", metavar="USER", help="only these user ids (default: every user)")
    r.add_argument("--include-seen", action="store_true", help="keep items the user already interacted with")
    r.add_argument("--unknown-items", choices=("error", "skip"), default="error",
                   help="history items the model does not know: stop with an error, or leave them out")
    r.add_argument("--max-len", type=_positive_int, default=None,
                   help="input window (default: the one it was trained with)")
    _add_adjustment_args(r)
    r.add_argument("--output", help="JSON file to write (default: print to standard output)")
    r.add_argument("--quiet", action="store_true", help="print nothing on success")
    r.set_defaults(func=cmd_recommend, protocol="full", seed=0)  # what an 'auto' adjustment is chosen under
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cfsr`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"cfsr {args.command}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"cfsr {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, TypeError, FloatingPointError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"cfsr {args.command}: error: {msg}".splitlines()[0], file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
