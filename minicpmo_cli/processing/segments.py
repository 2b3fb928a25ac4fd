"""Speech regions -> the pieces the ASR model hears and the cues the subtitles show.

A *piece* is what one model call transcribes: at most 30 s (the Whisper window), made of whole speech
regions, so every cut lies inside a pause the VAD found; it is padded by a small margin (never into the
next region) so the first and last words are not clipped. A region longer than a piece allows (speech with
no pause of ``--min-silence-ms``) is cut at its quietest point, where a breath or a short gap between words
is. Non-speech between pieces is never sent to the model: a file of noise or music gives no piece at all.

A *cue* is one timed line of srt/vtt/json: one speech region, short neighbouring regions merged up to about
10 s, long ones split at their quietest points, so a cue can be read on screen. Cue times are the regions'
times in the original file. The model gives one text per piece and no word times, so a piece's text is
shared out over its cues in proportion to their speech time, at word boundaries (characters in Chinese).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from minicpmo_cli.outputs import Segment
from minicpmo_cli.units import INPUT_SAMPLE_RATE

MAX_PIECE_SECONDS = 30.0  # s: one Whisper window
PIECE_PAD_SECONDS = 0.2  # s: margin around a piece's speech (clamped to half the pause to the next region)
SEARCH_SECONDS = 5.0  # s: how far back from a piece's length limit the quietest cut is looked for
CUE_SECONDS = 10.0  # s: cues are merged up to, and split down to, this length
CUE_MERGE_GAP_SECONDS = 1.0  # s: regions further apart than this stay separate cues (no text over a pause)
RMS_WINDOW_SECONDS = 0.1  # s: energy is measured over windows this long ...
RMS_HOP_SECONDS = 0.01  # s: ... at candidate cut points this far apart

Span = tuple[int, int]  # [start, end) in samples

# Han, kana, Hangul and CJK/full-width punctuation: written without spaces between them.
_CJK_RANGES = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_CJK = re.compile(f"[{_CJK_RANGES}]")
_UNIT = re.compile(f"[{_CJK_RANGES}]|[^\\s{_CJK_RANGES}]+")  # one CJK character or one spaced word


@dataclass(frozen=True)
class Piece:
    """Samples [start, end) go to the model; ``cues`` are the timed spans its text is shared over."""

    start: int
    end: int
    cues: tuple[Span, ...]


def segment_audio(samples: np.ndarray, sr: int = INPUT_SAMPLE_RATE, vad: bool = True, threshold: float | None = None,
                  min_silence_ms: int | None = None, max_seconds: float = MAX_PIECE_SECONDS,
                  device: str = "cpu") -> list[Piece]:
    """The pieces of ``samples``: speech regions grouped (``vad``), or fixed pieces cut at quiet points."""
    if not vad:
        return fixed_pieces(samples, sr, max_seconds)
    from minicpmo_cli.media import vad as silero

    if sr != INPUT_SAMPLE_RATE:
        raise ValueError(f"the VAD takes {INPUT_SAMPLE_RATE} Hz audio, not {sr} Hz")
    regions = silero.speech_regions(
        samples,
        silero.DEFAULT_THRESHOLD if threshold is None else threshold,
        silero.DEFAULT_MIN_SILENCE_MS if min_silence_ms is None else min_silence_ms,
        device,
    )
    return vad_pieces(samples, regions, sr, max_seconds)


def fixed_pieces(samples: np.ndarray, sr: int = INPUT_SAMPLE_RATE,
                 max_seconds: float = MAX_PIECE_SECONDS) -> list[Piece]:
    """``--no-vad``: contiguous pieces of at most ``max_seconds`` covering everything, cut at quiet points."""
    spans = split_at_quiet_points(samples, (0, len(samples)), _samples(max_seconds, sr), _samples(SEARCH_SECONDS, sr),
                                  sr)
    return [Piece(start, end, ((start, end),)) for start, end in spans]


def vad_pieces(samples: np.ndarray, regions: list[Span], sr: int = INPUT_SAMPLE_RATE,
               max_seconds: float = MAX_PIECE_SECONDS, pad_seconds: float = PIECE_PAD_SECONDS) -> list[Piece]:
    """Group sorted, disjoint speech ``regions`` into padded pieces of at most ``max_seconds``."""
    limit, pad = _samples(max_seconds, sr), _samples(pad_seconds, sr)
    if limit <= 2 * pad:
        raise ValueError(f"max_seconds {max_seconds} leaves no room inside the {pad_seconds} s margins")
    search = min(_samples(SEARCH_SECONDS, sr), limit - 2 * pad)
    regions = [part for region in regions for part in split_at_quiet_points(samples, region, limit - 2 * pad,
                                                                             search, sr)]
    bounds = _padded_bounds(regions, len(samples), pad)
    pieces: list[Piece] = []
    group: list[int] = []
    for index in range(len(regions)):
        if group and bounds[index][1] - bounds[group[0]][0] > limit:
            pieces.append(_piece(samples, regions, bounds, group, sr))
            group = []
        group.append(index)
    if group:
        pieces.append(_piece(samples, regions, bounds, group, sr))
    return pieces


def _padded_bounds(regions: list[Span], total: int, pad: int) -> list[Span]:
    """Each region widened by ``pad``, but never past the middle of the pause to its neighbour."""
    bounds = []
    for index, (start, end) in enumerate(regions):
        left = 0 if index == 0 else (regions[index - 1][1] + start) // 2
        right = total if index == len(regions) - 1 else (end + regions[index + 1][0]) // 2
        bounds.append((max(left, start - pad), min(right, end + pad)))
    return bounds


def _piece(samples, regions: list[Span], bounds: list[Span], group: list[int], sr: int) -> Piece:
    return Piece(bounds[group[0]][0], bounds[group[-1]][1], cue_spans(samples, [regions[i] for i in group], sr))


def cue_spans(samples: np.ndarray, regions: list[Span], sr: int = INPUT_SAMPLE_RATE,
              cue_seconds: float = CUE_SECONDS) -> tuple[Span, ...]:
    """One cue per region: long ones split at quiet points, close short ones merged up to ``cue_seconds``."""
    longest, gap = _samples(cue_seconds, sr), _samples(CUE_MERGE_GAP_SECONDS, sr)
    parts = [part for region in regions for part in split_at_quiet_points(samples, region, longest, longest // 2, sr)]
    cues: list[Span] = []
    for start, end in parts:
        if cues and end - cues[-1][0] <= longest and start - cues[-1][1] <= gap:
            cues[-1] = (cues[-1][0], end)
        else:
            cues.append((start, end))
    return tuple(cues)


def split_at_quiet_points(samples: np.ndarray, span: Span, max_len: int, search: int,
                          sr: int = INPUT_SAMPLE_RATE) -> list[Span]:
    """``span`` as contiguous parts of at most ``max_len`` samples, each cut at the quietest point of the
    last ``search`` samples before the limit (the latest such point on ties, so parts stay long)."""
    if max_len < 1:
        raise ValueError(f"a part must hold at least one sample, not {max_len}")
    window = max(1, _samples(RMS_WINDOW_SECONDS, sr))
    hop = max(1, _samples(RMS_HOP_SECONDS, sr))
    start, end = span
    parts: list[Span] = []
    while end - start > max_len:
        limit = start + max_len
        cut = quietest_point(samples, max(start + 1, limit - search), limit, window, hop)
        parts.append((start, cut))
        start = cut
    if end > start:
        parts.append((start, end))
    return parts


def quietest_point(samples: np.ndarray, low: int, high: int, window: int, hop: int) -> int:
    """The candidate in [low, high] (every ``hop`` samples, ``high`` included) that is quietest around it.

    Quiet is the mean energy over ``window`` plus that over four times ``window``, both centred on the
    candidate: the short window finds a gap between words, the long one prefers the longest such gap (a
    breath between sentences over a stop inside a word). The latest candidate wins ties.
    """
    candidates = np.arange(high, low - 1, -hop)[::-1]  # anchored at ``high``: the limit is always a candidate
    score = _mean_energy(samples, candidates, window) + _mean_energy(samples, candidates, 4 * window)
    latest_minimum = len(score) - 1 - int(np.argmin(score[::-1]))
    return int(candidates[latest_minimum])


def _mean_energy(samples: np.ndarray, centres: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    left = np.clip(centres - half, 0, len(samples))
    right = np.clip(centres + half, 0, len(samples))
    region_start, region_end = int(left.min()), int(right.max())
    region = np.asarray(samples[region_start:region_end], dtype=np.float64)
    cumulative = np.concatenate(([0.0], np.cumsum(region * region)))
    return (cumulative[right - region_start] - cumulative[left - region_start]) / np.maximum(right - left, 1)


# ------------------------------------------------------------------------------------------ texts
def join_texts(texts) -> str:
    """Texts joined with a space, or with nothing where both sides are CJK (no spaces in Chinese)."""
    joined = ""
    for text in (t.strip() for t in texts):
        if not text:
            continue
        if joined and not (_CJK.match(joined[-1]) and _CJK.match(text[0])):
            joined += " "
        joined += text
    return joined


def split_text(text: str, weights: list[float]) -> list[str]:
    """``text`` shared out over ``len(weights)`` parts in proportion to the weights, at word boundaries."""
    if len(weights) <= 1:
        return [text.strip()] * len(weights)
    units = _UNIT.findall(text)
    total = float(sum(weights)) or float(len(weights))
    shares = np.cumsum(weights if sum(weights) else [1.0] * len(weights)) / total
    bounds = [0] + [int(round(len(units) * share)) for share in shares[:-1]] + [len(units)]
    return [join_texts(units[a:b]) for a, b in zip(bounds, bounds[1:])]


def piece_segments(piece: Piece, text: str, sr: int = INPUT_SAMPLE_RATE) -> list[Segment]:
    """The timed segments of one transcribed piece: its cues, each with its share of the text."""
    texts = split_text(text, [end - start for start, end in piece.cues])
    return [Segment(round(start / sr, 3), round(end / sr, 3), part) for (start, end), part in zip(piece.cues, texts)]


def _samples(seconds: float, sr: int) -> int:
    return int(round(seconds * sr))
