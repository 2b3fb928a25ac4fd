"""processing.segments: speech regions -> pieces (<= 30 s, cut in pauses, padded) and cues; text sharing."""

from __future__ import annotations

import numpy as np
import pytest

from minicpmo_cli.processing.segments import (
    Piece,
    cue_spans,
    fixed_pieces,
    join_texts,
    piece_segments,
    split_at_quiet_points,
    split_text,
    vad_pieces,
)

SR = 16000


def bursts(plan: list[tuple[float, float]], sr: int = SR) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Noise bursts separated by true silence: [(burst s, silence s), ...] -> (audio, burst spans)."""
    rng = np.random.default_rng(1)
    parts, spans, at = [], [], 0
    for burst, gap in plan:
        n, g = int(burst * sr), int(gap * sr)
        parts += [0.3 * rng.standard_normal(n), np.zeros(g)]
        spans.append((at, at + n))
        at += n + g
    return np.concatenate(parts).astype(np.float32), spans


def check_pieces(pieces: list[Piece], regions, total: int, max_seconds: float = 30.0) -> None:
    assert all(0 <= p.start < p.end <= total for p in pieces)
    assert all(p.end - p.start <= max_seconds * SR for p in pieces)
    assert all(a.end <= b.start for a, b in zip(pieces, pieces[1:]))  # in order, never overlapping
    for start, end in regions:  # every sample of speech is in exactly one piece
        covering = [p for p in pieces if p.start <= start and end <= p.end]
        pieces_touching = [p for p in pieces if p.start < end and start < p.end]
        assert covering or len(pieces_touching) > 1, (start, end)
    for piece in pieces:
        assert piece.cues and piece.start <= piece.cues[0][0] and piece.cues[-1][1] <= piece.end
        assert all(a[1] <= b[0] for a, b in zip(piece.cues, piece.cues[1:]))


def test_regions_are_grouped_into_pieces_cut_only_in_pauses():
    audio, regions = bursts([(8, 1), (9, 0.6), (10, 1), (7, 0.5), (20, 0.5), (12, 2)])
    pieces = vad_pieces(audio, regions, SR)
    check_pieces(pieces, regions, len(audio))
    for a, b in zip(pieces, pieces[1:]):
        assert np.all(audio[a.end:b.start] == 0) and np.all(audio[a.end - 100:a.end] == 0)  # cut in silence
    # Greedy: 8 + 1 + 9 + 0.6 + 10 = 28.6 s fit, the 7 s burst does not; then 7 + 0.5 + 20 = 27.5 s; then 12.
    assert [len([r for r in regions if p.start <= r[0] < p.end]) for p in pieces] == [3, 2, 1]


def test_pieces_are_padded_but_never_into_the_next_region():
    audio, regions = bursts([(0.5, 3), (2, 0.1), (2, 2)])
    audio = np.concatenate([np.zeros(SR, np.float32), audio])
    regions = [(s + SR, e + SR) for s, e in regions]
    [piece] = vad_pieces(audio, regions, SR)
    assert piece.start == regions[0][0] - int(0.2 * SR)  # the 0.2 s margin before the first word
    assert piece.end == min(len(audio), regions[-1][1] + int(0.2 * SR))
    pieces = vad_pieces(audio, regions, SR, max_seconds=4.0)
    assert pieces[0].end <= (regions[0][1] + regions[1][0]) // 2 + 1
    assert pieces[1].start == pieces[0].end or pieces[1].start >= regions[1][0] - int(0.2 * SR)
    assert all(a.end <= b.start for a, b in zip(pieces, pieces[1:]))


def test_long_speech_without_a_pause_is_cut_at_its_quietest_point():
    rng = np.random.default_rng(3)
    audio = (0.3 * rng.standard_normal(70 * SR)).astype(np.float32)
    audio[int(26.0 * SR):int(26.1 * SR)] *= 0.01  # a breath at 26 s, another at 52 s
    audio[int(52.0 * SR):int(52.1 * SR)] *= 0.01
    regions = [(0, len(audio))]
    pieces = vad_pieces(audio, regions, SR)
    check_pieces(pieces, regions, len(audio))
    assert len(pieces) == 3
    assert 26.0 * SR <= pieces[0].end <= 26.1 * SR and 52.0 * SR <= pieces[1].end <= 52.1 * SR  # in the breaths
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))  # nothing dropped inside speech


def test_cues_follow_the_speech():
    audio, regions = bursts([(1, 0.6), (1.5, 0.6), (2, 0.6), (3, 3), (2, 0.5), (14, 0)])
    cues = cue_spans(audio, regions, SR)
    # The first three close short regions merge (1 + 0.6 + 1.5 + 0.6 + 2 = 5.7 s), the 3 s one would make
    # 9.3 s and joins too; after the 3 s pause a new cue; the 14 s region splits in two (its first part may
    # join the 2 s region before it, 0.5 s away, if the two fit in 10 s).
    assert cues[0] == (regions[0][0], regions[3][1])
    assert cues[1][0] == regions[4][0]
    assert all(end - start <= 10 * SR for start, end in cues)
    assert cues[-1][1] == regions[-1][1] and len(cues) in (3, 4)
    assert sum(1 for start, end in cues if regions[-1][0] < end) == 2  # the 14 s region: two cues
    assert all(a[1] <= b[0] for a, b in zip(cues, cues[1:]))


def test_no_regions_no_pieces_and_empty_audio():
    assert vad_pieces(np.zeros(SR * 5, np.float32), [], SR) == []
    assert fixed_pieces(np.zeros(0, np.float32)) == []


def test_fixed_pieces_cover_the_audio_cut_at_quiet_points():
    audio, _ = bursts([(8, 1), (9, 0.6), (10, 1), (7, 0.5), (20, 0.5), (12, 0)])  # pauses at 28.6 s, 57.1 s
    pieces = fixed_pieces(audio)
    assert pieces[0].start == 0 and pieces[-1].end == len(audio)
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    assert all(0 < p.end - p.start <= 30 * SR and p.cues == ((p.start, p.end),) for p in pieces)
    assert len(pieces) == 3
    for piece in pieces[:-1]:
        assert np.all(audio[piece.end - 400:piece.end + 400] == 0)
    assert fixed_pieces(np.ones(SR, np.float32)) == [Piece(0, SR, ((0, SR),))]


def test_constant_energy_cuts_at_the_limit():
    sr = 1000
    audio = np.ones(10 * sr + 1, np.float32)  # every candidate ties: the latest one wins
    parts = split_at_quiet_points(audio, (0, len(audio)), 3 * sr, sr, sr)
    assert [end - start for start, end in parts] == [3 * sr] * 3 + [sr + 1]


def test_text_is_shared_over_cues_by_speech_time():
    assert split_text("one two three four five six", [2, 1]) == ["one two three four", "five six"]
    assert split_text("你好世界，再见", [1, 1]) == ["你好世界", "，再见"]
    assert split_text("solo", [5]) == ["solo"]
    assert split_text("", [1, 2]) == ["", ""]
    assert join_texts(["你好", "世界。", "再见", "ok"]) == "你好世界。再见 ok"
    piece = Piece(0, 3 * SR, ((0, SR), (2 * SR, 3 * SR)))
    segments = piece_segments(piece, "a b c d", SR)
    assert [(s.start, s.end, s.text) for s in segments] == [(0.0, 1.0, "a b"), (2.0, 3.0, "c d")]


@pytest.mark.parametrize("seconds", [0.5, 2.0])
def test_bad_limits_are_refused(seconds):
    with pytest.raises(ValueError):
        vad_pieces(np.zeros(SR, np.float32), [(0, SR)], SR, max_seconds=seconds, pad_seconds=seconds)
