"""Error types the CLI maps to exit codes (see CLI.md): every message is one line naming the file and the problem."""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_ENVIRONMENT = 4
EXIT_INTERRUPTED = 130


class MiniCPMOError(Exception):
    """Base class: a user-facing failure with a one-line message and an exit code."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{display_name(self.path)}: {message}" if self.path else message)


def display_name(path: str | os.PathLike[str] | bytes) -> str:
    """A path as valid, readable text: bytes that are not UTF-8 (kept as surrogates by the OS layer) become
    U+FFFD. For messages and stdout; the file itself is always opened by its real name."""
    try:
        return os.fsencode(path).decode("utf-8", "replace")
    except (TypeError, UnicodeError):
        return valid_text(str(path))


def valid_text(text: str) -> str:
    """`text` made valid UTF-8: surrogates that stand for undecodable bytes (and any other lone surrogate)
    become U+FFFD. A no-op for ordinary text."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if all(
            not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text) else \
            text.encode("utf-8", "replace").decode("utf-8")


class InputError(MiniCPMOError):
    """A bad input file or value: missing, empty, unreadable, corrupt, wrong kind."""

    exit_code = EXIT_RUNTIME


class UsageError(MiniCPMOError):
    """Options that do not fit together, or a missing argument."""

    exit_code = EXIT_USAGE


class ModelLoadError(MiniCPMOError):
    """The checkpoint cannot be found or loaded (missing files, wrong layout, offline without cache)."""

    exit_code = EXIT_RUNTIME


class HubUnavailable(ModelLoadError):
    """A hub checkpoint that is not cached and cannot be downloaded (no network, or offline): the environment."""

    exit_code = EXIT_ENVIRONMENT


class EnvironmentProblem(MiniCPMOError):
    """No usable device, out of memory, or a missing optional dependency."""

    exit_code = EXIT_ENVIRONMENT


class OutputError(MiniCPMOError):
    """An output path that cannot be written."""

    exit_code = EXIT_RUNTIME


class PartialFailure(MiniCPMOError):
    """A batch in which some inputs failed while the others were done."""

    exit_code = EXIT_PARTIAL
