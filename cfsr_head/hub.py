"""Publishing a trained head to the Hugging Face Hub and finding one again (a local folder, a Hub
repo, or the offline Hugging Face cache).

A token is handed to ``huggingface_hub`` and nowhere else: it is never logged, put in a model card
or an error message, or written to a file. (cfsr_head keeps this apart from llm_item_embed's hub
module so that it never depends on it.)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io import atomic_write_text

logger = logging.getLogger(__name__)

LIBRARY_NAME = "cfsr-head"
CARD_NAME = "README.md"
# What a model folder may hold: the head (save_pretrained), the raw id mapping, and what
# `cfsr train` writes beside them. Checkpoints and anything else stay local.
MODEL_FILES = ("config.json", "model.safetensors", "item_index.json", "run.json", "metrics.json", CARD_NAME)


def _checked_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id (expected 'user/name')") from None
    return repo_id


def resolve_model_dir(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                      token: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder behind ``path_or_repo_id``: a local folder as it is, otherwise a Hub model repo
    fetched with ``snapshot_download`` (which, with ``HF_HUB_OFFLINE=1``, reads the local Hugging
    Face cache alone). Raises ``FileNotFoundError`` naming it when neither exists."""
    local = Path(os.path.expanduser(str(path_or_repo_id)))
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; expected the folder written by save_pretrained")
    repo_id = str(path_or_repo_id)
    try:
        _checked_repo_id(repo_id)
    except ValueError:
        raise FileNotFoundError(f"no folder {repo_id!r} (and it is not a Hub repo id)") from None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                   allow_patterns=list(MODEL_FILES))
    except Exception as exc:  # network, auth, missing repo or revision, not cached while offline
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
        where = " (HF_HUB_OFFLINE=1: it is not in the local Hugging Face cache)" if offline else ""
        raise FileNotFoundError(f"no folder {repo_id!r}, and Hub repo {repo_id!r} could not be fetched{where}: "
                                f"{type(exc).__name__}") from None
    return Path(folder)


def model_card(config: Mapping[str, Any], *, repo_id: str | None = None) -> str:
    """A README.md model card for a head folder: YAML front matter (library, tags) made with
    ``huggingface_hub.ModelCardData``, the head's settings from its ``config.json`` and how to
    load it."""
    from huggingface_hub import ModelCard, ModelCardData

    head = dict(config.get("config") or {})
    encoder = config.get("encoder") or {}
    data = ModelCardData(library_name=LIBRARY_NAME,
                         tags=["recommendation", "sequential-recommendation", "llm-cfsr", "cfsr-head"])
    views = [v for v, on in (("semantic", head.get("use_semantic", True)),
                             ("collaborative", head.get("use_collaborative", True))) if on]
    lines = [
        f"# {repo_id or 'dual-view-head'}",
        "",
        "A `cfsr_head.DualViewHead` (LLM-CFSR stage 2): a sequential recommender that scores items "
        "with a semantic view over LLM item embeddings and a collaborative view over an ID table.",
        "",
        "## Model",
        "",
        f"- Items: {config.get('num_items')} (indices 1..N; 0 is padding)",
        f"- Views: {', '.join(views) or 'none'}",
        f"- Sequence encoder: `{encoder.get('type', 'unknown')}`",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {k}: `{json.dumps(v)}`" for k, v in sorted(head.items())]
    ref = repo_id or "user/repo"
    built_in = encoder.get("args") is not None
    lines += ["", "## Usage", "", "```python", "from cfsr_head import DualViewHead", ""]
    if built_in:
        lines.append(f'head = DualViewHead.from_pretrained("{ref}")')
    else:
        lines.append(f'head = DualViewHead.from_pretrained("{ref}", encoder=my_encoder)  # the encoder it was trained with')
    lines += ["states = head.user_state(item_seq)   # item_seq: LongTensor [batch, L] of indices, 0 = padding",
              "scores = head.full_scores(states)    # [batch, N + 1] scores over every item", "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines)).content


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str | None = None) -> str:
    """Create the model repo if needed and upload a head folder's model files (``MODEL_FILES``;
    checkpoints and anything else stay local), with a model card made from its ``config.json``
    when it has no README.md. ``folder`` itself is left unchanged. Returns the repo URL;
    ``token=None`` lets huggingface_hub use ``HF_TOKEN`` or a stored login."""
    from huggingface_hub import HfApi

    from .io import read_json

    _checked_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a head folder (config.json and model.safetensors expected; "
                                "write one with DualViewHead.save_pretrained or `cfsr train`)")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cfsr-push-") as tmp:
        staged = Path(tmp)
        for name in MODEL_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, staged / name)
        if not (staged / CARD_NAME).is_file():
            atomic_write_text(staged / CARD_NAME, model_card(read_json(folder / "config.json"), repo_id=repo_id))
        logger.info("uploading %s to Hub repo %s (private=%s)", folder, repo_id, private)
        try:
            url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type="model",
                              commit_message=commit_message or f"Upload DualViewHead with {LIBRARY_NAME}")
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            if token:
                text = text.replace(token, "***")
            raise RuntimeError(f"uploading {folder} to Hub repo {repo_id!r} failed: {text}") from None
    return str(url) if url else f"https://huggingface.co/{repo_id}"
