"""Position ids of the NaViT tower and the resampler's 2-D sin-cos table (no checkpoint needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minicpmo_cli.model.vision import Resampler, _bucket_coords, navit_position_ids, sincos_pos_embed_2d

BOUNDARIES = torch.arange(1 / 70, 1.0, 1 / 70)


def _python_step_buckets(nb: int) -> list[int]:
    return torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / nb), BOUNDARIES, right=True).tolist()


def _idefics2_buckets(nb: int) -> list[int]:
    return torch.bucketize(torch.arange(nb) / nb * (1 - 1e-6), BOUNDARIES, right=True).tolist()


@pytest.mark.parametrize("nb", [1, 2, 7, 14, 24, 25, 26, 32, 37, 49, 50, 70, 78, 96, 500])
def test_buckets_are_monotone_and_in_table(nb):
    buckets = _bucket_coords(nb, 70).tolist()
    assert len(buckets) == nb and buckets[0] == 0
    assert all(a <= b for a, b in zip(buckets, buckets[1:])) and buckets[-1] <= 69
    # Exact multiples of 1/70 aside, the bucket is floor(i * 70 / nb).
    for i, bucket in enumerate(buckets):
        exact = i * 70 / nb
        assert bucket in (math.floor(exact), math.floor(exact) - 1)
        if abs(exact - round(exact)) > 1e-3:
            assert bucket == math.floor(exact)


def test_known_values():
    assert _bucket_coords(2, 70).tolist() == [0, 35]
    assert _bucket_coords(14, 70).tolist() == list(range(0, 70, 5))
    assert _bucket_coords(70, 70).tolist() == list(range(70))
    assert _bucket_coords(32, 70)[16].item() == 35  # Idefics2's formula gives 34 here
    assert _bucket_coords(24, 70)[12].item() == 35


@pytest.mark.parametrize("nb", [2, 24, 26, 32, 70, 78])
def test_differs_from_idefics2_formula(nb):
    assert _bucket_coords(nb, 70).tolist() != _idefics2_buckets(nb)


@pytest.mark.parametrize("nb,index,expected", [(25, 5, 13), (25, 10, 27), (50, 5, 6), (49, 7, 9), (100, 10, 6)])
def test_float32_step_as_reference(nb, index, expected):
    """The reference divides by an int32 tgt_sizes element, so the arange step is float32(1/nb), which is
    slightly below 1/nb for these nb: exact boundary hits fall one bucket lower than a Python-float step."""
    assert _bucket_coords(nb, 70)[index].item() == expected
    assert _python_step_buckets(nb)[index] == expected + 1


def test_position_ids_raster_order():
    ids = navit_position_ids(2, 3)
    assert ids.tolist() == [0, 23, 46, 35 * 70 + 0, 35 * 70 + 23, 35 * 70 + 46]


def test_sincos_table_layout():
    dim = 16
    table = sincos_pos_embed_2d(dim, 5, 7)
    assert table.shape == (5, 7, dim) and table.dtype == np.float32
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4))
    h, w = 3, 6
    expected = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
    np.testing.assert_allclose(table[h, w], expected, atol=1e-6)
    # First half depends on the column only, second half on the row only.
    assert np.array_equal(table[0, :, : dim // 2], table[4, :, : dim // 2])
    assert np.array_equal(table[:, 0, dim // 2 :], table[:, 6, dim // 2 :])


def test_resampler_cache_growth_keeps_values():
    resampler = Resampler(num_queries=4, embed_dim=16, num_heads=2, kv_dim=8)
    small = resampler._pos_table(10, 10, torch.device("cpu")).clone()
    assert small.shape == (70, 70, 16)
    grown = resampler._pos_table(13, 78, torch.device("cpu"))
    assert grown.shape == (70, 78, 16)
    assert torch.equal(grown[:70, :70], small)


def test_resampler_shapes_and_padding_invariance():
    torch.manual_seed(0)
    resampler = Resampler(num_queries=4, embed_dim=16, num_heads=2, kv_dim=8).eval()
    features = torch.randn(1, 6, 8)
    with torch.no_grad():
        alone = resampler(features, torch.tensor([[2, 3]]))
        padded = torch.cat([features, torch.randn(1, 6, 8)], dim=1)
        batch = torch.cat([padded, torch.randn(1, 12, 8)])
        together = resampler(batch, torch.tensor([[2, 3], [3, 4]]))
    assert alone.shape == (1, 4, 16) and together.shape == (2, 4, 16)
    torch.testing.assert_close(together[0], alone[0], rtol=0, atol=1e-5)
    # proj is right-multiplied: y = ln_post(out) @ proj
    assert resampler.proj.shape == (16, 16)
