"""`minicpmo asr` on a long recording streamed (api/asr_stream.py) writes byte for byte the files of the
whole-file path: every format, cue times included. The stream threshold is lowered to 30 s for the test (the
default streams inputs over 20 minutes), and the decoding chunks and VAD calls cut inside speech."""

from __future__ import annotations

import functools
import shutil
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

SENTENCES = ["Good morning everyone and welcome to the meeting.", "Today we talk about the quarterly results.",
             "Sales went up in the northern region.", "Please send me the report before Friday."]


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """About 100 s at 44.1 kHz: sentences with pauses of 0.3 to 2 s (a few shorter than --min-silence-ms)."""
    import soundfile

    from minicpmo_cli.media.audio import load_audio, resample

    folder = tmp_path_factory.mktemp("stream")
    clips = []
    for index, text in enumerate(SENTENCES):
        path = folder / f"s{index}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        clips.append(load_audio(path))
    pauses = [0.3, 2.0, 0.8, 0.3, 1.2]
    parts = [piece for index in range(30)
             for piece in (clips[index % 4], np.zeros(int(pauses[index % 5] * 16000), np.float32))]
    path = folder / "meeting.wav"
    soundfile.write(path, resample(np.concatenate(parts), 16000, 44100), 44100)
    return path


def test_streamed_recording_writes_the_files_of_the_whole_decode(cli, fake_engine, tiny_ckpt, recording, tmp_path,
                                                                 monkeypatch):
    from minicpmo_cli.api import asr_pipeline
    from minicpmo_cli.media import audio, audio_stream, vad_blocks

    run = cli.with_args("--model", tiny_ckpt)
    code, _, err = run("asr", recording, "-o", tmp_path / "whole", "-f", "all", "--batch-size", "3")
    assert code == 0, err

    def no_whole_decode(source, *args, **kwargs):
        raise AssertionError(f"{source} was decoded whole")

    monkeypatch.setattr(asr_pipeline, "Stages", functools.partial(asr_pipeline.Stages, stream_seconds=30.0,
                                                                  ahead_parts=1))
    monkeypatch.setattr(audio, "load_audio", no_whole_decode)
    monkeypatch.setattr(audio_stream, "BLOCK_FRAMES", 7777)
    monkeypatch.setattr(vad_blocks, "BLOCKS_PER_CALL", 2)
    code, _, err = run("asr", recording, "-o", tmp_path / "streamed", "-f", "all", "--batch-size", "3")
    assert code == 0, err
    names = sorted(path.name for path in (tmp_path / "whole").iterdir())
    assert names == [f"meeting.{ext}" for ext in ("json", "jsonl", "srt", "txt", "vtt")]
    assert sorted(path.name for path in (tmp_path / "streamed").iterdir()) == names
    for name in names:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert (tmp_path / "whole" / "meeting.srt").read_text().count(" --> ") >= 10
