"""Sequence encoders behind one small protocol, plus adapters for users' own SASRec models.

Protocol (``SequenceEncoder``): ``encoder(x [B, L, d], padding_mask [B, L] bool, True = padding)
-> [B, L, d]``, causal (the output at position t depends only on inputs at positions <= t), with
an integer attribute ``hidden_size``. Position embeddings live inside the encoder. An optional
``max_len`` attribute tells the head how many recent items the encoder can take (``None`` = any).
"""
from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SequenceEncoder",
    "SASRecEncoder",
    "GRU4RecEncoder",
    "RecBoleSASRecAdapter",
    "PmixerSASRecAdapter",
    "real_positions",
    "causal_allowed",
]


@runtime_checkable
class SequenceEncoder(Protocol):
    """What ``DualViewHead`` needs from a sequence encoder."""

    hidden_size: int

    def __call__(self, x: Tensor, padding_mask: Tensor) -> Tensor:  # pragma: no cover - protocol
        ...


def real_positions(padding_mask: Tensor) -> Tensor:
    """0-based rank of each real item among the real items of its row (padding gets 0).

    Depends only on positions <= t, so it is causal, and it is the same for left and right
    padding of the same sequence."""
    real = (~padding_mask).long()
    return ((real.cumsum(dim=1) - 1).clamp_min(0)) * real


def causal_allowed(padding_mask: Tensor) -> Tensor:
    """Boolean attention mask ``[B, 1, L, L]``, True = may attend: key <= query and key is not
    padding. The diagonal is always allowed so that a padding query never has an empty row (no
    NaN); a real query's diagonal key is itself, so real queries never see padding."""
    L = padding_mask.size(1)
    idx = torch.arange(L, device=padding_mask.device)
    causal = idx[None, :] <= idx[:, None]  # [L(query), L(key)]
    eye = idx[None, :] == idx[:, None]
    allowed = causal[None] & (~padding_mask)[:, None, :]
    allowed = allowed | eye[None]
    return allowed[:, None]


