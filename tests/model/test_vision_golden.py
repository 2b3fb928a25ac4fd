"""Vision tower, resampler and image processor against the reference's golden vectors (cases b and d)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmo_cli.model.config import MiniCPMOConfig
from minicpmo_cli.model.vision import NavitSiglipVisionTransformer, Resampler, encode_images
from minicpmo_cli.processing.image import MiniCPMVImageProcessor

IMAGE_TAG = "(<image>./</image>)"
AUDIO_TAG = "(<audio>./</audio>)"
CASES = [("b_image_chat", "b_image.png"), ("d_forward", "d_image.png")]


def _submodule_state(state: dict, prefix: str) -> dict:
    return {key[len(prefix) :]: value.float() for key, value in state.items() if key.startswith(prefix)}


@pytest.fixture(scope="module")
def golden_vision(golden_ckpt):
    """(config, {attn: vpm}, resampler, processor) built from the golden checkpoint, float32."""
    from safetensors.torch import load_file

    config = MiniCPMOConfig(**json.loads((golden_ckpt / "config.json").read_text()))
    state = load_file(golden_ckpt / "model.safetensors")
    towers = {}
    for attn in ("sdpa", "eager"):
        vpm = NavitSiglipVisionTransformer(config, attn_implementation=attn).eval()
        vpm.load_state_dict(_submodule_state(state, "vpm."), strict=True)
        towers[attn] = vpm
    dim = config.hidden_size
    resampler = Resampler(config.query_num, dim, dim // 128, config.vision_config.hidden_size).eval()
    resampler.load_state_dict(_submodule_state(state, "resampler."), strict=True)
    processor = MiniCPMVImageProcessor.from_pretrained(golden_ckpt)
    return config, towers, resampler, processor


def _process(processor, golden_ckpt, golden_case, case, image_file):
    """(case json, npz, PIL image, processor output for that one image)."""
    meta, arrays = golden_case(case)
    image = Image.open(golden_ckpt.parent / "cases" / image_file).convert("RGB")
    return meta, arrays, image, processor([[image]])


@pytest.mark.parametrize("case,image_file", CASES)
def test_processor_matches_reference(golden_vision, golden_ckpt, golden_case, case, image_file):
    _, _, _, processor = golden_vision
    meta, arrays, image, out = _process(processor, golden_ckpt, golden_case, case, image_file)
    info = meta["images"][0]
    assert list(image.size) == info["size_wh"]
    assert processor.get_sliced_grid(image.size, processor.max_slice_nums) == info["grid_cols_rows"]
    assert out["image_sizes"] == [[tuple(info["size_wh"])]]
    assert out["tgt_sizes"][0].tolist() == meta["inputs"]["tgt_sizes"]
    pixels = out["pixel_values"][0]
    assert len(pixels) == info["n_pixel_value_entries"] == meta["inputs"]["num_pixel_value_entries"]
    for index, strip in enumerate(pixels):
        expected = arrays[f"pixel_values.{index}"]
        assert strip.dtype == torch.float32 and tuple(strip.shape) == expected.shape
        np.testing.assert_allclose(strip.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case,image_file", CASES)
def test_placeholder_text_matches_prompt(golden_vision, golden_ckpt, golden_case, case, image_file):
    _, _, _, processor = golden_vision
    meta, _ = golden_case(case)
    placeholder = processor.get_slice_image_placeholder(meta["images"][0]["size_wh"], image_idx=0)
    cols, rows = meta["images"][0]["grid_cols_rows"]
    assert placeholder.startswith("<image_id>0</image_id><image>" + "<unk>" * 64 + "</image><slice>")
    assert placeholder.count("<slice>") == cols * rows and placeholder.count("\n") == rows - 1
    # The prompt up to the first audio tag, with the image tag expanded, is what the tokenizer decoded.
    text_before_audio = meta["inputs"]["prompt_text"].split(AUDIO_TAG)[0]
    expanded = text_before_audio.replace(IMAGE_TAG, placeholder)
    assert meta["inputs"]["prompt_expanded"].startswith(expanded)
    if AUDIO_TAG not in meta["inputs"]["prompt_text"]:
        assert meta["inputs"]["prompt_expanded"] == expanded


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case,image_file", CASES)
def test_vision_embeds_match_reference(golden_vision, golden_ckpt, golden_case, case, image_file, attn):
    _, towers, resampler, processor = golden_vision
    _, arrays, _, out = _process(processor, golden_ckpt, golden_case, case, image_file)
    with torch.no_grad():
        embeds = encode_images(towers[attn], resampler, out["pixel_values"], out["tgt_sizes"])
    assert len(embeds) == 1
    expected = arrays["vision_embeds"]
    assert tuple(embeds[0].shape) == expected.shape
    np.testing.assert_allclose(embeds[0].numpy(), expected, rtol=0, atol=1e-4)


def test_vpm_hidden_matches_reference(golden_vision, golden_ckpt, golden_case):
    _, towers, _, processor = golden_vision
    _, arrays, _, out = _process(processor, golden_ckpt, golden_case, "d_forward", "d_image.png")
    sizes = out["tgt_sizes"][0]
    for index, strip in enumerate(out["pixel_values"][0]):
        patches = int(sizes[index].prod())
        mask = torch.ones((1, 1, patches), dtype=torch.bool)
        with torch.no_grad():
            hidden = towers["sdpa"](strip[None], mask, sizes[index : index + 1])
        np.testing.assert_allclose(hidden[0].numpy(), arrays[f"vpm_hidden.{index}"], rtol=0, atol=1e-4)


def test_chunked_and_batched_encoding_agree(golden_vision, golden_ckpt, golden_case):
    """Case b's slices differ in length (padding + key mask); chunking the tower and batching two samples
    (one without images) must not change any sample's embeddings."""
    _, towers, resampler, processor = golden_vision
    _, arrays, image, out = _process(processor, golden_ckpt, golden_case, "b_image_chat", "b_image.png")
    pixel_values = [out["pixel_values"][0], [], out["pixel_values"][0]]
    tgt_sizes = [out["tgt_sizes"][0], torch.zeros((0, 2), dtype=torch.long), out["tgt_sizes"][0]]
    with torch.no_grad():
        embeds = encode_images(towers["sdpa"], resampler, pixel_values, tgt_sizes, vision_batch_size=2)
    assert [tuple(e.shape) for e in embeds] == [(3, 64, 256), (0, 64, 256), (3, 64, 256)]
    for index in (0, 2):
        np.testing.assert_allclose(embeds[index].numpy(), arrays["vision_embeds"], rtol=0, atol=1e-4)


