"""Error types the CLI maps to exit codes (see CLI.md): every message is one line naming the file and the problem."""

from __future__ import annotations

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
        super().__init__(f"{self.path}: {message}" if self.path else message)


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