class _PreLNBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)); x + FFN(LN(x))."""

    def __init__(self, d: int, n_heads: int, dropout: float, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"hidden size d={d} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.attn_dropout = attn_dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        B, L, d = x.shape
        h = self.attn_norm(x)
        q, k, v = self.qkv(h).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.resid_dropout(self.out(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.ffn_dropout(self.ffn(self.ffn_norm(x)))


class SASRecEncoder(nn.Module):
    """SASRec with pre-LN blocks, causal self-attention and a key padding mask.

    Positions: learned embeddings indexed by the item's rank among the real items of its row
    (0 = oldest item kept, clamped at ``max_len - 1``). This equals the usual absolute positions
    for right padding (RecBole) and for full-length windows, is causal, and makes left- and
    right-padded copies of one sequence give the same outputs. Padded positions are zeroed on the
    way in and on the way out; rows that are all padding give zeros, never NaN.

    ``dropout`` applies to the summed input embeddings, the attention output, the feed-forward
    hidden layer and its output. ``attn_dropout`` (dropout of the attention probabilities)
    defaults to 0: any value > 0 makes PyTorch fall back from the fused attention kernel to the
    unfused one, which costs about a third of a training step on a CPU.
    """

    def __init__(self, d: int = 64, n_layers: int = 2, n_heads: int = 4, max_len: int = 50,
                 dropout: float = 0.2, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if max_len < 1 or n_layers < 1:
            raise ValueError("max_len and n_layers must be >= 1")
        self.hidden_size = d
        self.max_len = max_len
        self._args = dict(d=d, n_layers=n_layers, n_heads=n_heads, max_len=max_len, dropout=dropout,
                          attn_dropout=attn_dropout)
        self.position_embedding = nn.Embedding(max_len, d)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_PreLNBlock(d, n_heads, dropout, attn_dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def encoder_config(self) -> dict[str, Any]:
        """Type and arguments, enough to rebuild the encoder (used by ``save_pretrained``)."""
        return {"type": "SASRecEncoder", "args": dict(self._args)}

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if padding_mask is None:
            padding_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
        pos = real_positions(padding_mask).clamp_max(self.max_len - 1)
        h = self.emb_dropout(x + self.position_embedding(pos)) * keep
        allowed = causal_allowed(padding_mask)
        for block in self.blocks:
            h = block(h, allowed)
        return self.final_norm(h) * keep


class GRU4RecEncoder(nn.Module):
    """GRU4Rec: input dropout, a stacked GRU, output dropout.

    Real items of each row are first gathered to the front (a stable sort of the padding mask),
    run through the GRU and scattered back, so left, right and no padding give the same outputs
    at real positions; padded positions are zero."""

    def __init__(self, d: int = 64, n_layers: int = 1, dropout: float = 0.2, max_len: int | None = None) -> None:
        super().__init__()
        self.hidden_size = d
        self.max_len = max_len  # the head cuts longer inputs to the most recent max_len items
        self._args = dict(d=d, n_layers=n_layers, dropout=dropout, max_len=max_len)
        self.emb_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(d, d, num_layers=n_layers, batch_first=True,
                          dropout=dropout if n_layers > 1 else 0.0)
        self.out_dropout = nn.Dropout(dropout)

    def encoder_config(self) -> dict[str, Any]:
        return {"type": "GRU4RecEncoder", "args": dict(self._args)}

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if padding_mask is None:
            padding_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        order = torch.argsort(padding_mask.to(torch.int8), dim=1, stable=True)  # real items first
        idx = order.unsqueeze(-1).expand_as(x)
        compact = torch.gather(self.emb_dropout(x), 1, idx)
        out, _ = self.gru(compact)
        out = torch.zeros_like(out).scatter(1, idx, out)
        return self.out_dropout(out) * (~padding_mask).unsqueeze(-1).to(out.dtype)


def _require(model: nn.Module, who: str, what: str, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(model, n)]
    if missing:
        raise TypeError(f"{who}: the model ({type(model).__name__}) lacks attributes {missing}; expected {what}")


class RecBoleSASRecAdapter(nn.Module):
    """Expose a RecBole-style SASRec (``position_embedding``, ``LayerNorm``, ``dropout``,
    ``trm_encoder``) as a ``SequenceEncoder``, reusing its trained layers.

    Reproduces RecBole's own computation after the item-embedding lookup: absolute positions
    0..L-1 from the left, LayerNorm, dropout, and the additive extended mask ``[B, 1, L, L]``
    (0 = allowed, -10000 = blocked: padding keys and future keys). RecBole right-pads; with left
    padding positions then differ from what the model saw in training. Outputs at padded positions
    are left as the model computes them (the head never reads them)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _require(model, "RecBoleSASRecAdapter", "a RecBole-style SASRec",
                 ("position_embedding", "LayerNorm", "dropout", "trm_encoder"))
        self.model = model
        self.hidden_size = int(model.position_embedding.embedding_dim)
        self.max_len = int(model.position_embedding.num_embeddings)

    def encoder_config(self) -> dict[str, Any]:
        return {"type": "RecBoleSASRecAdapter", "args": {}}

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        B, L, _ = x.shape
        if padding_mask is None:
            padding_mask = torch.zeros((B, L), dtype=torch.bool, device=x.device)
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the model's max length {self.max_len}")
        m = self.model
        pos = torch.arange(L, device=x.device)
        h = m.dropout(m.LayerNorm(x + m.position_embedding(pos).unsqueeze(0)))
        tril = torch.ones((L, L), dtype=torch.bool, device=x.device).tril()
        allowed = (~padding_mask)[:, None, None, :] & tril[None, None]
        ext = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, -10000.0)
        return m.trm_encoder(h, ext, output_all_encoded_layers=True)[-1]


