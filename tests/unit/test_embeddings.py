"""ItemEmbeddings: safetensors round trip, bad files, lookup, PCA, RecBole export, numpy/torch views."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_item_embed.embeddings import ItemEmbeddings, MissingIdsError

META = {
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "pooling": "mean",
    "template": {"instruction": "This item has the following attributes:", "fields": {"title": "name", "brand": "brand"}},
    "drop_prob": 0.2,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query", "value"]},
    "note": "ünïcödé ✓ \"quotes\" and\nnewlines",
}


def make(n: int = 6, d: int = 5, seed: int = 0, ids=None, meta=META) -> ItemEmbeddings:
    rng = np.random.default_rng(seed)
    ids = ids if ids is not None else [f"item-{i}" for i in range(n)]
    return ItemEmbeddings(ids, rng.standard_normal((len(ids), d)).astype(np.float32), meta)


# ------------------------------------------------------------------ construction
def test_metadata_tracks_shape_and_version():
    e = make(4, 3)
    assert len(e) == 4 and e.dim == 3 and e.shape == (4, 3)
    assert e.metadata["dim"] == 3 and e.metadata["count"] == 4
    assert e.metadata["library_version"]
    assert e.metadata["template"] == META["template"]
    assert e.matrix.dtype == np.float32 and e.matrix.flags.c_contiguous


def test_float64_and_torch_inputs_become_float32():
    m = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert ItemEmbeddings(["a", "b"], m, {}).matrix.dtype == np.float32
    t = ItemEmbeddings(["a", "b"], torch.tensor(m, dtype=torch.float16), {})
    np.testing.assert_array_equal(t.matrix, m.astype(np.float32))


def test_integer_ids_become_strings():
    e = ItemEmbeddings([1, np.int64(2)], np.zeros((2, 2)), {})
    assert e.ids == ["1", "2"]
    assert 1 in e and "2" in e and "3" not in e
    assert e.index_of(2) == 1


@pytest.mark.parametrize(
    "ids, matrix, match",
    [
        (["a", "b", "a"], np.zeros((3, 2)), r"appear more than once: 'a' at rows \[0, 2\]"),
        (["a", "b"], np.zeros((3, 2)), "2 ids but the matrix has 3 rows"),
        (["a", "b"], np.zeros(2), "2-D"),
        (["a", "b"], np.zeros((2, 2, 1)), "2-D"),
        (["a", ""], np.zeros((2, 2)), "non-empty"),
        (["a", "b"], np.zeros((2, 0)), "0 columns"),
    ],
)
def test_invalid_construction(ids, matrix, match):
    with pytest.raises(ValueError, match=match):
        ItemEmbeddings(ids, matrix, {})


def test_bad_id_types_and_single_string():
    with pytest.raises(TypeError, match=r"ids\[1\].*None"):
        ItemEmbeddings(["a", None], np.zeros((2, 2)), {})
    with pytest.raises(TypeError, match="single string"):
        ItemEmbeddings("ab", np.zeros((2, 2)), {})
    with pytest.raises(TypeError, match="real numbers"):
        ItemEmbeddings(["a"], np.array([["x"]]), {})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_rejected_with_count_and_examples(bad):
    m = np.ones((10, 3), dtype=np.float32)
    rows = [1, 4, 5, 6, 7, 8, 9]
    m[rows, 0] = bad
    with pytest.raises(ValueError) as info:
        ItemEmbeddings([f"id{i}" for i in range(10)], m, {})
    msg = str(info.value)
    assert "7 of 10 embedding rows contain NaN or inf" in msg
    assert "'id1', 'id4', 'id5', 'id6', 'id7', ..." in msg
    assert "'id0'" not in msg


def test_nan_check_in_blocks_and_memmap_not_copied(tmp_path):
    from llm_item_embed.embeddings import _nonfinite_rows

    m = np.ones((1000, 3), dtype=np.float32)
    m[[0, 499, 999], 1] = np.nan
    np.testing.assert_array_equal(_nonfinite_rows(m, chunk_bytes=7), [0, 499, 999])
    mm = np.memmap(tmp_path / "m.f32", mode="w+", dtype=np.float32, shape=(50, 4))
    mm[:] = 1.0
    e = ItemEmbeddings([str(i) for i in range(50)], mm, {})
    assert np.shares_memory(e.matrix, mm)


def test_metadata_must_be_json():
    with pytest.raises(TypeError, match=r"metadata\['obj'\]"):
        ItemEmbeddings(["a"], np.zeros((1, 2)), {"obj": object()})
    with pytest.raises(ValueError, match="reserved"):
        ItemEmbeddings(["a"], np.zeros((1, 2)), {"checksum": "x"})


def test_metadata_dataclass_and_tuple_normalised():
    from dataclasses import dataclass

    @dataclass
    class Lora:
        r: int = 4
        target_modules: tuple = ("q", "v")

    e = ItemEmbeddings(["a"], np.zeros((1, 2)), {"lora": Lora(), "np": np.float32(0.5)})
    assert e.metadata["lora"] == {"r": 4, "target_modules": ["q", "v"]}
    assert e.metadata["np"] == 0.5


# ------------------------------------------------------------------ save / load
def test_round_trip_exact_with_unicode_ids_and_metadata(tmp_path):
    ids = ["a1", "ü-ñ-✓", "商品-42", "emoji-🙂", "with space", "tab\tinside", "x" * 300]
    e = make(ids=ids, d=7)
    path = e.save(tmp_path / "sub" / "emb.safetensors")
    assert path.is_file()
    back = ItemEmbeddings.load(path)
    assert back.ids == ids
    assert back.matrix.dtype == np.float32
    np.testing.assert_array_equal(back.matrix, e.matrix)
    assert back.metadata == e.metadata
    assert back.metadata["note"] == META["note"]
    # the header is plain JSON strings (readable by any safetensors tool), no pickle
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        header = f.metadata()
        assert set(f.keys()) == {"embeddings", "ids_utf8", "ids_offsets"}
    assert json.loads(header["lora"]) == META["lora"]
    assert json.loads(header["dim"]) == 7 and json.loads(header["count"]) == len(ids)
    assert header["format"] == "llm_item_embed.embeddings"
    # no temp files left behind
    assert [p.name for p in path.parent.iterdir()] == ["emb.safetensors"]


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8, unique=True),
    d=st.integers(1, 4),
)
def test_round_trip_property(tmp_path_factory, ids, d):
    path = tmp_path_factory.mktemp("rt") / "e.safetensors"
    rng = np.random.default_rng(len(ids))
    e = ItemEmbeddings(ids, rng.standard_normal((len(ids), d)), {"k": ids[0]})
    e.save(path)
    back = ItemEmbeddings.load(path)
    assert back.ids == ids and back.metadata == e.metadata
    np.testing.assert_array_equal(back.matrix, e.matrix)


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "e.safetensors"
    make(seed=1).save(path)
    second = make(seed=2)
    second.save(path)
    np.testing.assert_array_equal(ItemEmbeddings.load(path).matrix, second.matrix)


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "e.safetensors"
    first = make(seed=1)
    first.save(path)
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        make(seed=2).save(path)
    np.testing.assert_array_equal(ItemEmbeddings.load(path).matrix, first.matrix)
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ItemEmbeddings.load(tmp_path / "nope.safetensors")


def _saved(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    make().save(path)
    return path


def test_load_corrupted_header(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    for pos in (10, 11, 40):  # inside the JSON header
        data[pos] ^= 0xFF
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="flipped.safetensors.*(corrupted|truncated)"):
        ItemEmbeddings.load(bad)


def test_load_corrupted_data_caught_by_checksum(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start, _ = json.loads(bytes(data[8:8 + header_len]))["embeddings"]["data_offsets"]
    data[8 + header_len + start + 3] ^= 0x01  # one bit inside the float matrix: still a valid file
    bad = tmp_path / "bitrot.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bitrot.safetensors.*checksum"):
        ItemEmbeddings.load(bad)


@pytest.mark.parametrize("keep", [0, 5, 30, -1])
def test_load_truncated(tmp_path, keep):
    data = _saved(tmp_path).read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:-7])
    with pytest.raises(ValueError, match="cut.safetensors"):
        ItemEmbeddings.load(bad)


def test_load_non_safetensors(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("item_id,title\na,b\n" * 20)
    with pytest.raises(ValueError, match="notes.safetensors.*not a readable safetensors"):
        ItemEmbeddings.load(bad)


def test_load_missing_tensors(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "matrix_only.safetensors"
    save_file({"embeddings": torch.zeros(3, 2)}, str(bad))
    with pytest.raises(ValueError, match=r"matrix_only.safetensors.*lacks.*'ids_utf8', 'ids_offsets'"):
        ItemEmbeddings.load(bad)


def test_load_foreign_format_and_bad_offsets(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="other.safetensors.*format 'pt'"):
        ItemEmbeddings.load(other)
    offs = tmp_path / "offs.safetensors"
    save_file({"embeddings": torch.zeros(2, 2), "ids_utf8": torch.tensor(list(b"ab"), dtype=torch.uint8),
               "ids_offsets": torch.tensor([0, 1], dtype=torch.int64)}, str(offs))
    with pytest.raises(ValueError, match="offs.safetensors.*offsets"):
        ItemEmbeddings.load(offs)


def test_load_rejects_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        ItemEmbeddings.load(tmp_path)
    with pytest.raises(IsADirectoryError):
        make().save(tmp_path)


# ------------------------------------------------------------------ lookup
def test_lookup_in_request_order():
    e = make(6, 4)
    order = ["item-4", "item-0", "item-4", "item-2"]
    got = e.lookup(order)
    assert got.shape == (4, 4)
    for row, i in zip(got, [4, 0, 4, 2]):
        np.testing.assert_array_equal(row, e.matrix[i])
    np.testing.assert_array_equal(e.index_of(order), [4, 0, 4, 2])
    assert e.index_of("item-3") == 3
    np.testing.assert_array_equal(e.lookup("item-3"), e.matrix[3])
    assert e.lookup([]).shape == (0, 4)
    np.testing.assert_array_equal(e.lookup(np.array(["item-1"])), e.matrix[[1]])


def test_lookup_missing_ids_error():
    e = make(6, 4)
    req = ["item-1"] + [f"ghost-{i}" for i in range(8)] + ["ghost-0"]
    with pytest.raises(MissingIdsError) as info:
        e.lookup(req)
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert msg.startswith("8 of 10 requested item ids are not in these embeddings (6 items)")
    assert "'ghost-0', 'ghost-1', 'ghost-2', 'ghost-3', 'ghost-4', ..." in msg
    assert info.value.missing == [f"ghost-{i}" for i in range(8)]
    with pytest.raises(KeyError, match="'nope'"):
        e.index_of("nope")


def test_subset_and_contains():
    e = make(6, 3)
    s = e.subset(["item-5", "item-1"])
    assert s.ids == ["item-5", "item-1"] and s.metadata["count"] == 2
    np.testing.assert_array_equal(s.matrix, e.matrix[[5, 1]])
    assert "item-5" in s and "item-0" not in s and None not in s
    with pytest.raises(KeyError, match="1 of 2"):
        e.subset(["item-1", "zzz"])


# ------------------------------------------------------------------ views
def test_numpy_and_torch_views():
    e = make(4, 3)
    assert e.numpy() is e.matrix
    t = e.torch()
    assert t.dtype == torch.float32 and tuple(t.shape) == (4, 3)
    assert t.data_ptr() == e.matrix.ctypes.data  # shares memory
    assert e.torch("cpu").device.type == "cpu"
    np.testing.assert_array_equal(e.torch().numpy(), e.matrix)


# ------------------------------------------------------------------ PCA
def test_pca_shape_centring_variance_order():
    rng = np.random.default_rng(0)
    # anisotropic data with a large offset: PCA must centre first
    base = rng.standard_normal((200, 6)) * np.array([10, 5, 3, 1, 0.5, 0.1]) + 100.0
    rot, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    e = ItemEmbeddings([str(i) for i in range(200)], base @ rot, {"pooling": "mean"})
    p = e.pca(3)
    assert p.shape == (200, 3) and p.matrix.dtype == np.float32
    assert p.ids == e.ids
    np.testing.assert_allclose(p.matrix.mean(axis=0), 0, atol=1e-3)
    var = p.matrix.var(axis=0)
    assert var[0] > var[1] > var[2]
    np.testing.assert_allclose(var, [100, 25, 9], rtol=0.25)
    assert p.metadata["pca"]["n_components"] == 3 and p.metadata["pca"]["source_dim"] == 6
    assert p.metadata["pca"]["centred"] is True
    assert 0.9 < p.metadata["pca"]["explained_variance_ratio"] <= 1.0
    assert p.metadata["dim"] == 3 and p.metadata["pooling"] == "mean"
    # distances in the kept subspace are preserved when nothing is dropped
    full = e.pca(6)
    d0 = np.linalg.norm(e.matrix[0] - e.matrix[1])
    assert np.isclose(np.linalg.norm(full.matrix[0] - full.matrix[1]), d0, rtol=1e-4)


@pytest.mark.parametrize("d", [0, 7, -1])
def test_pca_bad_dimension(d):
    with pytest.raises(ValueError, match=f"pca\\(d={d}\\)"):
        make(6, 5).pca(d)


# ------------------------------------------------------------------ RecBole
def test_recbole_export_parsable_and_exact(tmp_path):
    ids = ["a1", "ü✓", "42"]
    e = make(ids=ids, d=4)
    path = e.to_recbole(tmp_path / "beauty.itememb")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "iid:token\titem_emb:float_seq"
    assert len(lines) == 1 + len(ids)
    parsed = {}
    for line in lines[1:]:
        cols = line.split("\t")
        assert len(cols) == 2
        parsed[cols[0]] = np.array([float(v) for v in cols[1].split(" ")], dtype=np.float32)
    assert list(parsed) == ids
    for i, k in enumerate(ids):
        np.testing.assert_array_equal(parsed[k], e.matrix[i])  # exact float32 round trip


def test_recbole_field_and_bad_ids(tmp_path):
    e = make(3, 2)
    assert e.to_recbole(tmp_path / "x.itememb", field="item_emb_id").read_text().startswith("item_emb_id:token\t")
    with pytest.raises(ValueError, match="field"):
        e.to_recbole(tmp_path / "y.itememb", field="bad field")
    bad = make(ids=["ok", "tab\there"], d=2)
    with pytest.raises(ValueError, match="1 item ids contain tabs.*'tab\\\\there'"):
        bad.to_recbole(tmp_path / "z.itememb")
    assert not (tmp_path / "z.itememb").exists()


def test_recbole_large_chunking(tmp_path):
    e = make(5000, 2)
    lines = e.to_recbole(tmp_path / "big.itememb").read_text().splitlines()
    assert len(lines) == 5001 and lines[-1].startswith("item-4999\t")
