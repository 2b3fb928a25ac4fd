"""The incoming audio of a live connection at 16 kHz, addressed by its position in the whole stream.

Only what a turn may still need is kept: while nobody speaks, the last ``prefix_padding_ms`` (and a window);
during a turn, the turn's audio (its units are prefilled as they fill; the whole turn is kept for its
transcript, up to a cap).
"""

from __future__ import annotations

import numpy as np


class AudioBuffer:
    def __init__(self) -> None:
        self._data = np.zeros(16000, np.float32)
        self.base = 0  # stream position of self._data[0]
        self._used = 0

    @property
    def end(self) -> int:
        """Stream position just after the last sample received."""
        return self.base + self._used

    @property
    def size(self) -> int:
        return self._used

    def append(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        needed = self._used + len(samples)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data)), np.float32)
            grown[:self._used] = self._data[:self._used]
            self._data = grown
        self._data[self._used:needed] = samples
        self._used = needed

    def slice(self, start: int, stop: int) -> np.ndarray:
        """A copy of stream positions [start, stop), clipped to what is held."""
        lo = max(start, self.base) - self.base
        hi = min(stop, self.end) - self.base
        return self._data[lo:hi].copy() if hi > lo else np.zeros(0, np.float32)

    def drop_before(self, position: int) -> None:
        """Forget the samples before stream ``position`` (memory stays bounded between turns)."""
        cut = min(max(0, position - self.base), self._used)
        if cut == 0:
            return
        rest = self._data[cut:self._used].copy()
        if len(self._data) > 4 * 16000 and len(rest) < len(self._data) // 4:
            self._data = np.zeros(max(16000, 2 * len(rest)), np.float32)  # shrink after a long turn
        self._data[:len(rest)] = rest
        self._used = len(rest)
        self.base += cut

    def clear(self) -> None:
        self.drop_before(self.end)
