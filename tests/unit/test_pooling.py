"""Pooling: masked mean and last-token, left and right padding give the same vectors."""
from __future__ import annotations

import pytest
import torch

from llm_item_embed.pooling import last_token_pool, mean_pool, pool


def _batch(padding: str):
    torch.manual_seed(0)
    lengths = [5, 2, 3, 1]
    t, d = 5, 4
    real = [torch.randn(n, d) for n in lengths]
    hidden = torch.full((len(lengths), t, d), 1e6)  # garbage at padded positions
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, (n, r) in enumerate(zip(lengths, real)):
        sl = slice(0, n) if padding == "right" else slice(t - n, t)
        hidden[i, sl] = r
        mask[i, sl] = 1
    return hidden, mask, real


@pytest.mark.parametrize("padding", ["left", "right"])
def test_mean_pool_ignores_padding(padding):
    hidden, mask, real = _batch(padding)
    out = mean_pool(hidden, mask)
    expected = torch.stack([r.mean(0) for r in real])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_last_token_pool_takes_last_real_token(padding):
    hidden, mask, real = _batch(padding)
    out = last_token_pool(hidden, mask)
    torch.testing.assert_close(out, torch.stack([r[-1] for r in real]))


def test_left_and_right_padding_agree():
    hl, ml, _ = _batch("left")
    hr, mr, _ = _batch("right")
    for mode in ("mean", "last"):
        torch.testing.assert_close(pool(hl, ml, mode), pool(hr, mr, mode))


def test_bool_mask_and_half_precision():
    hidden, mask, real = _batch("right")
    out = mean_pool(hidden.masked_fill(mask.unsqueeze(-1) == 0, 0).half(), mask.bool())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.stack([r.mean(0) for r in real]), atol=2e-3, rtol=2e-3)


def test_gradients_flow_only_to_real_tokens():
    hidden, mask, _ = _batch("left")
    hidden = hidden.clone().requires_grad_(True)
    mean_pool(hidden, mask).sum().backward()
    assert torch.all(hidden.grad[mask == 0] == 0)
    assert torch.all(hidden.grad[mask == 1] != 0)


def test_unknown_mode():
    hidden, mask, _ = _batch("right")
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool(hidden, mask, "max")
