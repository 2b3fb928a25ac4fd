"""media.video: probing, 1 fps sampling with the uniform cap, omni units with and without sound, errors.

The test video's frame k is a flat grey of level GREY_STEP * k, so each returned frame tells which
source frame it is.
"""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmo_cli.errors import InputError
from minicpmo_cli.media.video import (
    iter_video_units,
    load_video_audio,
    probe_video,
    sample_frames,
    uniform_sample,
    video_units,
)
from minicpmo_cli.units import INPUT_SAMPLE_RATE

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")

FPS = 4
SECONDS = 6
GREY_STEP = 10
TONE_HZ = 330


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> types.SimpleNamespace:
    folder = tmp_path_factory.mktemp("video")
    for index in range(FPS * SECONDS):
        Image.new("RGB", (64, 48), (GREY_STEP * index,) * 3).save(folder / f"{index:03d}.png")
    frames = ["-framerate", str(FPS), "-i", str(folder / "%03d.png")]
    h264 = ["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p"]
    tone = ["-f", "lavfi", "-i", f"sine=frequency={TONE_HZ}:duration={SECONDS}:sample_rate=44100"]
    ffmpeg(*frames, *tone, *h264, "-c:a", "aac", str(folder / "sound.mp4"))
    ffmpeg(*frames, *h264, str(folder / "silent.mp4"))
    ffmpeg(*frames, "-c:v", "libvpx", "-b:v", "200k", str(folder / "silent.webm"))
    ffmpeg(*tone, str(folder / "tone.wav"))
    return types.SimpleNamespace(folder=folder, sound=folder / "sound.mp4", silent=folder / "silent.mp4",
                                 webm=folder / "silent.webm", wav=folder / "tone.wav")


def frame_number(image: Image.Image) -> int:
    assert image.mode == "RGB"
    return int(round(np.asarray(image, dtype=np.float64).mean() / GREY_STEP))


def test_probe(videos):
    info = probe_video(videos.sound)
    assert (info.fps, info.frame_count, info.has_audio) == (FPS, FPS * SECONDS, True)
    assert (info.width, info.height) == (64, 48)
    assert abs(info.duration - SECONDS) < 0.05
    assert probe_video(videos.silent).has_audio is False


def test_probe_counts_frames_when_the_container_does_not_store_them(videos):
    info = probe_video(videos.webm)  # webm headers carry no frame count
    assert info.frame_count == FPS * SECONDS


def test_one_frame_per_second(videos):
    frames = sample_frames(videos.silent, fps=1.0)
    assert [frame_number(f) for f in frames] == [0, 4, 8, 12, 16, 20]
    assert frames[0].size == (64, 48)


def test_two_frames_per_second(videos):
    assert [frame_number(f) for f in sample_frames(videos.silent, fps=2.0)] == list(range(0, 24, 2))


def test_uniform_cap(videos):
    frames = sample_frames(videos.silent, fps=1.0, max_frames=4)
    # uniform_sample([0, 4, 8, 12, 16, 20], 4): group width 1.5, middles at 0.75, 2.25, 3.75, 5.25
    assert [frame_number(f) for f in frames] == [0, 8, 12, 20]
    assert uniform_sample(list(range(10)), 3) == [1, 5, 8]


def test_units_with_sound(videos):
    units = video_units(videos.sound)
    assert len(units) == SECONDS
    # unit i shows the frame at (i + 1) s; the last unit (6 s) is past the last frame (5.75 s) and,
    # as moviepy in the reference, repeats the previous unit's frame.
    assert [frame_number(image) for image, _ in units] == [4, 8, 12, 16, 20, 20]
    for _, audio in units:
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert abs(len(audio) - INPUT_SAMPLE_RATE) <= INPUT_SAMPLE_RATE // 100
        spectrum = np.abs(np.fft.rfft(audio))
        assert abs(np.argmax(spectrum) * INPUT_SAMPLE_RATE / len(audio) - TONE_HZ) < 3
    assert len(units[0][1]) == INPUT_SAMPLE_RATE


def test_units_without_sound_get_one_second_of_silence(videos):
    units = video_units(videos.silent)
    assert len(units) == SECONDS
    for _, audio in units:
        assert audio.shape == (INPUT_SAMPLE_RATE,) and audio.dtype == np.float32 and not audio.any()


def test_iter_units_is_lazy(videos):
    units = iter_video_units(videos.sound)
    image, audio = next(units)
    assert frame_number(image) == 4 and len(audio) == INPUT_SAMPLE_RATE
    units.close()


def test_video_audio_track(videos):
    audio = load_video_audio(videos.sound)
    assert audio is not None and audio.dtype == np.float32
    assert abs(len(audio) / INPUT_SAMPLE_RATE - SECONDS) < 0.1
    assert load_video_audio(videos.silent) is None
    with pytest.raises(InputError, match="no audio track"):
        load_video_audio(videos.silent, required=True)


def test_errors(videos, tmp_path):
    with pytest.raises(InputError, match="not found"):
        probe_video(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        sample_frames(tmp_path / "empty.mp4")
    (tmp_path / "notes.mp4").write_text("not a video\n")
    with pytest.raises(InputError, match="not a video"):
        sample_frames(tmp_path / "notes.mp4")
    (tmp_path / "cut.mp4").write_bytes(videos.sound.read_bytes()[:600])
    with pytest.raises(InputError, match="corrupt") as info:
        video_units(tmp_path / "cut.mp4")
    assert info.value.path.endswith("cut.mp4")
    with pytest.raises(InputError, match="no video stream"):
        sample_frames(videos.wav)
    Image.new("RGB", (8, 8)).save(tmp_path / "still.png")
    with pytest.raises(InputError, match="not a video.*image"):
        probe_video(tmp_path / "still.png")


def test_example_clips_if_present():
    examples = Path(__file__).resolve().parents[2] / "examples"
    if not (examples / "clip.mp4").exists():
        pytest.skip("examples not generated")
    units = video_units(examples / "clip.mp4")
    assert len(units) == 3 and np.abs(np.concatenate([a for _, a in units])).max() > 0.05
    assert not any(a.any() for _, a in video_units(examples / "clip_silent.mp4"))
