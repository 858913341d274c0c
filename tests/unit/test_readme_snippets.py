"""README snippets that need a user's own objects, run here with tiny stand-ins built in the test."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cfsr_head import InteractionData, leave_one_out
from cyclic_data import cyclic_interactions
from tests.unit.test_encoders import RecBoleStyleSASRec

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def python_block_after(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"```python\n(.*?)```", text[text.index(marker):], flags=re.S)
    assert match, f"no python block after {marker!r} in README.md"
    return match.group(1)


def test_bolting_onto_your_own_sasrec_puts_its_layers_and_item_rows_in_the_head():
    """The snippet's head wraps the user's model itself and holds each raw id's trained row at that
    id's index of the split, whatever the user's own row order; then it trains."""
    lines = python_block_after("**On top of a SASRec you already trained.**").splitlines()
    training = [ln for ln in lines if ln.startswith("Trainer(")]
    assert training == ['Trainer(head, split, TrainConfig(loss="ce", lr=1e-3)).fit()'], "README changed; update"
    setup = "\n".join(ln for ln in lines if not ln.startswith("Trainer("))

    split = leave_one_out(InteractionData(cyclic_interactions(30)), max_len=50)
    torch.manual_seed(0)
    my_sasrec = RecBoleStyleSASRec(30, hidden=8, max_len=50)
    my_item_ids = [f"i{k}" for k in np.random.default_rng(0).permutation(30)]  # the user's own row order
    namespace = {"my_sasrec": my_sasrec, "my_item_ids": my_item_ids, "split": split,
                 "table": np.random.default_rng(1).normal(size=(30, 16)).astype(np.float32)}
    exec("from cfsr_head import DualViewHead, Trainer, TrainConfig, align_semantic", namespace)
    exec(compile(setup, str(README), "exec"), namespace)
    head = namespace["head"]
    assert head.encoder.model is my_sasrec  # its layers, not a copy
    index = split.item_index.index_of(my_item_ids)
    assert torch.equal(head.item_embedding.weight[torch.tensor(index)], my_sasrec.item_embedding.weight[1:])

    exec(training[0].replace("lr=1e-3)", "lr=1e-3, epochs=1, show_progress_bar=False)"), namespace)
    assert not torch.equal(head.item_embedding.weight[torch.tensor(index)], my_sasrec.item_embedding.weight[1:])


def test_cold_start_snippet_appends_the_new_items_in_their_order_and_recommends_over_them():
    """The snippet's new rows land at N+1..N+M in ``new_ids`` order (whatever the embeddings' own
    order), the extended index names them, and recommend takes them in histories and returns them."""
    from cfsr_head import DualViewHead, ItemIndex, SASRecEncoder, align_semantic, recommend
    from llm_item_embed import ItemEmbeddings

    inter = cyclic_interactions(200, n_users=600)
    inter["item_id"] = inter["item_id"].str[1:]                     # raw ids "0".."199", as in the snippet
    split = leave_one_out(InteractionData(inter), max_len=20)
    assert "50" in split.item_index and "172" in split.item_index
    n = split.num_items
    torch.manual_seed(0)
    head = DualViewHead(SASRecEncoder(d=8, n_layers=1, n_heads=2, max_len=20),
                        np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32), d=8, fusion="concat")
    rows = np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)
    new_item_embeddings = ItemEmbeddings(["B00NEW2", "B00NEW1"], rows)           # not in new_ids order
    namespace = {"head": head, "split": split, "new_item_embeddings": new_item_embeddings,
                 "ItemIndex": ItemIndex, "align_semantic": align_semantic, "recommend": recommend}
    code = python_block_after("**New items (cold start).**")
    exec(compile(code, str(README), "exec"), namespace)
    assert head.num_items == n + 2 and namespace["index"].ids[n:] == ["B00NEW1", "B00NEW2"]
    torch.testing.assert_close(head.semantic_table[n + 1:], torch.from_numpy(rows[::-1].copy()))
    recs = namespace["recs"]
    assert recs.items.shape == (1, 10) and "B00NEW1" not in set(recs.items[0])          # seen: left out
    everything = recommend(head, {"u1": ["50", "172", "B00NEW1"]}, k=n + 2, item_index=namespace["index"],
                           exclude_seen=False)
    # the new items are scored from their rows, and B00NEW1 is read in the history as item n + 1
    head.eval()
    with torch.no_grad():
        seq = torch.tensor([[*split.item_index.index_of(["50", "172"]), n + 1]])
        expected = head.full_scores(head.user_state(seq))[0]
    got = dict(zip(everything.items[0], everything.scores[0]))
    for new_id, index in (("B00NEW1", n + 1), ("B00NEW2", n + 2)):
        assert got[new_id] == pytest.approx(float(expected[index]), rel=1e-5, abs=1e-6)
    assert got["50"] == pytest.approx(float(expected[split.item_index.index_of(["50"])[0]]), rel=1e-5, abs=1e-6)
