"""Realistic test recordings: espeak-ng speech in pink noise and a music-like tone bed, with known pauses.

Every recording knows where its speech is (the voiced span of each sentence, measured on the clean speech
track) and so where its pauses are: the tests check segment edges against them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SR = 16000
SENTENCES = [
    "Good morning everyone and welcome to the weekly meeting.",
    "Today we talk about the quarterly results and the plans for next year.",
    "Sales went up in the northern region, mostly thanks to the new shop.",
    "Please send me the report before Friday so that I can read it.",
    "The weather was terrible on Monday, and half of the team stayed at home.",
    "We will need two more engineers to finish the project in time.",
    "Does anybody have a question about the budget?",
    "Thank you all, and see you next week.",
]


@dataclass
class Recording:
    path: Path
    samples: np.ndarray  # 16 kHz mono, as written to ``path``
    speech: list[tuple[float, float]]  # voiced span of every sentence, in seconds
    duration: float

    @property
    def pauses(self) -> list[tuple[float, float]]:
        """Everything that is not a sentence: leading and trailing silence, the gaps between sentences."""
        edges = [0.0] + [t for span in self.speech for t in span] + [self.duration]
        return [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]


def speak(text: str, path: Path, speed: int = 170) -> np.ndarray:
    """One sentence from espeak-ng (22.05 kHz) resampled to 16 kHz."""
    from minicpmo_cli.media.audio import load_audio

    subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(path), text], check=True, capture_output=True)
    return load_audio(path)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise (power falls 3 dB an octave), unit RMS: room tone, fans, traffic."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    return (noise / np.sqrt(np.mean(noise**2))).astype(np.float32)


def tone_bed(n: int, rng: np.random.Generator) -> np.ndarray:
    """Music-like: chords of harmonic tones that change every half second, with soft attacks; unit RMS."""
    t = np.arange(n) / SR
    out = np.zeros(n)
    note = int(0.5 * SR)
    ramp = np.minimum(1.0, np.arange(note) / (0.05 * SR)) * np.exp(-np.arange(note) / (0.6 * SR))
    for start in range(0, n, note):
        root = 110.0 * 2 ** (rng.integers(0, 24) / 12)
        seg = slice(start, min(n, start + note))
        length = seg.stop - seg.start
        for ratio in (1.0, 1.25, 1.5):  # a major triad
            for harmonic, gain in ((1, 1.0), (2, 0.5), (3, 0.25)):
                out[seg] += gain * ramp[:length] * np.sin(2 * np.pi * root * ratio * harmonic * t[seg])
    return (out / np.sqrt(np.mean(out**2))).astype(np.float32)


def scaled(signal: np.ndarray, reference_rms: float, db_below: float) -> np.ndarray:
    return signal * reference_rms / 10 ** (db_below / 20)


def build(plan: list[tuple[str, float]], clips: list[np.ndarray], snr_db: float, seed: int, path: Path,
          music: list[tuple[float, float]] = (), music_db: float = 20.0) -> Recording:
    """``plan``: ("speech", i) for sentence i, ("pause", seconds) for a pause; pink noise at ``snr_db`` below the
    speech over the whole file, the tone bed ``music_db`` below the speech over the ``music`` spans (s)."""
    import soundfile

    rng = np.random.default_rng(seed)
    parts, speech, at = [], [], 0
    for kind, value in plan:
        if kind == "pause":
            part = np.zeros(int(value * SR), np.float32)
        else:
            part = clips[int(value)]
            loud = np.flatnonzero(np.abs(part) > 1e-3)
            speech.append(((at + loud[0]) / SR, (at + loud[-1] + 1) / SR))
        parts.append(part)
        at += len(part)
    clean = np.concatenate(parts)
    voiced = np.concatenate([clean[int(a * SR):int(b * SR)] for a, b in speech])
    speech_rms = float(np.sqrt(np.mean(voiced**2)))
    mix = clean + scaled(pink_noise(len(clean), rng), speech_rms, snr_db)
    bed = scaled(tone_bed(len(clean), rng), speech_rms, music_db)
    for a, b in music:
        mix[int(a * SR):int(b * SR)] += bed[int(a * SR):int(b * SR)]
    mix = (0.5 * mix / np.max(np.abs(mix))).astype(np.float32)
    soundfile.write(path, mix, SR)
    return Recording(path, mix, speech, len(mix) / SR)


def five_minute_meeting(folder: Path) -> Recording:
    """About 5 minutes: 8 s of room tone, sentences with 0.8-3 s pauses, a 45 s stretch of speech with only
    short breaths (no pause long enough for the VAD: it must be cut at a quiet point), 20 s of music alone,
    music under some speech, 10 s of room tone at the end; pink noise at 12 dB SNR throughout."""
    clips = [speak(text, folder / f"sentence{i}.wav", speed=150 + 10 * (i % 4)) for i, text in enumerate(SENTENCES)]
    rng = np.random.default_rng(5)
    plan: list[tuple[str, float]] = [("pause", 8.0)]
    index = 0

    def sentences(count: int, gaps) -> None:
        nonlocal index
        for _ in range(count):
            plan.extend([("speech", index % len(clips)), ("pause", float(gaps()))])
            index += 1

    sentences(14, lambda: rng.uniform(0.8, 3.0))
    sentences(13, lambda: 0.0)  # about 45 s without a pause: only the breaths within espeak's clips
    plan.append(("pause", 2.0))
    music_start = sum(len(clips[int(v)]) / SR if k == "speech" else v for k, v in plan)
    plan.append(("pause", 20.0))
    sentences(22, lambda: rng.uniform(0.8, 3.0))
    plan.append(("pause", 10.0))
    music = [(music_start, music_start + 20.0), (music_start + 20.0, music_start + 60.0)]
    return build(plan, clips, snr_db=12.0, seed=11, path=folder / "meeting.wav", music=music, music_db=6.0)


def noise_only(folder: Path, seconds: float = 30.0) -> Path:
    """Pink noise with the tone bed over its second half: no speech at all."""
    import soundfile

    rng = np.random.default_rng(3)
    n = int(seconds * SR)
    mix = 0.1 * pink_noise(n, rng)
    mix[n // 2:] += 0.1 * tone_bed(n - n // 2, rng)
    path = folder / "noise.wav"
    soundfile.write(path, (0.5 * mix / np.max(np.abs(mix))).astype(np.float32), SR)
    return path
