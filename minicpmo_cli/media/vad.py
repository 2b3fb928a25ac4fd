"""Where the speech is: Silero VAD speech probabilities and the speech regions they give.

The Silero model ships inside the ``silero-vad`` wheel as a TorchScript file, so it loads with torch alone
(no download, no torchaudio). We load that file directly instead of calling ``silero_vad.load_silero_vad``:
importing the ``silero_vad`` package runs ``torch.set_num_threads(1)``, which would slow the whole process
(the ASR model included) down to one core.

The model gives one probability per 512-sample window (32 ms at 16 kHz) and carries an LSTM state from
window to window. A long file is cut into blocks that run side by side as one batch (many times faster on a
CPU than one window at a time); each block first sees the second before it, so its state is warm when its
own windows start. The LSTM remembers further back than that, so probabilities differ a little from a
strictly sequential run; region edges move by at most a window or two (measured: <= 64 ms on speech), at
about a tenth of the time on a CPU.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from minicpmo_cli.errors import EnvironmentProblem
from minicpmo_cli.units import INPUT_SAMPLE_RATE

WINDOW = 512  # samples per speech probability: the model's fixed frame at 16 kHz (32 ms)
BLOCK_WINDOWS = 256  # windows per block of the batch (about 8 s)
WARMUP_WINDOWS = 32  # windows of the preceding audio each block sees first (about 1 s)

# Region defaults (Silero's own defaults, but a longer pause: a region is then about a sentence or a
# phrase, which is what a subtitle cue and a cut for the ASR model want).
DEFAULT_THRESHOLD = 0.5  # a window is speech at or above this probability ...
THRESHOLD_DROP = 0.15  # ... and stays speech until it falls below threshold - this (Silero's hysteresis)
DEFAULT_MIN_SILENCE_MS = 500  # a pause must be this long to end a region
MIN_SPEECH_MS = 250  # shorter regions are clicks or breaths: dropped
SPEECH_PAD_MS = 30  # each region is widened by this much on both sides (Silero's speech_pad_ms)

_MODEL_FILE = ("data", "silero_vad.jit")  # inside the silero_vad package
_LOCK = threading.Lock()  # the TorchScript wrapper keeps its state on the module: one caller at a time


def model_path() -> Path:
    """The packaged Silero JIT file, found without importing the package (see the module docstring)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise EnvironmentProblem("the silero-vad package is not installed (pip install silero-vad)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_MODEL_FILE)
    if not path.is_file():
        raise EnvironmentProblem(f"the silero-vad package has no {'/'.join(_MODEL_FILE)}: reinstall it")
    return path


@lru_cache(maxsize=None)
def load_vad_model(device: str = "cpu"):
    """The Silero VAD TorchScript model on ``device`` (loaded once per process and device)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 flags torch.jit.load; it still works
        model = torch.jit.load(str(model_path()), map_location=device)
    return model.eval()


def speech_probabilities(samples: np.ndarray, device: str = "cpu") -> np.ndarray:
    """One speech probability per 512-sample window of 16 kHz ``samples`` (the last window zero-padded)."""
    import torch

    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    windows = -(-len(samples) // WINDOW)
    if windows == 0:
        return np.zeros(0, np.float32)
    blocks = -(-windows // BLOCK_WINDOWS)
    span = (WARMUP_WINDOWS + BLOCK_WINDOWS) * WINDOW
    padded = np.zeros(WARMUP_WINDOWS * WINDOW + blocks * BLOCK_WINDOWS * WINDOW, np.float32)
    padded[WARMUP_WINDOWS * WINDOW:WARMUP_WINDOWS * WINDOW + len(samples)] = samples
    # Block b covers windows [b*B, (b+1)*B) and is preceded by WARMUP windows (silence before block 0).
    rows = np.stack([padded[b * BLOCK_WINDOWS * WINDOW:b * BLOCK_WINDOWS * WINDOW + span] for b in range(blocks)])
    batch = torch.from_numpy(rows).to(device)
    model = load_vad_model(device)
    steps = WARMUP_WINDOWS + BLOCK_WINDOWS
    with _LOCK, torch.inference_mode(), one_thread(device):
        model.reset_states()
        out = [model(batch[:, t * WINDOW:(t + 1) * WINDOW], INPUT_SAMPLE_RATE) for t in range(steps)]
    probs = torch.cat(out, dim=1)[:, WARMUP_WINDOWS:].float().cpu().numpy()  # [blocks, B]
    return probs.reshape(-1)[:windows]


def model_lock() -> threading.Lock:
    """The lock around the shared model's forward (its LSTM state lives on the module)."""
    return _LOCK


@contextmanager
def one_thread(device: str):
    """One intra-op thread on the CPU while the VAD runs (the setting is restored after).

    Each window is a handful of tiny ops: with several threads, their barriers cost more than the work, and
    on a busy machine the run is 10-50 times slower (measured: 10 s of audio took 10-40 s with 2 threads
    under load, 0.9 s with 1). Silero's own loader sets one thread for the whole process for this reason.
    """
    import torch

    if not str(device).startswith("cpu"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_one_thread = one_thread  # its earlier name


def regions_from_probabilities(probs: np.ndarray, total: int, threshold: float = DEFAULT_THRESHOLD,
                               min_silence_ms: int = DEFAULT_MIN_SILENCE_MS, min_speech_ms: int = MIN_SPEECH_MS,
                               pad_ms: int = SPEECH_PAD_MS, sr: int = INPUT_SAMPLE_RATE) -> list[tuple[int, int]]:
    """Speech regions ``[(start, end), ...]`` in samples (sorted, disjoint, within ``[0, total]``).

    Speech starts at a window whose probability reaches ``threshold`` and ends where it stays below
    ``threshold - 0.15`` for ``min_silence_ms``; regions shorter than ``min_speech_ms`` are dropped; the rest
    are widened by ``pad_ms`` and merged where the padding makes them touch.
    """
    tracker = RegionTracker(threshold, min_silence_ms, min_speech_ms, pad_ms, sr)
    return tracker.feed(probs) + tracker.finish(total)


class RegionTracker:
    """:func:`regions_from_probabilities` fed a stream of probabilities: each region is handed out as soon as
    no later probability can change it (it ended, and no later region can reach it with its padding)."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, min_silence_ms: int = DEFAULT_MIN_SILENCE_MS,
                 min_speech_ms: int = MIN_SPEECH_MS, pad_ms: int = SPEECH_PAD_MS,
                 sr: int = INPUT_SAMPLE_RATE) -> None:
        self.threshold = threshold
        self.low = max(threshold - THRESHOLD_DROP, 0.01)
        self.silence_windows = max(1, int(round(min_silence_ms * sr / 1000 / WINDOW)))
        self.pad = int(round(pad_ms * sr / 1000))
        self.shortest = int(round(min_speech_ms * sr / 1000))
        self.index = 0  # windows seen
        self.start: int | None = None  # the window where the speech in progress started
        self.quiet_since: int | None = None
        self.pending: tuple[int, int] | None = None  # the last padded region (its end not yet clamped)

    def feed(self, probs: np.ndarray) -> list[tuple[int, int]]:
        """The regions these probabilities make final."""
        out: list[tuple[int, int]] = []
        for prob in np.asarray(probs, dtype=np.float32).tolist():
            index = self.index
            self.index += 1
            if prob >= self.threshold:
                self.quiet_since = None
                if self.start is None:
                    self.start = index
            elif self.start is not None and prob < self.low:
                self.quiet_since = index if self.quiet_since is None else self.quiet_since
                if index + 1 - self.quiet_since >= self.silence_windows:
                    self._close(self.start, self.quiet_since * WINDOW, out)
                    self.start, self.quiet_since = None, None
        # A later region starts at the speech in progress, or later: padded, can it still reach the last one?
        later = (self.index if self.start is None else self.start) * WINDOW - self.pad
        if self.pending is not None and later > self.pending[1] and self.pending[1] <= (self.index - 1) * WINDOW:
            out.append(self.pending)
            self.pending = None
        return out

    def finish(self, total: int) -> list[tuple[int, int]]:
        """The regions left once the stream of ``total`` samples has ended."""
        out: list[tuple[int, int]] = []
        if self.start is not None:
            last = self.quiet_since if self.quiet_since is not None else self.index
            self._close(self.start, min(last * WINDOW, total), out)
            self.start, self.quiet_since = None, None
        if self.pending is not None:
            out.append((self.pending[0], min(total, self.pending[1])))
            self.pending = None
        return out

    def _close(self, first: int, end: int, out: list[tuple[int, int]]) -> None:
        """A raw region ended: dropped when short, else padded and merged into the last one it reaches."""
        begin = first * WINDOW
        if end - begin < self.shortest:
            return
        begin, end = max(0, begin - self.pad), end + self.pad
        if self.pending is not None and begin <= self.pending[1]:
            self.pending = (self.pending[0], end)
            return
        if self.pending is not None:
            out.append(self.pending)
        self.pending = (begin, end)


def speech_regions(samples: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                   min_silence_ms: int = DEFAULT_MIN_SILENCE_MS, device: str = "cpu") -> list[tuple[int, int]]:
    """The speech regions of 16 kHz mono ``samples``, in samples: ``[]`` for silence, noise or music."""
    probs = speech_probabilities(samples, device)
    return regions_from_probabilities(probs, len(samples), threshold, min_silence_ms)
