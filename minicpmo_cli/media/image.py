"""Image loading: any file Pillow reads -> an upright RGB PIL image, or an InputError naming the file."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from minicpmo_cli.errors import InputError
from minicpmo_cli.media import (
    MediaSource,
    check_bytes,
    check_readable_file,
    guess_kind,
    read_head,
    source_name,
)

# Largest image we decode: 8192 x 8192 = 67 megapixels (about 200 MB as RGB). Pillow's own default
# (89 MP, warning only) lets a 2 GB bomb through before it errors; the model sees at most a few
# 448-pixel slices anyway, so anything bigger is a mistake or an attack.
MAX_IMAGE_PIXELS = 8192 * 8192

BACKGROUND_RGB = (255, 255, 255)  # transparent pixels are shown on white, as a viewer would
UINT16_TO_UINT8 = 257.0  # 65535 / 255: maps the full 16-bit range onto the full 8-bit range


def load_image(source: MediaSource, max_pixels: int | None = None) -> Image.Image:
    """Open, decode, rotate per EXIF orientation and convert to RGB.

    Raises InputError for: missing, directory, unreadable, empty, not an image, truncated/corrupt,
    and images over `max_pixels` (default MAX_IMAGE_PIXELS; the decompression-bomb guard).
    """
    name = source_name(source)
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, (bytes, bytearray, memoryview)):
        file = io.BytesIO(check_bytes(source))
    else:
        file = check_readable_file(source)
    with warnings.catch_warnings():
        # Pillow warns (instead of failing) between its limit and twice it; we want a clean error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(file) as opened:
                _check_size(opened, max_pixels, name)
                opened.load()
                upright = ImageOps.exif_transpose(opened)
                return to_rgb(upright)
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            message = f"image is too large (over {max_pixels} pixels; a decompression bomb?)"
            raise InputError(message, name) from None
        except UnidentifiedImageError:
            raise InputError(_not_an_image_message(source), name) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # Pillow reports truncation as OSError("image file is truncated ...") and bad data as
            # SyntaxError/ValueError depending on the plugin.
            raise InputError(f"corrupt or truncated image ({_first_line(exc)})", name) from None


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    width, height = image.size
    if width * height > max_pixels:
        pixels = f"{width}x{height} = {width * height} pixels, limit {max_pixels}"
        raise InputError(f"image is too large ({pixels}; a decompression bomb?)", name)


def _not_an_image_message(source: MediaSource) -> str:
    kind = guess_kind(read_head(source))
    if kind == "text":
        return "not an image (looks like text)"
    if kind == "media":
        return "not an image (looks like audio or video)"
    return "not an image (unknown or unsupported format)"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or "unreadable data"
    return text.splitlines()[0]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha composited on white, high bit depths scaled down."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_deep_to_uint8(image), mode="L").convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _deep_to_uint8(image: Image.Image) -> np.ndarray:
    """Grey levels of a 16-bit, 32-bit integer or float image as uint8.

    16-bit modes use their full range (0..65535). Mode I holds 16-bit PNG/TIFF data on older Pillow
    and 8-bit data after some conversions, so its range is taken from its values: up to 255 it is
    already 8-bit. Mode F is usually 0..1 (scaled by 255) or 0..255 (kept).
    """
    values = np.asarray(image, dtype=np.float64)
    mode = image.mode
    if mode.startswith("I;16"):
        scaled = values / UINT16_TO_UINT8
    elif mode == "I":
        scaled = values if values.size == 0 or values.max() <= 255 else values / UINT16_TO_UINT8
    else:
        finite = values[np.isfinite(values)]
        is_unit_range = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
        scaled = np.nan_to_num(values * 255.0 if is_unit_range else values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

