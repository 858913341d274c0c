"""cfsr_head.data, .split and .download: loading, raw formats, filtering, id maps, leave-one-out, batching,
downloads."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cfsr_head.data import (
    InteractionData, default_data_dir, drop_short_users, kcore_filter, load_amazon2014, load_dataset,
    load_movielens_raw,
)
from cfsr_head.download import DatasetSpec, RemoteFile, download_dataset
from cfsr_head.split import ItemIndex, SplitData, align_semantic, leave_one_out


# ------------------------------------------------------------------ helpers
def write_folder(folder: Path, inter: str, items: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "interactions.csv").write_text(inter)
    (folder / "items.csv").write_text(items)
    return folder


def frame(rows: list[tuple[str, str, int]]) -> InteractionData:
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return InteractionData(df, None, "toy")


TOY = [  # user u1: a b c d e ; u2: b c a ; u3: c d (dropped: < 3)
    ("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "d", 4), ("u1", "e", 5),
    ("u2", "b", 1), ("u2", "c", 2), ("u2", "a", 3),
    ("u3", "c", 1), ("u3", "d", 2),
]


@pytest.fixture
def toy_split() -> SplitData:
    with pytest.warns(UserWarning, match="1 user"):
        return leave_one_out(frame(TOY))


# ------------------------------------------------------------------ uniform layout
def test_uniform_layout_round_trip_and_string_ids(tmp_path):
    folder = write_folder(
        tmp_path / "tiny",
        "user_id,item_id,timestamp,rating\n007,0042,10,5\n007,42,5,4\n7,0042,1,3\n",
        "item_id,title\n0042,Forty-two\n42,Other\n",
    )
    data = load_dataset(folder)
    assert data.name == "tiny"
    df = data.interactions
    # numeric-looking ids stay strings, "007" != "7", "0042" != "42"
    assert df["user_id"].tolist() == ["007", "007", "7"]
    assert df["item_id"].tolist() == ["42", "0042", "0042"]  # sorted by time within user 007
    assert df["timestamp"].tolist() == [5, 10, 1]
    assert data.items["item_id"].tolist() == ["0042", "42"]
    assert data.stats() == {"users": 2, "items": 2, "interactions": 3}
    idx = ItemIndex.from_data(data)
    assert idx.id_of(idx.index_of(["0042", "42"])).tolist() == ["0042", "42"]


def test_load_by_name_uses_data_dir(tmp_path, monkeypatch):
    write_folder(tmp_path / "mini", "user_id,item_id,timestamp\nu,i,1\n", "item_id\ni\n")
    monkeypatch.setenv("CFSR_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert load_dataset("mini").num_interactions == 1
    with pytest.raises(FileNotFoundError, match="mini"):
        load_dataset("nope")


@pytest.mark.parametrize("missing", ["interactions.csv", "items.csv"])
def test_missing_file_named(tmp_path, missing):
    folder = write_folder(tmp_path / "d", "user_id,item_id,timestamp\nu,i,1\n", "item_id\ni\n")
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_dataset(folder)


def test_missing_column_named(tmp_path):
    folder = write_folder(tmp_path / "d", "user_id,item_id\nu,i\n", "item_id\ni\n")
    with pytest.raises(ValueError, match="timestamp"):
        load_dataset(folder)
    folder = write_folder(tmp_path / "e", "user_id,item_id,timestamp\nu,i,1\n", "title\nx\n")
    with pytest.raises(ValueError, match="item_id"):
        load_dataset(folder)


def test_bad_timestamp_and_empty_id(tmp_path):
    folder = write_folder(tmp_path / "d", "user_id,item_id,timestamp\nu,i,yesterday\n", "item_id\ni\n")
    with pytest.raises(ValueError, match="timestamp"):
        load_dataset(folder)
    folder = write_folder(tmp_path / "e", "user_id,item_id,timestamp\nu,,1\n", "item_id\ni\n")
    with pytest.raises(ValueError, match="item_id"):
        load_dataset(folder)


def test_duplicates_dropped_with_count_or_kept_or_error(tmp_path):
    inter = "user_id,item_id,timestamp\nu,a,1\nu,a,1\nu,a,1\nu,a,2\nu,b,3\n"
    folder = write_folder(tmp_path / "d", inter, "item_id\na\nb\n")
    with pytest.warns(UserWarning, match="dropped 2 duplicate"):
        data = load_dataset(folder)
    assert data.num_interactions == 3
    assert load_dataset(folder, duplicates="keep").num_interactions == 5
    with pytest.raises(ValueError, match="2 duplicate"):
        load_dataset(folder, duplicates="error")


def test_chronological_sort_is_stable_on_ties():
    data = leave_one_out(frame([("u", "x", 5), ("u", "y", 1), ("u", "z", 5), ("u", "w", 1)]))
    assert data.item_index.id_of(data.items).tolist() == ["y", "w", "x", "z"]


# ------------------------------------------------------------------ filtering
def test_kcore_is_iterative():
    # item "rare" has 1 interaction; removing it makes user u2 drop below 2, which makes item "b"
    # drop below 2 as well.
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u2", "b", 1), ("u2", "rare", 2),
            ("u3", "a", 1), ("u3", "c", 2), ("u4", "a", 1), ("u4", "c", 2)]
    out = kcore_filter(frame(rows), 2)
    df = out.interactions
    assert set(df["user_id"]) == {"u3", "u4"}
    assert set(df["item_id"]) == {"a", "c"}
    counts_u = df.groupby("user_id").size()
    counts_i = df.groupby("item_id").size()
    assert (counts_u >= 2).all() and (counts_i >= 2).all()


def test_users_with_fewer_than_three_dropped(toy_split):
    assert toy_split.user_ids.tolist() == ["u1", "u2"]
    with pytest.warns(UserWarning, match="1 user"):
        assert drop_short_users(frame(TOY)).num_users == 2


# ------------------------------------------------------------------ item index
def test_item_index_save_load_and_errors(tmp_path):
    idx = ItemIndex(["b", "007", "a"])
    assert idx.index_of(["007", "a", "b"]).tolist() == [2, 3, 1]
    assert idx.id_of(2) == "007"
    idx.save(tmp_path / "ix.json")
    assert json.loads((tmp_path / "ix.json").read_text())["ids"] == ["b", "007", "a"]
    assert ItemIndex.load(tmp_path / "ix.json") == idx
    with pytest.raises(KeyError, match=r"2 id\(s\).*'7'"):
        idx.index_of(["7", "zz", "a"])
    assert idx.index_of(["7", "a"], missing="zero").tolist() == [0, 3]
    with pytest.raises(ValueError, match="duplicated"):
        ItemIndex(["a", "a"])
    with pytest.raises(IndexError):
        idx.id_of([0])


def test_item_index_extended_appends_and_refuses_known_ids():
    idx = ItemIndex(["b", "007", "a"])
    more = idx.extended(["c", 8])
    assert more.ids == ["b", "007", "a", "c", "8"] and idx.ids == ["b", "007", "a"]
    assert more.index_of(["c", "8", "b"]).tolist() == [4, 5, 1]
    with pytest.raises(ValueError, match=r"1 id\(s\) already in the index.*'a'"):
        idx.extended(["c", "a"])
    with pytest.raises(ValueError, match="duplicated"):
        idx.extended(["c", "c"])


# ------------------------------------------------------------------ leave-one-out
def test_leave_one_out_by_hand(toy_split):
    s = toy_split
    assert s.item_index.ids == ["a", "b", "c", "d", "e"]  # first appearance
    a, b, c, d, e = 1, 2, 3, 4, 5
    assert s.lengths.tolist() == [5, 3]
    assert s.train_lengths.tolist() == [3, 1]
    assert s.targets("valid").tolist() == [d, c]
    assert s.targets("test").tolist() == [e, a]
    np.testing.assert_array_equal(s.sequences, [[a, b, c, d, e], [0, 0, b, c, a]])
    # popularity from the training parts only: u1 a b c, u2 b
    assert s.item_popularity.tolist() == [0, 1, 2, 1, 0, 0]
    # counts over each split's inputs: validation = training; test adds the validation items d (u1), c (u2)
    assert s.input_popularity("valid").tolist() == [0, 1, 2, 1, 0, 0]
    assert s.input_popularity("test").tolist() == [0, 1, 2, 2, 1, 0]
    assert s.item_popularity.tolist() == [0, 1, 2, 1, 0, 0]  # left as it was
    with pytest.raises(ValueError, match="'train'"):
        s.input_popularity("train")
    seq, tgt, users = s.eval_inputs("valid")
    assert seq.dtype == torch.int64 and tgt.tolist() == [d, c] and users.tolist() == ["u1", "u2"]
    assert seq.tolist() == [[0, a, b, c], [0, 0, 0, b]]
    seq, tgt, _ = s.eval_inputs("test", max_len=3)
    assert seq.tolist() == [[b, c, d], [0, b, c]] and tgt.tolist() == [e, a]
    hv, ht = s.history("valid").toarray(), s.history("test").toarray()
    assert hv.shape == (2, 6)
    assert np.flatnonzero(hv[0]).tolist() == [a, b, c] and np.flatnonzero(hv[1]).tolist() == [b]
    assert np.flatnonzero(ht[0]).tolist() == [a, b, c, d] and np.flatnonzero(ht[1]).tolist() == [b, c]


def test_split_save_load(tmp_path, toy_split):
    toy_split.save(tmp_path / "s")
    back = SplitData.load(tmp_path / "s")
    assert back.item_index == toy_split.item_index
    np.testing.assert_array_equal(back.sequences, toy_split.sequences)
    assert back.user_ids.tolist() == toy_split.user_ids.tolist()


def test_leave_one_out_rejects_items_outside_given_index():
    with pytest.raises(KeyError, match="not in the item index"):
        leave_one_out(frame(TOY[:5]), item_index=ItemIndex(["a", "b"]))


# ------------------------------------------------------------------ batches
def random_data(n_users=40, n_items=30, seed=0) -> InteractionData:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(3, 25))
        for t, it in enumerate(rng.choice(n_items, size=n, replace=False)):
            rows.append((f"u{u}", f"i{it}", t))
    return frame(rows)


def test_train_batches_shapes_padding_and_targets(toy_split):
    batches = list(toy_split.train_batches(8, max_len=4, rng=0, shuffle=False))
    assert len(batches) == 1  # u2 has a train sequence of 1 item: no training pair
    inp, pos, neg = batches[0]
    assert inp.dtype == pos.dtype == neg.dtype == torch.int64
    assert inp.shape == pos.shape == neg.shape == (1, 4)
    assert inp.tolist() == [[0, 0, 1, 2]] and pos.tolist() == [[0, 0, 2, 3]]
    assert (neg[pos == 0] == 0).all()
    assert set(neg[pos > 0].tolist()) <= {4, 5}  # never a training item of u1 (a b c)


def test_train_batches_negatives_never_in_history_and_left_padding():
    s = leave_one_out(random_data())
    hist = s.history("valid").toarray()  # = training items per user
    seen_rows = 0
    for inp, pos, neg, users in s.train_batches(7, max_len=10, rng=1, with_users=True):
        assert inp.shape[1] == 10 and inp.shape == pos.shape == neg.shape
        pad = inp == 0
        # left padding: once a real item starts, no padding follows
        assert (pad[:, :-1] | ~pad[:, 1:]).all()
        assert torch.equal(pos == 0, neg == 0)
        assert (inp[:, 1:][pos[:, :-1] > 0] == pos[:, :-1][pos[:, :-1] > 0]).all()  # pos = next input
        u = users.numpy()[:, None].repeat(10, 1)
        m = (neg > 0).numpy()
        assert not hist[u[m], neg.numpy()[m]].any()
        seen_rows += len(inp)
    assert seen_rows == s.num_train_rows(10) == int((s.train_lengths >= 2).sum())
    inp, pos, neg = next(s.train_batches(4, max_len=10, rng=0, n_negatives=3))
    assert neg.shape == (*pos.shape, 3) and ((neg > 0) == (pos > 0)[..., None]).all()


def test_train_batches_truncate_to_most_recent_and_sliding():
    s = leave_one_out(frame([("u", f"i{k}", k) for k in range(12)]))  # train = i0..i9
    idx = s.item_index.index_of([f"i{k}" for k in range(12)])
    inp, pos, _ = next(s.train_batches(2, max_len=4, rng=0))
    assert inp.tolist() == [idx[5:9].tolist()] and pos.tolist() == [idx[6:10].tolist()]
    wins = list(s.train_batches(10, max_len=4, rng=0, sliding=True, shuffle=False))
    inp, pos, _ = wins[0]
    assert s.num_train_rows(4, sliding=True) == 3 == len(inp)
    got = sorted(p for row in pos.tolist() for p in row if p)
    assert got == sorted(idx[1:10].tolist())  # every position trained exactly once
    assert pos[2].tolist() == [0, 0, 0, idx[1]] and inp[2].tolist() == [0, 0, 0, idx[0]]


def test_train_batches_seeded():
    s = leave_one_out(random_data())
    a = [t for b in s.train_batches(5, 8, rng=3) for t in b]
    b = [t for b in s.train_batches(5, 8, rng=3) for t in b]
    c = [t for b in s.train_batches(5, 8, rng=4) for t in b]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_length_buckets_group_similar_lengths_and_keep_every_row_once():
    s = leave_one_out(random_data(n_users=60))

    def widths(batch):  # real items per row
        return (batch[0] > 0).sum(1)

    plain = list(s.train_batches(6, max_len=10, rng=2, with_users=True))
    bucketed = list(s.train_batches(6, max_len=10, rng=2, with_users=True, length_buckets=4))
    users = sorted(u for b in bucketed for u in b[3].tolist())
    assert users == sorted(u for b in plain for u in b[3].tolist())  # same rows, each once
    assert len(users) == len(set(users))

    def spread(batches):  # mean within-batch max-min real length
        return float(np.mean([float(widths(b).max() - widths(b).min()) for b in batches]))

    assert spread(bucketed) < spread(plain)
    # within each chunk of 4 batches the rows are sorted by length: each batch's widths are a sorted run
    for b in bucketed:
        w = widths(b)
        assert torch.equal(w, w.sort().values)
    # batches are cut by trained positions, not rows: about batch_size * mean length each
    positions = np.array([int((b[1] > 0).sum()) for b in bucketed])
    rows_per_batch = np.array([len(b[0]) for b in bucketed])
    assert rows_per_batch.max() > rows_per_batch.min()  # short sequences come in larger batches
    mean_plain = np.mean([int((b[1] > 0).sum()) for b in plain[:-1]])  # full batches of 6 rows
    assert (positions > 0.5 * mean_plain).all() and (positions < 1.5 * mean_plain).all()
    assert abs(len(bucketed) - len(plain)) <= len(plain) // 4
    again = list(s.train_batches(6, max_len=10, rng=2, with_users=True, length_buckets=4))
    assert all(torch.equal(x, y) for bx, by in zip(bucketed, again) for x, y in zip(bx, by))
    with pytest.raises(ValueError, match="length_buckets"):
        next(s.train_batches(6, max_len=10, rng=2, length_buckets=-1))
    with pytest.raises(ValueError, match="drop_last"):
        next(s.train_batches(6, max_len=10, rng=2, length_buckets=4, drop_last=True))


def test_user_with_every_item_raises():
    s = leave_one_out(frame([("u", i, t) for t, i in enumerate("abcab")]))
    with pytest.raises(ValueError, match=r"1 user\(s\) have interacted with all 3 items.*'u'"):
        list(s.train_batches(2, 4, rng=0))


# ------------------------------------------------------------------ semantic alignment
class FakeEmb:
    def __init__(self, ids, matrix):
        self.ids, self.matrix = ids, matrix


def test_align_semantic_orders_rows_and_reports_missing():
    idx = ItemIndex(["c", "a", "b"])
    emb = FakeEmb(["a", "b", "c", "z"], np.arange(8, dtype=np.float64).reshape(4, 2))
    out = align_semantic(emb, idx)
    assert out.dtype == np.float32 and out.tolist() == [[4, 5], [0, 1], [2, 3]]
    assert align_semantic({"a": [1, 1], "b": [2, 2], "c": [3, 3]}, idx)[0].tolist() == [3, 3]
    df = pd.DataFrame({"item_id": ["a", "b", "c"], "x": [1.0, 2, 3], "y": [0.0, 0, 0]})
    assert align_semantic(df, idx)[:, 0].tolist() == [3, 1, 2]
    small = FakeEmb(["a"], np.ones((1, 2)))
    with pytest.raises(KeyError, match=r"2 of 3 item\(s\).*'c'"):
        align_semantic(small, idx)
    with pytest.warns(UserWarning, match="2 of 3"):
        z = align_semantic(small, idx, missing="zeros")
    assert z.tolist() == [[0, 0], [1, 1], [0, 0]]
    bad = FakeEmb(["a", "b", "c"], np.array([[1, np.nan], [0, 0], [0, 0]]))
    with pytest.raises(ValueError, match="NaN"):
        align_semantic(bad, idx)


# ------------------------------------------------------------------ raw formats
def write_ml100k(folder: Path, n_users: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for u in range(1, n_users + 1):
        for k, it in enumerate([1, 2, 3]):
            lines.append(f"{u}\t{it}\t{(u + k) % 5 + 1}\t{1000 - k * 10 if u == 1 else 100 + k}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    flags = ["0"] * 19
    g1 = flags.copy(); g1[3] = g1[5] = "1"  # Animation, Comedy
    g2 = flags.copy(); g2[1] = "1"          # Action
    rows = [f"1|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(g1)}",
            f"2|Caf\xe9 Society (1996)|01-Jan-1996||http://y|{'|'.join(g2)}",
            f"3|unknown||||{'|'.join(flags)}"]
    (folder / "u.item").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    return folder


def test_movielens_raw(tmp_path):
    data = load_movielens_raw(write_ml100k(tmp_path / "ml"))
    assert data.stats() == {"users": 3, "items": 3, "interactions": 9}
    u1 = data.interactions[data.interactions["user_id"] == "1"]
    assert u1["item_id"].tolist() == ["3", "2", "1"]  # chronological
    items = data.items.set_index("item_id")
    assert items.loc["1", "title"] == "Toy Story" and items.loc["1", "year"] == "1995"
    assert items.loc["1", "genres"] == "Animation, Comedy"
    assert items.loc["2", "title"] == "Caf\xe9 Society"
    assert "rating" in data.interactions.columns
    with pytest.raises(FileNotFoundError, match="u.item"):
        (tmp_path / "ml" / "u.item").unlink()
        load_movielens_raw(tmp_path / "ml")


@pytest.mark.parametrize("gz", [True, False])
def test_amazon2014_raw(tmp_path, gz):
    reviews = [{"reviewerID": "R1", "asin": "0001", "unixReviewTime": 20, "overall": 5.0, "reviewText": "x"},
               {"reviewerID": "R1", "asin": "B2", "unixReviewTime": 10, "overall": 4.0},
               {"reviewerID": "R2", "asin": "0001", "unixReviewTime": 10, "overall": 3.0}]
    meta_lines = [
        "{'asin': '0001', 'title': 'Lipstick \"Red\"', 'brand': 'OPI', 'price': 9.5, "
        "'categories': [['Beauty', 'Makeup'], ['Beauty', 'Lips']], 'description': 'glossy'}",
        json.dumps({"asin": "B2", "title": "Soap", "categories": [["Beauty", "Bath"]]}),
        "{'asin': 'UNUSED', 'title': 'never reviewed'}",
    ]
    opener = gzip.open if gz else open
    rp, mp = tmp_path / ("r.json.gz" if gz else "r.json"), tmp_path / ("m.json.gz" if gz else "m.json")
    with opener(rp, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    with opener(mp, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(meta_lines) + "\n")
    data = load_amazon2014(rp, mp)
    df = data.interactions
    assert df["user_id"].tolist() == ["R1", "R1", "R2"]
    assert df["item_id"].tolist() == ["B2", "0001", "0001"]  # "0001" stays a string
    items = data.items.set_index("item_id")
    assert sorted(items.index) == ["0001", "B2"]
    assert items.loc["0001", "title"] == 'Lipstick "Red"'
    assert items.loc["0001", "categories"] == "Beauty > Makeup | Beauty > Lips"
    assert items.loc["0001", "price"] == "9.5"


def test_amazon_meta_never_evaluates_code(tmp_path):
    rp, mp = tmp_path / "r.json", tmp_path / "m.json"
    rp.write_text(json.dumps({"reviewerID": "R", "asin": "A", "unixReviewTime": 1}) + "\n")
    mp.write_text("__import__('os').system('echo pwned')\n")
    with pytest.raises(ValueError, match="m.json:1"):
        load_amazon2014(rp, mp)
    rp.write_text(json.dumps({"reviewerID": "R", "asin": "A"}) + "\n")
    with pytest.raises(ValueError, match="unixReviewTime"):
        load_amazon2014(rp)


# ------------------------------------------------------------------ downloads
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def make_ml_zip(path: Path, tmp: Path) -> str:
    src = write_ml100k(tmp / "src" / "ml-100k", n_users=4)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f"ml-100k/{f.name}")
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def test_download_good_checksum_and_statistics(tmp_path, http_root, umask):
    root, base = http_root
    sha = make_ml_zip(root / "ml.zip", tmp_path)
    cache = tmp_path / "cache"
    expected = {"users": 4, "items": 3, "interactions": 12}
    data = download_dataset("ml-100k", cache, url=f"{base}/ml.zip", sha256=sha, expected=expected)
    assert data.stats() == expected
    assert (cache / "ml-100k" / "ml-100k.zip").is_file()
    # the extracted folder is readable by others, like any folder made under umask 022
    assert [oct(p.stat().st_mode & 0o777) for p in (cache / "ml-100k").iterdir() if p.is_dir()] == [oct(0o755)]
    assert not list((cache / "ml-100k").glob("*.part"))
    # cached: works with the server gone (file removed) and the checksum still verified
    (root / "ml.zip").unlink()
    assert download_dataset("ml-100k", cache, url=f"{base}/ml.zip", sha256=sha, expected=expected).stats() == expected


def test_download_bad_checksum_fails_and_leaves_nothing(tmp_path, http_root):
    root, base = http_root
    make_ml_zip(root / "ml.zip", tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_dataset("ml-100k", cache, url=f"{base}/ml.zip", sha256="0" * 64, expected={})
    assert not (cache / "ml-100k" / "ml-100k.zip").exists()
    assert not list((cache / "ml-100k").glob("*.part"))


def test_download_statistics_mismatch_fails(tmp_path, http_root):
    root, base = http_root
    sha = make_ml_zip(root / "ml.zip", tmp_path)
    # the registry expects the real ML-100K statistics (943 users ...)
    with pytest.raises(ValueError, match="users: expected 943, got 4"):
        download_dataset("ml-100k", tmp_path / "cache", url=f"{base}/ml.zip", sha256=sha)


def test_download_restarts_stale_partial_and_multi_file_registry(tmp_path, http_root):
    root, base = http_root
    rev = "\n".join(json.dumps({"reviewerID": f"R{u}", "asin": f"A{i}", "unixReviewTime": i})
                    for u in range(3) for i in range(3))
    (root / "r.json.gz").write_bytes(gzip.compress(rev.encode()))
    (root / "m.json.gz").write_bytes(gzip.compress(b"{'asin': 'A1', 'title': 'one'}\n"))
    spec = DatasetSpec("toy-amz", (RemoteFile(f"{base}/r.json.gz", "r.json.gz"),
                                   RemoteFile(f"{base}/m.json.gz", "m.json.gz")),
                       "amazon2014", {"users": 3, "items": 3, "interactions": 9})
    cache = tmp_path / "cache"
    (cache / "toy-amz").mkdir(parents=True)
    (cache / "toy-amz" / "r.json.gz.part").write_bytes(b"garbage from an interrupted run")
    sha = {"r.json.gz": hashlib.sha256((root / "r.json.gz").read_bytes()).hexdigest()}
    data = download_dataset("toy-amz", cache, sha256=sha, registry={"toy-amz": spec})
    assert data.stats() == {"users": 3, "items": 3, "interactions": 9}
    assert data.items["title"].tolist() == ["one"]
    with pytest.raises(KeyError, match="unknown dataset"):
        download_dataset("nope", cache)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one payload with HTTP Range support and records the bytes it sent."""

    payload = b""
    sent: list[int] = []

    def do_GET(self):  # noqa: N802
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        if start >= len(self.payload):
            self.send_response(416)
            self.end_headers()
            return
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.sent.append(len(body))

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("already", ["half", "all"])
def test_download_resumes_partial_file_with_range(tmp_path, already):
    zpath = tmp_path / "ml.zip"
    sha = make_ml_zip(zpath, tmp_path)
    payload = zpath.read_bytes()
    handler = type("H", (_RangeHandler,), {"payload": payload, "sent": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cache = tmp_path / "cache"
        (cache / "ml-100k").mkdir(parents=True)
        cut = len(payload) // 2 if already == "half" else len(payload)
        (cache / "ml-100k" / "ml-100k.zip.part").write_bytes(payload[:cut])
        data = download_dataset("ml-100k", cache, url=f"http://127.0.0.1:{server.server_address[1]}/x.zip",
                                sha256=sha, expected={"users": 4, "items": 3, "interactions": 12})
    finally:
        server.shutdown()
        server.server_close()
    assert data.num_interactions == 12
    assert handler.sent == ([len(payload) - cut] if already == "half" else [])  # only the rest was sent
    assert (cache / "ml-100k" / "ml-100k.zip").read_bytes() == payload


def test_default_data_dir_falls_back_to_cwd_then_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("CFSR_DATA_DIR", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "proj")
    assert default_data_dir().resolve() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")  # no ../shared/data from here
    assert default_data_dir() == Path(__file__).resolve().parents[3] / "shared" / "data"
