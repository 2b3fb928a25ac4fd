"""Media I/O: files and bytes <-> arrays (audio samples, PIL images, video frames and units).

Submodules (imported on demand so that `import minicpmo_cli.media` stays cheap):
  audio  load_audio, audio_duration
  vad    speech_regions (Silero VAD), speech_probabilities
  image  load_image
  video  probe_video, sample_frames, iter_video_units, video_units, load_video_audio

This module only holds the checks every loader does before decoding, so that a missing, empty or
unreadable input gives the same one-line message whatever its kind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Union

from minicpmo_cli.errors import InputError

# What a caller may hand a loader: a path, or the raw bytes of a file (e.g. read from stdin).
MediaSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

# How stdin / in-memory inputs are named in error messages.
STDIN_NAME = "<stdin>"

# How many leading bytes are read to guess what kind of file an undecodable input is.
SNIFF_BYTES = 64


def source_name(source: MediaSource) -> str:
    """The name an error message uses for a source: its path, or <stdin> for bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return STDIN_NAME
    return str(source)


def check_readable_file(path: str | os.PathLike[str]) -> Path:
    """Raise InputError unless `path` is an existing, non-empty, readable regular file."""
    file_path = Path(path)
    try:
        mode = os.stat(file_path).st_mode
    except FileNotFoundError:
        raise InputError("file not found", file_path) from None
    except NotADirectoryError:
        raise InputError("file not found (a folder in this path is a file)", file_path) from None
    except PermissionError:
        raise InputError("permission denied (cannot enter a folder of this path)", file_path) from None
    except OSError as exc:  # a symlink loop, a name too long, an I/O error
        raise InputError(f"cannot reach the file ({_reason(exc)})", file_path) from None
    if stat.S_ISDIR(mode):
        raise InputError("is a directory, not a file", file_path)
    try:
        with open(file_path, "rb") as handle:
            first_byte = handle.read(1)
    except PermissionError:
        raise InputError("permission denied (cannot read the file)", file_path) from None
    except OSError as exc:
        raise InputError(f"cannot read the file ({_reason(exc)})", file_path) from None
    if not first_byte:
        raise InputError("file is empty (0 bytes)", file_path)
    return file_path


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def check_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """Raise InputError when in-memory input is empty; return it as bytes."""
    data = bytes(data)
    if not data:
        raise InputError("input is empty (0 bytes)", STDIN_NAME)
    return data


def read_head(source: MediaSource, size: int = SNIFF_BYTES) -> bytes:
    """The first `size` bytes of a source (for guessing its kind in error messages)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:size])
    try:
        with open(source, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


# Signatures of common containers; used only to word error messages well (never to pick a decoder).
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_MEDIA_MAGIC = (b"RIFF", b"fLaC", b"ID3", b"OggS", b"\x1a\x45\xdf\xa3", b"FORM", b"caff")
_MPEG_SYNC = (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xf1", b"\xff\xf9")  # mp3 / adts aac frames


def guess_kind(head: bytes) -> str:
    """'image', 'media' (audio/video container), 'text' or 'unknown' from a file's first bytes."""
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith(_MEDIA_MAGIC) or head[4:8] == b"ftyp" or head[:2] in _MPEG_SYNC:
        return "media"
    text = _decode_utf8_prefix(head)
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "text"
    return "unknown"


def _decode_utf8_prefix(head: bytes) -> str:
    """Decode `head` as UTF-8, forgiving a multi-byte character cut off by the sniffing window."""
    for cut in range(4):
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""
