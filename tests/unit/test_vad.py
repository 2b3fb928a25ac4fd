"""media.vad: the packaged Silero model (torch only), speech probabilities and speech regions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicpmo_cli.media import vad

SR = 16000
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def sentence(tmp_path_factory) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from minicpmo_cli.media.audio import load_audio

    path = tmp_path_factory.mktemp("vad") / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Good morning everyone and welcome to the meeting."],
                   check=True, capture_output=True)
    return load_audio(path)


def test_model_loads_from_the_wheel_with_torch_alone():
    import torch

    threads = torch.get_num_threads()
    assert vad.model_path().name == "silero_vad.jit"
    vad.load_vad_model("cpu")
    assert torch.get_num_threads() == threads  # importing the silero_vad package would set it to 1
    assert "torchaudio" not in sys.modules


def test_silence_and_noise_have_no_speech():
    rng = np.random.default_rng(0)
    assert vad.speech_regions(np.zeros(10 * SR, np.float32)) == []
    assert vad.speech_regions((0.05 * rng.standard_normal(10 * SR)).astype(np.float32)) == []
    assert vad.speech_probabilities(np.zeros(0, np.float32)).shape == (0,)


def test_speech_regions_find_each_sentence(sentence):
    gap = np.zeros(2 * SR, np.float32)
    audio = np.concatenate([gap, sentence, gap, sentence, gap])
    starts = [2 * SR, 4 * SR + len(sentence)]
    regions = vad.speech_regions(audio)
    assert len(regions) == 2
    for (start, end), known in zip(regions, starts):
        assert known - 0.3 * SR <= start and end <= known + len(sentence) + 0.3 * SR
        voiced = np.flatnonzero(np.abs(sentence) > 0.01)
        assert start <= known + voiced[0] + 0.1 * SR and end >= known + voiced[-1] - 0.1 * SR  # nothing cut off
    assert len(vad.speech_probabilities(audio)) == -(-len(audio) // vad.WINDOW)


def test_blocks_side_by_side_match_one_window_at_a_time(sentence):
    """The batched blocks give the same regions as the plain sequential loop, edges within 2 windows."""
    import torch

    gap = np.zeros(SR, np.float32)
    audio = np.concatenate([gap, sentence, gap, sentence[: len(sentence) // 2], 2 * gap, sentence, gap])
    model = vad.load_vad_model("cpu")
    padded = torch.from_numpy(np.pad(audio, (0, -len(audio) % vad.WINDOW)))
    with torch.inference_mode(), vad._one_thread("cpu"):
        model.reset_states()
        plain = [model(padded[None, i:i + vad.WINDOW], SR).item() for i in range(0, len(padded), vad.WINDOW)]
    expected = vad.regions_from_probabilities(np.array(plain), len(audio))
    got = vad.speech_regions(audio)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        assert abs(a[0] - b[0]) <= 2 * vad.WINDOW and abs(a[1] - b[1]) <= 2 * vad.WINDOW


def test_hysteresis_minimum_silence_and_speech():
    w = vad.WINDOW
    ms = lambda windows: windows * w * 1000 // SR  # noqa: E731 - windows -> milliseconds
    probs = np.array([0.0] * 10 + [0.9] * 20 + [0.4] * 5 + [0.9] * 20 + [0.1] * 40 + [0.9] * 3 + [0.0] * 20)
    total = len(probs) * w
    # 0.4 is above threshold - 0.15: still speech. The 3-window blip is shorter than min_speech: dropped.
    regions = vad.regions_from_probabilities(probs, total, min_silence_ms=ms(16), pad_ms=0)
    assert regions == [(10 * w, 55 * w)]
    # A shorter minimum silence ends the region in the 0.1 stretch; pad widens and merges.
    probs = np.array([0.9] * 20 + [0.1] * 6 + [0.9] * 20 + [0.0] * 5)
    assert vad.regions_from_probabilities(probs, len(probs) * w, min_silence_ms=ms(4), pad_ms=0) == \
        [(0, 20 * w), (26 * w, 46 * w)]
    assert vad.regions_from_probabilities(probs, len(probs) * w, min_silence_ms=ms(4), pad_ms=ms(4)) == \
        [(0, 50 * w)]
    assert vad.regions_from_probabilities(probs, len(probs) * w, threshold=0.95) == []


@pytest.mark.skipif(not (EXAMPLES / "long_speech.mp3").exists(), reason="examples not generated")
def test_real_long_recording_is_cut_between_sentences():
    from minicpmo_cli.media.audio import audio_duration, load_audio
    from minicpmo_cli.processing.segments import segment_audio

    audio = load_audio(EXAMPLES / "long_speech.mp3")
    assert audio_duration(audio) > 60
    pieces = segment_audio(audio)
    assert len(pieces) >= 3 and all(p.end - p.start <= 30 * SR for p in pieces)
    loud = np.sqrt(np.mean(audio**2))
    for before, after in zip(pieces, pieces[1:]):
        assert before.end <= after.start
        around_cut = audio[before.end - 800:after.start + 800]
        assert np.sqrt(np.mean(around_cut**2)) < 0.05 * loud  # in a pause between sentences


# ------------------------------------------------------------------------------------ many files at once
def test_vad_over_many_files_equals_vad_file_by_file(sentence):
    """media.vad_batch: the blocks of many files in fixed-shape batches give every file bit for bit the
    probabilities (and so the regions) it gets alone, whatever files share its batches; and what media/vad.py
    finds for it (the same cut into blocks; the rounding may differ in the last bits only)."""
    from minicpmo_cli.media.vad_batch import BatchVAD

    rng = np.random.default_rng(3)
    pause = np.zeros(SR, np.float32)
    files = [sentence, np.zeros(0, np.float32), 0.01 * rng.standard_normal(SR * 3).astype(np.float32),
             np.concatenate([sentence, pause, sentence, pause, sentence]), sentence[: SR // 3]]
    files += [sentence * (0.5 + 0.1 * i) for i in range(12)]  # enough blocks for two batches of 16 rows
    batch = BatchVAD("cpu")
    together = batch.probabilities(files)
    alone = [batch.probabilities([samples])[0] for samples in files]
    reversed_order = batch.probabilities(files[::-1])[::-1]
    for index, samples in enumerate(files):
        assert np.array_equal(together[index], alone[index]), index
        assert np.array_equal(reversed_order[index], alone[index]), index
        assert len(together[index]) == -(-len(samples) // vad.WINDOW)
        np.testing.assert_allclose(together[index], vad.speech_probabilities(samples), atol=1e-4)
    assert batch.regions(files) == [vad.regions_from_probabilities(p, len(s)) for p, s in zip(alone, files)]
    assert batch.regions(files)[0] == vad.speech_regions(sentence)


def test_region_tracker_fed_in_pieces_gives_the_regions_of_all_at_once():
    """media.vad.RegionTracker (streams) against regions_from_probabilities, with hysteresis, short regions,
    padding that merges and a region still open at the end, fed in random slices."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        count = int(rng.integers(0, 300))
        steady = np.repeat(rng.choice([0.05, 0.4, 0.9], size=count // 4 + 1), rng.integers(1, 25, count // 4 + 1))
        probs = (rng.random(count) if trial % 2 else steady[:count]).astype(np.float32)
        total = max(0, count * vad.WINDOW - int(rng.integers(0, vad.WINDOW)))
        settings = {"min_silence_ms": int(rng.choice([0, 100, 500])), "pad_ms": int(rng.choice([0, 30, 400])),
                    "min_speech_ms": int(rng.choice([0, 250]))}
        tracker, found, start = vad.RegionTracker(**settings), [], 0
        while start < count:
            step = int(rng.integers(1, 40))
            found += tracker.feed(probs[start:start + step])
            start += step
        found += tracker.finish(total)
        assert found == vad.regions_from_probabilities(probs, total, **settings), (trial, settings)


def test_vad_stream_and_worker_threads_give_the_batched_probabilities(sentence):
    """media.vad_blocks.VadStream (blocks cut from a stream, a few per call) finds the regions of the whole
    file; BatchVAD with one worker thread or two gives the same bits."""
    from minicpmo_cli.media.vad_batch import BatchVAD
    from minicpmo_cli.media.vad_blocks import SampleWindow, VadStream

    rng = np.random.default_rng(4)
    audio = np.concatenate([part for _ in range(14) for part in
                            (sentence, np.zeros(int(rng.integers(1000, 40000)), np.float32))])
    one, two = BatchVAD("cpu", workers=1), BatchVAD("cpu", workers=2)
    together = two.probabilities([audio, sentence])
    assert all(np.array_equal(a, b) for a, b in zip(together, one.probabilities([audio, sentence])))
    whole = two.regions([audio])[0]
    assert len(whole) >= 10
    for chunk in (3001, 50000):
        window, stream, found = SampleWindow(), VadStream(two, blocks_per_call=2), []
        for start in range(0, len(audio), chunk):
            window.append(audio[start:start + chunk])
            found += stream.feed(window)
            window.drop_before(min(stream.needed_from(), stream.region_floor()))
        assert found + stream.finish(window) == whole
        assert window.offset > len(audio) // 2  # the samples read are dropped as the stream goes
    two.close()
