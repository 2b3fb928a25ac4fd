"""The media parts of a chat request -> what the model takes (PIL images, 16 kHz samples, video parts).

Images and videos come as data: URLs or http(s) URLs (fetched by server/fetch.py: public addresses only,
a size and a time limit); audio as base64 ``input_audio`` data (wav, mp3, or any format the decoders read),
refused from its header's duration when longer than the request may hold. Each failure is one 400 naming
the part: ``messages[1].content[0]: not an image (...)``; a fetched URL that fails in any way, decoding
included, gets one text whatever the reason (a client must not map the network through our error texts).

Everything here blocks (network, decoding): the routes call it off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from typing import Any, Callable

from minicpmo_cli.errors import MiniCPMOError, describe_error
from minicpmo_cli.server.errors import APIError
from minicpmo_cli.server.fetch import FetchFailed, FetchLimits, fetch

__all__ = ["FetchLimits", "b64decode", "url_bytes", "decode_image", "decode_audio", "video_parts",
           "image_from_url", "video_from_url", "check_audio_length", "MAX_REFERENCE_SECONDS"]
MAX_REFERENCE_SECONDS = 300.0  # a reference voice (speech's reference_audio): a few seconds are enough
logger = logging.getLogger("minicpmo_cli.server")


def b64decode(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: not valid base64 data", param=where) from None


def _data_url_bytes(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise APIError(400, f"{where}: a data: URL needs a ',' before its data", param=where)
    if header.endswith(";base64"):
        return b64decode(payload, where)
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(payload)


def _check_url(url: str, where: str, limits: FetchLimits) -> None:
    if url.startswith("data:"):
        return
    if url.lower().startswith(("http://", "https://")):
        if not limits.allow_http:
            raise APIError(400, f"{where}: this server does not fetch URLs (serve --no-url-fetch); send a data: URL",
                           param=where)
        return
    raise APIError(400, f"{where}: the URL must be a data: or http(s) URL", param=where)


def _fetch_failed(where: str, limits: FetchLimits, url: str, reason: str) -> APIError:
    logger.warning("%s: fetching %s failed: %s", where, url[:200], reason)
    return APIError(400, f"{where}: {limits.failure()}", param=where, code="url_fetch_failed")


def url_bytes(url: str, where: str, limits: FetchLimits) -> bytes:
    """The bytes behind a data: or http(s) URL."""
    _check_url(url, where, limits)
    if url.startswith("data:"):
        return _data_url_bytes(url, where)
    try:
        return fetch(url, limits)
    except FetchFailed as exc:
        raise _fetch_failed(where, limits, url, str(exc)) from None


def _from_url(url: str, where: str, limits: FetchLimits, decode: Callable[[bytes, str], Any]) -> Any:
    data = url_bytes(url, where, limits)
    if url.startswith("data:"):
        return decode(data, where)
    try:
        return decode(data, where)
    except APIError as exc:  # "not an image", "looks like text": the same one text as any failed fetch
        raise _fetch_failed(where, limits, url, exc.message) from None


def image_from_url(url: str, where: str, limits: FetchLimits):
    return _from_url(url, where, limits, decode_image)


def video_from_url(url: str, where: str, limits: FetchLimits, **sampling: Any) -> list[Any]:
    """``sampling``: ``fps`` and ``max_frames`` when the part asks for other than 1 fps and 64 frames."""
    return _from_url(url, where, limits,
                     lambda data, at: video_parts(data, at, limits.max_audio_seconds, **sampling))


def decode_image(data: bytes, where: str):
    from minicpmo_cli.media.image import load_image

    try:
        return load_image(data)
    except (MiniCPMOError, OSError, ValueError) as exc:
        raise APIError(400, f"{where}: {_reason(exc)}", param=where) from None


def decode_audio(data: bytes, where: str, max_seconds: float | None = None):
    """16 kHz samples; audio longer than ``max_seconds`` is a 413 naming the limit, refused before decoding."""
    from minicpmo_cli.media.audio import AudioTooLong, load_audio

    try:
        samples = load_audio(data, max_seconds=max_seconds)
    except AudioTooLong as exc:
        raise APIError(413, f"{where}: {_reason(exc)}", param=where, code="audio_too_long") from None
    except (MiniCPMOError, OSError, ValueError) as exc:
        raise APIError(400, f"{where}: {_reason(exc)}", param=where) from None
    if samples.size == 0:
        raise APIError(400, f"{where}: the audio has no samples", param=where)
    return samples


def check_audio_length(data: bytes, where: str, max_seconds: float) -> None:
    """413 for audio longer than ``max_seconds``: from the header when it says, else by a capped decode (whose
    memory the cap bounds). Unreadable audio is left for the real decode to word."""
    from minicpmo_cli.media.audio import header_seconds

    try:
        seconds = header_seconds(data)
    except (MiniCPMOError, OSError, ValueError):
        return
    if seconds is None:
        try:
            decode_audio(data, where, max_seconds)
        except APIError as exc:
            if exc.status == 413:
                raise
    elif seconds > max_seconds:
        raise APIError(413, f"{where}: the audio is {seconds:.0f} s long, over this server's limit of "
                            f"{max_seconds:g} s", param=where, code="audio_too_long")


def video_parts(data: bytes, where: str, max_audio_seconds: float | None = None, fps: float | None = None,
                max_frames: int | None = None) -> list[Any]:
    """Frames (1 fps, at most 64, unless ``fps`` / ``max_frames`` say otherwise) and the sound of a video, as
    ``chat --video`` attaches them. A sound track longer than ``max_audio_seconds`` (by the container's header)
    is a 413 before anything is decoded."""
    from minicpmo_cli.api.video import DEFAULT_FPS, MAX_FRAMES, video_message_parts
    from minicpmo_cli.media.video import probe_video

    handle, name = tempfile.mkstemp(prefix="minicpmo-video-", suffix=".bin")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        if max_audio_seconds is not None:
            info = probe_video(name)
            if info.has_audio and info.duration > max_audio_seconds:
                raise APIError(413, f"{where}: the video's sound is {info.duration:.0f} s long, over the limit of "
                                    f"{max_audio_seconds:g} s", param=where, code="audio_too_long")
        parts, _ = video_message_parts(name, max_frames=max_frames or MAX_FRAMES, fps=fps or DEFAULT_FPS)
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
