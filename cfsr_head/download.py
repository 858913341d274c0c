"""Checked downloads of public datasets (MovieLens-100K, Amazon 2014 Beauty): SHA-256 and the
expected statistics verified before the data is returned."""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

from .data import InteractionData, default_cache_dir, load_amazon2014, load_movielens_raw
from .io import make_staging_dir

__all__ = ["RemoteFile", "DatasetSpec", "DATASET_REGISTRY", "download_dataset"]


@dataclass(frozen=True)
class RemoteFile:
    """One public file: where, under which local name, and its SHA-256 (None: not verified)."""

    url: str
    filename: str
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A downloadable dataset: its files, the loader (``"movielens"`` or ``"amazon2014"``) and the
    statistics expected after loading (``users``, ``items``, ``interactions``)."""

    name: str
    files: tuple[RemoteFile, ...]
    loader: Literal["movielens", "amazon2014"]
    expected: Mapping[str, int] = field(default_factory=dict)


# Amazon 2014 files: the UCSD page jmcauley.ucsd.edu/data/amazon/links.html links to these SNAP URLs.
# SHA-256 values are None because they could not be verified offline when this was written;
# pass ``sha256=`` to download_dataset (or fill them in here) to enforce them. The statistics are
# the published ones of these exact files and are always checked.
DATASET_REGISTRY: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        "ml-100k",
        (RemoteFile("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "ml-100k.zip", None),),
        "movielens", {"users": 943, "items": 1682, "interactions": 100000}),
    "amazon-beauty-2014": DatasetSpec(
        "amazon-beauty-2014",
        (RemoteFile("http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz", "reviews_Beauty_5.json.gz", None),
         RemoteFile("http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz", "meta_Beauty.json.gz", None)),
        "amazon2014", {"users": 22363, "items": 12101, "interactions": 198502}),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, sha256: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed with an HTTP Range request when the
    server supports it), verify ``sha256``, then rename. An existing ``dest`` with the right
    checksum is reused."""
    if not url.startswith(("http://", "https://", "file://")):
        raise ValueError(f"unsupported URL scheme: {url}")
    if dest.is_file():
        if sha256 is None or _sha256(dest) == sha256.lower():
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            mode = "ab" if have and getattr(resp, "status", 200) == 206 else "wb"
            with open(part, mode) as fh:
                shutil.copyfileobj(resp, fh, 1 << 20)
    except urllib.error.HTTPError as exc:
        if not (exc.code == 416 and have):  # 416: the partial file is already complete
            raise ConnectionError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except OSError as exc:
        raise ConnectionError(f"download of {url} failed: {exc} (partial data kept in {part}; rerun to resume)") from exc
    if sha256 is not None:
        got = _sha256(part)
        if got != sha256.lower():
            part.unlink(missing_ok=True)
            raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {got} "
                             "(the download was deleted)")
    os.replace(part, dest)
    return dest


def _extract_zip(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` atomically (temp folder + rename); rejects unsafe paths."""
    if target.is_dir():
        return target
    tmp = make_staging_dir(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                p = Path(member)
                if p.is_absolute() or ".." in p.parts:
                    raise ValueError(f"{archive}: unsafe path in archive: {member!r}")
            zf.extractall(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def download_dataset(name: str, cache_dir: str | os.PathLike | None = None,
                     url: str | Mapping[str, str] | None = None,
                     sha256: str | Mapping[str, str] | None = None, *,
                     expected: Mapping[str, int] | None = None,
                     registry: Mapping[str, DatasetSpec] | None = None) -> InteractionData:
    """Download a registered dataset's public raw files into ``cache_dir/name`` (default
    :func:`default_cache_dir`), verify checksums, load it and verify the expected statistics.

    ``url`` / ``sha256`` override the registry: a string for a one-file dataset, or a mapping
    filename -> value. ``expected`` overrides the statistics (``{}`` skips the check)."""
    registry = DATASET_REGISTRY if registry is None else registry
    if name not in registry:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(registry)}")
    spec = registry[name]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)

    def pick(over, f: RemoteFile, default):
        if over is None:
            return default
        if isinstance(over, str):
            if len(spec.files) != 1:
                raise ValueError(f"{name} has {len(spec.files)} files; pass a mapping filename -> value")
            return over
        return over.get(f.filename, default)

    paths = [_fetch(pick(url, f, f.url), folder / f.filename, pick(sha256, f, f.sha256)) for f in spec.files]
    if spec.loader == "movielens":
        root = _extract_zip(paths[0], folder / "extracted")
        hits = sorted(root.rglob("u.data"))
        if not hits:
            raise FileNotFoundError(f"{paths[0]}: no u.data inside the archive")
        data = load_movielens_raw(hits[0].parent)
    elif spec.loader == "amazon2014":
        data = load_amazon2014(paths[0], paths[1] if len(paths) > 1 else None, name=name)
    else:
        raise ValueError(f"unknown loader {spec.loader!r}")
    data.name = name
    want = dict(spec.expected if expected is None else expected)
    got = data.stats()
    bad = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != v}
    if bad:
        detail = ", ".join(f"{k}: expected {v[0]}, got {v[1]}" for k, v in bad.items())
        raise ValueError(f"dataset {name} in {folder} does not have the expected statistics ({detail})")
    return data
