"""Long inputs streamed through asr (api/asr_stream.py): decoded chunk by chunk, the VAD run over the stream and
the pieces handed on as found give the records of the whole-file path byte for byte (pieces, texts, cue times),
with chunks and VAD calls that cut inside speech; and each stage alone equals its whole-file counterpart."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

SR = 16000
SENTENCES = ["Good morning and welcome to the meeting.", "The weather will be sunny tomorrow.",
             "Please read the first chapter before Monday.", "One two three.",
             "The library opens a new reading room next week, with long tables and quiet corners."]


@pytest.fixture(scope="module")
def talk(tmp_path_factory) -> np.ndarray:
    """About three minutes of speech: pauses from 0.2 s (inside a region) to 2.5 s, and a stretch of over
    30 s without a pause of 0.5 s (a region cut at its quietest points)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from minicpmo_cli.media.audio import load_audio

    folder = tmp_path_factory.mktemp("talk")
    spoken = []
    for index, text in enumerate(SENTENCES):
        path = folder / f"{index}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        spoken.append(load_audio(path))
    rng = np.random.default_rng(5)
    parts = [np.zeros(SR // 3, np.float32)]
    for index in range(48):
        pause = 0.2 if 10 <= index < 22 else float(rng.choice([0.3, 0.6, 1.0, 2.5]))
        parts += [spoken[index % len(spoken)] * (0.5 + 0.5 * rng.random()), np.zeros(int(pause * SR), np.float32)]
    return np.concatenate(parts).astype(np.float32)


@pytest.fixture(scope="module")
def files(talk, tmp_path_factory) -> dict:
    """The talk as a 16 kHz wav (libsndfile, no resampling), a 44.1 kHz stereo wav (soxr's stream) and an
    mp3 (PyAV's frames)."""
    import soundfile

    from minicpmo_cli.media.audio import resample

    folder = tmp_path_factory.mktemp("long")
    paths = {"wav16k": folder / "talk.wav", "stereo44k": folder / "talk44.wav"}
    soundfile.write(paths["wav16k"], talk, SR)
    wide = resample(talk, SR, 44100)
    soundfile.write(paths["stereo44k"], np.stack([wide, 0.5 * wide], axis=1), 44100)
    if shutil.which("ffmpeg"):
        paths["mp3"] = folder / "talk.mp3"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(paths["wav16k"]), "-b:a", "48k",
                        str(paths["mp3"])], check=True)
    return paths


@pytest.fixture(scope="module")
def fake(tiny_ckpt):
    from minicpmo_cli.api.engine import LoadOptions
    from tests.fake_engine import Recorder

    return Recorder().load(LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, audio=True, tts=False)


@pytest.fixture
def small_chunks(monkeypatch):
    """Decoded chunks of 12,345 frames and a VAD call every 3 blocks (~25 s): both cut inside speech."""
    from minicpmo_cli.media import audio_stream, vad_blocks

    monkeypatch.setattr(audio_stream, "BLOCK_FRAMES", 12345)
    monkeypatch.setattr(vad_blocks, "BLOCKS_PER_CALL", 3)


OPTIONS = {"default": {}, "no-vad": {"vad": False, "language": "en"},
           "short pieces": {"min_silence_ms": 200, "max_piece_seconds": 12.0, "piece_pad_ms": 500}}


@pytest.mark.parametrize("kind", ["wav16k", "stereo44k", "mp3"])
@pytest.mark.parametrize("setting", list(OPTIONS))
def test_streamed_long_input_equals_whole_decode(fake, files, small_chunks, monkeypatch, kind, setting):
    from minicpmo_cli.api import asr
    from minicpmo_cli.api.asr_pipeline import Stages
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.media import audio

    if kind not in files:
        pytest.skip("ffmpeg is not installed")
    options = asr.AsrOptions(batch_size=3, **OPTIONS[setting])
    inputs = [asr.AudioInput("long", files[kind]), asr.AudioInput("bytes", files[kind].read_bytes()),
              asr.AudioInput("bad", b"not audio at all")]
    whole = [r.to_dict() for r in asr.transcribe_many(fake, inputs, options, DecodeOptions(),
                                                      stages=Stages(stream_seconds=None))]
    real_load, known = audio.load_audio, []

    def whole_decode_of_short_inputs_only(source, *args, **kwargs):
        assert isinstance(source, bytes) and len(source) < 100, "a long input was decoded whole"
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(audio, "load_audio", whole_decode_of_short_inputs_only)
    streamed = [r.to_dict() for r in asr.transcribe_many(
        fake, inputs, options, DecodeOptions(), stages=Stages(stream_seconds=60.0, ahead_parts=1),
        progress=lambda done, found: known.append(found))]
    assert streamed == whole
    assert whole[0]["duration"] > 150 and len(whole[0]["segments"]) >= 5 and whole[2]["error"]
    assert len(set(known)) > 4  # the long input's pieces reached the model stage in several parts


@pytest.mark.parametrize("min_silence_ms", [500, 3000])
def test_piece_stream_equals_whole_file_pieces(talk, min_silence_ms):
    """processing/segments_stream.py against segments.vad_pieces / fixed_pieces, chunk by chunk, the window
    of samples kept well under the input; with 3 s of silence to end a region the whole talk is one region of
    minutes, cut into pieces while it is still in progress."""
    from minicpmo_cli.media.vad_batch import BatchVAD
    from minicpmo_cli.media.vad_blocks import VadStream
    from minicpmo_cli.processing.segments import fixed_pieces, vad_pieces
    from minicpmo_cli.processing.segments_stream import PieceStream

    vad = BatchVAD("cpu")
    regions = vad.regions([talk], 0.5, min_silence_ms)[0]
    assert (len(regions) == 1) == (min_silence_ms == 3000)
    expected = {True: vad_pieces(talk, regions, SR, 30.0, 0.2), False: fixed_pieces(talk, SR)}
    for vad_on in (True, False):
        for chunk in (4099, 48007):
            stream = PieceStream(VadStream(vad, 0.5, min_silence_ms, blocks_per_call=2) if vad_on else None,
                                 30.0, 0.2)
            found, widest = [], 0
            for start in range(0, len(talk), chunk):
                found += stream.feed(talk[start:start + chunk])
                widest = max(widest, len(stream.window) - stream.window.offset)
            found += stream.finish()
            assert [piece for piece, _ in found] == expected[vad_on]
            assert all(np.array_equal(clip, talk[p.start:p.end]) for p, clip in found)
            assert widest < len(talk) * 2 / 3


def test_stream_decode_equals_whole_decode(files, monkeypatch):
    from minicpmo_cli.media import audio_stream
    from minicpmo_cli.media.audio import load_audio

    monkeypatch.setattr(audio_stream, "BLOCK_FRAMES", 9999)
    for path in files.values():
        chunks = list(audio_stream.stream_audio(path))
        assert len(chunks) > 10
        assert np.array_equal(np.concatenate(chunks), load_audio(path)), path.name
