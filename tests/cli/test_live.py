"""`minicpmo live --input FILE` end to end on the tiny checkpoint: locally and through a server (the realtime
websocket), the same seeded answer both ways; --video frames; a bad input is one line."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("live_cli") / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Hello, what can you see right now?"], check=True,
                   capture_output=True)
    return path


def wav_frames(path: Path) -> tuple[int, int]:
    with wave.open(str(path)) as wav:
        return wav.getframerate(), wav.getnframes()


def run_live(cli, tiny_ckpt, *args):
    return cli("--model", tiny_ckpt, "--device", "cpu", "--seed", "5", "live", "--speed", "0", *args)


def test_live_input_locally_and_through_a_server(cli, tiny_ckpt, spoken, tmp_path, monkeypatch):
    from tests.server.conftest import API_KEY, start_server, stop_server

    local_wav = tmp_path / "local.wav"
    result = run_live(cli, tiny_ckpt, "--input", spoken, "-o", local_wav)
    assert result.code == 0, result
    lines = result.stdout.splitlines()
    assert any(line.startswith("assistant: ") and len(line) > len("assistant: ") for line in lines), result
    assert any(line.startswith("user: ") for line in lines), result
    rate, frames = wav_frames(local_wav)
    assert rate == 24000 and frames > 0

    server = start_server(tiny_ckpt, tmp_path / "server", "--api-key", API_KEY)
    try:
        monkeypatch.setenv("MINICPMO_API_KEY", API_KEY)
        remote_wav = tmp_path / "remote.wav"
        remote = cli("--server", server.url, "--seed", "5", "live", "--speed", "0", "--input", spoken,
                     "-o", remote_wav)
        assert remote.code == 0, remote
        assert remote.stdout == result.stdout  # the same seeded conversation, here or on the server
        assert remote_wav.read_bytes() == local_wav.read_bytes()
        monkeypatch.setenv("MINICPMO_API_KEY", "wrong")
        refused = cli("--server", server.url, "live", "--speed", "0", "--input", spoken)
        assert refused.code != 0 and "401" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        stop_server(server)


def test_live_with_video_frames(cli, tiny_ckpt, spoken, tmp_path):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    clip = tmp_path / "camera.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=4", "-t", "3",
                    "-pix_fmt", "yuv420p", str(clip)], check=True)
    out = tmp_path / "answer.wav"
    result = run_live(cli, tiny_ckpt, "--input", spoken, "--video", clip, "-o", out)
    assert result.code == 0, result
    assert "assistant: " in result.stdout and wav_frames(out)[1] > 0


def test_live_bad_input_is_one_line(cli, tiny_ckpt, tmp_path):
    missing = tmp_path / "nothing.wav"
    result = run_live(cli, tiny_ckpt, "--input", missing)
    assert result.code != 0
    assert "nothing.wav" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_ends_cleanly_and_keeps_the_answer(tiny_ckpt, spoken, tmp_path):
    import os
    import signal
    import sys

    out = tmp_path / "answer.wav"
    import numpy as np
    import soundfile

    speech, rate = soundfile.read(str(spoken), dtype="float32")
    source = tmp_path / "long.wav"  # a minute of turns: still streaming when Ctrl-C comes
    soundfile.write(str(source), np.concatenate([speech, np.zeros(rate, np.float32)] * 20), rate)
    process = subprocess.Popen([sys.executable, "-m", "minicpmo_cli", "--model", str(tiny_ckpt), "--device", "cpu",
                                "--seed", "5", "live", "--input", str(source), "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})
    try:
        first = process.stdout.readline().decode()  # the first answer has started (real-time pacing goes on)
        assert first.startswith("assistant: ") or first.startswith("user: "), first
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err.decode()
    assert b"Traceback" not in err
    assert wav_frames(out)[1] > 0


def test_live_without_input_needs_the_microphone_library(cli, tiny_ckpt, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # as if the live extra were not installed
    result = cli("--model", tiny_ckpt, "--device", "cpu", "live")
    assert result.code == 4, result
    assert "sounddevice" in result.stderr and "--input" in result.stderr and "Traceback" not in result.stderr


def test_a_long_local_conversation_forgets_its_oldest_turns(cli, tiny_ckpt, tmp_path):
    """Five spoken turns on an LLM of 320 positions (two turns fill it): the conversation goes on to the end,
    forgetting its oldest turns, with a note on stderr."""
    import numpy as np
    import soundfile

    from minicpmo_cli.media.audio import load_audio
    from tests.server.small_context import small_context_checkpoint

    ckpt = small_context_checkpoint(tiny_ckpt, tmp_path)
    pieces = []
    for index, text in enumerate(["What is the weather like today?", "Tell me about the river.",
                                  "How tall is the old tower?", "Where does the train stop?",
                                  "What did I ask you first?"]):
        path = tmp_path / f"q{index}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        pieces += [load_audio(str(path)), np.zeros(24000, np.float32)]  # 1.5 s of silence ends the turn
    spoken = tmp_path / "conversation.wav"
    soundfile.write(spoken, np.concatenate(pieces), 16000)
    result = cli("--model", ckpt, "--device", "cpu", "--seed", "5", "live", "--speed", "0", "--max-new-tokens",
                 "20", "--input", spoken)
    assert result.code == 0, result
    assert "forgot its" in result.stderr and "outgrew the model's context (320 tokens)" in result.stderr, result
    assert "warning" not in result.stderr, result  # no turn failed
    assert sum(line.startswith("user: ") for line in result.stdout.splitlines()) >= 5, result
