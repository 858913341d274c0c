"""``ItemEmbeddings``: raw item ids + a float32 matrix + metadata, stored as one safetensors file.

File layout (format ``llm_item_embed.embeddings``, version 1):

- tensor ``embeddings``: float32 ``[N, d]``
- tensor ``ids_utf8``: uint8 ``[total bytes]``, the UTF-8 bytes of every id, concatenated
- tensor ``ids_offsets``: int64 ``[N + 1]``, id ``i`` is ``ids_utf8[offsets[i]:offsets[i + 1]]``
- header metadata: every metadata value JSON-encoded under its key, plus ``format``,
  ``format_version`` and ``checksum`` (SHA-256 of the three tensors, verified on load).

No pickle anywhere; the file is written atomically (temp file + rename).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_path, atomic_save_safetensors, load_safetensors

logger = logging.getLogger(__name__)

FORMAT_NAME = "llm_item_embed.embeddings"
FORMAT_VERSION = "1"
DEFAULT_FILENAME = "embeddings.safetensors"
MATRIX_KEY = "embeddings"
IDS_KEY = "ids_utf8"
OFFSETS_KEY = "ids_offsets"
# Header keys that describe the file rather than the embeddings; never part of ``metadata``.
_FILE_KEYS = ("format", "format_version", "checksum")
_N_EXAMPLES = 5
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def _library_version() -> str:
    from . import __version__

    return __version__


def _examples(items: Sequence[Any], n: int = _N_EXAMPLES) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (", ..." if len(items) > n else "")


def _normalise_id(value: Any, where: str) -> str:
    if isinstance(value, str):
        if value == "":
            raise ValueError(f"{where}: item ids must be non-empty strings, got ''")
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    raise TypeError(f"{where}: item ids must be strings (or integers), got {value!r} of type {type(value).__name__}")


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON-serialisable: {obj!r} of type {type(obj).__name__}")


def _normalise_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON round trip of every value, so that what is in memory equals what a file gives back."""
    out: dict[str, Any] = {}
    for key, value in dict(metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        if key in _FILE_KEYS:
            raise ValueError(f"metadata key {key!r} is reserved for the file format")
        try:
            out[key] = json.loads(json.dumps(value, default=_json_default))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata[{key!r}] cannot be stored as JSON: {exc}") from exc
    return out


def _nonfinite_rows(matrix: np.ndarray, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Row indices holding NaN/inf, checked in blocks so a memory-mapped matrix is never copied whole."""
    step = max(1, chunk_bytes // max(1, matrix.shape[1]))
    bad = [start + np.flatnonzero(~np.isfinite(matrix[start:start + step]).all(axis=1))
           for start in range(0, matrix.shape[0], step)]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


class MissingIdsError(KeyError):
    """Raised when requested ids are not in an ``ItemEmbeddings``; ``.missing`` lists them all."""

    def __init__(self, missing: list[str], n_requested: int, n_items: int) -> None:
        self.missing = missing
        msg = (
            f"{len(missing)} of {n_requested} requested item ids are not in these embeddings "
            f"({n_items} items): {_examples(missing)}"
        )
        super().__init__(msg)
        self.message = msg

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class ItemEmbeddings:
    """Raw item ids, a float32 ``[N, d]`` matrix (row ``i`` belongs to ``ids[i]``) and metadata.

    ``metadata`` is a JSON-compatible dict (base model, pooling, template, drop probability, LoRA
    settings, ...); ``dim``, ``count`` and ``library_version`` are kept in it automatically.
    """

    def __init__(self, ids: Sequence[Any], matrix: Any, metadata: Mapping[str, Any] | None = None) -> None:
        if isinstance(ids, str):
            raise TypeError("ids must be a sequence of item ids, not a single string")
        ids = [_normalise_id(x, f"ids[{i}]") for i, x in enumerate(ids)]
        if hasattr(matrix, "detach") and hasattr(matrix, "cpu"):  # torch tensor
            matrix = matrix.detach().cpu().float().numpy()
        matrix = np.asarray(matrix)
        if matrix.dtype == object or not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
            raise TypeError(f"matrix must hold real numbers, got dtype {matrix.dtype}")
        if matrix.ndim != 2:
            raise ValueError(f"matrix must be 2-D [N, d], got shape {tuple(matrix.shape)}")
        if matrix.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids but the matrix has {matrix.shape[0]} rows; they must match")
        if matrix.shape[1] == 0:
            raise ValueError("matrix has 0 columns; embeddings need d >= 1")
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        rows = _nonfinite_rows(matrix)
        if len(rows):
            raise ValueError(
                f"{len(rows)} of {len(ids)} embedding rows contain NaN or inf values "
                f"(NaN/inf embeddings cannot be used), e.g. item ids {_examples([ids[i] for i in rows])}"
            )
        index: dict[str, int] = {}
        dups: dict[str, list[int]] = {}
        for i, x in enumerate(ids):
            j = index.setdefault(x, i)
            if j != i:
                dups.setdefault(x, [j]).append(i)
        if dups:
            shown = "; ".join(f"{k!r} at rows {v}" for k, v in list(dups.items())[:_N_EXAMPLES])
            raise ValueError(f"{len(dups)} item ids appear more than once: {shown}")
        self.ids: list[str] = ids
        self.matrix: np.ndarray = matrix
        self._index = index
        meta = _normalise_metadata(metadata)
        meta.setdefault("library_version", _library_version())
        meta["dim"] = int(matrix.shape[1])
        meta["count"] = int(matrix.shape[0])
        self.metadata: dict[str, Any] = meta

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Embedding dimension ``d``."""
        return int(self.matrix.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.ids), self.dim)

    def __contains__(self, item_id: object) -> bool:
        if isinstance(item_id, (int, np.integer)) and not isinstance(item_id, (bool, np.bool_)):
            item_id = str(int(item_id))
        return isinstance(item_id, str) and item_id in self._index

    def __repr__(self) -> str:
        base = self.metadata.get("base_model")
        extra = f", base_model={base!r}" if base else ""
        return f"ItemEmbeddings(n={len(self)}, dim={self.dim}{extra})"

    def numpy(self) -> np.ndarray:
        """The ``[N, d]`` float32 matrix itself (no copy)."""
        return self.matrix

    def torch(self, device: Any = None):
        """A float32 torch tensor ``[N, d]``; on the CPU it shares memory with ``matrix``."""
        import torch

        t = torch.from_numpy(self.matrix)
        return t if device is None else t.to(device)

    # ------------------------------------------------------------------ lookup
    def index_of(self, ids: Any) -> Any:
        """Row index of one id (``int``) or of each id in a sequence (int64 array, request order).

        Raises ``MissingIdsError`` (a ``KeyError``) listing the missing ids.
        """
        if isinstance(ids, (str, int, np.integer)) and not isinstance(ids, (bool, np.bool_)):
            key = _normalise_id(ids, "id")
            if key not in self._index:
                raise MissingIdsError([key], 1, len(self))
            return self._index[key]
        if not isinstance(ids, Iterable):
            raise TypeError(f"ids must be an id or a sequence of ids, got {type(ids).__name__}")
        keys = [_normalise_id(x, f"ids[{i}]") for i, x in enumerate(ids)]
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise MissingIdsError(list(dict.fromkeys(missing)), len(keys), len(self))
        return np.fromiter((self._index[k] for k in keys), dtype=np.int64, count=len(keys))

    def lookup(self, ids: Any) -> np.ndarray:
        """Embeddings of ``ids`` in request order: ``[len(ids), d]`` (or ``[d]`` for one id)."""
        return self.matrix[self.index_of(ids)]

    def subset(self, ids: Any) -> "ItemEmbeddings":
        """A new ``ItemEmbeddings`` holding only ``ids``, in the order given."""
        if isinstance(ids, str):
            ids = [ids]
        rows = self.index_of(list(ids))
        return ItemEmbeddings([self.ids[i] for i in rows], self.matrix[rows], self.metadata)

    # ------------------------------------------------------------------ PCA
    def pca(self, d: int, *, random_state: int = 0) -> "ItemEmbeddings":
        """Centred PCA to ``d`` dimensions (scikit-learn); components ordered by explained variance.

        The metadata records the projection (``pca``: source dim, components, explained variance).
        """
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"d must be an integer, got {d!r}")
        limit = min(len(self), self.dim)
        if not 1 <= d <= limit:
            raise ValueError(f"pca(d={d}): d must be between 1 and min(n_items={len(self)}, dim={self.dim}) = {limit}")
        from sklearn.decomposition import PCA

        model = PCA(n_components=int(d), svd_solver="full", random_state=random_state)
        reduced = model.fit_transform(self.matrix.astype(np.float64)).astype(np.float32)
        meta = dict(self.metadata)
        meta["pca"] = {
            "n_components": int(d),
            "source_dim": self.dim,
            "centred": True,
            "whiten": False,
            "explained_variance_ratio": float(np.sum(model.explained_variance_ratio_)),
            "previous": self.metadata.get("pca"),
        }
        return ItemEmbeddings(list(self.ids), reduced, meta)

    # ------------------------------------------------------------------ files
    def _payload(self) -> tuple[np.ndarray, np.ndarray]:
        encoded = [x.encode("utf-8") for x in self.ids]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return blob, offsets

    @staticmethod
    def _checksum(matrix: np.ndarray, blob: np.ndarray, offsets: np.ndarray) -> str:
        h = hashlib.sha256()
        h.update(np.asarray(matrix.shape, dtype=np.int64).tobytes())
        for arr in (matrix, offsets, blob):
            h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
        return "sha256:" + h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (matrix, raw ids, JSON metadata) atomically; returns the path."""
        import torch

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file path such as {path / DEFAULT_FILENAME}")
        blob, offsets = self._payload()
        header = {k: json.dumps(v, ensure_ascii=False) for k, v in self.metadata.items()}
        header.update(format=FORMAT_NAME, format_version=FORMAT_VERSION,
                      checksum=self._checksum(self.matrix, blob, offsets))
        tensors = {
            MATRIX_KEY: torch.from_numpy(self.matrix),
            IDS_KEY: torch.from_numpy(blob.copy()),
            OFFSETS_KEY: torch.from_numpy(offsets),
        }
        atomic_save_safetensors(path, tensors, metadata=header)
        logger.info("saved %d item embeddings (dim %d) to %s", len(self), self.dim, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ItemEmbeddings":
        """Read a file written by ``save``. Missing, corrupted, truncated or foreign files raise
        ``FileNotFoundError`` / ``ValueError`` naming the file."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder, not an embeddings file (expected e.g. {path / DEFAULT_FILENAME})")
        tensors, header = load_safetensors(path)
        fmt = header.get("format")
        if fmt is not None and fmt != FORMAT_NAME:
            raise ValueError(f"{path} is a safetensors file of format {fmt!r}, not {FORMAT_NAME!r}")
        version = header.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} uses embeddings format version {version!r}; this library reads version {FORMAT_VERSION}")
        missing = [k for k in (MATRIX_KEY, IDS_KEY, OFFSETS_KEY) if k not in tensors]
        if missing:
            raise ValueError(
                f"{path} is not an item-embeddings file: it lacks the tensor(s) {missing} "
                f"(it holds {sorted(tensors)}); write it with ItemEmbeddings.save"
            )
        import torch

        mat_t, blob_t, off_t = tensors[MATRIX_KEY], tensors[IDS_KEY], tensors[OFFSETS_KEY]
        if mat_t.dtype != torch.float32 or mat_t.ndim != 2:
            raise ValueError(f"{path}: tensor {MATRIX_KEY!r} must be float32 [N, d], got {mat_t.dtype} {tuple(mat_t.shape)}")
        if blob_t.dtype != torch.uint8 or blob_t.ndim != 1 or off_t.dtype != torch.int64 or off_t.ndim != 1:
            raise ValueError(f"{path}: id tensors have the wrong type (need uint8 {IDS_KEY!r} and int64 {OFFSETS_KEY!r})")
        matrix, blob, offsets = mat_t.numpy(), blob_t.numpy(), off_t.numpy()
        n = matrix.shape[0]
        if (len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(blob)
                or (len(offsets) > 1 and np.any(np.diff(offsets) < 0))):
            raise ValueError(f"{path}: id offsets do not match {n} rows and {len(blob)} id bytes (corrupted file?)")
        expected = header.get("checksum")
        if expected is not None and cls._checksum(matrix, blob, offsets) != expected:
            raise ValueError(f"{path}: checksum mismatch; the file is corrupted")
        raw = blob.tobytes()
        try:
            ids = [raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: item ids are not valid UTF-8 (corrupted file?): {exc}") from exc
        metadata: dict[str, Any] = {}
        for key, value in header.items():
            if key in _FILE_KEYS:
                continue
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                metadata[key] = value  # plain strings written by other tools
        try:
            return cls(ids, matrix, metadata)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def to_recbole(self, path: str | os.PathLike, field: str = "iid") -> Path:
        """Write RecBole's pre-trained embedding atomic file (e.g. ``<dataset>.itememb``).

        Header ``<field>:token<TAB>item_emb:float_seq``; one row per item, values space-separated
        with 9 significant digits (exact float32 round trip). In RecBole's config set
        ``additional_feat_suffix: [itememb]``, ``alias_of_item_id: [<field>]`` and
        ``preload_weight: {<field>: item_emb}``.
        """
        if not field or re.search(r"[\s:]", field):
            raise ValueError(f"field must be a non-empty name without spaces or ':', got {field!r}")
        bad = [x for x in self.ids if re.search(r"[\t\r\n]", x)]
        if bad:
            raise ValueError(f"{len(bad)} item ids contain tabs or line breaks, which RecBole files cannot hold: {_examples(bad)}")
        path = Path(path)
        chunk = 4096
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(f"{field}:token\titem_emb:float_seq\n")
                for start in range(0, len(self), chunk):
                    rows = self.matrix[start:start + chunk]
                    lines = [
                        self.ids[start + i] + "\t" + " ".join(f"{v:.9g}" for v in row)
                        for i, row in enumerate(rows.tolist())
                    ]
                    fh.write("\n".join(lines) + "\n")
        logger.info("wrote RecBole embeddings for %d items to %s", len(self), path)
        return path

    # ------------------------------------------------------------------ Hub
    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = False,
        commit_message: str = "Upload item embeddings with llm_item_embed",
        filename: str = DEFAULT_FILENAME,
    ) -> str:
        """Upload the safetensors file and a generated model card to a Hub model repo; returns its URL.

        ``token`` (or ``HF_TOKEN`` / a stored login when None) is passed to ``huggingface_hub`` only.
        """
        from .hub import push_folder, render_model_card, validate_repo_id

        validate_repo_id(repo_id)
        card = render_model_card("embeddings", self.metadata, repo_id=repo_id, filename=filename)
        with tempfile.TemporaryDirectory(prefix="llm-item-embed-push-") as tmp:
            self.save(Path(tmp) / filename)
            return push_folder(tmp, repo_id, token=token, private=private,
                               commit_message=commit_message, card=card)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        revision: str | None = None,
        token: str | None = None,
        filename: str = DEFAULT_FILENAME,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> "ItemEmbeddings":
        """Load from a local file, a local folder holding ``filename``, or a Hub repo id.

        Hub files come through ``huggingface_hub.hf_hub_download``, so the HF cache and offline
        mode (``HF_HUB_OFFLINE=1``) work as usual.
        """
        path = Path(os.fspath(repo_id_or_path)).expanduser()
        if path.is_file():
            return cls.load(path)
        if path.is_dir():
            target = path / filename
            if not target.is_file():
                found = sorted(p.name for p in path.glob("*.safetensors"))
                raise FileNotFoundError(
                    f"folder {path} has no {filename}" + (f" (safetensors files there: {found})" if found else "")
                )
            return cls.load(target)
        name = os.fspath(repo_id_or_path)
        if not _REPO_ID_RE.match(name) or name.endswith(".safetensors"):
            raise FileNotFoundError(f"{name} is neither an existing file or folder nor a Hub repo id ('user/name')")
        try:
            local = download_from_hub(name, filename, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc} (and there is no local file or folder {name!r})") from exc.__cause__
        return cls.load(local)


def download_from_hub(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> str:
    """``hf_hub_download`` with errors that name the repo and file (and never the token)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{filename!r} in Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, library_name="llm-item-embed",
            library_version=_library_version(),
        )
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(
            f"could not find {where}: it is not in the local Hugging Face cache and the Hub cannot be "
            f"reached (offline mode or no network)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(f"Hub repo {repo_id!r} does not exist or is not accessible with this token") from exc
    except RevisionNotFoundError as exc:
        raise FileNotFoundError(f"revision {revision!r} not found in Hub repo {repo_id!r}") from exc
    except EntryNotFoundError as exc:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no file {filename!r}") from exc
