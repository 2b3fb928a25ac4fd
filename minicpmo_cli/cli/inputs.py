"""What INPUT arguments stand for: files, folders (audio/video inside), globs, --files-from lists, stdin.

Listing never stops a batch: a folder that cannot be listed, a path through a folder we may not enter or
through a file becomes an input with its one-line `error`, reported with the other failures (exit 3),
while the rest are done. Our own temp and claim files are never inputs.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from minicpmo_cli.cli import common
from minicpmo_cli.errors import display_name

# What a folder argument contributes: audio files and videos with a sound track (decoded by PyAV).
MEDIA_EXTENSIONS = frozenset(
    ".wav .mp3 .flac .ogg .oga .opus .m4a .aac .wma .aif .aiff .aifc .amr .caf .mka .ac3 .au .spx .webm .mp4 "
    ".m4v .mkv .mov .avi .mpg .mpeg .ts .3gp .flv .wmv".split()
)
MAX_LIST_BYTES = 64 * 1024 * 1024  # --files-from: a list of paths longer than this is not a list of paths


@dataclass
class InputItem:
    """An input path ("-" for stdin) and where its outputs go, relative to -o (sub-folders of a folder)."""

    path: str
    relative_dir: Path = Path(".")
    error: str | None = None  # why it cannot be read, found while listing (reported as a failed input)


def resolve_inputs(args: list[str], files_from: str | None, recursive: bool) -> list[InputItem]:
    """Expand folders and globs, add --files-from lines; missing paths stay in (reported as failures)."""
    if files_from is not None:
        args = args + _read_list(files_from)
    if not args:
        common.fail_usage("no input: give INPUT paths, a folder, a glob, - for stdin, or --files-from")
    if args.count("-") > 1 or ("-" in args and files_from == "-"):
        common.fail_usage("stdin (-) can be read only once")
    items: list[InputItem] = []
    for arg in args:
        items.extend(_expand(arg, recursive))
    unique = list({item.path: item for item in reversed(items)}.values())[::-1]  # first occurrence wins
    if not unique:
        common.fail_usage("no audio or video files found in the given inputs")
    return unique


def os_reason(exc: OSError) -> str:
    """An OSError as the few words a one-line message needs ("permission denied")."""
    return (exc.strerror or str(exc) or "cannot be read").lower()


def _read_list(source: str) -> list[str]:
    from minicpmo_cli.errors import InputError, UsageError

    name = "<stdin>" if source == "-" else source
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_LIST_BYTES + 1)
        else:
            with open(source, "rb") as handle:
                data = handle.read(MAX_LIST_BYTES + 1)
    except OSError as exc:  # unreadable like any other input: a runtime error, not a usage error
        raise InputError(f"--files-from: cannot read it ({os_reason(exc)})", name) from None
    if len(data) > MAX_LIST_BYTES or b"\0" in data:
        raise UsageError("--files-from: not a text list of paths (binary data, or over 64 MB)", name)
    # Paths are bytes to the file system: names that are not UTF-8 round-trip through surrogateescape.
    lines = (line.strip() for line in os.fsdecode(data).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _expand(arg: str, recursive: bool) -> list[InputItem]:
    if arg == "-":
        return [InputItem(arg)]
    try:
        mode = os.stat(arg).st_mode
    except (FileNotFoundError, NotADirectoryError) as exc:
        if glob.has_magic(arg):  # the shell did not expand it (quoted, or Windows): do it here
            return _expand_glob(arg, recursive)
        if isinstance(exc, NotADirectoryError):
            return [InputItem(arg, error="a folder in this path is a file")]
        return [InputItem(arg)]  # missing: the decoder reports it as a failed input, the others go on
    except OSError as exc:  # permission denied on a folder of the path, a symlink loop, a name too long
        return [InputItem(arg, error=f"cannot reach it ({os_reason(exc)})")]
    if stat.S_ISDIR(mode):
        return _folder_items(Path(arg), recursive)
    from minicpmo_cli.temp_files import is_temp_name

    if is_temp_name(os.path.basename(arg)):
        common.warn(f"{display_name(arg)}: a temp file of an unfinished write, not an input: skipped")
        return []
    return [InputItem(arg)]


def _expand_glob(pattern: str, recursive: bool) -> list[InputItem]:
    # `**` means "any depth" as in bash's globstar, with or without --recursive.
    matches = sorted(glob.glob(pattern, recursive=recursive or "**" in pattern))
    if not matches:
        common.warn(f"{display_name(pattern)}: no files match this pattern")
    return [item for match in matches for item in _expand(match, recursive)]


def _folder_items(folder: Path, recursive: bool) -> list[InputItem]:
    files, unlistable = media_files(folder, recursive)
    items = [InputItem(str(path), path.parent.relative_to(folder)) for path in files]
    items += [InputItem(str(path), error=f"cannot list this folder ({reason})") for path, reason in unlistable]
    if not items:
        common.warn(f"{display_name(folder)}: no audio or video files in this folder")
    return items


def media_files(folder: Path, recursive: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The media files under `folder` (sorted), and the folders that could not be listed with the reason."""
    files: list[Path] = []
    unlistable: list[tuple[Path, str]] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of the folders walked: symlink loops end here
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            info = current.stat()
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(current))
        except OSError as exc:
            unlistable.append((current, os_reason(exc)))
            continue
        for entry in entries:
            kind = _entry_kind(entry)
            if kind == "dir" and recursive:
                pending.append(Path(entry.path))
            elif kind == "file" and not entry.name.startswith(".") \
                    and os.path.splitext(entry.name)[1].lower() in MEDIA_EXTENSIONS:
                files.append(Path(entry.path))
    return sorted(files), sorted(unlistable)


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file' (a regular file: never a FIFO or device, which would block or never end) or 'other'."""
    try:
        if entry.is_dir():
            return "dir"
        return "file" if entry.is_file() else "other"
    except OSError:  # a symlink whose target we may not see: let the decoder name the problem
        return "file" if entry.is_symlink() else "other"


