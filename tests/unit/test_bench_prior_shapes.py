"""benchmarks.bench_prior_shapes: other shapes of the semantic prior, scored as choose_adjustment scores."""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_prior_shapes import prior_shapes, shape_values, view_scores
from cfsr_head import DualViewHead, SASRecEncoder
from cfsr_head.adjust import choose_adjustment
from tests.unit.test_adjust import chain_split, circle_table


def test_last_shape_is_the_librarys_prior_and_every_point_is_scored_like_choose_adjustment():
    split = chain_split()
    table = circle_table(split, noise=0.3)
    torch.manual_seed(0)
    head = DualViewHead(SASRecEncoder(d=4, n_layers=1, n_heads=1, max_len=6), table, d=4, fusion="concat",
                        score_temperature=0.1).eval()
    betas, weights, gammas = (-0.5, 0.0), (1.0, 3.0), (0.0, 1.0)
    values = shape_values(head, split, table, betas, weights, gammas, batch_size=7)
    _, library = choose_adjustment(head, split, table, betas=betas, weights=weights, tail_exponents=gammas)
    last = {(p.tail_exponent, p.weight, p.beta): v for p, v in library.items() if p.weight != 0}
    assert {k[1:]: v for k, v in values.items() if k[0] == "last"} == pytest.approx(last, abs=1e-12)
    shapes = {k[0] for k in values}
    assert {"max 1", "max 0.5", "kernel 0.1", "semantic 0.5", "collaborative -0.5"} <= shapes
    assert len(values) == len(shapes) * len(betas) * len(weights) * len(gammas)
    # a head without a score temperature has no per-view rows
    plain = DualViewHead(SASRecEncoder(d=4, n_layers=1, n_heads=1, max_len=6), table, d=4, fusion="concat").eval()
    assert view_scores(plain, torch.zeros(2, 8)) == {}


def test_prior_shapes_follow_their_definitions():
    torch.manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(9, 5), dim=1)
    unit = torch.cat([torch.zeros(1, 5), unit])
    seq = torch.tensor([[0, 0, 3, 7, 2], [0, 0, 0, 0, 4]])  # left-padded
    shapes = prior_shapes(seq, unit)
    torch.testing.assert_close(shapes["last"][0], unit @ unit[2])
    cos = torch.stack([unit @ unit[i] for i in (3, 7, 2)])  # oldest first: ages 2, 1, 0
    torch.testing.assert_close(shapes["max 1"][0], cos.max(0).values)
    ages = torch.tensor([2.0, 1.0, 0.0])[:, None]
    torch.testing.assert_close(shapes["max 0.5"][0], (0.5 ** ages * cos).max(0).values)
    torch.testing.assert_close(shapes["max 0.8"][1], shapes["last"][1])  # one item: every shape of max is it
    torch.testing.assert_close(shapes["kernel 0.1"][0], torch.exp((shapes["last"][0] - 1) / 0.1))
    assert float(shapes["kernel 0.05"][0, 2]) == pytest.approx(1.0, abs=1e-4)  # the last item itself
