"""Pooling of token states into one vector per text; correct for left and right padding."""
from __future__ import annotations

import torch

__all__ = ["POOLING_MODES", "mean_pool", "last_token_pool", "pool"]

POOLING_MODES = ("mean", "last")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over real tokens: ``hidden [B, T, d]``, ``attention_mask [B, T]`` (1 = token).

    Sums in float32 so half-precision states do not overflow; returns the input dtype.
    """
    mask = attention_mask.to(dtype=torch.float32).unsqueeze(-1)
    summed = (hidden.float() * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp_min(1.0)
    return (summed / count).to(hidden.dtype)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the last real token of each row, wherever the padding is (left, right or none)."""
    mask = attention_mask.to(torch.long)
    t = mask.shape[1]
    # index of the last position whose mask is 1: largest position weighted by the mask
    positions = torch.arange(t, device=mask.device).unsqueeze(0).expand_as(mask)
    last = (positions * mask).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Dispatch to :func:`mean_pool` (``"mean"``) or :func:`last_token_pool` (``"last"``)."""
    if mode == "mean":
        return mean_pool(hidden, attention_mask)
    if mode in ("last", "last_token", "lasttoken"):
        return last_token_pool(hidden, attention_mask)
    raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")
