#!/usr/bin/env python3
"""ASR segmentation on the CPU: the Silero VAD segmenter against the energy splitter it replaced.

Builds a recording of espeak-ng sentences with pauses of 0.8-3 s in pink noise (15 dB SNR), about a third of
it non-speech, repeats it to ``--minutes``, and times, in alternating rounds (median of ``--repeats``):

- **energy splitter (old)**: the hand-written splitter asr used before (copied below as the baseline, since
  it left the package): contiguous <= 30 s pieces cut at the quietest 0.1 s in the last 5 s before each limit.
- **VAD (minicpmo)**: ``processing.segments.segment_audio``: Silero speech probabilities (blocks of the
  file side by side as one batch, one thread), speech regions, pieces and cues.
- **VAD, one window at a time**: the same probabilities computed the plain way (Silero's own loop), to show
  what the batched blocks save.

    python benchmarks/segmentation.py                    # 10 minutes of audio, 3 rounds
    python benchmarks/segmentation.py --minutes 30 --repeats 5

Times are given per hour of audio. "sent to the model" is the share of the audio in the pieces.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SR = 16000
SENTENCES = ["Good morning everyone and welcome to the weekly meeting.",
             "Today we talk about the quarterly results and the plans for next year.",
             "Sales went up in the northern region, mostly thanks to the new shop.",
             "Please send me the report before Friday so that I can read it."]


# --------------------------------------------------------------------- the old splitter (the baseline)
def split_on_silence(samples, sr=SR, max_seconds=30.0, search_seconds=5.0, window_seconds=0.1, hop_seconds=0.01):
    """The energy splitter minicpmo used before the VAD (media/audio.py), unchanged."""
    total = len(samples)
    max_len = int(round(max_seconds * sr))
    window = max(1, int(round(window_seconds * sr)))
    hop = max(1, int(round(hop_seconds * sr)))
    search = max(1, int(round(search_seconds * sr)))
    pieces, start = [], 0
    while total - start > max_len:
        limit = start + max_len
        cut = _quietest_point(samples, max(start + 1, limit - search), limit, window, hop)
        pieces.append((start, cut))
        start = cut
    if total > start:
        pieces.append((start, total))
    return pieces


def _quietest_point(samples, low, high, window, hop):
    candidates = np.arange(high, low - 1, -hop)[::-1]
    half = window // 2
    left = np.clip(candidates - half, 0, len(samples))
    right = np.clip(candidates + half, 0, len(samples))
    region_start, region_end = int(left.min()), int(right.max())
    region = np.asarray(samples[region_start:region_end], dtype=np.float64)
    cumulative = np.concatenate(([0.0], np.cumsum(region * region)))
    energy = (cumulative[right - region_start] - cumulative[left - region_start]) / np.maximum(right - left, 1)
    latest_minimum = len(energy) - 1 - int(np.argmin(energy[::-1]))
    return int(candidates[latest_minimum])


# --------------------------------------------------------------------- the recording
def recording(minutes: float, folder: Path) -> tuple[np.ndarray, str]:
    from minicpmo_cli.media.audio import load_audio

    rng = np.random.default_rng(0)
    if shutil.which("espeak-ng"):
        clips = []
        for i, text in enumerate(SENTENCES):
            subprocess.run(["espeak-ng", "-w", str(folder / f"{i}.wav"), text], check=True, capture_output=True)
            clips.append(load_audio(folder / f"{i}.wav"))
        source = "espeak-ng speech"
    else:  # tone bursts: the VAD finds little speech in them, so its row is then a lower bound
        clips = [0.3 * np.sin(2 * np.pi * 180 * np.arange(int(2.5 * SR)) / SR).astype(np.float32)] * 4
        source = "tone bursts (no espeak-ng)"
    parts = []
    for index in range(40):
        parts += [clips[index % len(clips)], np.zeros(int(rng.uniform(0.8, 3.0) * SR), np.float32)]
    block = np.concatenate(parts)
    audio = np.tile(block, int(np.ceil(minutes * 60 * SR / len(block))))[:int(minutes * 60 * SR)]
    speech_rms = np.sqrt(np.mean(audio[np.abs(audio) > 1e-3] ** 2))
    audio = audio + pink_noise(len(audio), rng) * speech_rms / 10 ** (15 / 20)
    return audio.astype(np.float32), source


def pink_noise(n: int, rng) -> np.ndarray:
    """1/f noise of unit RMS (room tone)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / np.sqrt(np.mean(noise**2))


# --------------------------------------------------------------------- methods
def energy_splitter(audio):
    return split_on_silence(audio)


def vad_segmenter(audio):
    from minicpmo_cli.processing.segments import segment_audio

    return [(p.start, p.end) for p in segment_audio(audio)]


def vad_one_window_at_a_time(audio):
    import torch

    from minicpmo_cli.media import vad
    from minicpmo_cli.processing.segments import vad_pieces

    model = vad.load_vad_model("cpu")
    padded = torch.from_numpy(np.pad(audio, (0, -len(audio) % vad.WINDOW)))
    with torch.inference_mode(), vad._one_thread("cpu"):
        model.reset_states()
        probs = [model(padded[None, i:i + vad.WINDOW], SR).item() for i in range(0, len(padded), vad.WINDOW)]
    regions = vad.regions_from_probabilities(np.array(probs), len(audio))
    return [(p.start, p.end) for p in vad_pieces(audio, regions)]


METHODS = [("energy splitter (old)", energy_splitter), ("VAD (minicpmo)", vad_segmenter),
           ("VAD, one window at a time", vad_one_window_at_a_time)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as folder:
        audio, source = recording(args.minutes, Path(folder))
    vad_segmenter(audio[:10 * SR])  # load the model and warm TorchScript up outside the timings
    times: dict[str, list[float]] = {name: [] for name, _ in METHODS}
    pieces: dict[str, list[tuple[int, int]]] = {}
    for _ in range(args.repeats):
        for name, method in METHODS:  # alternating rounds: load on a shared machine hits all alike
            start = time.perf_counter()
            pieces[name] = method(audio)
            times[name].append(time.perf_counter() - start)
    hours = len(audio) / SR / 3600
    baseline = statistics.median(times[METHODS[0][0]])
    print(f"{len(audio) / SR / 60:.1f} min of {source} in noise (15 dB SNR); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (the VAD runs on 1); median of {args.repeats} rounds\n")
    print("| segmenter | s per hour of audio | x the old splitter | pieces | longest piece (s) | sent to the model |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _ in METHODS:
        median = statistics.median(times[name])
        spans = pieces[name]
        sent = sum(e - s for s, e in spans) / len(audio)
        longest = max(e - s for s, e in spans) / SR
        print(f"| {name} | {median / hours:.2f} | {median / baseline:.1f} | {len(spans)} | {longest:.1f} | "
              f"{100 * sent:.0f} % |")


if __name__ == "__main__":
    main()
