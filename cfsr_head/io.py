"""Atomic file writes and safe reads: only JSON and safetensors ever touch the disk.

(cfsr_head keeps its own copy so that it never depends on llm_item_embed.)"""
from __future__ import annotations

import json
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _staging_name(path: Path) -> Path:
    """A fresh hidden name beside ``path``, on its filesystem, to build ``path`` under."""
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def make_staging_dir(path: str | os.PathLike) -> Path:
    """Create an empty folder beside ``path`` to build it in before one rename onto ``path``. It gets
    the permissions of any new folder (0o777 less the umask); ``tempfile.mkdtemp`` would make the
    folder that lands owner-only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_name(path)
    os.mkdir(tmp)
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The file that lands gets the permissions a plain ``open(path, "w")`` would leave: those of the
    file it replaces, else 0o666 less the process umask. (``tempfile.mkstemp``, and safetensors'
    own writer since 0.8, make every file owner-only: safetensors/safetensors#782.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies here
    mode = stat.S_IMODE((path if path.is_file() else tmp).stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # the block may have replaced the file with an owner-only one
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of torch tensors with ``safetensors.torch.save_file``, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Load every tensor and the metadata of a safetensors file; corrupt or truncated files raise
    ``ValueError`` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError subclasses
        raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): {exc}") from exc
    return tensors, metadata
