"""media.image: EXIF orientation, every Pillow mode to RGB, decompression-bomb guard, error messages."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from minicpmo_cli.errors import InputError
from minicpmo_cli.media import image as image_module
from minicpmo_cli.media.image import load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel((x, y)))


def close_to(actual, expected, tolerance=6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)
    assert close_to(pixel(loaded, 10, 5), RED)  # the left half is now on top
    assert close_to(pixel(loaded, 10, 35), BLUE)


def test_rgb_passes_through_and_bytes_input(tmp_path):
    Image.new("RGB", (5, 4), (10, 20, 30)).save(tmp_path / "plain.png")
    from_path = load_image(tmp_path / "plain.png")
    from_bytes = load_image((tmp_path / "plain.png").read_bytes())
    assert from_path.mode == from_bytes.mode == "RGB" and from_path.size == (5, 4)
    assert pixel(from_bytes, 4, 3) == (10, 20, 30)


def alpha_image(mode: str) -> Image.Image:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # left pixel transparent
    rgba.putpixel((1, 0), (200, 0, 0, 255) if mode == "RGBA" else (100, 100, 100, 255))
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize(
    ("mode", "opaque"),
    [("RGBA", (200, 0, 0)), ("LA", (100, 100, 100)), ("PA", (100, 100, 100))],
)
def test_alpha_is_composited_on_white(mode, opaque):
    converted = image_module.to_rgb(alpha_image(mode))
    assert converted.mode == "RGB"
    assert pixel(converted, 0, 0) == WHITE
    assert pixel(converted, 1, 0) == opaque


def test_palette_with_transparency_from_file(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)  # index 0 is transparent
    loaded = load_image(tmp_path / "palette.png")
    assert pixel(loaded, 0, 0) == WHITE
    assert pixel(loaded, 1, 0) == (0, 200, 0)


def test_sixteen_bit_grey_uses_full_range(tmp_path):
    values = np.array([[0, 65535, 32896, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    loaded = load_image(tmp_path / "deep.png")
    assert [pixel(loaded, x, 0) for x in range(4)] == [(0,) * 3, (255,) * 3, (128,) * 3, (4,) * 3]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.fromarray(np.array([[0, 65535, 257 * 100]], dtype=np.int32), mode="I"), [0, 255, 100]),
        (Image.fromarray(np.array([[0, 255, 100]], dtype=np.int32), mode="I"), [0, 255, 100]),
        (Image.fromarray(np.array([[0.0, 1.0, 0.5]], dtype=np.float32), mode="F"), [0, 255, 128]),
        (Image.fromarray(np.array([[0.0, 300.0, 50.0]], dtype=np.float32), mode="F"), [0, 255, 50]),
        (Image.fromarray(np.array([[0, 255, 7]], dtype=np.uint8), mode="L"), [0, 255, 7]),
        (Image.frombytes("1", (3, 1), bytes([0b01000000])), [0, 255, 0]),
    ],
    ids=["I-16bit-data", "I-8bit-data", "F-unit", "F-0-255", "L", "1"],
)
def test_grey_modes(image, expected):
    converted = image_module.to_rgb(image)
    assert converted.mode == "RGB"
    assert [pixel(converted, x, 0) for x in range(3)] == [(v,) * 3 for v in expected]


def test_cmyk(tmp_path):
    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=95)
    loaded = load_image(tmp_path / "print.jpg")
    assert loaded.mode == "RGB"
    assert close_to(pixel(loaded, 1, 1), RED, tolerance=10)


def test_bomb_guard_with_a_lowered_limit(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "big.png", max_pixels=9_999)
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 5_000)
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)


def test_pillows_own_bomb_warning_becomes_an_error(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # warns between 6k and 12k pixels
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "big.png", max_pixels=10**9)


def test_missing_empty_directory(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello, this is text\n")
    with pytest.raises(InputError, match="not an image.*text") as info:
        load_image(tmp_path / "notes.jpg")
    assert info.value.path.endswith("notes.jpg")
    with pytest.raises(InputError, match="not an image"):
        load_image(b"\x00\x01\x02 random bytes")


def test_truncated_and_corrupt(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(tmp_path / "half.png")
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    data = bytearray((tmp_path / "full.jpg").read_bytes())
    (tmp_path / "cut.jpg").write_bytes(bytes(data[:200]))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")
