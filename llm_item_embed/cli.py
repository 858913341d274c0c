"""``llm-item-embed``: fine-tune an item embedder, encode item tables, score embeddings against
users' next items, push results to the Hub.

    llm-item-embed fit items.csv --output-dir runs/beauty --field name=title --field brand=brand
    llm-item-embed encode items.csv --embedder runs/beauty -o beauty.safetensors --recbole beauty.itememb
    llm-item-embed evaluate frozen.safetensors beauty.safetensors --interactions interactions.csv
    llm-item-embed push runs/beauty user/beauty-embedder        # token: HF_TOKEN or --token

Errors print one line (``llm-item-embed <command>: error: ...``) and exit with status 1; ``--debug``
shows the traceback instead. Usage errors exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

PROG = "llm-item-embed"
EXIT_ERROR = 1
logger = logging.getLogger("llm_item_embed.cli")

_READERS = {
    ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------- input tables
def _read_table(path: Path, what: str, dtype: dict[str, Any]) -> Any:
    """A CSV / TSV / parquet / JSON (lines) table, or a CLIError that names the file."""
    import pandas as pd

    if not path.exists():
        raise CLIError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise CLIError(f"{what} file {path} is a folder")
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise CLIError(f"{what} file {path}: unknown extension {path.suffix!r}; use one of {sorted(_READERS)}")
    try:
        if kind == "csv":
            df = pd.read_csv(path, dtype=dtype)
        elif kind == "tsv":
            df = pd.read_csv(path, sep="\t", dtype=dtype)
        elif kind == "parquet":
            df = pd.read_parquet(path)
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True, dtype=dtype)
        else:
            try:
                df = pd.read_json(path, dtype=dtype)
            except ValueError:
                df = pd.read_json(path, lines=True, dtype=dtype)
    except ImportError as exc:
        raise CLIError(f"cannot read {path}: {exc} (parquet needs 'pip install pyarrow')") from exc
    except Exception as exc:
        raise CLIError(f"cannot read {what} file {path}: {_one_line(exc)}") from exc
    return df


def read_items(path: str | os.PathLike, id_column: str) -> Any:
    """Read an items table (CSV, TSV, parquet, JSON / JSON lines) with ids as strings, and check the
    id column before any model work: present, no missing and no duplicate ids, at least one row."""
    path = Path(path)
    df = _read_table(path, "items", {id_column: str})
    if id_column not in df.columns:
        raise CLIError(f"items file {path} has no id column {id_column!r}; its columns are {[str(c) for c in df.columns]} "
                       f"(choose one with --id-column)")
    if len(df) == 0:
        raise CLIError(f"items file {path} has no rows")
    ids = df[id_column]
    missing = ids.isna() | (ids.astype(str).str.strip() == "")
    if missing.any():
        rows = [int(i) for i in missing.to_numpy().nonzero()[0][:5]]
        raise CLIError(f"items file {path}: {int(missing.sum())} row(s) have an empty {id_column!r}, e.g. rows {rows}")
    df[id_column] = ids.astype(str)
    dup = df[id_column][df[id_column].duplicated(keep=False)]
    if len(dup):
        raise CLIError(f"items file {path}: {dup.nunique()} id(s) in {id_column!r} appear more than once, "
                       f"e.g. {sorted(set(dup.tolist()))[:5]}")
    if len(df.columns) < 2:
        raise CLIError(f"items file {path} has only the id column {id_column!r}; prompts need attribute columns")
    return df


def read_interactions(path: str | os.PathLike, item_ids: Any) -> Any:
    """An interactions table (user_id, item_id[, timestamp]) whose items are all in ``item_ids``;
    missing columns and unknown items are named."""
    path = Path(path)
    df = _read_table(path, "interactions", {"user_id": str, "item_id": str})
    missing = [c for c in ("user_id", "item_id") if c not in df.columns]
    if missing:
        raise CLIError(f"interactions file {path} has no column(s) {missing}; its columns are "
                       f"{[str(c) for c in df.columns]}")
    df["item_id"] = df["item_id"].astype(str)
    unknown = sorted(set(df["item_id"]) - set(item_ids))
    if unknown:
        raise CLIError(f"interactions file {path}: {len(unknown)} item id(s) are not in the items table, "
                       f"e.g. {unknown[:5]}")
    return df


def read_pairs(path: str | os.PathLike, item_ids: Any, holdout_last: int, min_count: int = 1,
               counts: bool = False) -> Any:
    """Positive pairs from an interactions table (user_id, item_id[, timestamp]): consecutive items of each
    user's history, the last ``holdout_last`` interactions of each user left out, pairs seen fewer than
    ``min_count`` times dropped (``counts``: with a count column). Unknown items are named."""
    from .pairs import sequence_pairs

    df = read_interactions(path, item_ids)
    pairs = sequence_pairs(df, time_column="timestamp" if "timestamp" in df.columns else None,
                           holdout_last=holdout_last, min_count=min_count, counts=counts)
    if len(pairs) == 0:
        raise CLIError(f"interactions file {path}: no two different consecutive items in any history "
                       f"(after holding out the last {holdout_last} per user"
                       + (f", seen at least {min_count} times)" if min_count > 1 else ")"))
    return pairs


def read_targets(path: str | os.PathLike, item_ids: Any, holdout_last: int, **options: Any) -> Any:
    """Co-occurrence targets (:func:`~llm_item_embed.pairs.cooccurrence_embeddings`) of an interactions
    table, one row per item of ``item_ids``, each user's last ``holdout_last`` interactions left out
    (``options``, e.g. ``dim``, go to that function)."""
    from .pairs import cooccurrence_embeddings

    df = read_interactions(path, item_ids)
    try:
        return cooccurrence_embeddings(df, ids=list(item_ids), holdout_last=holdout_last,
                                       time_column="timestamp" if "timestamp" in df.columns else None, **options)
    except ValueError as exc:
        raise CLIError(f"interactions file {path}: {exc}") from None


def build_template(args: argparse.Namespace) -> Any:
    """A ``PromptTemplate`` from --template-json / --instruction / --field, or ``None`` if none given."""
    from .prompts import PromptTemplate

    spec: dict[str, Any] = {}
    if args.template_json:
        text = args.template_json
        source = "--template-json"
        if not text.lstrip().startswith("{"):
            p = Path(text)
            if not p.is_file():
                raise CLIError(f"--template-json: {text} is neither a JSON object nor an existing file")
            text, source = p.read_text(encoding="utf-8"), str(p)
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{source} is not valid JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise CLIError(f"{source} must hold a JSON object like {{\"instruction\": ..., \"fields\": {{column: name}}}}")
    if args.instruction is not None:
        spec["instruction"] = args.instruction
    if args.field:
        fields: dict[str, str] = {}
        for item in args.field:
            name, sep, column = item.partition("=")
            if not sep or not name.strip() or not column.strip():
                raise CLIError(f"--field {item!r}: expected NAME=COLUMN, e.g. --field name=title")
            if column.strip() in fields:
                raise CLIError(f"--field {item!r}: column {column.strip()!r} is used twice")
            fields[column.strip()] = name.strip()
        spec["fields"] = fields
    if not spec:
        return None
    try:
        return PromptTemplate.from_dict(spec)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"bad prompt template: {_one_line(exc)}") from exc


def _template_for_check(template: Any) -> Any:
    from .prompts import PromptTemplate

    return template if template is not None else PromptTemplate()


def check_table(df: Any, template: Any, id_column: str, items: str) -> None:
    """Run the template's checks on the table (missing columns, all-empty items) before model work."""
    try:
        _template_for_check(template).validate(df, id_column=id_column)
    except (KeyError, ValueError, TypeError) as exc:
        raise CLIError(f"items file {items}: {_one_line(exc)}") from exc


