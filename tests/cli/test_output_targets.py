"""`-o` means one thing everywhere: - is stdout, a single input's FILE.ext is that file, the extension names
the format (txt/json/jsonl/srt/vtt for asr; wav/flac/mp3/ogg for speech), anything else is refused in one line.

On the fake engine: the targets and formats are the CLI's, whatever the model says (`tts -o -` on the real
model: test_speech.py's subprocess test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli.ttyrun import noise_wav

FAST = ["--max-new-tokens", "3", "--no-vad"]  # noise stands in for speech: no VAD
SHORT = ["--max-audio-seconds", "0.2", "--seed", "3"]


@pytest.fixture
def cli(cli, fake_engine, tiny_ckpt, tmp_path, monkeypatch):
    """`minicpmo --model <tiny> --device cpu ARGS` in-process on the fake engine, working in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    return cli.with_args("--model", tiny_ckpt, "--device", "cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return noise_wav(tmp_path_factory.mktemp("in") / "talk.wav", 1.0)


def test_asr_dash_is_stdout_not_a_folder(cli, clip, tmp_path):
    code, plain, _ = cli("asr", clip, *FAST)
    assert code == 0
    code, out, err = cli("asr", clip, "-o", "-", *FAST)
    assert code == 0, err
    assert out == plain and out.strip()
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("name, check", [
    ("transcript.txt", lambda text, plain: text == plain),
    ("transcript.srt", lambda text, plain: text.startswith("1\n00:00:00,000 --> 00:00:01,000\n")),
    ("transcript.json", lambda text, plain: json.loads(text)["text"] == plain.strip()),
])
def test_asr_single_input_with_a_file_name_writes_that_file(cli, clip, tmp_path, name, check):
    _, plain, _ = cli("asr", clip, *FAST)
    code, out, err = cli("asr", clip, "-o", name, *FAST)
    assert code == 0, err
    assert out == ""
    target = tmp_path / name
    assert target.is_file(), "a file, not a folder of that name"
    assert check(target.read_text(), plain)


def test_asr_file_name_for_several_inputs_or_another_format_is_refused(cli, clip, tmp_path):
    other = noise_wav(tmp_path / "other.wav", 1.0, seed=4)
    code, _, err = cli("asr", clip, other, "-o", "all.txt", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "2 inputs" in err
    code, _, err = cli("asr", clip, "-o", "x.txt", "-f", "srt", *FAST)
    assert code == 2 and "--format is srt" in err
    assert not (tmp_path / "all.txt").exists() and not (tmp_path / "x.txt").exists()


def test_asr_a_name_without_a_text_extension_is_still_a_folder(cli, clip, tmp_path):
    code, _, err = cli("asr", clip, "-o", "transcripts", *FAST)
    assert code == 0, err
    assert (tmp_path / "transcripts" / "talk.txt").is_file()


def _decode(path: Path):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
        return stream.codec_context.name, container.format.name, stream.rate, samples


def test_tts_writes_the_format_the_extension_names(cli, tmp_path):
    import soundfile

    code, _, err = cli("tts", "Hello there.", "-o", "ref.wav", *SHORT)
    assert code == 0, err
    reference, rate = soundfile.read(tmp_path / "ref.wav", dtype="int16")
    assert rate == 24000 and len(reference) > 0
    for name in ("out.flac", "out.mp3", "out.ogg"):
        code, _, err = cli("tts", "Hello there.", "-o", name, *SHORT)
        assert code == 0, err
        codec, container, _, samples = _decode(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:4] != b"RIFF"
        if name.endswith(".flac"):
            assert codec == "flac"
            flac, flac_rate = soundfile.read(tmp_path / name, dtype="int16")
            assert flac_rate == 24000 and np.array_equal(flac, reference)  # lossless: the wav's samples
        elif name.endswith(".mp3"):
            assert container == "mp3" and codec.startswith("mp3")
            assert abs(len(samples) - len(reference)) <= 2 * 1152 + 529  # encoder padding only
        else:
            assert container == "ogg" and codec == "opus"
            assert abs(len(samples) / 48000 - len(reference) / 24000) < 0.05


def test_speech_output_with_an_unknown_extension_is_one_line(cli, tmp_path):
    for args in (("tts", "Hi.", "-o", "out.txt", *SHORT), ("tts", "Hi.", "-o", "noext", *SHORT),
                 ("chat", "Hi.", "--no-stdin", "--speak", "answer.aac")):
        code, out, err = cli(*args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and ".wav" in err and ".mp3" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == []
