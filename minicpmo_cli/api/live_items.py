"""``conversation.item.create`` content -> what the model reads (text, 16 kHz audio, PIL images)."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from minicpmo_cli.api.live_model import pcm16_samples, resample_once
from minicpmo_cli.api.live_session_config import LiveError

MAX_IMAGE_BYTES = 10 * 1024 * 1024


def user_parts(item: dict) -> tuple[list[Any], bool]:
    """(parts in order, whether the item is only an image: a camera frame for the next unit)."""
    if item.get("type", "message") != "message":
        raise LiveError(f"item.type {item.get('type')!r} is not supported (message)", "invalid_value", "item.type")
    if item.get("role") != "user":
        raise LiveError(f"item.role {item.get('role')!r} is not supported: the conversation takes user "
                        "messages (instructions go in session.update)", "invalid_value", "item.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise LiveError("item.content must be a non-empty list of parts", "invalid_value", "item.content")
    parts: list[Any] = []
    for index, part in enumerate(content):
        where = f"item.content[{index}]"
        if not isinstance(part, dict):
            raise LiveError(f"{where} must be an object", "invalid_value", where)
        parts.append(_part(part, where))
    only_images = all(not isinstance(p, (str,)) and getattr(p, "ndim", None) is None for p in parts)
    return parts, only_images


def _part(part: dict, where: str) -> Any:
    kind = part.get("type")
    if kind in ("input_text", "text"):
        text = part.get("text")
        if not isinstance(text, str) or not text:
            raise LiveError(f"{where}.text must be a non-empty string", "invalid_value", f"{where}.text")
        return text
    if kind == "input_audio":
        data = b64_field(part.get("audio"), f"{where}.audio")
        samples = pcm16_samples(data)
        if not len(samples):
            raise LiveError(f"{where}.audio holds no samples", "invalid_value", f"{where}.audio")
        return resample_once(samples)
    if kind == "input_image":
        return _image(part.get("image_url"), f"{where}.image_url")
    raise LiveError(f"{where}.type {kind!r} is not supported (input_text, input_audio, input_image)",
                    "invalid_value", f"{where}.type")


def b64_field(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise LiveError(f"{where} must be a base64 string", "invalid_value", where)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise LiveError(f"{where} is not valid base64", "invalid_value", where) from None


def _image(url: Any, where: str):
    """A ``data:image/...;base64,`` URL -> an RGB PIL image (remote URLs are not fetched in a live session)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
        raise LiveError(f"{where} must be a data URL (data:image/jpeg;base64,...)", "invalid_value", where)
    header, payload = url.split(",", 1)
    if ";base64" not in header:
        raise LiveError(f"{where} must be base64-encoded", "invalid_value", where)
    data = b64_field(payload, where)
    if len(data) > MAX_IMAGE_BYTES:
        raise LiveError(f"{where} is {len(data)} bytes, over {MAX_IMAGE_BYTES}", "invalid_value", where)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise LiveError(f"{where} is not a readable image", "invalid_value", where) from None
