"""`minicpmo tts --stream` end to end on the tiny checkpoint: the wav is written chunk by chunk as the
streaming schedule makes it, equals the library's ``speak_stream`` for the same seed, keeps its length (the
codes) for any chunk sizes, and bad chunk options are one-line usage errors (exit 2)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np

TEXT = "Hello world. This is a test."
SHORT = ["--max-audio-seconds", "0.2", "--seed", "5"]


from tts_support import cli, read_pcm16, speech_commands  # noqa: F401 - fixtures shared with the other tts tests


def library_stream(tiny_ckpt, **chunks) -> np.ndarray:
    from minicpmo_cli import api
    from minicpmo_cli.api.speech import frames_for_seconds, speak_stream

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, tts=True)
    pieces = list(speak_stream(engine, TEXT, max_frames=frames_for_seconds(0.2), seed=5, **chunks))
    assert len(pieces) >= 2 and all(p.dtype == np.float32 for p in pieces)
    return np.concatenate(pieces)


def pcm(samples: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)


def test_stream_writes_the_library_stream_to_a_wav(cli, tiny_ckpt, tmp_path):
    target = tmp_path / "streamed.wav"
    code, out, err = cli("-v", "tts", TEXT, "--stream", "-o", target, *SHORT)
    assert code == 0, err
    assert out == "" and f"wrote {target}" in err and "first audio after" in err
    samples = read_pcm16(target)
    expected = library_stream(tiny_ckpt)
    assert len(samples) == len(expected) > 0 and len(samples) % 512 == 0  # whole 512-sample frames
    assert np.array_equal(samples, pcm(expected))

    other = tmp_path / "small-chunks.wav"
    code, _, err = cli("tts", TEXT, "--stream", "--first-chunk-frames", "10", "--chunk-frames", "15", "-o", other,
                       *SHORT)
    assert code == 0, err
    assert len(read_pcm16(other)) == len(samples)  # the same codes, decoded in other chunks


def test_stream_to_stdout(tiny_ckpt):
    env = {**os.environ, "NO_COLOR": "1"}
    cmd = [sys.executable, "-c", "from minicpmo_cli.cli import speech, app as a; import sys;"
           "any(getattr(c.callback, '__name__', '') == 'tts' for c in a.app.registered_commands) "
           "or speech.register(a.app); a.main(sys.argv[1:])",
           "--model", str(tiny_ckpt), "--device", "cpu", "tts", TEXT, "--stream", "-o", "-", *SHORT]
    result = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    head = result.stdout[:44]
    assert head[:4] == b"RIFF" and head[8:16] == b"WAVEfmt " and head[36:40] == b"data"
    assert struct.unpack("<IHHIIHH", head[16:36]) == (16, 1, 1, 24000, 48000, 2, 16)
    assert struct.unpack("<I", head[40:44])[0] == 0xFFFFFFFF  # a stream: the length is not known up front
    samples = np.frombuffer(result.stdout[44:], dtype="<i2")
    assert np.array_equal(samples, pcm(library_stream(tiny_ckpt)))


def test_stream_option_errors(cli, tmp_path):
    out = tmp_path / "o.wav"
    cases = [
        (["--stream", "--first-chunk-frames", "3", "-o", out], "--first-chunk-frames"),
        (["--stream", "--chunk-frames", "0", "-o", out], "--chunk-frames"),
        (["--chunk-frames", "10", "-o", out], "--chunk-frames sets the chunks of streamed speech: add --stream"),
        (["--stream", "--lines", "-o", tmp_path], "does not combine with --lines"),
        (["--stream", "--no-verbatim", "-o", out], "does not combine with --no-verbatim"),
        (["--stream", "-o", tmp_path / "o.mp3"], "name a .wav file"),
    ]
    for args, message in cases:
        code, _, err = cli("tts", "Hi.", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not out.exists()
