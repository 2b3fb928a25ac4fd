"""The pieces of an audio stream, handed out as soon as they are final: processing/segments.py's pieces of
the whole file (same regions, cuts, margins, cues), found while only a window of the samples is kept.

Why they are the same: a speech region is split and its cues are found from its own samples and 0.2 s on each
side (the energy windows of ``quietest_point``); a piece's margins depend on its neighbours' edges; pieces are
grouped greedily from the first region. So a region is split once the samples 0.2 s past its end have come,
and a piece is closed once the region that does not fit in it, and that region's right neighbour, are known.
A region longer than a piece is cut from its start, each cut from the samples up to the piece limit after the
previous one, so its first parts are cut while it is still in progress (speech without a pause, or music taken
for speech, is never kept whole). With --no-vad, each fixed cut needs the samples up to 0.2 s past the piece
limit. The window keeps the samples from the earliest one any of this (or the VAD's next blocks) can still
read: a few pieces and a VAD call of audio, whatever the length of the file.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from minicpmo_cli.media.vad_blocks import SampleWindow, VadStream
from minicpmo_cli.processing.segments import (
    RMS_WINDOW_SECONDS, SEARCH_SECONDS, Piece, Span, _samples, cue_spans, quietest_point, split_at_quiet_points,
    RMS_HOP_SECONDS)
from minicpmo_cli.units import INPUT_SAMPLE_RATE

READ_MARGIN = 2 * int(round(RMS_WINDOW_SECONDS * INPUT_SAMPLE_RATE)) + 1  # samples read past a span's edges


class PieceStream:
    """Feed decoded samples with :meth:`feed`, then :meth:`finish`; each returns the pieces it made final, in
    order, each with its samples."""

    def __init__(self, vad: VadStream | None, max_seconds: float, pad_seconds: float,
                 sr: int = INPUT_SAMPLE_RATE) -> None:
        self.window = SampleWindow()
        self.vad = vad
        self.sr = sr
        self.limit, self.pad = _samples(max_seconds, sr), _samples(pad_seconds, sr)
        if vad is not None and self.limit <= 2 * self.pad:
            raise ValueError(f"max_seconds {max_seconds} leaves no room inside the {pad_seconds} s margins")
        self.search = min(_samples(SEARCH_SECONDS, sr), self.limit - 2 * self.pad)
        self.regions: deque[Span] = deque()  # final regions not yet split into parts
        self.parts: list[Span] = []  # split parts not yet in a handed-out piece
        self.last_end: int | None = None  # the end of the last part handed out
        self.fixed_start = 0  # --no-vad: where the next fixed piece starts
        self.open_start: int | None = None  # a long region still in progress: where it starts ...
        self.open_cut = 0  # ... and where its part not yet cut starts
        self.ended = False

    @property
    def total(self) -> int:
        return len(self.window)

    def feed(self, samples: np.ndarray) -> list[tuple[Piece, np.ndarray]]:
        self.window.append(samples)
        if self.vad is None:
            pieces = self._with_clips(self._fixed(final=False))
        else:
            self.regions.extend(self.vad.feed(self.window))
            pieces = self._with_clips(self._vad_pieces(final=False))
        self.window.drop_before(self._keep_from())
        return pieces

    def finish(self) -> list[tuple[Piece, np.ndarray]]:
        self.ended = True
        if self.vad is None:
            return self._with_clips(self._fixed(final=True))
        self.regions.extend(self.vad.finish(self.window))
        return self._with_clips(self._vad_pieces(final=True))

    def _with_clips(self, pieces: list[Piece]) -> list[tuple[Piece, np.ndarray]]:
        return [(piece, self.window[piece.start:piece.end].copy()) for piece in pieces]

    def _keep_from(self) -> int:
        """The first sample anything still to come may read."""
        if self.vad is None:
            return self.fixed_start
        floors = [self.vad.needed_from(), self.open_cut if self.open_start is not None else self.vad.region_floor()]
        floors += [self.regions[0][0]] if self.regions else []
        floors += [self.parts[0][0]] if self.parts else []
        return max(0, min(floors) - max(self.pad, READ_MARGIN))

    def _fixed(self, final: bool) -> list[Piece]:
        """segments.fixed_pieces, cut by cut: a cut is certain once the samples past its search are in."""
        window, hop = _samples(RMS_WINDOW_SECONDS, self.sr), _samples(RMS_HOP_SECONDS, self.sr)
        search = _samples(SEARCH_SECONDS, self.sr)
        pieces: list[Piece] = []
        if final:
            spans = split_at_quiet_points(self.window, (self.fixed_start, self.total), self.limit, search, self.sr)
            return [Piece(start, end, ((start, end),)) for start, end in spans]
        while self.total - self.fixed_start > self.limit + READ_MARGIN:
            start, high = self.fixed_start, self.fixed_start + self.limit
            cut = quietest_point(self.window, max(start + 1, high - search), high, max(1, window), max(1, hop))
            pieces.append(Piece(start, cut, ((start, cut),)))
            self.fixed_start = cut
        return pieces

    def _vad_pieces(self, final: bool) -> list[Piece]:
        """segments.vad_pieces over the regions final so far: split the regions whose samples are all in,
        then close every piece whose end is certain."""
        while self.regions and (final or self.regions[0][1] + READ_MARGIN < self.total):
            region = self.regions.popleft()
            if self.open_start is not None and region[0] == self.open_start:  # its first parts are cut already
                region, self.open_start = (self.open_cut, region[1]), None
            self.parts += split_at_quiet_points(self.window, region, self.limit - 2 * self.pad, self.search,
                                                self.sr)
        if not final and not self.regions:
            self._cut_open_region()
        pieces: list[Piece] = []
        while self.parts:
            known = len(self.parts) if final and not self.regions else len(self.parts) - 1
            close = next((i for i in range(1, known)
                          if self._bound(i)[1] - self._bound(0)[0] > self.limit), None)
            if close is None:
                if not (final and not self.regions):
                    break
                close = len(self.parts)
            group = self.parts[:close]
            pieces.append(Piece(self._bound(0)[0], self._bound(close - 1)[1], cue_spans(self.window, group, self.sr)))
            self.last_end = group[-1][1]
            del self.parts[:close]
        return pieces

    def _cut_open_region(self) -> None:
        """The parts of a region still in progress that no later sample can change: split_at_quiet_points cuts
        from the region's start, each cut from the samples up to the piece limit after the previous one, so
        a region longer than a piece (speech without a pause, music taken for speech) is not kept whole."""
        region = self.vad.open_region()
        if region is None:
            return
        if self.open_start != region[0]:
            self.open_start, self.open_cut = region[0], region[0]
        longest = self.limit - 2 * self.pad
        window, hop = max(1, _samples(RMS_WINDOW_SECONDS, self.sr)), max(1, _samples(RMS_HOP_SECONDS, self.sr))
        while region[1] - self.open_cut > longest and self.open_cut + longest + READ_MARGIN < self.total:
            start, high = self.open_cut, self.open_cut + longest
            cut = quietest_point(self.window, max(start + 1, high - self.search), high, window, hop)
            self.parts.append((start, cut))
            self.open_cut = cut

    def _bound(self, index: int) -> Span:
        """segments._padded_bounds of open part ``index`` (its right neighbour known, or the stream ended)."""
        start, end = self.parts[index]
        if index == 0:
            left = 0 if self.last_end is None else (self.last_end + start) // 2
        else:
            left = (self.parts[index - 1][1] + start) // 2
        right = self.total if index == len(self.parts) - 1 else (end + self.parts[index + 1][0]) // 2
        return max(left, start - self.pad), min(right, end + self.pad)
