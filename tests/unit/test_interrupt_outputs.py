"""Outputs after an interruption: no empty wav from a stream that never spoke; REPL speech never overwrites."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from minicpmo_cli.outputs import WavStreamWriter


def test_stream_interrupted_before_any_speech_leaves_no_file(tmp_path):
    target = tmp_path / "out.wav"
    with pytest.raises(KeyboardInterrupt):
        with WavStreamWriter(target):
            raise KeyboardInterrupt
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_stream_interrupted_after_speech_keeps_a_valid_wav(tmp_path):
    target = tmp_path / "out.wav"
    with pytest.raises(KeyboardInterrupt):
        with WavStreamWriter(target) as writer:
            writer.write(np.zeros(12800, dtype=np.float32))
            raise KeyboardInterrupt
    with wave.open(str(target)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getnframes()) == (24000, 1, 12800)


def test_repl_speech_files_skip_existing_names(tmp_path):
    from minicpmo_cli.cli.repl import Repl

    (tmp_path / "answer.wav").write_bytes(b"keep")
    (tmp_path / "answer-2.wav").write_bytes(b"keep")
    repl = Repl(engine=None, conversation=None, decode=None, speak_path=tmp_path / "answer.wav")
    assert repl.next_speech_path() == tmp_path / "answer-3.wav"
    assert (tmp_path / "answer.wav").read_bytes() == b"keep"
    assert isinstance(repl.next_speech_path(), Path)
