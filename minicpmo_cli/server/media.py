"""The media parts of a chat request -> what the model takes (PIL images, 16 kHz samples, video parts).

Images and videos come as data: URLs or http(s) URLs (fetched with a size and a time limit); audio as
base64 ``input_audio`` data (wav, mp3, or any format the decoders read). Each failure is one 400 naming the
part: ``messages[1].content[0]: not an image (...)``.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from minicpmo_cli.errors import MiniCPMOError, describe_error
from minicpmo_cli.server.errors import APIError


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 25 * 1024 * 1024
    timeout: float = 10.0  # seconds for the whole download
    allow_http: bool = True


def b64decode(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: not valid base64 data", param=where) from None


def url_bytes(url: str, where: str, limits: FetchLimits) -> bytes:
    """The bytes behind a data: or http(s) URL."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep:
            raise APIError(400, f"{where}: a data: URL needs a ',' before its data", param=where)
        if header.endswith(";base64"):
            return b64decode(payload, where)
        from urllib.parse import unquote_to_bytes

        return unquote_to_bytes(payload)
    if url.startswith(("http://", "https://")):
        if not limits.allow_http:
            raise APIError(400, f"{where}: this server does not fetch URLs; send a data: URL", param=where)
        return _fetch(url, where, limits)
    raise APIError(400, f"{where}: the URL must be a data: or http(s) URL", param=where)


def _fetch(url: str, where: str, limits: FetchLimits) -> bytes:
    import time

    deadline = time.monotonic() + limits.timeout
    try:
        with urllib.request.urlopen(url, timeout=limits.timeout) as response:  # noqa: S310 - http(s) only
            chunks, size = [], 0
            while True:
                chunk = response.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > limits.max_bytes:
                    raise APIError(413, f"{where}: {url} is larger than {limits.max_bytes} bytes", param=where)
                if time.monotonic() > deadline:
                    raise APIError(400, f"{where}: fetching {url} took longer than {limits.timeout:g} s",
                                   param=where)
                chunks.append(chunk)
            return b"".join(chunks)
    except APIError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise APIError(400, f"{where}: cannot fetch {url} ({reason})", param=where) from None


def decode_image(data: bytes, where: str):
    from minicpmo_cli.media.image import load_image

    try:
        return load_image(data)
    except (MiniCPMOError, OSError, ValueError) as exc:
        raise APIError(400, f"{where}: {_reason(exc)}", param=where) from None


def decode_audio(data: bytes, where: str):
    from minicpmo_cli.media.audio import load_audio

    try:
        samples = load_audio(data)
    except (MiniCPMOError, OSError, ValueError) as exc:
        raise APIError(400, f"{where}: {_reason(exc)}", param=where) from None
    if samples.size == 0:
        raise APIError(400, f"{where}: the audio has no samples", param=where)
    return samples


def video_parts(data: bytes, where: str) -> list[Any]:
    """Frames (1 fps, at most 64) and the sound of a video, as ``chat --video`` attaches them."""
    from minicpmo_cli.api.video import video_message_parts

    handle, name = tempfile.mkstemp(prefix="minicpmo-video-", suffix=".bin")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        parts, _ = video_message_parts(name)
    except (MiniCPMOError, OSError, ValueError) as exc:
        raise APIError(400, f"{where}: {_reason(exc)}", param=where) from None
    finally:
        os.unlink(name)
    if not parts:
        raise APIError(400, f"{where}: the video has no frames", param=where)
    return parts


def _reason(exc: Exception) -> str:
    """The library's message without a leading "<bytes>: "-style name of the input."""
    text = describe_error(exc)
    path = getattr(exc, "path", None)
    return text[len(path) + 2:] if path and text.startswith(f"{path}: ") else text
