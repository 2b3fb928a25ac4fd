"""Small things a new user tripped over: `tts --stream -o - > x.wav` leaves a header with the real length,
and a voice clip outside 5-15 s is saved with a warning."""

from __future__ import annotations

import subprocess
import wave

import numpy as np
import pytest
import soundfile

from tests.conftest import cli_command


def test_stream_to_a_stdout_file_gets_a_true_header(tiny_ckpt, tmp_path):
    target = tmp_path / "x.wav"
    args = cli_command("--model", tiny_ckpt, "--device", "cpu", "--seed", "5", "tts", "Hello there.", "--stream",
                       "-o", "-", "--max-audio-seconds", "0.2")
    with open(target, "wb") as stdout:  # `> x.wav`: a regular file the command can seek in
        done = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    size = target.stat().st_size
    with wave.open(str(target)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.getnframes() == (size - 44) // 2 > 0  # not 0xFFFFFFFF: "89,478 s"
    data = target.read_bytes()
    assert int.from_bytes(data[4:8], "little") == size - 8
    samples, rate = soundfile.read(str(target))
    assert rate == 24000 and len(samples) == (size - 44) // 2


def test_stream_appended_to_a_file_keeps_the_unknown_length(tiny_ckpt, tmp_path):
    """`>> x.wav` (a file opened for appending): writes cannot go back, so the header says 'unknown'."""
    target = tmp_path / "x.wav"
    target.write_bytes(b"")
    args = cli_command("--model", tiny_ckpt, "--device", "cpu", "tts", "Hi.", "--stream", "-o", "-",
                       "--max-audio-seconds", "0.1")
    with open(target, "ab") as stdout:
        done = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    assert target.read_bytes()[40:44] == b"\xff\xff\xff\xff"


def write_clip(path, seconds: float):
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    return path


@pytest.mark.parametrize("seconds, warned", [(2.8, "a shorter one"), (8.0, None), (20.0, "a longer one")])
def test_voices_add_warns_about_a_clip_outside_5_to_15_s(cli, tmp_path, seconds, warned):
    code, _, err = cli("voices", "add", "alice", write_clip(tmp_path / "clip.wav", seconds))
    assert code == 0, err
    assert "saved voice 'alice'" in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "5-15 s" in warnings[0] and warned in warnings[0], err
        assert f"{seconds:.1f} s" in warnings[0]
    assert cli("voices")[1].count("alice") == 1  # saved all the same
