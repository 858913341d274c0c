"""Model cards and Hub uploads. A token is handed to ``huggingface_hub`` and nowhere else: it is
never logged, printed, put in a card, or written to a file."""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io import atomic_write_text

logger = logging.getLogger(__name__)

LIBRARY_NAME = "llm-item-embed"
CARD_FILENAME = "README.md"
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
# Metadata keys that could hold credentials: never rendered into a card.
_SECRET_RE = re.compile(r"token|secret|password|api[_-]?key|credential", re.IGNORECASE)


def validate_repo_id(repo_id: str) -> str:
    """Check ``repo_id`` looks like ``user/name`` (or ``name``); raise ``ValueError`` naming it."""
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id) or len(repo_id) > 96 \
            or ".." in repo_id or "--" in repo_id or repo_id.endswith(".git"):
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id (expected 'user/name')")
    return repo_id


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


# ---------------------------------------------------------------------------- model card
def _first(meta: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        v = meta.get(k)
        if v not in (None, "", {}, []):
            return v
    return None


def _code(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = text.replace("\n", " ").replace("`", "'")
    return f"`{text}`"


def _looks_like_hub_id(value: Any) -> bool:
    return isinstance(value, str) and "/" in value and bool(_REPO_ID_RE.match(value)) and not os.path.exists(value)


def _as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def render_model_card(
    kind: str,
    metadata: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    filename: str = "embeddings.safetensors",
) -> str:
    """A README.md model card: YAML front matter (library_name, tags, base_model) and a body with
    the base model, prompt template, training settings, dataset size and how to load.

    ``kind`` is ``"embedder"`` (a fine-tuned ItemEmbedder folder) or ``"embeddings"`` (an
    ItemEmbeddings file). Keys that look like credentials are never rendered.
    """
    if kind not in ("embedder", "embeddings"):
        raise ValueError(f"kind must be 'embedder' or 'embeddings', got {kind!r}")
    meta = {k: v for k, v in dict(metadata or {}).items() if not _SECRET_RE.search(str(k))}
    base = _first(meta, "base_model", "model_name_or_path", "model_name", "base_model_name_or_path")
    lora = _first(meta, "lora", "lora_settings", "peft")
    template = _first(meta, "template", "prompt_template")
    training = _as_dict(_first(meta, "training", "fit", "fit_config", "train"))
    n_items = _first(meta, "n_items", "dataset_size", "n_train_items")
    if n_items is None:
        n_items = training.get("n_items")
    used = {"base_model", "model_name_or_path", "model_name", "base_model_name_or_path", "lora", "lora_settings",
            "peft", "template", "prompt_template", "training", "fit", "fit_config", "train", "n_items",
            "dataset_size", "n_train_items"}

    tags = ["llm-item-embed", "recommendation", "sequential-recommendation", "item-embeddings",
            "sentence-similarity", "feature-extraction"]
    if lora:
        tags += ["lora", "peft"]
    if kind == "embeddings":
        tags.append("embeddings")
    front = ["---", f"library_name: {LIBRARY_NAME}", "tags:"] + [f"- {t}" for t in tags]
    hub_base = base[: -len(" (bundled)")] if isinstance(base, str) and base.endswith(" (bundled)") else base
    if _looks_like_hub_id(hub_base):
        front.append(f"base_model: {json.dumps(hub_base)}")
    if kind == "embedder":
        front.append("pipeline_tag: feature-extraction")
    front.append("---")

    name = repo_id or ("item-embedder" if kind == "embedder" else "item-embeddings")
    body: list[str] = [""]
    if kind == "embedder":
        body += [
            f"# {name}",
            "",
            "A recommendation-aware item text encoder fine-tuned with "
            "[llm_item_embed](https://pypi.org/project/llm-cfsr/): masked-prompt contrastive LoRA tuning "
            "(two views of each item's attribute prompt, each attribute dropped at random, symmetric "
            "in-batch InfoNCE). Encode item attribute tables into embeddings for sequential recommenders.",
        ]
    else:
        body += [
            f"# {name}",
            "",
            f"Item embeddings (`{filename}`: a float32 matrix, the raw item ids and this metadata in one "
            "safetensors file) produced with [llm_item_embed](https://pypi.org/project/llm-cfsr/).",
        ]
    body += ["", "## Model", ""]
    body.append(f"- Base model: {_code(base) if base else 'unknown'}")
    for label, keys in (("Pooling", ("pooling",)), ("Embedding dimension", ("dim", "dimension")),
                        ("Similarity", ("similarity",)), ("Bidirectional attention", ("bidirectional",)),
                        ("Max length", ("max_length",))):
        v = _first(meta, *keys)
        used.update(keys)
        if v is not None:
            body.append(f"- {label}: {_code(v)}")
    if kind == "embeddings" and meta.get("count") is not None:
        body.append(f"- Items: {meta['count']}")
    if meta.get("pca"):
        body.append(f"- PCA: {_code(meta['pca'])}")
        used.add("pca")

    body += ["", "## Prompt template", ""]
    if isinstance(template, Mapping):
        instr = template.get("instruction")
        fields = template.get("fields")
        if isinstance(fields, list) and all(isinstance(f, (list, tuple)) and len(f) == 2 for f in fields):
            fields = {str(c): str(n) for c, n in fields}  # [[column, name], ...] keeps prompt order
        body.append(f"- Instruction: {_code(instr) if instr else 'none'}")
        if isinstance(fields, Mapping) and fields:
            body.append("- Fields (column -> attribute name): " + ", ".join(f"{_code(k)} -> {_code(v)}" for k, v in fields.items()))
        else:
            body.append("- Fields: every non-id column")
        rest = {k: v for k, v in template.items() if k not in ("instruction", "fields")}
        if rest:
            body.append(f"- Other: {_code(rest)}")
    elif template is not None:
        body.append(f"- Template: {_code(template)}")
    else:
        body.append("- default template")

    body += ["", "## Training", ""]
    settings: list[str] = []
    for label, keys in (("Attribute drop probability", ("drop_prob",)), ("Views per item", ("n_views",))):
        v = _first(meta, *keys)
        used.update(keys)
        if v is not None:
            settings.append(f"- {label}: {_code(v)}")
    if lora:
        settings.append(f"- LoRA: {_code(lora)}")
    for k, v in training.items():
        if not _SECRET_RE.search(str(k)) and v is not None:
            settings.append(f"- {k}: {_code(v)}")
    if n_items is not None:
        settings.append(f"- Dataset size: {n_items} items")
    body += settings or ["- not fine-tuned (base model embeddings)"]

    other = {k: v for k, v in meta.items() if k not in used and k not in ("count", "library_version")}
    if meta.get("library_version"):
        body += ["", f"Produced with llm_item_embed {meta['library_version']}."]
    if other:
        body += ["", "## Other metadata", ""] + [f"- {k}: {_code(v)}" for k, v in sorted(other.items())]

    ref = repo_id or "user/repo"
    body += ["", "## Usage", "", "```python"]
    if kind == "embedder":
        body += [
            "from llm_item_embed import ItemEmbedder",
            "",
            f'embedder = ItemEmbedder.from_pretrained("{ref}")',
            'E = embedder.encode(items_df, id_column="item_id")   # ItemEmbeddings',
            'E.save("item_embeddings.safetensors")',
        ]
    else:
        extra = "" if filename == "embeddings.safetensors" else f', filename="{filename}"'
        body += [
            "from llm_item_embed import ItemEmbeddings",
            "",
            f'E = ItemEmbeddings.from_pretrained("{ref}"{extra})',
            'vectors = E.lookup(["item-1", "item-2"])   # float32 [2, d], in request order',
            "small = E.pca(64)                           # centred PCA",
            'E.to_recbole("dataset.itememb")            # RecBole pre-trained embedding file',
        ]
    body += ["```", ""]
    return "\n".join(front + body)


# ---------------------------------------------------------------------------- upload
def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    card: str | None = None,
) -> str:
    """Create the model repo if needed and upload ``folder`` (writing ``card`` as README.md first).

    Returns the repo URL. ``token=None`` lets huggingface_hub use ``HF_TOKEN`` or a stored login.
    """
    validate_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; nothing to upload")
    if not any(folder.iterdir()):
        raise ValueError(f"{folder} is empty; nothing to upload")
    if card is not None:
        if token and token in card:
            raise ValueError("the model card contains the Hub token; refusing to upload it")
        atomic_write_text(folder / CARD_FILENAME, card)
    from huggingface_hub import HfApi

    message = commit_message or f"Upload with {LIBRARY_NAME}"
    logger.info("uploading %s to Hub repo %s (private=%s)", folder, repo_id, private)
    api = HfApi()
    try:
        repo_url = api.create_repo(repo_id, exist_ok=True, private=private, token=token, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=message, token=token,
            repo_type="model", ignore_patterns=[".*.tmp", "*.tmp", ".cache/**", "__pycache__/**"],
        )
    except Exception as exc:
        text = _redact(f"{type(exc).__name__}: {exc}", token)
        if token and token in f"{exc!r}":
            raise RuntimeError(f"uploading {folder} to Hub repo {repo_id!r} failed: {text}") from None
        raise RuntimeError(f"uploading {folder} to Hub repo {repo_id!r} failed: {text}") from exc
    url = str(repo_url) if repo_url else f"https://huggingface.co/{repo_id}"
    logger.info("uploaded to %s", url)
    return url
