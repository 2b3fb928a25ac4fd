"""outputs: exact text of each format, atomic writes, wav files, skip-existing, unwritable destinations."""

from __future__ import annotations

import io
import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest

from minicpmo_cli import outputs
from minicpmo_cli.errors import OutputError, UsageError
from minicpmo_cli.outputs import (
    Segment,
    TranscriptRecord,
    format_timestamp,
    get_writer,
    output_path_for,
    should_skip,
    wav_bytes,
    write_text_atomic,
    write_wav,
)


@pytest.fixture
def record() -> TranscriptRecord:
    return TranscriptRecord(
        path="audio/talk.mp3",
        text="Hello there. 你好。",
        language="en",
        duration=3661.5,
        segments=[Segment(0.0, 1.25, "Hello there."), Segment(1.25, 3661.5, " 你好。")],
    )


EXPECTED = {
    "txt": "Hello there. 你好。\n",
    "srt": (
        "1\n00:00:00,000 --> 00:00:01,250\nHello there.\n\n"
        "2\n00:00:01,250 --> 01:01:01,500\n你好。\n"
    ),
    "vtt": "WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHello there.\n\n00:00:01.250 --> 01:01:01.500\n你好。\n",
}


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt"])
def test_text_formats_exactly(record, fmt):
    assert get_writer(fmt).format(record) == EXPECTED[fmt]


def test_json_and_jsonl(record):
    expected = {
        "path": "audio/talk.mp3",
        "text": "Hello there. 你好。",
        "language": "en",
        "duration": 3661.5,
        "segments": [
            {"start": 0.0, "end": 1.25, "text": "Hello there."},
            {"start": 1.25, "end": 3661.5, "text": " 你好。"},
        ],
        "error": None,
    }
    pretty = get_writer("json").format(record)
    assert json.loads(pretty) == expected and "你好" in pretty  # unicode kept readable
    line = get_writer("jsonl").format(record)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == expected


def test_failed_record_and_record_without_segments():
    failed = TranscriptRecord(path="bad.wav", error="bad.wav: file is empty (0 bytes)")
    assert json.loads(get_writer("jsonl").format(failed))["error"].endswith("(0 bytes)")
    assert get_writer("srt").format(failed) == ""
    plain = TranscriptRecord(path="a.wav", text="Hi.", duration=2.0)
    assert get_writer("srt").format(plain) == "1\n00:00:00,000 --> 00:00:02,000\nHi.\n"


def test_timestamps():
    assert format_timestamp(0) == "00:00:00.000"
    assert format_timestamp(59.9996, ",") == "00:01:00,000"
    assert format_timestamp(3723.004) == "01:02:03.004"


def test_writer_files_named_after_inputs(record, tmp_path):
    out = tmp_path / "new" / "folder"
    written = get_writer("vtt", out).write(record)
    assert written == out / "talk.vtt"
    assert written.read_text(encoding="utf-8") == EXPECTED["vtt"]
    all_files = get_writer("all", out).write(record)
    assert sorted(p.name for p in all_files) == sorted(f"talk.{e}" for e in outputs.TEXT_FORMATS)
    assert sorted(os.listdir(out)) == sorted(p.name for p in all_files)  # no temp files left


def test_write_to_stream(record):
    buffer = io.StringIO()
    get_writer("txt").write_to(buffer, record)
    assert buffer.getvalue() == EXPECTED["txt"]


def test_unknown_format():
    with pytest.raises(UsageError, match="unknown output format"):
        get_writer("docx")


def test_atomic_write_replaces_whole_file_and_cleans_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "first\n")
    write_text_atomic(target, "second\n")
    assert target.read_text() == "second\n" and os.listdir(tmp_path) == ["out.txt"]

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", broken_replace)
    with pytest.raises(OutputError, match="No space left") as info:
        write_text_atomic(target, "third\n")
    assert info.value.path == str(target)
    assert target.read_text() == "second\n"  # the old complete file is untouched
    assert os.listdir(tmp_path) == ["out.txt"]  # and the temp file is gone


def test_interrupt_during_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(tmp_path / "out.txt", "text")
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    path = write_text_atomic(tmp_path / "out.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_unwritable_destinations(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="not a folder") as info:
        get_writer("txt", tmp_path / "a_file")
    assert info.value.path.endswith("a_file")
    with pytest.raises(OutputError, match="cannot write"):
        write_text_atomic(tmp_path / "missing" / "out.txt", "x")
    with pytest.raises(OutputError, match="directory"):
        write_text_atomic(tmp_path, "x")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError):
            write_text_atomic(locked / "out.txt", "x")
    finally:
        locked.chmod(0o700)


def read_wav(data: bytes) -> tuple[wave._wave_params, np.ndarray]:
    with wave.open(io.BytesIO(data), "rb") as wav:
        return wav.getparams(), np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def test_write_wav_is_24k_mono_pcm16_and_clips(tmp_path):
    samples = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, np.nan], dtype=np.float32)
    path = write_wav(tmp_path / "speech.wav", np.tile(samples, 3000))
    params, pcm = read_wav(path.read_bytes())
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 24000)
    assert params.nframes == len(samples) * 3000
    assert pcm[:8].tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767, 0]
    assert os.listdir(tmp_path) == ["speech.wav"]


def test_wav_bytes_for_stdout():
    data = wav_bytes(np.zeros((100, 1), dtype=np.float32), 16000)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    params, pcm = read_wav(data)
    assert params.framerate == 16000 and len(pcm) == 100
    with pytest.raises(ValueError, match="mono"):
        wav_bytes(np.zeros((100, 2)))


def test_output_paths_and_skip_existing(tmp_path):
    assert output_path_for("/data/in/talk.final.mp3", tmp_path, "srt") == tmp_path / "talk.final.srt"
    assert output_path_for("-", tmp_path, ".txt") == tmp_path / "stdin.txt"
    target = Path(tmp_path / "talk.txt")
    assert should_skip(target, overwrite=False) is False
    target.write_text("done\n")
    assert should_skip(target, overwrite=False) is True
    assert should_skip(target, overwrite=True) is False
