"""Silero VAD over many files at once: the blocks of every file in one batch, in batches of a fixed shape.

``media/vad.py`` runs one file's blocks as a batch, calling the model once per 32 ms window (~300 calls of a
few tiny ops per batch). Here the blocks of many files share each batch, and the model runs as its parts: the
stateless feature extractor and encoder over every window that counts at once, only the LSTM cell window by
window (:meth:`BatchVAD._lstm`), so a folder of short clips costs a few large calls instead of a few hundred
small ones per file.

Work that cannot change a probability is skipped: the silent warm-up before a file's first block shares one
encoded zero window, windows past a file's end are not encoded, and the LSTM of a batch stops at the last
window any of its rows needs (rows are batched longest first, so the short last blocks of files share
batches). The LSTM is causal, so the steps after a row's last window never reach its probabilities.

Why a fixed shape: a matrix product's rounding depends on how many rows it multiplies, so the same block in a
batch of 3 rows and of 40 rows gets probabilities that differ in the last bits (measured: up to 3e-5), which
can move a region edge that sits on the threshold. Every call here has a fixed shape (ENCODE_WINDOWS windows
through the encoder, ``rows`` rows through the LSTM; zeros fill the rest), so a file gets bit for bit the same
probabilities alone, among any other files, or fed block by block as a stream (media/vad_blocks.py): VAD over
many files == VAD file by file. Each BatchVAD has its own model instance (the TorchScript module keeps its
state on itself): no lock shared with other callers; one thread uses an instance at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from minicpmo_cli.media import vad as silero
from minicpmo_cli.units import INPUT_SAMPLE_RATE

CPU_ROWS = 32  # blocks per LSTM batch on the CPU
CUDA_ROWS = 512  # on a GPU: wide batches are almost free
ENCODE_WINDOWS = 2304  # windows through the stateless encoder in one call on the CPU (a fixed shape too)
CUDA_ENCODE_WINDOWS = 32768
STEPS = silero.WARMUP_WINDOWS + silero.BLOCK_WINDOWS  # LSTM steps of one block (its warm-up first)


def rows_for(device: str) -> int:
    return CPU_ROWS if str(device).startswith("cpu") else CUDA_ROWS


@dataclass(frozen=True)
class Block:
    """One block as media/vad.py cuts a file: ``samples`` [(WARMUP + BLOCK) * WINDOW] (its warm-up audio
    first), the first step that is not silence before the file (WARMUP for a file's first block, else 0),
    and the steps that hold file audio (warm-up included)."""

    samples: np.ndarray
    first: int
    steps: int


def file_blocks(samples: np.ndarray) -> tuple[list[Block], int]:
    """The blocks one file is cut into (as media/vad.py cuts it), and its number of windows."""
    window, block, warmup = silero.WINDOW, silero.BLOCK_WINDOWS, silero.WARMUP_WINDOWS
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    windows = -(-len(samples) // window)
    count = -(-windows // block)
    span = STEPS * window
    padded = np.zeros(warmup * window + count * block * window, np.float32)
    padded[warmup * window:warmup * window + len(samples)] = samples
    return [Block(padded[b * block * window:b * block * window + span], warmup if b == 0 else 0,
                  warmup + min(block, windows - b * block)) for b in range(count)], windows


class BatchVAD:
    """Speech probabilities and regions of many 16 kHz files per call (see the module docstring)."""

    def __init__(self, device: str = "cpu", rows: int | None = None) -> None:
        import torch

        self.device = str(device)
        self.rows = rows or rows_for(self.device)
        self.encode_windows = ENCODE_WINDOWS if self.device.startswith("cpu") else CUDA_ENCODE_WINDOWS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 flags torch.jit.load
            self.model = torch.jit.load(str(silero.model_path()), map_location=self.device).eval()

    def probabilities(self, files: list[np.ndarray]) -> list[np.ndarray]:
        """One probability per 512-sample window of each file (what media/vad.py's cut gives, bit-stable)."""
        cut = [file_blocks(samples) for samples in files]
        probs = self.block_probabilities([block for blocks, _ in cut for block in blocks])
        out, row = [], 0
        for blocks, windows in cut:
            out.append(probs[row:row + len(blocks)].reshape(-1)[:windows].copy())
            row += len(blocks)
        return out

    def regions(self, files: list[np.ndarray], threshold: float = silero.DEFAULT_THRESHOLD,
                min_silence_ms: int = silero.DEFAULT_MIN_SILENCE_MS) -> list[list[tuple[int, int]]]:
        """The speech regions of each file, in samples."""
        return [silero.regions_from_probabilities(probs, len(samples), threshold, min_silence_ms)
                for probs, samples in zip(self.probabilities(files), files)]

    def block_probabilities(self, blocks: list[Block]) -> np.ndarray:
        """Probabilities [n, BLOCK_WINDOWS] of n blocks (past a block's ``steps``: meaningless)."""
        import torch

        out = np.zeros((len(blocks), silero.BLOCK_WINDOWS), np.float32)
        if not blocks:
            return out
        if not _has_parts(self.model):
            return self._window_steps(blocks)
        # One intra-op thread on the CPU (media/vad.py says why); the calls are large enough now that
        # parallel files (the decoding threads, the model) use the other cores better than op threads would.
        with torch.inference_mode(), silero.one_thread(self.device):
            features, entry = self._encode(blocks)
            order = sorted(range(len(blocks)), key=lambda index: -blocks[index].steps)  # stable
            for first in range(0, len(order), self.rows):
                part = order[first:first + self.rows]
                index = np.zeros((self.rows, STEPS), np.int64)  # 0: the encoded zero window
                index[:len(part)] = entry[part]
                probs = self._lstm(features[torch.from_numpy(index).to(self.device)],
                                   max(blocks[i].steps for i in part))
                out[part] = probs[:len(part), silero.WARMUP_WINDOWS:].float().cpu().numpy()
        return out

    def _encode(self, blocks: list[Block]):
        """The encoder's features [n, F] of every window that counts (entry 0: a zero window, which stands for
        the silence before a file and for the steps past its end), and the entry of each step [blocks, STEPS]."""
        import torch

        inner = self.model._model
        context = int(inner.context_size_samples)
        entry = np.zeros((len(blocks), STEPS), np.int64)
        views, count = [], 1
        for row, block in enumerate(blocks):
            entry[row, block.first:block.steps] = np.arange(count, count + block.steps - block.first)
            count += block.steps - block.first
            padded = np.concatenate([np.zeros(context, np.float32), block.samples])
            windows = np.lib.stride_tricks.sliding_window_view(padded, context + silero.WINDOW)[::silero.WINDOW]
            views.append(windows[block.first:block.steps])  # each window with the samples before it as context
        chunk = np.zeros((self.encode_windows, context + silero.WINDOW), np.float32)
        parts, filled = [], 1  # chunk row 0 of the first chunk: the zero window
        for view in views:
            done = 0
            while done < len(view):
                take = min(len(view) - done, len(chunk) - filled)
                chunk[filled:filled + take] = view[done:done + take]
                filled, done = filled + take, done + take
                if filled == len(chunk):
                    parts.append(self._encode_chunk(chunk, filled))
                    filled = 0
        if filled:
            parts.append(self._encode_chunk(chunk, filled))
        return torch.cat(parts), entry

    def _encode_chunk(self, chunk: np.ndarray, used: int):
        """The features of the first ``used`` windows of ``chunk`` (always encoded whole: a fixed shape)."""
        import torch

        inner = self.model._model
        chunk[used:] = 0.0
        windows = torch.from_numpy(chunk).to(self.device)
        return inner.encoder(inner.run_extractors(windows)).reshape(len(chunk), -1)[:used]

    def _lstm(self, features, steps: int):
        """Probabilities [rows, STEPS] from the features [rows, STEPS, F] of a batch: the LSTM cell step by step
        up to ``steps`` (its state is the one thing carried from window to window), then the output layer over
        every step at once (a fixed shape)."""
        import torch

        decoder = self.model._model.decoder
        rnn = decoder.rnn
        rows = features.shape[0]
        h = torch.zeros(rows, rnn.hidden_size, device=features.device)
        c = torch.zeros_like(h)
        hidden = torch.zeros(rows, STEPS, rnn.hidden_size, device=features.device)
        weights = (rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh)
        for step in range(steps):
            h, c = torch.lstm_cell(features[:, step], (h, c), *weights)
            hidden[:, step] = h
        scores = decoder.decoder(hidden.reshape(rows * STEPS, -1, 1))
        return scores.squeeze(1).mean(1).reshape(rows, STEPS)

    def _window_steps(self, blocks: list[Block]) -> np.ndarray:
        """The model's forward window by window (a Silero build without the parts used above)."""
        import torch

        out = []
        with torch.inference_mode(), silero.one_thread(self.device):
            for first in range(0, len(blocks), self.rows):
                part = blocks[first:first + self.rows]
                batch = np.zeros((self.rows, STEPS * silero.WINDOW), np.float32)
                batch[:len(part)] = [block.samples for block in part]
                tensor = torch.from_numpy(batch).to(self.device)
                self.model.reset_states()
                probs = [self.model(tensor[:, t * silero.WINDOW:(t + 1) * silero.WINDOW], INPUT_SAMPLE_RATE)
                         for t in range(STEPS)]
                out.append(torch.cat(probs, dim=1)[:len(part), silero.WARMUP_WINDOWS:].float().cpu().numpy())
        return np.concatenate(out)


def _has_parts(model) -> bool:
    inner = getattr(model, "_model", None)
    decoder = getattr(inner, "decoder", None)
    rnn = getattr(decoder, "rnn", None)
    return all(hasattr(inner, name) for name in ("encoder", "run_extractors", "context_size_samples")) and \
        all(hasattr(rnn, name) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "hidden_size")) and \
        hasattr(decoder, "decoder")
