#!/usr/bin/env python3
"""Regenerate the example media in this folder from scratch (espeak-ng, ffmpeg, Pillow).

    python examples/make_examples.py            # writes next to this script
    python examples/make_examples.py -o DIR     # somewhere else

Outputs (all small; the total stays well under 1.5 MB):
  speech_en.wav     ~4 s English sentence, 16 kHz mono PCM16
  speech_zh.wav     ~5.5 s Mandarin sentence (espeak-ng voice "cmn"), 16 kHz mono PCM16
  long_speech.mp3   ~70 s English paragraph with pauses between sentences (tests long-audio splitting)
  image.png         a drawn landscape (house, tree, sun) with a caption, 448x336
  clip.mp4          3 s, 2 fps, 320x240: a red ball crossing a scene, with spoken "one, two, three"
  clip_silent.mp4   the same frames without an audio track

The same tools give the same bytes: fixed text, fixed voices and rates, no timestamps or encoder
version tags in the containers, single-threaded x264.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

SPEECH_RATE = 16000  # Hz: the model's audio input rate
ESPEAK_WORDS_PER_MINUTE = 165
PAUSE_SECONDS = 0.8  # silence between the sentences of long_speech.mp3
MP3_BITRATE = "32k"  # speech at 16 kHz mono stays intelligible and small
CLIP_SECONDS = 3
CLIP_FPS = 2
CLIP_SIZE = (320, 240)
IMAGE_SIZE = (448, 336)

ENGLISH_SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river."
CHINESE_SENTENCE = "今天天气很好，我们去散步吧。"
CLIP_SPEECH = "One. Two. Three."
LONG_PARAGRAPH = [
    "Welcome to this short recording about the weather and the seasons.",
    "In spring, the days grow longer and the first flowers open in the gardens.",
    "Farmers prepare their fields, and birds return from the warm south.",
    "Summer brings long afternoons, bright sunshine, and sudden thunderstorms.",
    "Children play outside until late, and the evenings smell of cut grass.",
    "In autumn, the leaves turn yellow, orange, and red before they fall.",
    "The air becomes cool and clear, and the harvest fills the markets.",
    "Winter is the quiet season, with short days and cold, still nights.",
    "Snow covers the hills, and people gather indoors around warm fires.",
    "Each season has its own colours, sounds, and small pleasures.",
    "Listening carefully, you can hear how the world changes through the year.",
    "Thank you for listening to this recording about the four seasons.",
    "We hope it was useful for testing speech recognition on long audio files.",
    "The end of the recording comes after this final sentence.",
]

# ffmpeg flags that keep the output free of version strings and timestamps.
BITEXACT = ["-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact"]


def run(command: list[str]) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def speak(text: str, voice: str, work: Path) -> np.ndarray:
    """espeak-ng speech as float32 samples at SPEECH_RATE."""
    raw = work / "espeak.wav"
    run(["espeak-ng", "-v", voice, "-s", str(ESPEAK_WORDS_PER_MINUTE), "-w", str(raw), text])
    samples, rate = soundfile.read(raw, dtype="float32")
    import soxr

    return soxr.resample(samples, rate, SPEECH_RATE, quality="HQ").astype(np.float32)


def write_pcm16(path: Path, samples: np.ndarray) -> None:
    soundfile.write(path, np.clip(samples, -1.0, 1.0), SPEECH_RATE, subtype="PCM_16")


def make_speech(out: Path, work: Path) -> None:
    write_pcm16(out / "speech_en.wav", speak(ENGLISH_SENTENCE, "en-us", work))
    write_pcm16(out / "speech_zh.wav", speak(CHINESE_SENTENCE, "cmn", work))


def make_long_speech(out: Path, work: Path) -> None:
    pause = np.zeros(int(PAUSE_SECONDS * SPEECH_RATE), dtype=np.float32)
    pieces = []
    for sentence in LONG_PARAGRAPH:
        pieces += [speak(sentence, "en-us", work), pause]
    wav = work / "long.wav"
    write_pcm16(wav, np.concatenate(pieces))
    run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-c:a", "libmp3lame", "-b:a", MP3_BITRATE,
         "-ar", str(SPEECH_RATE), "-ac", "1", "-write_xing", "0", "-id3v2_version", "0", *BITEXACT,
         str(out / "long_speech.mp3")])


def draw_landscape(size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, (135, 195, 235))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.62)
    draw.rectangle([0, horizon, width, height], fill=(90, 170, 80))
    draw.ellipse([width - 110, 25, width - 40, 95], fill=(250, 215, 60))  # sun
    house_left, house_top = int(width * 0.18), horizon - 90
    draw.rectangle([house_left, house_top, house_left + 120, horizon + 10], fill=(200, 80, 60))
    draw.polygon([(house_left - 15, house_top), (house_left + 60, house_top - 60),
                  (house_left + 135, house_top)], fill=(110, 60, 40))
    draw.rectangle([house_left + 45, horizon - 40, house_left + 75, horizon + 10], fill=(90, 50, 30))
    draw.rectangle([house_left + 12, house_top + 18, house_left + 38, house_top + 40], fill=(230, 240, 255))
    tree_x = int(width * 0.68)
    draw.rectangle([tree_x - 8, horizon - 50, tree_x + 8, horizon + 20], fill=(110, 75, 40))
    draw.ellipse([tree_x - 45, horizon - 130, tree_x + 45, horizon - 35], fill=(40, 120, 50))
    draw.text((16, height - 28), "A red house, a tree and the sun", fill=(255, 255, 255))
    return image


def make_image(out: Path) -> None:
    draw_landscape(IMAGE_SIZE).save(out / "image.png", optimize=True)


def make_clips(out: Path, work: Path) -> None:
    frames_dir = work / "frames"
    frames_dir.mkdir()
    width, height = CLIP_SIZE
    frame_count = CLIP_SECONDS * CLIP_FPS
    for index in range(frame_count):
        frame = draw_landscape(CLIP_SIZE)
        draw = ImageDraw.Draw(frame)
        x = int(20 + (width - 60) * index / max(frame_count - 1, 1))
        draw.ellipse([x, height - 70, x + 40, height - 30], fill=(220, 20, 20))  # the moving ball
        draw.text((8, 8), f"frame {index}", fill=(0, 0, 0))
        frame.save(frames_dir / f"{index:03d}.png")
    speech = speak(CLIP_SPEECH, "en-us", work)
    clip_samples = CLIP_SECONDS * SPEECH_RATE
    speech = np.pad(speech, (0, max(0, clip_samples - len(speech))))[:clip_samples]
    audio = work / "clip_audio.wav"
    write_pcm16(audio, speech)
    video_in = ["-framerate", str(CLIP_FPS), "-i", str(frames_dir / "%03d.png")]
    video_codec = ["-c:v", "libx264", "-preset", "medium", "-crf", "28", "-pix_fmt", "yuv420p",
                   "-x264-params", "threads=1", "-t", str(CLIP_SECONDS)]
    run(["ffmpeg", "-v", "error", "-y", *video_in, "-i", str(audio), *video_codec,
         "-c:a", "aac", "-b:a", "48k", *BITEXACT, str(out / "clip.mp4")])
    run(["ffmpeg", "-v", "error", "-y", *video_in, *video_codec, *BITEXACT, str(out / "clip_silent.mp4")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    missing = [tool for tool in ("espeak-ng", "ffmpeg") if shutil.which(tool) is None]
    if missing:
        print(f"make_examples: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 4
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        make_speech(args.output_dir, work)
        make_long_speech(args.output_dir, work)
        make_image(args.output_dir)
        make_clips(args.output_dir, work)
    for path in sorted(args.output_dir.iterdir()):
        if path.suffix in (".wav", ".mp3", ".png", ".mp4"):
            print(f"{path.name:18s} {path.stat().st_size / 1024:7.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
