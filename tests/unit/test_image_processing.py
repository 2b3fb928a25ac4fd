"""LLaVA-UHD slicing helpers, pixel layout and placeholder text of MiniCPMVImageProcessor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmo_cli.processing.image import (
    MiniCPMVImageProcessor,
    ensure_divide,
    find_best_resize,
    get_refine_size,
    get_sliced_grid,
    reshape_by_patch,
    split_to_patches,
)

UNK64 = "<unk>" * 64


def _processor(**overrides):
    values = dict(max_slice_nums=9, scale_resolution=448, patch_size=14, use_image_id=True, version=2.6)
    values.update(overrides)
    return MiniCPMVImageProcessor(**values)


def test_ensure_divide_uses_bankers_rounding():
    assert ensure_divide(35, 14) == 28  # 2.5 -> 2
    assert ensure_divide(49, 14) == 56  # 3.5 -> 4
    assert ensure_divide(3, 14) == 14  # at least one patch
    assert ensure_divide(601, 2) == 600  # 300.5 -> 300


# (w, h), max_slice_nums -> grid, source size, refine size, tgt sizes (spec vision-llm §5.4 table)
SLICING_TABLE = [
    ((1344, 1344), 9, [3, 3], (448, 448), (1344, 1344), [[32, 32]] * 10),
    ((1920, 1080), 9, [4, 2], (602, 336), (1680, 952), [[24, 43]] + [[34, 30]] * 8),
    ((1080, 1920), 9, [2, 4], (336, 602), (952, 1680), [[43, 24]] + [[30, 34]] * 8),
    ((1000, 1000), 9, [2, 2], (448, 448), (896, 896), [[32, 32]] * 5),
    ((640, 480), 9, [2, 1], (518, 392), (728, 546), [[28, 37]] + [[39, 26]] * 2),
    ((600, 400), 9, [2, 1], (546, 364), (784, 518), [[26, 39]] + [[37, 28]] * 2),
    ((448, 448), 9, None, (448, 448), None, [[32, 32]]),
    ((300, 200), 9, None, (546, 364), None, [[26, 39]]),
    ((8, 8), 9, None, (448, 448), None, [[32, 32]]),
    ((1280, 720), 2, [2, 1], (602, 336), (840, 476), [[24, 43]] + [[34, 30]] * 2),
    ((1280, 720), 1, None, (602, 336), None, [[24, 43]]),
    ((3000, 500), 9, [7, 1], (1092, 182), (2940, 476), [[13, 78]] + [[34, 30]] * 7),
    ((448, 4032), 9, [1, 9], (154, 1344), (448, 4032), [[96, 11]] + [[32, 32]] * 9),
]


@pytest.mark.parametrize("size,max_slices,grid,source,refine,tgt", SLICING_TABLE)
def test_slicing_geometry(size, max_slices, grid, source, refine, tgt):
    assert get_sliced_grid(size, max_slices) == grid
    assert find_best_resize(size, 448, 14, allow_upscale=grid is None) == source
    if grid is not None:
        assert get_refine_size(size, grid, 448, 14, allow_upscale=True) == refine
    out = _processor()([Image.new("RGB", size, (10, 200, 30))], max_slice_nums=max_slices)
    assert out["tgt_sizes"][0].tolist() == tgt
    assert out["image_sizes"] == [[size]]
    for strip, (h, w) in zip(out["pixel_values"][0], tgt):
        assert tuple(strip.shape) == (3, 14, 14 * h * w)


def test_grid_ties_keep_first_candidate():
    # A square of 1-2 x 448^2 px: multiple 2, candidates [1,2], [2,1], [1,3], [3,1]; [1,2] and [2,1] tie
    # exactly (|log 1/2| == |log 2|) and the strict "<" keeps the first: 1 column, 2 rows.
    assert get_sliced_grid((500, 500), 9) == [1, 2]
    assert get_sliced_grid((600, 600), 9) == [1, 2]
    # Square with 4 x 448^2 px: [2,2] (error 0) beats everything.
    assert get_sliced_grid((900, 900), 9) == [2, 2]
    # max_slice_nums caps the count: 2:1 image of ~10 x 448^2 px with at most 2 slices.
    assert get_sliced_grid((2000, 1000), 2) == [2, 1]


def test_split_to_patches_row_major():
    image = Image.new("RGB", (6, 4))
    for x in range(6):
        for y in range(4):
            image.putpixel((x, y), (x, y, 0))
    tiles = split_to_patches(image, [3, 2])
    assert len(tiles) == 2 and all(len(row) == 3 for row in tiles)
    assert tiles[1][2].getpixel((0, 0)) == (4, 2, 0) and tiles[0][1].size == (2, 2)


def test_reshape_by_patch_matches_unfold_layout():
    image = np.random.default_rng(0).standard_normal((3, 28, 42)).astype(np.float32)
    strip = reshape_by_patch(image, 14)
    assert strip.shape == (3, 14, 6 * 14)
    # patch l = row * 3 + col sits at columns [l*14, (l+1)*14)
    for row in range(2):
        for col in range(3):
            l = row * 3 + col
            np.testing.assert_array_equal(
                strip[:, :, l * 14 : (l + 1) * 14], image[:, row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14]
            )
    unfolded = torch.nn.functional.unfold(torch.from_numpy(image), (14, 14), stride=(14, 14))
    reference = unfolded.reshape(3, 14, 14, -1).permute(0, 1, 3, 2).reshape(3, 14, -1)
    np.testing.assert_array_equal(strip, reference.numpy())


def test_normalisation_values():
    out = _processor()([Image.new("RGB", (448, 448), (0, 255, 51))])
    strip = out["pixel_values"][0][0]
    assert strip.dtype == torch.float32
    assert torch.all(strip[0] == -1.0) and torch.all(strip[1] == 1.0)
    assert torch.allclose(strip[2], torch.tensor((51 / 255 - 0.5) / 0.5, dtype=torch.float32))


def test_placeholder_layout():
    processor = _processor()
    single = processor.get_slice_image_placeholder((448, 448), image_idx=3)
    assert single == "<image_id>3</image_id><image>" + UNK64 + "</image>"
    grid = processor.get_slice_image_placeholder((1920, 1080), image_idx=12)
    row = ("<slice>" + UNK64 + "</slice>") * 4
    assert grid == "<image_id>12</image_id><image>" + UNK64 + "</image>" + row + "\n" + row
    no_id = processor.get_slice_image_placeholder((1920, 1080), use_image_id=False, max_slice_nums=1)
    assert no_id == "<image>" + UNK64 + "</image>"
    tall = processor.get_slice_image_placeholder((500, 700), use_image_id=False)
    assert tall.count("\n") == 1 and tall.count("<slice>") == 2
    assert _processor(slice_mode=False).get_slice_image_placeholder((1920, 1080)).count("<slice>") == 0


def test_invalid_max_slice_nums():
    with pytest.raises(ValueError):
        _processor().get_slice_image_placeholder((100, 100), max_slice_nums=0)


def test_input_nesting_and_empty_samples():
    processor = _processor()
    image = Image.new("RGB", (100, 50))
    flat = processor([image, image])
    nested = processor([[image], [], [image, image]])
    assert len(flat["pixel_values"]) == 1 and len(flat["pixel_values"][0]) == 2
    assert [len(p) for p in nested["pixel_values"]] == [1, 0, 2]
    assert nested["tgt_sizes"][1].shape == (0, 2)
    assert nested["image_sizes"][2] == [(100, 50), (100, 50)]
    single = processor(image, return_tensors=None)
    assert isinstance(single["pixel_values"][0][0], np.ndarray)


def test_non_rgb_and_array_inputs():
    processor = _processor()
    gray = Image.new("L", (64, 64), 128)
    rgba = Image.new("RGBA", (64, 64), (128, 128, 128, 0))
    array = np.full((64, 64, 3), 128, dtype=np.uint8)
    results = [processor([img])["pixel_values"][0][0] for img in (gray, rgba, array)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_from_pretrained_ignores_feature_extractor_keys(tmp_path):
    config = {
        "image_processor_type": "MiniCPMVImageProcessor", "max_slice_nums": 4, "use_image_id": True,
        "image_feature_size": 32, "slice_mode": True, "norm_mean": [0.5] * 3, "norm_std": [0.5] * 3,
        "version": 2.6, "feature_size": 80, "hop_length": 160, "n_fft": 400, "sampling_rate": 16000,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = MiniCPMVImageProcessor.from_pretrained(tmp_path)
    assert processor.max_slice_nums == 4 and processor.image_feature_size == 32 and processor.use_image_id
    assert processor.get_slice_image_placeholder((300, 300)).count("<unk>") == 32