class PmixerSASRecAdapter(nn.Module):
    """Expose a pmixer SASRec.pytorch-style model (``pos_emb``, ``emb_dropout``,
    ``attention_layernorms``, ``attention_layers`` (seq-first ``nn.MultiheadAttention``),
    ``forward_layernorms``, ``forward_layers``, ``last_layernorm``) as a ``SequenceEncoder``.

    Reproduces ``log2feats`` after the item lookup: the input is scaled by sqrt(d)
    (``scale_input``), then positions are added. Two position styles are detected from ``pos_emb``:
    the classic one (``nn.Embedding(maxlen, d)``, positions 0..L-1 from the left, padded
    timesteps zeroed after every block) and the newer one (``nn.Embedding(maxlen + 1, d,
    padding_idx=0)``, positions 1..L with 0 for padding, no timeline mask; ``norm_first`` honoured).
    The model expects left padding, as the pmixer code produces."""

    def __init__(self, model: nn.Module, scale_input: bool = True) -> None:
        super().__init__()
        _require(model, "PmixerSASRecAdapter", "a pmixer SASRec.pytorch-style model",
                 ("pos_emb", "emb_dropout", "attention_layernorms", "attention_layers",
                  "forward_layernorms", "forward_layers", "last_layernorm"))
        self.model = model
        self.scale_input = scale_input
        self.hidden_size = int(model.pos_emb.embedding_dim)
        self.masked_positions = model.pos_emb.padding_idx == 0
        self.max_len = int(model.pos_emb.num_embeddings) - int(self.masked_positions)

    def encoder_config(self) -> dict[str, Any]:
        return {"type": "PmixerSASRecAdapter", "args": {"scale_input": self.scale_input}}

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        B, L, d = x.shape
        if padding_mask is None:
            padding_mask = torch.zeros((B, L), dtype=torch.bool, device=x.device)
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the model's max length {self.max_len}")
        m = self.model
        seqs = x * math.sqrt(d) if self.scale_input else x
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
        if self.masked_positions:
            pos = torch.arange(1, L + 1, device=x.device).expand(B, L) * (~padding_mask)
        else:
            pos = torch.arange(L, device=x.device).expand(B, L)
        seqs = m.emb_dropout(seqs + m.pos_emb(pos))
        timeline = not self.masked_positions
        if timeline:
            seqs = seqs * keep
        attn_mask = ~torch.ones((L, L), dtype=torch.bool, device=x.device).tril()
        norm_first = bool(getattr(m, "norm_first", False))
        for i in range(len(m.attention_layers)):
            seqs = seqs.transpose(0, 1)
            if norm_first:
                q = m.attention_layernorms[i](seqs)
                out, _ = m.attention_layers[i](q, q, q, attn_mask=attn_mask)
                seqs = (seqs + out).transpose(0, 1)
                seqs = seqs + m.forward_layers[i](m.forward_layernorms[i](seqs))
            else:
                q = m.attention_layernorms[i](seqs)
                out, _ = m.attention_layers[i](q, seqs, seqs, attn_mask=attn_mask)
                seqs = (q + out).transpose(0, 1)
                seqs = m.forward_layers[i](m.forward_layernorms[i](seqs))
            if timeline:
                seqs = seqs * keep
        return m.last_layernorm(seqs)


ENCODER_TYPES: dict[str, type[nn.Module]] = {"SASRecEncoder": SASRecEncoder, "GRU4RecEncoder": GRU4RecEncoder}


def build_encoder(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an encoder from ``{"type": ..., "args": {...}}`` (built-in encoders only)."""
    kind = spec.get("type")
    if kind not in ENCODER_TYPES:
        raise ValueError(f"cannot rebuild encoder of type {kind!r} from its config; pass the encoder "
                         "yourself (from_pretrained(path, encoder=...))")
    return ENCODER_TYPES[kind](**spec.get("args", {}))
