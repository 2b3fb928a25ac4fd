"""No failure reaches the user as an exception's class name: each becomes one line in words and an exit code.

Representative failures from every family (OSError and its kinds, UnicodeError, MemoryError, a third-party
library's own exception, plain Python errors) are raised where a command loads the model, through the
console entry point; the static check below keeps class names out of the messages the code writes.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from minicpmo_cli.cli import app as app_module
from minicpmo_cli.cli import common

CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Warning)\b|Traceback")


class SafetensorError(Exception):
    """Stands for a third-party library's own exception type."""


FAILURES = [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.txt"), 1, "/data/out.txt: no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "model.safetensors"), 1,
     "model.safetensors: permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), 1, "is a directory"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 1, "not UTF-8 text"),
    (UnicodeEncodeError("ascii", "\xe9", 0, 1, "ordinal not in range(128)"), 1, "cannot be encoded"),
    (MemoryError(), 4, "out of memory"),
    (SafetensorError("Error while deserializing header: HeaderTooLarge"), 1,
     "unexpected failure: Error while deserializing header"),
    (KeyError("vision_config"), 1, "missing key 'vision_config'"),
    (ValueError(""), 1, "unexpected failure (run with --debug"),
    (RuntimeError("shape mismatch\nsecond line"), 1, "unexpected failure: shape mismatch (run with --debug"),
]


@pytest.mark.parametrize("exc, code, words", FAILURES, ids=[type(f[0]).__name__ for f in FAILURES])
def test_failures_are_one_line_in_words(cli, exc, code, words, monkeypatch, tmp_path):
    def failing_load(**towers):
        raise exc

    monkeypatch.setattr(common, "load_engine", failing_load)
    exit_code, _, err = cli("tts", "Hello.", "-o", tmp_path / "x.wav")
    assert exit_code == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minicpmo: error: ") and words in lines[0], err
    assert not CLASS_NAME.search(err), err


def test_python_warnings_are_one_line_without_their_category(cli, monkeypatch, tmp_path):
    import warnings

    def warning_load(**towers):
        warnings.warn("TypedStorage is deprecated", UserWarning)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(common, "load_engine", warning_load)
    _, _, err = cli("tts", "Hello.", "-o", tmp_path / "x.wav")
    assert err.splitlines() == ["warning: TypedStorage is deprecated", "minicpmo: error: input/output error"]


def test_no_message_in_the_code_names_an_exception_class():
    """Messages are built from words, never from ``type(exc).__name__`` (the entry point only matches on it)."""
    package = Path(app_module.__file__).resolve().parents[1]
    offenders = []
    for path in package.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"type\(exc\)\.__name__|exc\.__class__\.__name__", line) and " == " not in line \
                    and "!=" not in line:
                offenders.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert offenders == []
