"""The speech regions of an audio stream: media/vad.py's blocks cut from the stream as it comes, run through a
BatchVAD some blocks at a time, and their probabilities fed to a RegionTracker.

A block reads only its own samples and the second before it, and BatchVAD gives a block the same bits in any
company, so the probabilities, and so the regions, are those of the whole file, while only the samples of the
next blocks are kept (the caller's :class:`SampleWindow` drops what is no longer needed).
"""

from __future__ import annotations

import numpy as np

from minicpmo_cli.media import vad as silero
from minicpmo_cli.media.vad_batch import STEPS, BatchVAD, Block

BLOCKS_PER_CALL = 32  # blocks (about 8 s each) per BatchVAD call on a stream: about 4 minutes of audio
BLOCK_SAMPLES = silero.BLOCK_WINDOWS * silero.WINDOW


class SampleWindow:
    """The samples of a stream from ``offset`` on, indexed (by slices) like the whole stream; ``len`` is the
    number of samples received so far. Appends are amortised (the buffer doubles), drops move the rest."""

    def __init__(self) -> None:
        self.offset = 0
        self._buffer = np.zeros(1 << 16, np.float32)
        self._used = 0

    def __len__(self) -> int:
        return self.offset + self._used

    def append(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._used + len(samples) > len(self._buffer):
            grown = np.zeros(max(2 * len(self._buffer), self._used + len(samples)), np.float32)
            grown[:self._used] = self._buffer[:self._used]
            self._buffer = grown
        self._buffer[self._used:self._used + len(samples)] = samples
        self._used += len(samples)

    def drop_before(self, index: int) -> None:
        """Forget the samples before ``index`` (they will not be read again)."""
        cut = min(max(0, int(index) - self.offset), self._used)
        if cut:
            self._buffer[:self._used - cut] = self._buffer[cut:self._used]
            self._used -= cut
            self.offset += cut

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a SampleWindow is read by plain slices")
        start = 0 if key.start is None else int(key.start)
        stop = len(self) if key.stop is None else min(int(key.stop), len(self))
        if start < self.offset:
            raise IndexError(f"samples from {start} were dropped (the window starts at {self.offset})")
        return self._buffer[start - self.offset:max(start, stop) - self.offset]


class VadStream:
    """Speech regions of a stream, each handed out once final (see the module docstring)."""

    def __init__(self, vad: BatchVAD, threshold: float = silero.DEFAULT_THRESHOLD,
                 min_silence_ms: int = silero.DEFAULT_MIN_SILENCE_MS, blocks_per_call: int | None = None) -> None:
        self.vad = vad
        self.tracker = silero.RegionTracker(threshold, min_silence_ms)
        self.blocks_per_call = blocks_per_call or BLOCKS_PER_CALL
        self.block = 0  # the next block to run

    def needed_from(self) -> int:
        """The first sample the blocks still to run read (their warm-up included); the region tracker's
        regions all lie after :meth:`region_floor`."""
        return max(0, self.block * BLOCK_SAMPLES - silero.WARMUP_WINDOWS * silero.WINDOW)

    def region_floor(self) -> int:
        """No region handed out later starts before this sample."""
        tracker = self.tracker
        if tracker.pending is not None:
            return tracker.pending[0]
        first = tracker.index if tracker.start is None else tracker.start
        return max(0, first * silero.WINDOW - tracker.pad)

    def open_region(self) -> tuple[int, int] | None:
        """(start, least end) of the region of the speech in progress, once it is certain to be kept: it will
        start there (padded, or merged into the last region when the padding reaches it) and end no sooner."""
        tracker = self.tracker
        if tracker.start is None:
            return None
        least = (tracker.quiet_since if tracker.quiet_since is not None else tracker.index) * silero.WINDOW
        if least - tracker.start * silero.WINDOW < tracker.shortest:
            return None  # it may still be dropped as too short
        begin = max(0, tracker.start * silero.WINDOW - tracker.pad)
        if tracker.pending is not None and begin <= tracker.pending[1]:
            begin = tracker.pending[0]
        return begin, least

    def feed(self, window: SampleWindow) -> list[tuple[int, int]]:
        """The regions made final by the samples now in ``window`` (blocks run once enough are complete)."""
        ready = len(window) // BLOCK_SAMPLES - self.block
        if ready < self.blocks_per_call:
            return []
        return self._run(window, ready, None)

    def finish(self, window: SampleWindow) -> list[tuple[int, int]]:
        """The remaining regions once the stream has ended (``len(window)`` samples in all)."""
        total = len(window)
        windows = -(-total // silero.WINDOW)
        count = -(-windows // silero.BLOCK_WINDOWS)
        regions = self._run(window, count - self.block, windows) if count > self.block else []
        return regions + self.tracker.finish(total)

    def _run(self, window: SampleWindow, count: int, windows: int | None) -> list[tuple[int, int]]:
        blocks = [self._block(window, b, windows) for b in range(self.block, self.block + count)]
        probs = self.vad.block_probabilities(blocks)
        self.block += count
        return self.tracker.feed(np.concatenate([row[:block.steps - silero.WARMUP_WINDOWS]
                                                 for row, block in zip(probs, blocks)]))

    def _block(self, window: SampleWindow, index: int, windows: int | None) -> Block:
        """Block ``index`` as media/vad_batch.file_blocks cuts it (``windows``: the file's, once known)."""
        warmup = silero.WARMUP_WINDOWS * silero.WINDOW
        start = index * BLOCK_SAMPLES - warmup
        samples = np.zeros(STEPS * silero.WINDOW, np.float32)
        part = window[max(0, start):start + len(samples)]
        samples[max(0, start) - start:max(0, start) - start + len(part)] = part
        own = silero.BLOCK_WINDOWS if windows is None else min(silero.BLOCK_WINDOWS,
                                                                windows - index * silero.BLOCK_WINDOWS)
        return Block(samples, silero.WARMUP_WINDOWS if index == 0 else 0, silero.WARMUP_WINDOWS + own,
                     follows=index > self.block)  # its predecessor is in the same call
