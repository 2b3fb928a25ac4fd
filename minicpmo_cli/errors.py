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

    def __init__(self, message: str, path: object | None = None, parameters: tuple[str, ...] = ()) -> None:
        self.path = None if path is None else str(path)
        # The library parameters the message names (e.g. "dtype"): the CLI says them as its flags (--dtype).
        self.parameters = tuple(parameters)
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


def describe_error(exc: BaseException, debug: bool = False) -> str:
    """One line for any failure, in words: an exception's class name never reaches the user (--debug adds
    the traceback instead)."""
    hint = "" if debug else " (run with --debug for details)"
    text = _first_line(exc)
    if isinstance(exc, MiniCPMOError):
        return text
    if isinstance(exc, OSError):
        reason = (exc.strerror or text or "input/output error").lower()
        where = exc.filename if exc.filename is not None else None
        return f"{display_name(where)}: {reason}" if where is not None else reason
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, UnicodeError):
        return f"text that cannot be encoded ({getattr(exc, 'reason', '') or 'invalid characters'})"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory" + (f": {text}" if text else "") + " (try a smaller --batch-size, or --device cpu)"
    return f"unexpected failure{': ' + text if text else ''}{hint}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = f"missing key {exc.args[0]!r}"  # str(KeyError('x')) is just "'x'"
    return valid_text(text.splitlines()[0]) if text else ""
