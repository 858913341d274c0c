"""Sequence encoders: causality, padding handling, and adapters that reproduce users' models."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cfsr_head.encoders import (
    GRU4RecEncoder,
    PmixerSASRecAdapter,
    RecBoleSASRecAdapter,
    SASRecEncoder,
    SequenceEncoder,
    build_encoder,
)

D = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    enc = SASRecEncoder(d=D, n_layers=2, n_heads=4, max_len=12, dropout=0.3) if kind == "sasrec" \
        else GRU4RecEncoder(d=D, n_layers=2, dropout=0.3)
    return enc.eval()


def padded(x: torch.Tensor, lengths: list[int], L: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the first ``lengths[b]`` rows of ``x[b]`` left- or right-padded in a length-L batch."""
    B = x.shape[0]
    out = torch.zeros(B, L, x.shape[-1])
    mask = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        sl = slice(L - n, L) if side == "left" else slice(0, n)
        out[b, sl] = x[b, :n]
        mask[b, sl] = False
    return out, mask


# ---------------------------------------------------------------------------- built-in encoders
@pytest.mark.parametrize("kind", ["sasrec", "gru"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_causal(kind: str, side: str) -> None:
    enc = make(kind)
    torch.manual_seed(1)
    L, n = 10, 8
    x = torch.randn(3, L, D)
    xa, mask = padded(x, [n, n, n], L, side)
    first = L - n if side == "left" else 0
    for t in range(n - 1):
        xb = xa.clone()
        xb[:, first + t + 1: first + n] = torch.randn(3, n - t - 1, D)
        with torch.no_grad():
            ya, yb = enc(xa, mask), enc(xb, mask)
        torch.testing.assert_close(ya[:, : first + t + 1], yb[:, : first + t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(ya[:, first + n - 1], yb[:, first + n - 1])  # later inputs do matter


@pytest.mark.parametrize("kind", ["sasrec", "gru"])
def test_left_right_and_no_padding_agree(kind: str) -> None:
    enc = make(kind)
    torch.manual_seed(2)
    lengths = [1, 4, 9, 10]
    x = torch.randn(4, 10, D)
    xl, ml = padded(x, lengths, 10, "left")
    xr, mr = padded(x, lengths, 10, "right")
    with torch.no_grad():
        yl, yr = enc(xl, ml), enc(xr, mr)
        for b, n in enumerate(lengths):
            alone = enc(x[b: b + 1, :n], torch.zeros(1, n, dtype=torch.bool))[0]
            torch.testing.assert_close(yl[b, 10 - n:], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(yr[b, :n], alone, atol=1e-5, rtol=1e-5)
    assert (yl[ml] == 0).all() and (yr[mr] == 0).all()


@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_sasrec_padding_invariance_property(lengths: list[int], seed: int) -> None:
    enc = make("sasrec")
    torch.manual_seed(seed)
    x = torch.randn(len(lengths), 9, D)
    xl, ml = padded(x, lengths, 9, "left")
    xr, mr = padded(x, lengths, 9, "right")
    with torch.no_grad():
        yl, yr = enc(xl, ml), enc(xr, mr)
    assert torch.isfinite(yl).all() and torch.isfinite(yr).all()
    for b, n in enumerate(lengths):
        torch.testing.assert_close(yl[b, 9 - n:], yr[b, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sasrec", "gru"])
def test_all_padding_rows_are_finite_in_train_and_eval(kind: str) -> None:
    enc = make(kind)
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    for mode in (True, False):
        enc.train(mode)
        y = enc(x, mask)
        assert torch.isfinite(y).all()
        assert (y[0] == 0).all()
    y.sum().backward()


def test_sasrec_longer_than_max_len_and_protocol() -> None:
    enc = make("sasrec")
    with torch.no_grad():
        y = enc(torch.randn(2, 20, D), torch.zeros(2, 20, dtype=torch.bool))
    assert y.shape == (2, 20, D) and torch.isfinite(y).all()
    assert isinstance(enc, SequenceEncoder) and enc.hidden_size == D
    with pytest.raises(ValueError, match="divisible"):
        SASRecEncoder(d=10, n_heads=4)


def test_build_encoder_round_trip() -> None:
    for enc in (make("sasrec"), make("gru")):
        rebuilt = build_encoder(enc.encoder_config())
        assert type(rebuilt) is type(enc)
        rebuilt.load_state_dict(enc.state_dict())
    with pytest.raises(ValueError, match="encoder="):
        build_encoder({"type": "MyEncoder", "args": None})


# ---------------------------------------------------------------------------- RecBole-style SASRec
class RBMultiHeadAttention(nn.Module):
    """Mimics RecBole's MultiHeadAttention (post-LN, additive mask)."""

    def __init__(self, n_heads: int, hidden: int, hidden_dropout: float, attn_dropout: float, eps: float) -> None:
        super().__init__()
        self.n_heads, self.head = n_heads, hidden // n_heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.out_dropout = nn.Dropout(hidden_dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.n_heads, self.head).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head) + attention_mask
        ctx = self.attn_dropout(scores.softmax(-1)) @ v
        ctx = ctx.permute(0, 2, 1, 3).reshape(x.shape)
        return self.LayerNorm(self.out_dropout(self.dense(ctx)) + x)


class RBFeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense_1, self.dense_2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
        self.LayerNorm, self.dropout = nn.LayerNorm(hidden, eps=eps), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense_2(nn.functional.gelu(self.dense_1(x)))) + x)


class RBTransformerLayer(nn.Module):
    def __init__(self, n_heads: int, hidden: int, inner: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.multi_head_attention = RBMultiHeadAttention(n_heads, hidden, dropout, dropout, eps)
        self.feed_forward = RBFeedForward(hidden, inner, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.multi_head_attention(x, mask))


class RBTransformerEncoder(nn.Module):
    def __init__(self, n_layers: int, n_heads: int, hidden: int, inner: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(RBTransformerLayer(n_heads, hidden, inner, dropout, eps) for _ in range(n_layers))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                output_all_encoded_layers: bool = True) -> list[torch.Tensor]:
        out = []
        for layer in self.layer:
            hidden = layer(hidden, attention_mask)
            if output_all_encoded_layers:
                out.append(hidden)
        if not output_all_encoded_layers:
            out.append(hidden)
        return out


class RecBoleStyleSASRec(nn.Module):
    """RecBole's SASRec interface: right padding, absolute positions, additive -10000 mask."""

    def __init__(self, n_items: int, hidden: int = D, max_len: int = 12, n_layers: int = 2, n_heads: int = 2,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.item_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.trm_encoder = RBTransformerEncoder(n_layers, n_heads, hidden, 2 * hidden, dropout, 1e-12)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def get_attention_mask(self, item_seq: torch.Tensor) -> torch.Tensor:
        ext = (item_seq != 0).unsqueeze(1).unsqueeze(2)
        ext = torch.tril(ext.expand((-1, -1, item_seq.size(-1), -1)))
        return torch.where(ext, 0.0, -10000.0)

    def all_states(self, item_seq: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(item_seq.size(1), dtype=torch.long).unsqueeze(0).expand_as(item_seq)
        h = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(pos)))
        return self.trm_encoder(h, self.get_attention_mask(item_seq), output_all_encoded_layers=True)[-1]

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        out = self.all_states(item_seq)
        return out[torch.arange(item_seq.size(0)), item_seq_len - 1]


# ---------------------------------------------------------------------------- pmixer-style SASRec
class PointWiseFeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(hidden, hidden, 1), nn.Conv1d(hidden, hidden, 1)
        self.dropout1, self.dropout2, self.relu = nn.Dropout(dropout), nn.Dropout(dropout), nn.ReLU()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.dropout2(self.conv2(self.relu(self.dropout1(self.conv1(inputs.transpose(-1, -2))))))
        return out.transpose(-1, -2) + inputs


class PmixerStyleSASRec(nn.Module):
    """pmixer SASRec.pytorch's log2feats: left padding, sqrt(d) scaling, seq-first MHA.
    ``new_positions``: the newer variant (positions 1..L, 0 for padding, no timeline mask)."""

    def __init__(self, n_items: int, hidden: int = D, maxlen: int = 12, blocks: int = 2, heads: int = 2,
                 dropout: float = 0.2, new_positions: bool = False) -> None:
        super().__init__()
        self.new_positions = new_positions
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(maxlen + 1, hidden, padding_idx=0) if new_positions else nn.Embedding(maxlen, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.attention_layernorms, self.attention_layers = nn.ModuleList(), nn.ModuleList()
        self.forward_layernorms, self.forward_layers = nn.ModuleList(), nn.ModuleList()
        self.last_layernorm = nn.LayerNorm(hidden, eps=1e-8)
        for _ in range(blocks):
            self.attention_layernorms.append(nn.LayerNorm(hidden, eps=1e-8))
            self.attention_layers.append(nn.MultiheadAttention(hidden, heads, dropout))
            self.forward_layernorms.append(nn.LayerNorm(hidden, eps=1e-8))
            self.forward_layers.append(PointWiseFeedForward(hidden, dropout))

    def log2feats(self, log_seqs: torch.Tensor) -> torch.Tensor:
        seqs = self.item_emb(log_seqs) * self.item_emb.embedding_dim ** 0.5
        B, L = log_seqs.shape
        if self.new_positions:
            poss = torch.arange(1, L + 1).repeat(B, 1) * (log_seqs != 0)
        else:
            poss = torch.arange(L).repeat(B, 1)
        seqs = self.emb_dropout(seqs + self.pos_emb(poss))
        timeline_mask = log_seqs == 0
        if not self.new_positions:
            seqs = seqs * ~timeline_mask.unsqueeze(-1)
        attention_mask = ~torch.tril(torch.ones((L, L), dtype=torch.bool))
        for i in range(len(self.attention_layers)):
            seqs = torch.transpose(seqs, 0, 1)
            Q = self.attention_layernorms[i](seqs)
            mha_outputs, _ = self.attention_layers[i](Q, seqs, seqs, attn_mask=attention_mask)
            seqs = Q + mha_outputs
            seqs = torch.transpose(seqs, 0, 1)
            seqs = self.forward_layernorms[i](seqs)
            seqs = self.forward_layers[i](seqs)
            if not self.new_positions:
                seqs = seqs * ~timeline_mask.unsqueeze(-1)
        return self.last_layernorm(seqs)


def _seqs(n_items: int, lengths: list[int], L: int, side: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    seq = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        items = torch.randint(1, n_items + 1, (n,), generator=g)
        if side == "left":
            seq[b, L - n:] = items
        else:
            seq[b, :n] = items
    return seq


def test_recbole_adapter_reproduces_model_exactly() -> None:
    torch.manual_seed(0)
    model = RecBoleStyleSASRec(30).eval()
    seq = _seqs(30, [12, 7, 3, 1], 12, "right")
    adapter = RecBoleSASRecAdapter(model)
    assert adapter.hidden_size == D and adapter.max_len == 12
    with torch.no_grad():
        ours = adapter(model.item_embedding(seq), seq == 0)
        theirs = model.all_states(seq)
        last = model(seq, (seq != 0).sum(1))
    assert torch.equal(ours, theirs)
    lengths = (seq != 0).sum(1)
    assert torch.equal(ours[torch.arange(4), lengths - 1], last)
    # training mode with the same RNG state gives the same output too (dropout in the same order)
    model.train()
    torch.manual_seed(5)
    a = adapter(model.item_embedding(seq), seq == 0)
    torch.manual_seed(5)
    b = model.all_states(seq)
    assert torch.equal(a, b)
    # the adapter trains the user's own parameters
    a.sum().backward()
    assert model.trm_encoder.layer[0].multi_head_attention.query.weight.grad is not None


@pytest.mark.parametrize("new_positions", [False, True])
def test_pmixer_adapter_reproduces_model_exactly(new_positions: bool) -> None:
    torch.manual_seed(0)
    model = PmixerStyleSASRec(30, new_positions=new_positions).eval()
    seq = _seqs(30, [12, 7, 3, 1], 12, "left")
    adapter = PmixerSASRecAdapter(model)
    assert adapter.max_len == 12 and adapter.hidden_size == D
    with torch.no_grad():
        ours = adapter(model.item_emb(seq), seq == 0)
        theirs = model.log2feats(seq)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("which", ["recbole", "pmixer"])
def test_adapters_are_causal(which: str) -> None:
    torch.manual_seed(0)
    if which == "recbole":
        model = RecBoleStyleSASRec(30).eval()
        adapter, emb, side = RecBoleSASRecAdapter(model), model.item_embedding, "right"
    else:
        model = PmixerStyleSASRec(30).eval()
        adapter, emb, side = PmixerSASRecAdapter(model), model.item_emb, "left"
    seq = _seqs(30, [10, 10], 12, side)
    first = 2 if side == "left" else 0
    t = 4
    seq2 = seq.clone()
    seq2[:, first + t + 1: first + 10] = (seq2[:, first + t + 1: first + 10] % 30) + 1
    with torch.no_grad():
        a, b = adapter(emb(seq), seq == 0), adapter(emb(seq2), seq2 == 0)
    torch.testing.assert_close(a[:, : first + t + 1], b[:, : first + t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, first + 9], b[:, first + 9])


def test_adapters_reject_other_models_and_long_inputs() -> None:
    with pytest.raises(TypeError, match="trm_encoder"):
        RecBoleSASRecAdapter(nn.Module())
    with pytest.raises(TypeError, match="pos_emb"):
        PmixerSASRecAdapter(nn.Module())
    adapter = RecBoleSASRecAdapter(RecBoleStyleSASRec(5, max_len=4))
    with pytest.raises(ValueError, match="max length"):
        adapter(torch.randn(1, 6, D), torch.zeros(1, 6, dtype=torch.bool))
