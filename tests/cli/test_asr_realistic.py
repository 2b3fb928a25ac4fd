"""Segmentation on realistic recordings (tests/realistic_audio.py): a noisy 5-minute meeting with music and
known pauses, and a file of noise and music alone; at the segmenter and through `minicpmo asr`.

Through the CLI on the fake engine (tests/fake_engine.py): these tests check where the audio is cut, what is sent to
the model and the times written, never words.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests import realistic_audio as ra

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

SR = ra.SR
SLACK = 0.1  # s: a VAD edge may reach this far into speech (about 3 of its 32 ms windows)
FAST = ["--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def meeting(tmp_path_factory) -> ra.Recording:
    return ra.five_minute_meeting(tmp_path_factory.mktemp("meeting"))


@pytest.fixture(scope="module")
def noise_file(tmp_path_factory):
    return ra.noise_only(tmp_path_factory.mktemp("noise"))


@pytest.fixture(scope="module")
def pieces(meeting):
    from minicpmo_cli.media.audio import load_audio
    from minicpmo_cli.processing.segments import segment_audio

    return segment_audio(load_audio(meeting.path))


def in_a_pause(recording: ra.Recording, seconds: float) -> bool:
    return any(start - SLACK <= seconds <= end + SLACK for start, end in recording.pauses)


def sent_to_model(fake_engine) -> list[tuple[str, int]]:
    """(prompt, clip length) of everything sent to the (fake) engine."""
    return [(prompt, samples) for call in fake_engine.of_kind("transcribe")
            for prompt, samples in zip(call.options["instructions"], call.options["samples"])]


def test_the_meeting_is_what_it_should_be(meeting):
    assert 270 <= meeting.duration <= 330 and len(meeting.speech) > 40
    assert meeting.speech[0][0] > 7.5 and meeting.duration - meeting.speech[-1][1] > 9.5
    assert max(b - a for a, b in meeting.pauses) >= 20.0  # the music alone


def test_pieces_are_cut_in_pauses_and_keep_all_speech(meeting, pieces):
    spans = [(p.start / SR, p.end / SR) for p in pieces]
    assert all(0 <= a < b <= meeting.duration for a, b in spans)
    assert all(b - a <= 30.0 for a, b in spans)
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))  # in order, never overlapping
    for a, b in spans:
        assert in_a_pause(meeting, a) and in_a_pause(meeting, b), (a, b)
    for a, b in meeting.speech:  # no speech dropped
        assert any(start <= a + SLACK and b - SLACK <= end for start, end in spans), (a, b)
    # The 45 s stretch without a pause is cut once, at a breath, with no gap between its two pieces.
    assert any(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    # Room tone at both ends and the 20 s of music alone are not sent.
    assert spans[0][0] > 7.0 and spans[-1][1] < meeting.duration - 9.0
    sent = sum(b - a for a, b in spans)
    assert sent < meeting.duration - 8.0 - 20.0 - 10.0


def test_cues_follow_the_sentences(meeting, pieces):
    cues = [(a / SR, b / SR) for p in pieces for a, b in p.cues]
    assert all(x[1] <= y[0] for x, y in zip(cues, cues[1:]))
    assert all(0 < b - a <= 10.0 for a, b in cues)
    for a, b in cues:
        assert in_a_pause(meeting, a) and in_a_pause(meeting, b), (a, b)
    for a, b in meeting.speech:
        assert any(start <= b and a <= end for start, end in cues)  # every sentence is under some cue
    assert len(cues) >= len(meeting.speech) / 3  # readable lines, not one cue per 30 s piece


def test_noise_and_music_alone_have_no_pieces(noise_file):
    from minicpmo_cli.media.audio import load_audio
    from minicpmo_cli.processing.segments import segment_audio

    assert segment_audio(load_audio(noise_file)) == []


def test_meeting_through_the_cli(cli, fake_engine, tiny_ckpt, meeting, pieces, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli("--model", tiny_ckpt, "asr", meeting.path, "-o", out, "-f", "all", "--language", "en",
                       "--batch-size", "4", *FAST)
    assert code == 0, err
    sent = sent_to_model(fake_engine)
    # exactly the pieces, each <= 30 s (batches go out sorted by length)
    assert sorted(n for _, n in sent) == sorted(p.end - p.start for p in pieces)
    record = json.loads((out / "meeting.json").read_text())
    assert record["language"] == "en" and record["duration"] == pytest.approx(meeting.duration, abs=1e-3)
    segments = record["segments"]
    assert len(segments) == sum(len(p.cues) for p in pieces)
    times = [t for s in segments for t in (s["start"], s["end"])]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= record["duration"]
    assert all(in_a_pause(meeting, t) for t in times)
    spoken = [s for s in segments if s["text"].strip()]
    assert (out / "meeting.srt").read_text().count(" --> ") == len(spoken)


def test_noise_through_the_cli_sends_nothing(cli, fake_engine, tiny_ckpt, noise_file):
    code, stdout, err = cli("--model", tiny_ckpt, "-v", "asr", noise_file, "-f", "json", *FAST)
    assert code == 0, err
    sent = sent_to_model(fake_engine)
    record = json.loads(stdout)
    assert (record["text"], record["segments"], record["error"]) == ("", [], None)
    assert sent == [] and "loading" not in err  # no piece sent; the model was not even loaded
    assert "0 segment(s)" in err
