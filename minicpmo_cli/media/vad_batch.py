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
many files == VAD file by file, with any number of worker threads (each call runs whole on one). The model is
the one media/vad.py loads: only its stateless parts run here, so no lock is shared with other callers; one
thread uses a BatchVAD at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np

from minicpmo_cli.media import vad as silero
from minicpmo_cli.units import INPUT_SAMPLE_RATE

CPU_ROWS = 32  # blocks per LSTM batch on the CPU
CUDA_ROWS = 512  # on a GPU: wide batches are almost free
ENCODE_WINDOWS = 1024  # windows through the stateless encoder in one call on the CPU (a fixed shape too)
CUDA_ENCODE_WINDOWS = 8192  # 19 MB of windows a call: large for the GPU, small for the host
CPU_WORKERS = 2  # threads of the CPU VAD (its calls are independent: any number gives the same bits)
STEPS = silero.WARMUP_WINDOWS + silero.BLOCK_WINDOWS  # LSTM steps of one block (its warm-up first)


def rows_for(device: str) -> int:
    return CPU_ROWS if str(device).startswith("cpu") else CUDA_ROWS


@dataclass(frozen=True)
class Block:
    """One block as media/vad.py cuts a file: ``samples`` [(WARMUP + BLOCK) * WINDOW] (its warm-up audio
    first), the first step that is not silence before the file (WARMUP for a file's first block, else 0),
    and the steps that hold file audio (warm-up included). ``follows``: the block before it in the same
    call is its file's previous block, whose last windows are its warm-up (encoded once for both)."""

    samples: np.ndarray
    first: int
    steps: int
    follows: bool = False


def own_steps(block: Block) -> list[tuple[int, int]]:
    """The step ranges whose windows are encoded for ``block``: a block that follows another shares that
    one's windows for its warm-up but its first step (whose context is silence in its own row)."""
    if block.follows:
        return [(0, 1), (silero.WARMUP_WINDOWS, block.steps)]
    return [(block.first, block.steps)]


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
                  warmup + min(block, windows - b * block), follows=b > 0) for b in range(count)], windows


class BatchVAD:
    """Speech probabilities and regions of many 16 kHz files per call (see the module docstring)."""

    def __init__(self, device: str = "cpu", rows: int | None = None, workers: int | None = None) -> None:
        self.device = str(device)
        self.rows = rows or rows_for(self.device)
        on_cpu = self.device.startswith("cpu")
        self.encode_windows = ENCODE_WINDOWS if on_cpu else CUDA_ENCODE_WINDOWS
        self.workers = max(1, workers or (CPU_WORKERS if on_cpu else 1))
        # Shared with media/vad.py (loaded once per process and device): only its stateless parts run here.
        self.model = silero.load_vad_model(self.device)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """End the worker threads (a later call starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> BatchVAD:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _map(self, function, items: list) -> list:
        """``function`` over ``items`` on the workers, each call on one intra-op thread (media/vad.py says why;
        the calls are large, and independent of each other: which thread runs one changes none of its bits)."""
        import torch

        def run(item):
            with torch.inference_mode(), silero.one_thread(self.device):
                return function(item)

        if self.workers == 1 or len(items) <= 1:
            return [run(item) for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="minicpmo-vad")
        return list(self._pool.map(run, items))

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
        entry, chunks, parts = self._entries(blocks), self._chunks(blocks), []
        while wave := list(islice(chunks, 2 * self.workers)):  # a few chunks in memory at a time
            parts += self._map(self._encode_chunk, wave)
        with torch.inference_mode(), silero.one_thread(self.device):  # one op: on a busy CPU, 2 threads cost 30x
            features = torch.cat(parts)
        order = sorted(range(len(blocks)), key=lambda index: -blocks[index].steps)  # stable
        batches = [order[first:first + self.rows] for first in range(0, len(order), self.rows)]

        def run(part: list[int]) -> np.ndarray:
            index = np.zeros((self.rows, STEPS), np.int64)  # 0: the encoded zero window
            index[:len(part)] = entry[part]
            probs = self._lstm(features[torch.from_numpy(index).to(self.device)], max(blocks[i].steps for i in part))
            return probs[:len(part), silero.WARMUP_WINDOWS:].float().cpu().numpy()

        for part, probs in zip(batches, self._map(run, batches)):
            out[part] = probs
        return out

    def _entries(self, blocks: list[Block]) -> np.ndarray:
        """The encoded window each step of each block reads [blocks, STEPS]: entry 0 is a zero window, which
        stands for the silence before a file and for the steps past its end; the others are numbered in
        the order :meth:`_chunks` gives them."""
        entry = np.zeros((len(blocks), STEPS), np.int64)
        count = 1
        for row, block in enumerate(blocks):
            for low, high in own_steps(block):
                entry[row, low:high] = np.arange(count, count + high - low)
                count += high - low
            if block.follows:
                if row == 0 or blocks[row - 1].steps != STEPS:
                    raise ValueError("a block that follows another comes right after a whole block")
                entry[row, 1:silero.WARMUP_WINDOWS] = entry[row - 1, silero.BLOCK_WINDOWS + 1:]
        return entry

    def _chunks(self, blocks: list[Block]) -> Iterator[tuple[np.ndarray, int]]:
        """Every window that counts, as (chunk [encode_windows, context + WINDOW], windows used), each window
        with the samples before it as its context (made as they are encoded: a few chunks at a time)."""
        context = int(self.model._model.context_size_samples)
        chunk = np.zeros((self.encode_windows, context + silero.WINDOW), np.float32)
        filled = 1  # the first chunk's row 0: the zero window
        for block in blocks:
            padded = np.concatenate([np.zeros(context, np.float32), block.samples])
            windows = np.lib.stride_tricks.sliding_window_view(padded, context + silero.WINDOW)[::silero.WINDOW]
            view, done = np.concatenate([windows[low:high] for low, high in own_steps(block)]), 0
            while done < len(view):
                take = min(len(view) - done, len(chunk) - filled)
                chunk[filled:filled + take] = view[done:done + take]
                filled, done = filled + take, done + take
                if filled == len(chunk):
                    yield chunk, filled
                    chunk, filled = np.zeros_like(chunk), 0
        if filled:
            yield chunk, filled

    def _encode_chunk(self, chunk_used: tuple[np.ndarray, int]):
        """The features of the windows used in a chunk (always encoded whole: a fixed shape; zeros after)."""
        import torch

        inner = self.model._model
        chunk, used = chunk_used
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
        with silero.model_lock(), torch.inference_mode(), silero.one_thread(self.device):  # its state is shared
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
