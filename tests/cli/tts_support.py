"""What the `minicpmo tts` CLI tests share: the speech commands registered on the app, a runner of the CLI on
the tiny checkpoint with a temp home, and a reader of the 24 kHz mono 16-bit wavs it writes."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module", autouse=True)
def speech_commands():
    from minicpmo_cli.cli import speech
    from minicpmo_cli.cli.app import app

    if not any(getattr(c.callback, "__name__", "") == "tts" for c in app.registered_commands):
        speech.register(app)


@pytest.fixture
def cli(tiny_ckpt, capsys, tmp_path, monkeypatch):
    from minicpmo_cli.cli.app import main

    monkeypatch.setenv("MINICPMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_COLOR", "1")

    def run(*args):
        code = 0
        try:
            main(["--model", str(tiny_ckpt), "--device", "cpu", *map(str, args)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def read_pcm16(path) -> np.ndarray:
    import soundfile

    info = soundfile.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 24000, 1)
    samples, _ = soundfile.read(str(path), dtype="int16")
    return samples
