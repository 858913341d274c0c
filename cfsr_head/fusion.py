"""Causal multi-head cross-attention between the semantic and the collaborative view."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import causal_allowed

__all__ = ["CrossViewAttention"]


class CrossViewAttention(nn.Module):
    """``softmax(Q K^T / sqrt(d_h)) V`` with Q from the query view and K, V from the other view.

    Position t of the query view attends only to non-padding positions <= t of the other view
    (causal mask AND key padding mask; LLM-ESR's cross-attention masks only padding). Following
    the paper (and LLM-ESR) the output *replaces* the input sequence; ``residual=True`` returns
    ``query + output`` instead. Padded positions of the output are zero. One module per direction.
    ``dropout`` is applied to the output projection (not to the attention probabilities, which
    would force PyTorch's slow unfused attention kernel).
    """

    def __init__(self, d: int, n_heads: int = 4, dropout: float = 0.2, residual: bool = False) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d={d} must be divisible by n_heads={n_heads}")
        self.d, self.n_heads, self.dropout, self.residual = d, n_heads, dropout, residual
        self.out_dropout = nn.Dropout(dropout)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, query: Tensor, context: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """query, context: ``[B, L, d]``; padding_mask ``[B, L]`` (True = padding) -> ``[B, L, d]``."""
        B, L, d = query.shape
        if context.shape != query.shape:
            raise ValueError(f"query {tuple(query.shape)} and context {tuple(context.shape)} differ in shape")
        if padding_mask is None:
            padding_mask = torch.zeros((B, L), dtype=torch.bool, device=query.device)
        h = self.n_heads

        def split(t: Tensor) -> Tensor:
            return t.view(B, L, h, d // h).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            split(self.q_proj(query)), split(self.k_proj(context)), split(self.v_proj(context)),
            attn_mask=causal_allowed(padding_mask),
        )
        out = self.out_dropout(self.out_proj(a.transpose(1, 2).reshape(B, L, d)))
        if self.residual:
            out = query + out
        return out * (~padding_mask).unsqueeze(-1).to(out.dtype)
