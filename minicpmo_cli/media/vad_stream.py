"""Streaming speech detection for live conversations: one Silero VAD with its own state per connection.

The batch VAD (media/vad.py) shares one TorchScript model behind a lock, whose LSTM state lives on the
module. A live connection feeds audio in small pieces for minutes and must never wait for another one, so
each :class:`StreamingVAD` loads its own copy of the same packaged model (about 2 MB, ~50 ms) and keeps its
state to itself: connections run side by side with no lock between them.

Turn rules follow OpenAI's ``server_vad``: speech starts at a window whose probability reaches
``threshold``; it stops once the probability has stayed below ``threshold - 0.15`` (Silero's hysteresis) for
``silence_duration_ms``. ``prefix_padding_ms`` of audio before the start belong to the turn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from minicpmo_cli.media.vad import THRESHOLD_DROP, WINDOW, model_path
from minicpmo_cli.units import INPUT_SAMPLE_RATE

DEFAULT_THRESHOLD = 0.5
DEFAULT_PREFIX_PADDING_MS = 300
DEFAULT_SILENCE_MS = 500


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "start" | "stop"
    sample: int  # 16 kHz sample index in the stream: where speech started (padding included) or ended


class StreamingVAD:
    """Feed 16 kHz float32 samples with :meth:`feed`; get start/stop events as they become certain."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS,
                 silence_duration_ms: int = DEFAULT_SILENCE_MS) -> None:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._model = torch.jit.load(str(model_path()), map_location="cpu").eval()
        self.configure(threshold, prefix_padding_ms, silence_duration_ms)
        self._pending = np.zeros(0, np.float32)
        self.position = 0  # samples consumed by full windows
        self.speaking = False
        self._quiet_since: int | None = None

    def configure(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int) -> None:
        self.threshold = float(threshold)
        self.low = max(self.threshold - THRESHOLD_DROP, 0.01)
        self.prefix_samples = int(prefix_padding_ms) * INPUT_SAMPLE_RATE // 1000
        self.silence_samples = max(WINDOW, int(silence_duration_ms) * INPUT_SAMPLE_RATE // 1000)

    def reset(self) -> None:
        """Forget the LSTM state and any speech in progress (the stream position goes on)."""
        self._model.reset_states()
        self.speaking, self._quiet_since = False, None

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Events decided by these samples (whole 32 ms windows; a remainder waits for the next call)."""
        import torch

        data = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        count = len(data) // WINDOW
        self._pending = data[count * WINDOW:]
        events: list[VadEvent] = []
        with torch.inference_mode():
            for index in range(count):
                window = torch.from_numpy(data[index * WINDOW:(index + 1) * WINDOW].copy())[None]
                prob = float(self._model(window, INPUT_SAMPLE_RATE))
                event = self._update(prob)
                self.position += WINDOW
                if event is not None:
                    events.append(event)
        return events

    def _update(self, prob: float) -> VadEvent | None:
        if not self.speaking:
            if prob >= self.threshold:
                self.speaking, self._quiet_since = True, None
                return VadEvent("start", max(0, self.position - self.prefix_samples))
            return None
        if prob >= self.threshold:
            self._quiet_since = None
            return None
        if prob < self.low and self._quiet_since is None:
            self._quiet_since = self.position
        if self._quiet_since is None:
            return None
        if self.position + WINDOW - self._quiet_since >= self.silence_samples:
            self.speaking = False
            end, self._quiet_since = self._quiet_since, None
            return VadEvent("stop", end)
        return None
