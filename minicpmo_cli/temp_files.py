"""Temp files that are recognisable as ours and swept when their owner is gone (no half files survive a kill).

Every file we write goes through a temp file beside its target, named after the writing process
(``.<name>.minicpmo-<pid>@<host>.<random>.part``), then a rename. A later run removes the temp files of
processes that no longer run, and any untouched for a day.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from pathlib import Path

from minicpmo_cli.errors import OutputError

TEMP_MARKER = "minicpmo"
TEMP_SUFFIX = ".part"
# Longest part of the target's name kept in a temp name: the whole name must stay under NAME_MAX (255).
TEMP_NAME_KEEP = 120
STALE_SECONDS = 24 * 3600  # a temp file untouched this long is stale whoever owns it (pid reuse, other hosts)
LEGACY_STALE_SECONDS = 3600  # temp files of earlier versions (no owner in the name)
_TEMP_RE = re.compile(r"^\..*\." + TEMP_MARKER + r"-(?P<pid>\d+)@(?P<host>[A-Za-z0-9_.-]+)\.[A-Za-z0-9_]{8}"
                      + re.escape(TEMP_SUFFIX) + "$", re.DOTALL)
_LEGACY_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.part$", re.DOTALL)  # tempfile's `.<name>.XXXXXXXX.part`
_swept_folders: set[str] = set()


def host_name() -> str:
    """This machine's name as it appears in temp and claim file names (only safe characters)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() or "localhost")[:64]


def owner_tag() -> str:
    return f"{os.getpid()}@{host_name()}"


def make_temp_file(target: Path) -> tuple[int, str]:
    """An open descriptor and the name of a new temp file beside `target`, named after this process.

    Sweeps the folder's stale temp files first (once per folder and process).
    """
    if target.is_dir():
        raise OutputError("is a directory, cannot write a file there", target)
    folder = target.parent
    sweep_temp_files(folder)
    prefix = f".{target.name[:TEMP_NAME_KEEP]}.{TEMP_MARKER}-{owner_tag()}."
    try:
        # Same folder as the target: os.replace is only atomic within one file system.
        return tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write here ({exc.strerror or exc})", target) from None


def is_temp_name(name: str) -> bool:
    """True for our temp and claim files (and earlier versions' temp files): never inputs or outputs."""
    return bool(_TEMP_RE.match(name) or _LEGACY_TEMP_RE.match(name) or name.endswith(CLAIM_SUFFIX)
                or name.startswith(".minicpmo-probe-"))


def sweep_temp_files(folder: str | os.PathLike[str], force: bool = False) -> list[str]:
    """Remove the temp files in `folder` left by processes that died; returns their names.

    A temp file is stale when its owner (pid on this host) no longer runs, or when it was not touched for
    STALE_SECONDS; files of live writers are left alone (a concurrent run is writing them).
    """
    key = os.path.abspath(folder)
    if key in _swept_folders and not force:
        return []
    _swept_folders.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []  # the write that follows reports the folder's problem
    now = time.time()
    for entry in entries:
        if entry.name.startswith(".") and _is_stale_temp(entry, now):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


def _is_stale_temp(entry: os.DirEntry, now: float) -> bool:
    match = _TEMP_RE.match(entry.name)
    limit = STALE_SECONDS if match else LEGACY_STALE_SECONDS if _LEGACY_TEMP_RE.match(entry.name) else None
    if limit is None:
        return False
    try:
        if not entry.is_file(follow_symlinks=False):
            return False
        age = now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if age > limit:
        return True
    return bool(match) and match["host"] == host_name() and not process_alive(int(match["pid"]))


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


CLAIM_SUFFIX = ".minicpmo-claim"  # claims.py names claim files so; listed here so inputs never pick them


_UMASK: int | None = None


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode open() would have given a new file."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)  # reading the umask requires setting it; restore at once
        os.umask(_UMASK)
    return 0o666 & ~_UMASK
