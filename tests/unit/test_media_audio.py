"""media.audio: decoding every supported format to 16 kHz mono float32, and its errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from minicpmo_cli.errors import InputError
from minicpmo_cli.media.audio import audio_duration, load_audio, resample
from minicpmo_cli.units import INPUT_SAMPLE_RATE

TONE_HZ = 440.0
TONE_SECONDS = 1.5
SOURCE_RATE = 44100

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def dominant_frequency(samples: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1.0 / sr)[np.argmax(spectrum)])


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """A stereo 44.1 kHz tone as wav, plus (with ffmpeg) every compressed format and a video."""
    folder = tmp_path_factory.mktemp("audio")
    t = np.arange(int(TONE_SECONDS * SOURCE_RATE)) / SOURCE_RATE
    tone = 0.5 * np.sin(2 * np.pi * TONE_HZ * t)
    soundfile.write(folder / "tone.wav", np.stack([tone, tone], axis=1), SOURCE_RATE, subtype="PCM_16")
    soundfile.write(folder / "tone.flac", np.stack([tone, tone], axis=1), SOURCE_RATE)
    if shutil.which("ffmpeg"):
        wav = str(folder / "tone.wav")
        ffmpeg("-i", wav, "-c:a", "libmp3lame", str(folder / "tone.mp3"))
        ffmpeg("-i", wav, "-c:a", "libvorbis", str(folder / "tone.ogg"))
        ffmpeg("-i", wav, "-c:a", "libopus", str(folder / "tone.opus"))
        ffmpeg("-i", wav, "-c:a", "aac", str(folder / "tone.m4a"))
        video = ["-f", "lavfi", "-i", f"testsrc=duration={TONE_SECONDS}:size=64x48:rate=5"]
        ffmpeg(*video, "-i", wav, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
               str(folder / "tone.mp4"))
        ffmpeg(*video, "-i", wav, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "libopus", "-shortest",
               str(folder / "tone.mkv"))
        ffmpeg(*video, "-c:v", "libx264", "-pix_fmt", "yuv420p", str(folder / "silent.mp4"))
    return folder


def check_tone(samples: np.ndarray) -> None:
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    # Lossy codecs add up to a few frames of priming/padding; never more than 0.1 s.
    assert abs(audio_duration(samples) - TONE_SECONDS) < 0.1
    assert abs(dominant_frequency(samples, INPUT_SAMPLE_RATE) - TONE_HZ) < 2.0
    assert 0.4 < np.abs(samples).max() < 0.6  # the tone's amplitude (0.5) survives decode + resample


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_lossless_formats(media_dir, suffix):
    samples = load_audio(media_dir / f"tone.{suffix}")
    check_tone(samples)
    assert len(samples) == int(TONE_SECONDS * INPUT_SAMPLE_RATE)


@needs_ffmpeg
@pytest.mark.parametrize("suffix", ["mp3", "ogg", "opus", "m4a", "mp4", "mkv"])
def test_compressed_formats_and_video_tracks(media_dir, suffix):
    check_tone(load_audio(media_dir / f"tone.{suffix}"))


@needs_ffmpeg
@pytest.mark.parametrize("suffix", ["wav", "m4a"])
def test_bytes_input_matches_file_input(media_dir, suffix):
    path = media_dir / f"tone.{suffix}"
    np.testing.assert_array_equal(load_audio(path.read_bytes()), load_audio(path))


def test_resamples_to_requested_rate_and_mixes_channels_by_mean(tmp_path):
    rate = 8000
    left = 0.6 * np.sin(2 * np.pi * 300 * np.arange(rate) / rate)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, np.zeros_like(left)], axis=1), rate, subtype="FLOAT")
    samples = load_audio(path)
    assert len(samples) == 2 * rate  # 1 s at 16 kHz
    assert abs(np.abs(samples[2000:-2000]).max() - 0.3) < 0.01  # (left + 0) / 2
    native = load_audio(path, sr=rate)
    np.testing.assert_allclose(native, (left / 2).astype(np.float32), atol=1e-6)


def test_resample_is_identity_at_same_rate():
    samples = np.linspace(-1, 1, 100, dtype=np.float32)
    np.testing.assert_array_equal(resample(samples, 16000, 16000), samples)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found") as info:
        load_audio(tmp_path / "nope.wav")
    assert info.value.path.endswith("nope.wav")


def test_empty_file_and_empty_bytes(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(InputError, match="empty") as info:
        load_audio(b"")
    assert info.value.path == "<stdin>"


def test_directory(tmp_path):
    with pytest.raises(InputError, match="directory"):
        load_audio(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.wav"
    path.write_bytes(b"RIFF....")
    path.chmod(0)
    with pytest.raises(InputError, match="permission"):
        load_audio(path)


def test_text_and_image_files_are_not_audio(tmp_path):
    (tmp_path / "notes.wav").write_text("these are not samples\n")
    with pytest.raises(InputError, match="not an audio file.*text"):
        load_audio(tmp_path / "notes.wav")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "picture.png")
    with pytest.raises(InputError, match="not an audio file.*image"):
        load_audio(tmp_path / "picture.png")


def test_corrupt_files(media_dir, tmp_path):
    header_only = tmp_path / "cut.wav"
    header_only.write_bytes((media_dir / "tone.wav").read_bytes()[:30])
    with pytest.raises(InputError, match="corrupt"):
        load_audio(header_only)
    garbage = tmp_path / "garbage.flac"
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    garbage.write_bytes((media_dir / "tone.flac").read_bytes()[:200] + noise)
    with pytest.raises(InputError, match="corrupt"):
        load_audio(garbage)


@needs_ffmpeg
def test_video_without_audio_track(media_dir):
    with pytest.raises(InputError, match="no audio track") as info:
        load_audio(media_dir / "silent.mp4")
    assert "silent.mp4" in str(info.value)
