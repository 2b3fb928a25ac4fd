"""Shared fixtures: paths to ../shared (skipped with a reason when absent) and a session-wide tiny checkpoint."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "fixtures" / "golden"
GOLDEN_CKPT = GOLDEN / "checkpoint"
GOLDEN_CASES = GOLDEN / "cases"
REFERENCE = SHARED / "reference"
EXAMPLES = REPO / "examples"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only present in the project's CI and dev checkouts)")
    return path


@pytest.fixture(scope="session")
def golden_ckpt() -> Path:
    return _need(GOLDEN_CKPT)


@pytest.fixture(scope="session")
def golden_case():
    """Load a golden case: returns (json dict, npz mapping) for a case name like 'a_text_chat'."""
    import numpy as np

    def load(name: str):
        meta = json.loads(_need(GOLDEN_CASES / f"{name}.json").read_text())
        arrays = np.load(GOLDEN_CASES / meta.get("npz", f"{name}.npz"))
        return meta, arrays

    return load


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A complete tiny random checkpoint (every tower, tokenizers, Vocos), built once per test session."""
    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    make_tiny_checkpoint(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gptq_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint in the official GPTQ int4 layout (its LLM decoder linears as qweight/qzeros/...)."""
    import shutil

    from minicpmo_cli.model.tiny_gptq import convert_to_gptq

    folder = tmp_path_factory.mktemp("tiny-gptq-checkpoint") / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    convert_to_gptq(folder)
    return folder


# ------------------------------------------------------------------------------------------------ the CLI
class CliResult(tuple):
    """What a `minicpmo` run gave: exit code, stdout, stderr (``code, out, err = cli(...)``; ``.code`` ...), and
    the bytes of both (``.stdout_bytes``: wav bytes, or text that must be valid UTF-8, from a subprocess)."""

    def __new__(cls, code: int, stdout: str, stderr: str, stdout_bytes: bytes | None = None,
                stderr_bytes: bytes | None = None) -> CliResult:
        result = super().__new__(cls, (code, stdout, stderr))
        result.stdout_bytes = stdout.encode() if stdout_bytes is None else stdout_bytes
        result.stderr_bytes = stderr.encode() if stderr_bytes is None else stderr_bytes
        return result

    code = property(lambda self: self[0])
    stdout = property(lambda self: self[1])
    stderr = property(lambda self: self[2])

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stdout={self.stdout[-300:]!r}, stderr={self.stderr[-600:]!r})"


def main_exit_code(*args) -> int:
    """Run the console entry point (``main``) in this process on ``args``; its exit code. The output goes to
    whatever captures it: the ``cli`` fixture below, or pytest (for module-scoped fixtures)."""
    from minicpmo_cli.cli.app import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


class _TerminalInput(io.TextIOWrapper):
    """Scripted keyboard input: a stdin that says it is a terminal (the REPL starts) and reads the script."""

    def isatty(self) -> bool:
        return True


def _stdin(text: str | bytes, tty: bool) -> io.TextIOWrapper:
    data = text.encode() if isinstance(text, str) else text
    return (_TerminalInput if tty else io.TextIOWrapper)(io.BytesIO(data), encoding="utf-8")


class CliRunner:
    """`minicpmo ARGS` in this process, through the console entry point (``main``): argv handling, error lines
    and exit codes are those of the real command. Each run gets the given stdin (empty by default; ``tty``:
    a scripted terminal, for the REPL) and returns a :class:`CliResult`."""

    def __init__(self, capsys, monkeypatch, prefix: tuple[str, ...] = ()) -> None:
        self.capsys, self.monkeypatch, self.prefix = capsys, monkeypatch, prefix

    def __call__(self, *args, stdin: str | bytes = "", tty: bool = False) -> CliResult:
        self.capsys.readouterr()  # what the test printed before is not the command's
        self.monkeypatch.setattr(sys, "stdin", _stdin(stdin, tty))
        code = main_exit_code(*self.prefix, *args)
        out, err = self.capsys.readouterr()
        return CliResult(code, out, err)

    def with_args(self, *args) -> CliRunner:
        """A runner that puts ``args`` (e.g. ``--model DIR --device cpu``) before each run's own."""
        return CliRunner(self.capsys, self.monkeypatch, (*self.prefix, *map(str, args)))


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path_factory) -> CliRunner:
    """The in-process CLI runner, in a temporary home (MINICPMO_HOME: saved voices) and working folder of its
    own (outside the test's ``tmp_path``, which stays the test's to fill and list)."""
    folder = tmp_path_factory.mktemp("cli")
    home, cwd = folder / "home", folder / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("MINICPMO_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.chdir(cwd)
    return CliRunner(capsys, monkeypatch)


def cli_command(*args) -> list:
    """The argv of `python -m minicpmo_cli ARGS` (bytes arguments kept: file names that are not UTF-8)."""
    return [sys.executable, "-m", "minicpmo_cli", *[a if isinstance(a, bytes) else str(a) for a in args]]


def run_cli_process(*args, stdin: str | bytes = b"", env: dict | None = None, cwd=None, timeout: float = 300,
                    prefix: list | None = None) -> CliResult:
    """`python -m minicpmo_cli ARGS` in a subprocess: the real entry point, for the few tests that need a
    process of its own (a fresh interpreter, signals, real pipes and file descriptors, ``prefix``: a command
    to run it under, e.g. setpriv)."""
    import os
    import subprocess

    data = stdin.encode() if isinstance(stdin, str) else stdin
    done = subprocess.run([*(prefix or []), *cli_command(*args)], capture_output=True, input=data,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})}, cwd=cwd, timeout=timeout)
    return CliResult(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"),
                     stdout_bytes=done.stdout, stderr_bytes=done.stderr)


@pytest.fixture
def cli_process():
    """:func:`run_cli_process`, as a fixture."""
    return run_cli_process


@pytest.fixture
def fake_engine(monkeypatch):
    """The fake engine (tests/fake_engine.py) as what the CLI loads; returns its Recorder (loads, calls)."""
    from minicpmo_cli.api import engine as engine_module
    from tests.fake_engine import Recorder

    recorder = Recorder()
    monkeypatch.setattr(engine_module, "load", recorder.load)
    return recorder
