"""Silero VAD over many files at once: the blocks of every file in one batch, in batches of a fixed shape.

``media/vad.py`` runs one file's blocks as a batch, calling the model once per 32 ms window (~300 calls of a
few tiny ops per batch). Here the blocks of many files share each batch, and the model runs as its parts: the
stateless feature extractor and encoder over every window at once, only the LSTM cell window by window
(:meth:`BatchVAD._split_steps`), so a folder of short clips costs a few large calls instead of a few hundred
small ones per file.

Why a fixed shape: a matrix product's rounding depends on how many rows it multiplies, so the same block in a
batch of 3 rows and of 40 rows gets probabilities that differ in the last bits (measured: up to 3e-5), which
can move a region edge that sits on the threshold. Every batch here has exactly ``rows`` rows (zeros fill the
last one), so a file gets bit for bit the same probabilities alone or among any other files: VAD over many
files == VAD file by file. Each BatchVAD has its own model instance (the TorchScript module keeps its state on
itself): no lock shared with other callers; one thread uses an instance at a time.
"""

from __future__ import annotations

import warnings

import numpy as np

from minicpmo_cli.media import vad as silero
from minicpmo_cli.units import INPUT_SAMPLE_RATE

CPU_ROWS = 32  # blocks per batch on the CPU
CUDA_ROWS = 512  # on a GPU: wide batches are almost free
ENCODER_ROWS = 8  # rows whose windows go through the stateless encoder in one call (a fixed shape too)


def rows_for(device: str) -> int:
    return CPU_ROWS if str(device).startswith("cpu") else CUDA_ROWS


def file_blocks(samples: np.ndarray) -> tuple[np.ndarray, int]:
    """The blocks [n, (WARMUP + BLOCK) * WINDOW] one file is cut into (as media/vad.py cuts it), and its
    number of windows."""
    window, block, warmup = silero.WINDOW, silero.BLOCK_WINDOWS, silero.WARMUP_WINDOWS
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    windows = -(-len(samples) // window)
    blocks = -(-windows // block)
    span = (warmup + block) * window
    padded = np.zeros(warmup * window + blocks * block * window, np.float32)
    padded[warmup * window:warmup * window + len(samples)] = samples
    if blocks == 0:
        return np.zeros((0, span), np.float32), 0
    starts = np.arange(blocks) * block * window
    return np.stack([padded[s:s + span] for s in starts]), windows


class BatchVAD:
    """Speech probabilities and regions of many 16 kHz files per call (see the module docstring)."""

    def __init__(self, device: str = "cpu", rows: int | None = None) -> None:
        import torch

        self.device = str(device)
        self.rows = rows or rows_for(self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 flags torch.jit.load
            self.model = torch.jit.load(str(silero.model_path()), map_location=self.device).eval()

    def probabilities(self, files: list[np.ndarray]) -> list[np.ndarray]:
        """One probability per 512-sample window of each file (what media/vad.py's cut gives, bit-stable)."""
        cut = [file_blocks(samples) for samples in files]
        blocks = [b for b, _ in cut if len(b)]
        if not blocks:
            return [np.zeros(0, np.float32) for _ in files]
        probs = self._run(np.concatenate(blocks))
        out, row = [], 0
        for block_rows, windows in cut:
            out.append(probs[row:row + len(block_rows)].reshape(-1)[:windows].copy())
            row += len(block_rows)
        return out

    def regions(self, files: list[np.ndarray], threshold: float = silero.DEFAULT_THRESHOLD,
                min_silence_ms: int = silero.DEFAULT_MIN_SILENCE_MS) -> list[list[tuple[int, int]]]:
        """The speech regions of each file, in samples."""
        return [silero.regions_from_probabilities(probs, len(samples), threshold, min_silence_ms)
                for probs, samples in zip(self.probabilities(files), files)]

    def _run(self, blocks: np.ndarray) -> np.ndarray:
        """Probabilities [n, BLOCK_WINDOWS] of n blocks, ``self.rows`` blocks per batch."""
        import torch

        out = []
        # One intra-op thread on the CPU (media/vad.py says why); the calls are large enough now that
        # parallel files (the decoding threads, the model) use the other cores better than op threads would.
        with torch.inference_mode(), silero.one_thread(self.device):
            for first in range(0, len(blocks), self.rows):
                part = blocks[first:first + self.rows]
                batch = np.zeros((self.rows, blocks.shape[1]), np.float32)
                batch[:len(part)] = part
                tensor = torch.from_numpy(batch).to(self.device)
                probs = (self._split_steps(tensor, len(part)) if _has_parts(self.model)
                         else self._window_steps(tensor))
                out.append(probs[:len(part), silero.WARMUP_WINDOWS:].float().cpu().numpy())
        return np.concatenate(out)

    def _split_steps(self, batch, used: int):
        """The model's own parts, each over the whole batch at once where it keeps no state: the feature
        extractor and the convolutional encoder over every window of the ``used`` rows (in fixed groups of
        ENCODER_ROWS rows, so that a window's features never depend on what else is computed with it), then
        only the LSTM cell step by step (its state is the one thing carried from window to window), then the
        output layer over every step at once. What the model's forward does per window (its 64 samples of the
        window before as context included), in a few large calls instead of ~300 small ones per batch."""
        import torch

        inner = self.model._model
        rows, steps, window = batch.shape[0], silero.WARMUP_WINDOWS + silero.BLOCK_WINDOWS, silero.WINDOW
        context = int(inner.context_size_samples)
        padded = torch.cat([torch.zeros(rows, context, device=batch.device), batch], dim=1)
        index = (torch.arange(steps, device=batch.device)[:, None] * window
                 + torch.arange(context + window, device=batch.device)[None, :])
        parts = []
        for first in range(0, max(used, 1), ENCODER_ROWS):  # rows past ``used`` are padding: results dropped
            windows = padded[first:first + ENCODER_ROWS][:, index].reshape(ENCODER_ROWS * steps, context + window)
            parts.append(inner.encoder(inner.run_extractors(windows)).reshape(ENCODER_ROWS, steps, -1))
        features = torch.cat(parts)[:rows]
        if len(features) < rows:
            zeros = torch.zeros(rows - len(features), steps, features.shape[-1], device=batch.device)
            features = torch.cat([features, zeros.to(features.dtype)])
        rnn = inner.decoder.rnn
        h = torch.zeros(rows, rnn.hidden_size, device=batch.device)
        c = torch.zeros_like(h)
        hidden = []
        for step in range(steps):
            h, c = rnn(features[:, step], (h, c))
            hidden.append(h)
        scores = inner.decoder.decoder(torch.stack(hidden, 1).reshape(rows * steps, -1, 1))
        return scores.squeeze(1).mean(1).reshape(rows, steps)

    def _window_steps(self, batch):
        """The model's forward window by window (a Silero build without the parts _split_steps uses)."""
        import torch

        window, steps = silero.WINDOW, silero.WARMUP_WINDOWS + silero.BLOCK_WINDOWS
        self.model.reset_states()
        probs = [self.model(batch[:, t * window:(t + 1) * window], INPUT_SAMPLE_RATE) for t in range(steps)]
        return torch.cat(probs, dim=1)


def _has_parts(model) -> bool:
    inner = getattr(model, "_model", None)
    decoder = getattr(inner, "decoder", None)
    return all(hasattr(inner, name) for name in ("encoder", "run_extractors", "context_size_samples")) and \
        hasattr(decoder, "rnn") and hasattr(decoder, "decoder")
