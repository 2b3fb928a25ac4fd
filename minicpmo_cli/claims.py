"""Claims on outputs, so that runs sharing an output folder do each input once.

A claim is a file ``.<output>.minicpmo-claim`` beside the output, holding an exclusive `flock` for as long
as its owner works on that output; the file says who (``pid@host``). The kernel drops the lock when the
owner exits in any way (kill -9 included), so a claim of a dead run is simply taken over, and a failed
input's claim is released for the next run. Where file locks are not available (Windows, some network
file systems) every claim is granted: runs then work as before, each doing everything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from minicpmo_cli.temp_files import CLAIM_SUFFIX, owner_tag

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@dataclass
class Claim:
    path: Path
    descriptor: int | None  # None: granted without a lock (locks unsupported here)


class Claimed(Exception):
    """The output is claimed by a live run (its ``pid@host`` is the message)."""


def claim_path(output: str | os.PathLike[str]) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}{CLAIM_SUFFIX}"


def try_claim(output: str | os.PathLike[str]) -> Claim:
    """Claim `output` for this process; raises Claimed when a live run holds it."""
    path = claim_path(output)
    if fcntl is None:
        return Claim(path, None)
    for _ in range(10):  # the file can be replaced between open and lock; then try the new one
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return Claim(path, None)  # the write that follows reports an unwritable folder
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(descriptor)
            os.close(descriptor)
            raise Claimed(owner) from None
        except OSError:  # no locks on this file system
            os.close(descriptor)
            return Claim(path, None)
        if _same_file(descriptor, path):
            try:
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"{owner_tag()}\n".encode())
            except OSError:  # a full disk: no claim file stays behind; the caller names the output
                release(Claim(path, descriptor))
                raise
            return Claim(path, descriptor)
        os.close(descriptor)  # we locked a file its owner had just released and removed
    raise Claimed("unknown")


def release(claim: Claim) -> None:
    """Give the claim up: remove the file while still holding the lock, then unlock."""
    if claim.descriptor is None:
        return
    try:
        os.unlink(claim.path)
    except OSError:
        pass
    os.close(claim.descriptor)
    claim.descriptor = None


def sweep_claims(folder: str | os.PathLike[str]) -> int:
    """Remove the claim files in `folder` that nobody holds (left by killed runs); returns how many."""
    if fcntl is None:
        return 0
    try:
        names = [e.name for e in os.scandir(folder) if e.name.endswith(CLAIM_SUFFIX) and e.name.startswith(".")]
    except OSError:
        return 0
    removed = 0
    for name in names:
        output = Path(folder) / name[1:-len(CLAIM_SUFFIX)]
        try:
            claim = try_claim(output)
        except Claimed:
            continue
        release(claim)
        removed += 1
    return removed


def _read_owner(descriptor: int) -> str:
    try:
        return os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        mine, current = os.fstat(descriptor), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)
