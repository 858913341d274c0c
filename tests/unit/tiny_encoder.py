"""A tiny stand-in for ``TextEncoder`` used by the loss/trainer tests (no transformer: fast).

Same interface: ``.tokenize(list[str]) -> dict of tensors``, ``forward(input_ids, attention_mask)
-> [B, d]``, ``.dim``; a frozen "base" embedding table plus a trainable low-rank update (LoRA-like)
and a trainable projection, with optional dropout (to test RNG replay in GradCache).
"""
from __future__ import annotations

import torch
from torch import nn


class TinyEncoder(nn.Module):
    def __init__(self, tokenizer_path: str, dim: int = 16, rank: int = 4, dropout: float = 0.0,
                 seed: int = 0, max_length: int = 64) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.max_length = max_length
        g = torch.Generator().manual_seed(seed)
        vocab = len(self.tokenizer)
        self.base = nn.Embedding(vocab, dim)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(vocab, dim, generator=g))
        self.base.weight.requires_grad_(False)  # frozen base, never checkpointed
        self.lora_A = nn.Parameter(torch.randn(vocab, rank, generator=g) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(rank, dim, generator=g) * 0.1)
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim) + 0.01 * torch.randn(dim, dim, generator=g))
            self.proj.bias.zero_()
        self.drop = nn.Dropout(dropout)
        self.dim = dim

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.base(input_ids) + self.lora_A[input_ids] @ self.lora_B
        h = self.drop(h)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.proj(pooled)