def test_no_images_gives_empty_entries(golden_vision):
    _, towers, resampler, _ = golden_vision
    embeds = encode_images(towers["sdpa"], resampler, [[], []], [[], []])
    assert [tuple(e.shape) for e in embeds] == [(0, 64, 256), (0, 64, 256)]


def test_wide_thumbnail_grows_position_cache(golden_vision):
    """A 3000x500 image has a 13x78 thumbnail: wider than the 70-patch tables of both the tower and the
    resampler. The tower buckets positions into its table; the resampler's sin-cos cache grows."""
    config, towers, resampler, processor = golden_vision
    out = processor([Image.new("RGB", (3000, 500), (120, 30, 200))])
    assert out["tgt_sizes"][0][0].tolist() == [13, 78]
    with torch.no_grad():
        embeds = encode_images(towers["sdpa"], resampler, out["pixel_values"], out["tgt_sizes"])
    assert tuple(embeds[0].shape) == (8, 64, config.hidden_size)
    assert torch.isfinite(embeds[0]).all()
    assert resampler._pos_size[1] >= 78


def test_drop_vision_last_layer_is_honoured(golden_vision):
    config, towers, _, _ = golden_vision
    assert len(towers["sdpa"].encoder.layers) == config.vision_config.num_hidden_layers
    dropped = MiniCPMOConfig(**{**config.to_dict(), "drop_vision_last_layer": True})
    tower = NavitSiglipVisionTransformer(dropped)
    assert len(tower.encoder.layers) == config.vision_config.num_hidden_layers - 1
    assert set(towers["sdpa"].state_dict()) >= set(tower.state_dict())