# ---------------------------------------------------------------------------------------------- text
MAX_TEXT_BYTES = 64 * 1024 * 1024  # text on stdin or in a --text-file: more is not text for a model to read


def read_text_input(path: str | os.PathLike[str] | None) -> str:
    """UTF-8 text from a file, or stdin for None or "-"; binary data or other encodings are usage errors."""
    from minicpmo_cli.errors import InputError, UsageError

    name = "<stdin>" if path is None or str(path) == "-" else str(path)
    try:
        if name == "<stdin>":
            stream = getattr(sys.stdin, "buffer", None)  # a text-only stdin (a test harness) has no bytes
            data = stream.read(MAX_TEXT_BYTES + 1) if stream is not None else sys.stdin.read().encode()
        else:
            with open(path, "rb") as handle:
                data = handle.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:
        raise InputError("no such file", name) from None
    except OSError as exc:
        raise InputError(f"cannot read it ({os_reason(exc)})", name) from None
    if len(data) > MAX_TEXT_BYTES:
        raise UsageError(f"the text is over {MAX_TEXT_BYTES // (1024 * 1024)} MB, the most that is read", name)
    return decode_text(data, name)


def decode_text(data: bytes, name: str) -> str:
    from minicpmo_cli.errors import UsageError

    try:
        text = data.decode("utf-8-sig")  # a byte-order mark some editors write is not part of the text
    except UnicodeDecodeError as exc:
        raise UsageError(f"not UTF-8 text (byte {exc.start} is not; binary data?)", name) from None
    if "\0" in text:
        raise UsageError("not UTF-8 text (it holds NUL bytes: binary data?)", name)
    return text


def check_text_argument(text: str | None, what: str) -> str | None:
    """An argument from the command line: bytes that were not UTF-8 reach Python as lone surrogates."""
    from minicpmo_cli.errors import UsageError

    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{what} is not UTF-8 text") from None
    return text