# ---------------------------------------------------------------------------- embedder construction
def _embedder_class() -> Any:
    from .embedder import ItemEmbedder

    return ItemEmbedder


def _lora(args: argparse.Namespace) -> Any:
    from .backbone import LoraSettings

    targets: Any = args.lora_target_modules
    if targets != "auto":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    try:
        return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"bad LoRA settings: {_one_line(exc)}") from exc


def _supported(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keep the keyword arguments ``fn`` accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    dropped = [k for k in kwargs if k not in params]
    if dropped:
        logger.debug("ignoring options not supported by %s: %s", getattr(fn, "__qualname__", fn), dropped)
    return {k: v for k, v in kwargs.items() if k in params}


def new_embedder(args: argparse.Namespace, template: Any) -> Any:
    """``ItemEmbedder(...)`` from the model options of ``fit`` / ``encode --model``."""
    cls = _embedder_class()
    kwargs: dict[str, Any] = dict(
        template=template, drop_prob=args.drop_prob, n_views=args.n_views, pooling=args.pooling,
        lora=_lora(args), bidirectional=args.bidirectional, max_length=args.max_length,
        similarity="cos" if args.similarity == "cosine" else args.similarity,
    )
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return cls(args.model, **_supported(cls.__init__, kwargs))


# ---------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    template = build_template(args)
    if not 0.0 <= args.drop_prob < 1.0:
        raise CLIError(f"--drop-prob must be in [0, 1), got {args.drop_prob}")
    if args.n_views < 2:
        raise CLIError(f"--n-views must be at least 2, got {args.n_views}")
    if args.epochs < 1:
        raise CLIError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 2:
        raise CLIError(f"--batch-size must be at least 2 (in-batch negatives), got {args.batch_size}")
    if args.max_steps is not None and args.max_steps < 1:
        raise CLIError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.lr <= 0:
        raise CLIError(f"--lr must be positive, got {args.lr}")
    if args.resume_from and args.resume_from != "latest" and not Path(args.resume_from).exists():
        raise CLIError(f"--resume-from {args.resume_from} does not exist")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {out} exists and is not a folder")
    if not 0.0 < args.pair_prob <= 1.0:
        raise CLIError(f"--pair-prob must be in (0, 1], got {args.pair_prob}")
    if args.holdout_last < 0:
        raise CLIError(f"--holdout-last must be >= 0, got {args.holdout_last}")
    if args.pair_min_count < 1:
        raise CLIError(f"--pair-min-count must be at least 1, got {args.pair_min_count}")
    target_options = {"view_weight": args.view_weight, "target_weight": args.target_weight}
    if args.collaborative == "targets":
        if not args.interactions:
            raise CLIError("--collaborative targets needs --interactions (the histories the targets come from)")
        from .losses import check_alignment_weights

        try:
            check_alignment_weights(*(1.0 if w is None else w for w in target_options.values()))
        except ValueError as exc:
            raise CLIError(f"--view-weight / --target-weight: {exc}") from None
    else:
        given = [f"--{k.replace('_', '-')}" for k, v in {**target_options, "target_dim": args.target_dim}.items()
                 if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} only apply with --collaborative targets")
    df = read_items(args.items, args.id_column)
    check_table(df, template, args.id_column, args.items)
    weighted = args.pair_weighting == "count"
    pairs = targets = None
    if args.interactions and args.collaborative == "pairs":
        pairs = read_pairs(args.interactions, df[args.id_column], args.holdout_last, args.pair_min_count,
                           counts=weighted)
    elif args.interactions:
        targets = read_targets(args.interactions, df[args.id_column].astype(str), args.holdout_last,
                               **({"dim": args.target_dim} if args.target_dim is not None else {}))
    emb = new_embedder(args, template)
    fit_kwargs = dict(
        id_column=args.id_column, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        max_steps=args.max_steps, output_dir=str(out), resume_from=args.resume_from,
    )
    if pairs is not None:
        fit_kwargs.update(positive_pairs=pairs, pair_prob=args.pair_prob,
                          mask_known_positives=not args.negatives_include_partners)
        logger.info("%d positive pairs from %s (pair_prob %.2f, %s partners)", len(pairs), args.interactions,
                    args.pair_prob, "count-weighted" if weighted else "uniform")
    if targets is not None:
        fit_kwargs.update(targets=targets, **{k: v for k, v in target_options.items() if v is not None})
        logger.info("co-occurrence targets (dim %d) from %s", targets.dim, args.interactions)
    optional = dict(seed=args.seed, mini_batch_size=args.mini_batch_size, save_every=args.save_every,
                    mixed_precision=args.mixed_precision, show_progress_bar=False if args.no_progress else None)
    fit_kwargs.update(_supported(emb.fit, {k: v for k, v in optional.items() if v is not None}))
    logger.info("fine-tuning on %d items from %s", len(df), args.items)
    emb.fit(df, **fit_kwargs)
    save_dir = Path(args.save_dir) if args.save_dir else out
    emb.save_pretrained(str(save_dir))
    print(f"saved the fine-tuned embedder to {save_dir}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    template = build_template(args)
    if args.embedder and (template is not None or args.model):
        raise CLIError("--embedder uses its saved model and template; do not combine it with --model, "
                       "--template-json, --instruction or --field")
    out = Path(args.output)
    if out.is_dir():
        raise CLIError(f"--output {out} is a folder; give a file name such as {out / 'embeddings.safetensors'}")
    if args.recbole and Path(args.recbole).is_dir():
        raise CLIError(f"--recbole {args.recbole} is a folder; give a file name such as dataset.itememb")
    df = read_items(args.items, args.id_column)
    if args.embedder:
        src = args.embedder
        if not Path(src).exists() and "/" not in src:
            raise CLIError(f"--embedder {src} does not exist")
        emb = _embedder_class().from_pretrained(src)
        check_table(df, getattr(emb, "template", None), args.id_column, args.items)
    else:
        check_table(df, template, args.id_column, args.items)
        emb = new_embedder(args, template)
    kwargs = _supported(emb.encode, dict(id_column=args.id_column, batch_size=args.batch_size,
                                         show_progress_bar=False if args.no_progress else None,
                                         shard_dir=args.shard_dir))
    E = emb.encode(df, **kwargs)
    E.save(out)  # logs "saved N item embeddings (dim d) to ..." (not with --quiet)
    if args.recbole:
        E.to_recbole(args.recbole, field=args.recbole_field)
        print(f"wrote the RecBole file {args.recbole}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .embeddings import ItemEmbeddings
    from .evaluation import neighbour_scores, next_item_transitions

    tables = []
    for given in args.embeddings:
        path = Path(given)
        if not path.is_file():
            raise CLIError(f"embeddings file {path} does not exist" if not path.exists()
                           else f"embeddings file {path} is a folder")
        tables.append((path, ItemEmbeddings.load(path)))
    df = read_interactions(args.interactions, set(tables[0][1].ids))
    prev, nxt = next_item_transitions(df, holdout_last=args.holdout_last, held_out=args.held_out,
                                      time_column="timestamp" if "timestamp" in df.columns else None)
    if len(prev) == 0:
        raise CLIError(f"interactions file {args.interactions}: no transitions "
                       + ("into a held-out item" if args.held_out else f"after holding out the last "
                                                                       f"{args.holdout_last} per user"))
    which = "into the held-out items" if args.held_out else "within the training histories"
    print(f"{len(prev)} transitions {which} (last {args.holdout_last} per user held out), k={args.k}")
    results: dict[str, dict[str, float]] = {}
    for path, table in tables:
        scores = neighbour_scores(table, prev, nxt, k=args.k, max_queries=args.max_queries or None, seed=args.seed)
        results[str(path)] = scores
        line = "  ".join(f"{name} {value:.4f}" for name, value in scores.items())
        first = results[str(tables[0][0])]
        ratio = "" if path == tables[0][0] else "  (vs the first file: " + ", ".join(
            f"{name} " + (f"{scores[name] / first[name]:.2f}x" if first[name] else "n/a") for name in scores
            if name.startswith("next@") or name == "AUC") + ")"
        print(f"{path}: {line}{ratio}")
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(Path(args.json), {"k": args.k, "held_out": args.held_out, "holdout_last": args.holdout_last,
                                            "transitions": int(len(prev)), "scores": results})
    return 0


def _is_embeddings_folder(folder: Path, filename: str) -> bool:
    """A folder holding an embeddings file and no saved embedder (``item_embedder_config.json``)."""
    return (folder / filename).is_file() and not (folder / "item_embedder_config.json").exists()


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    token = args.token or os.environ.get("HF_TOKEN") or None
    path = Path(args.path)
    if not path.exists():
        raise CLIError(f"{path} does not exist (give a saved embedder folder or an embeddings .safetensors file)")
    common = dict(token=token, private=args.private)
    if args.commit_message:
        common["commit_message"] = args.commit_message
    if path.is_file() or _is_embeddings_folder(path, args.filename):
        from .embeddings import ItemEmbeddings

        E = ItemEmbeddings.load(path if path.is_file() else path / args.filename)
        url = E.push_to_hub(args.repo_id, filename=args.filename, **common)
    else:
        emb = _embedder_class().from_pretrained(str(path))
        kwargs = _supported(emb.push_to_hub, common)
        if args.private and "private" not in kwargs:
            raise CLIError("this ItemEmbedder.push_to_hub does not support --private")
        url = emb.push_to_hub(args.repo_id, **kwargs)
    print(f"pushed {path} to {url if url else args.repo_id}")
    return 0


# ---------------------------------------------------------------------------- parser
def _add_template_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt template (default: every non-id column, named after the column)")
    g.add_argument("--template-json", metavar="JSON_OR_FILE",
                   help='template as JSON or a JSON file: {"instruction": "...", "fields": {"column": "name"}}')
    g.add_argument("--instruction", help="text before the attributes, e.g. 'This beauty product has the following attributes:'")
    g.add_argument("--field", action="append", metavar="NAME=COLUMN",
                   help="an attribute 'NAME is <value of COLUMN>'; repeat in prompt order (replaces the JSON fields)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hugging Face model id, local folder or .gguf file (default: the bundled all-MiniLM-L6-v2)")
    g.add_argument("--pooling", choices=["mean", "last"], default="mean", help="pooling of the last layer (default: mean)")
    g.add_argument("--max-length", type=int, default=256, help="truncate prompts to this many tokens (default: 256)")
    bi = g.add_mutually_exclusive_group()
    bi.add_argument("--bidirectional", dest="bidirectional", action="store_const", const=True, default=None,
                    help="let a decoder LLM attend in both directions")
    bi.add_argument("--causal", dest="bidirectional", action="store_const", const=False, help="keep causal attention")
    g.add_argument("--similarity", choices=["dot", "cos", "cosine"], default="dot",
                   help="contrastive similarity: inner product or cosine (default: dot)")
    g.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a Hub model (off by default)")
    g.add_argument("--drop-prob", type=float, default=0.2, help="probability of dropping each attribute in a view (default: 0.2)")
    g.add_argument("--n-views", type=int, default=2, help="views per item (default: 2)")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    g.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default: 16)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    g.add_argument("--lora-target-modules", default="auto", metavar="auto|NAMES",
                   help="comma-separated module names, or 'auto' (default)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Recommendation-aware item embeddings from item attribute tables: fine-tune a language "
                    "model with masked-prompt contrastive LoRA, encode items, push to the Hugging Face Hub.",
        epilog="Run '%(prog)s COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", help="only print warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = sub.add_parser("fit", parents=[common], help="fine-tune an item embedder on an items table",
                         description="Fine-tune a language model (LoRA) so that masked views of the same item's "
                                     "attribute prompt embed close together; saves the embedder folder.")
    fit.add_argument("items", help="items table: .csv, .tsv, .parquet, .jsonl or .json")
    fit.add_argument("--id-column", default="item_id", help="column with the item ids (default: item_id)")
    fit.add_argument("--output-dir", required=True, help="folder for checkpoints and the fine-tuned embedder")
    fit.add_argument("--save-dir", help="where to save the fine-tuned embedder (default: --output-dir)")
    _add_template_options(fit)
    _add_model_options(fit)
    t = fit.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=1, help="passes over the items (default: 1)")
    t.add_argument("--batch-size", type=int, default=64, help="items per contrastive batch (default: 64)")
    t.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: 2e-4)")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    t.add_argument("--resume-from", help="checkpoint folder to continue an interrupted run from, or 'latest'")
    t.add_argument("--seed", type=int, default=None, help="random seed (default: the library's)")
    t.add_argument("--mini-batch-size", type=int, default=None, help="GradCache chunk size (saves memory, same gradients)")
    t.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None, help="Accelerate mixed precision")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    c = fit.add_argument_group("collaborative positives (beyond the paper)")
    c.add_argument("--interactions", help="interactions table (user_id, item_id[, timestamp]): items that follow "
                                          "each other in a history become positives too (or, with "
                                          "--collaborative targets, give each item a co-occurrence target)")
    c.add_argument("--collaborative", choices=["pairs", "targets"], default="pairs",
                   help="what --interactions teach: consecutive items as positives (pairs, default), or each "
                        "view matched to its item's co-occurrence vector (targets)")
    c.add_argument("--view-weight", type=float, default=None,
                   help="with targets: weight of the paper's InfoNCE between masked views (default 1; 0: the "
                        "alignment alone, the better choice on Amazon Beauty)")
    c.add_argument("--target-weight", type=float, default=None,
                   help="with targets: weight of the alignment (default 1)")
    c.add_argument("--target-dim", type=int, default=None,
                   help="with targets: width of the co-occurrence vectors (default 64)")
    c.add_argument("--pair-prob", type=float, default=0.5,
                   help="probability that a view is a partner's instead of the item's own (default: 0.5)")
    c.add_argument("--holdout-last", type=int, default=2,
                   help="interactions per user left out of the pairs or targets (default 2: leave-one-out's validation "
                        "and test items)")
    c.add_argument("--pair-min-count", type=int, default=1,
                   help="only pairs that follow each other in at least this many histories' steps (default: 1)")
    c.add_argument("--pair-weighting", choices=["uniform", "count"], default="uniform",
                   help="draw an item's partners uniformly (default) or in proportion to how often the pair occurs")
    c.add_argument("--negatives-include-partners", action="store_true",
                   help="keep an anchor's partners among its in-batch negatives (default: left out)")
    fit.set_defaults(func=cmd_fit)

    enc = sub.add_parser("encode", parents=[common], help="encode an items table into an embeddings file",
                         description="Encode every item of a table with a fine-tuned embedder (--embedder) or an "
                                     "untuned model (--model); writes one .safetensors file (and a RecBole file).")
    enc.add_argument("items", help="items table: .csv, .tsv, .parquet, .jsonl or .json")
    enc.add_argument("-o", "--output", required=True, help="embeddings file to write (.safetensors)")
    enc.add_argument("--embedder", help="a saved embedder folder (from 'fit') or its Hub repo id")
    enc.add_argument("--id-column", default="item_id", help="column with the item ids (default: item_id)")
    enc.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    enc.add_argument("--shard-dir", help="encode in shards written here (bounded memory for huge catalogues)")
    enc.add_argument("--recbole", metavar="FILE", help="also write RecBole's pre-trained embedding file (e.g. beauty.itememb)")
    enc.add_argument("--recbole-field", default="iid", help="id field name in the RecBole file (default: iid)")
    enc.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_template_options(enc)
    _add_model_options(enc)
    enc.set_defaults(func=cmd_encode)

    ev = sub.add_parser("evaluate", parents=[common],
                        help="score embedding files against what users interact with next",
                        description="How often each transition's next item is among the k nearest neighbours "
                                    "(cosine) of the previous item (next@k), and how often a consecutive pair is "
                                    "more similar than a random one (AUC); no recommender is trained. Give the "
                                    "untuned model's file first to read the others against it.")
    ev.add_argument("embeddings", nargs="+", help="embeddings files (.safetensors, from 'encode')")
    ev.add_argument("--interactions", required=True,
                    help="interactions table (user_id, item_id[, timestamp]; without timestamps the file's "
                         "order is each user's time order)")
    ev.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10)")
    ev.add_argument("--holdout-last", type=int, default=2,
                    help="interactions per user held out (default 2: leave-one-out's validation and test items)")
    ev.add_argument("--held-out", action="store_true",
                    help="score the transitions into the first held-out item instead of the training ones (for "
                         "embeddings fine-tuned on the training transitions: --interactions at fit time)")
    ev.add_argument("--max-queries", type=int, default=5000,
                    help="transitions drawn for next@k (default: 5000; 0: all)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    ev.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    ev.set_defaults(func=cmd_evaluate)

    push = sub.add_parser("push", parents=[common], help="upload an embedder folder or an embeddings file to the Hub",
                          description="Upload a saved embedder folder or an embeddings .safetensors file, with a "
                                      "generated model card. The token comes from --token or HF_TOKEN (or a stored "
                                      "login) and is never printed or saved.")
    push.add_argument("path", help="saved embedder folder or embeddings .safetensors file")
    push.add_argument("repo_id", help="Hub repo id, e.g. user/beauty-item-embeddings")
    push.add_argument("--token", help="Hub token (prefer the HF_TOKEN environment variable)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--commit-message", help="commit message")
    push.add_argument("--filename", default="embeddings.safetensors",
                      help="embeddings file name in the repo, and inside PATH when it is a folder "
                           "(default: embeddings.safetensors, what from_pretrained looks for)")
    push.set_defaults(func=cmd_push)
    return parser


# ---------------------------------------------------------------------------- entry point
def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    msg = " ".join(str(msg).split())
    return msg or type(exc).__name__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (safe under redirection)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@contextlib.contextmanager
def _cli_logging(quiet: bool) -> Iterator[None]:
    """The library's INFO messages on stderr while a command runs; the logger is left as it was
    found afterwards (``main`` may be called in-process, from a notebook or a test)."""
    log = logging.getLogger("llm_item_embed")
    level = log.level
    handler = None
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 error, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    token = getattr(args, "token", None) or os.environ.get("HF_TOKEN")
    try:
        with _cli_logging(args.quiet):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug and not (token and token in f"{exc!r}"):
            raise
        msg = _one_line(exc)
        if token:
            msg = msg.replace(token, "***")
        kind = "" if isinstance(exc, CLIError) else f"{type(exc).__name__}: "
        print(f"{PROG} {args.command}: error: {kind}{msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
