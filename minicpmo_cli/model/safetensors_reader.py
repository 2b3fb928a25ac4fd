"""Reading safetensors files tensor by tensor into memory we allocate, with every damage named.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a copy touches stays in the
process's resident set until the file is closed, so loading a checkpoint that way holds the weights twice
(the mapped file plus the copies). Reading each tensor's bytes with plain file reads straight into its final
tensor keeps the process at the final size plus at most one tensor (a staging copy when the dtype or device
changes). The format (8-byte little-endian header length, a JSON header of
``name -> {dtype, shape, data_offsets}``, then the data) is checked before any data is read, so a truncated
or garbage file is a one-line error naming the file and what to do, not a SafetensorError.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minicpmo_cli.errors import ModelLoadError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit


class CorruptCheckpoint(ModelLoadError):
    """A weights file that is truncated, garbage or inconsistent with its own header."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int
    file: Path


def repair_advice(path: Path) -> str:
    """What to do about a damaged file: re-download a hub file, or repair a local folder."""
    parts = Path(os.path.abspath(path)).parts
    for i, part in enumerate(parts[:-3]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            repo = part.removeprefix("models--").replace("--", "/", 1)
            revision = parts[i + 2]
            blob = os.path.realpath(path)
            also = f" and {blob}" if blob != os.path.abspath(path) else ""
            return (f"delete it{also}, then run the command again to download it again "
                    f"(--model {repo} --revision {revision[:12]})")
    return (f"copy or convert it again into {Path(path).parent}, or delete that folder and use a hub id "
            "with --model to download the checkpoint")


def broken(path: Path, detail: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"damaged or incomplete weights file ({detail}); {repair_advice(path)}", path)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's dtype, shape and byte range, checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > min(size - 8, _MAX_HEADER):
                raise broken(path, f"no valid safetensors header: {size} bytes")
            raw = handle.read(length)
    except OSError as exc:
        raise ModelLoadError(f"cannot read the weights file ({exc.strerror or exc})", path) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise broken(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise broken(path, "its header is not a JSON object")
    base = 8 + length
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, base, size)
    return entries


def _entry(path: Path, name: str, info, base: int, size: int) -> TensorEntry:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise broken(path, f"bad header entry for tensor {name}") from None
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if begin < 0 or end - begin != nbytes:
        raise broken(path, f"tensor {name}: its byte range does not match its shape {list(shape)}")
    if base + end > size:
        raise broken(path, f"truncated: tensor {name} ends at byte {base + end}, the file has {size} bytes")
    return TensorEntry(name=name, dtype=dtype, shape=shape, start=base + begin, end=base + end, file=path)


def read_into(handle, entry: TensorEntry, out: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous CPU tensor ``out`` (entry's dtype and size) with the entry's bytes."""
    if out.numel() == 0:
        return out
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    handle.seek(entry.start)
    done = 0
    while done < len(view):
        try:
            count = handle.readinto(view[done:])
        except OSError as exc:
            raise ModelLoadError(f"cannot read the weights file ({exc.strerror or exc})", entry.file) from None
        if not count:
            raise broken(entry.file, f"truncated while reading tensor {entry.name}")
        done += count
    return out


def read_tensor(handle, entry: TensorEntry) -> torch.Tensor:
    """A new CPU tensor holding the entry."""
    return read_into(handle, entry, torch.empty(entry.shape, dtype=entry.dtype))


def open_weights(path: Path):
    """An unbuffered binary handle (reads go straight into our tensors)."""
    try:
        return open(path, "rb", buffering=0)
    except OSError as exc:
        raise ModelLoadError(f"cannot open the weights file ({exc.strerror or exc})", path) from None
