"""Sampling for the TTS's audio codes: the reference's logits processors (``gen_logits``) and multinomial
samplers, one of which reproduces the reference environment's random draws bit for bit."""

from __future__ import annotations

import struct

import numpy as np
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from minicpmo_cli.model.tts import AUDIO_EOS_ID


class RepetitionPenaltyWindow:
    """ChatTTS-style repetition penalty over the last ``past_window`` frames: logits are multiplied
    (negative) or divided (positive) by ``penalty ** count``. Inactive with the official penalty 1.0."""

    def __init__(self, penalty: float, num_codes: int, past_window: int = 16) -> None:
        self.penalty = float(penalty)
        self.num_codes = num_codes
        self.past_window = past_window

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.size(1) > self.past_window:
            input_ids = input_ids[:, -self.past_window :]
        freq = F.one_hot(input_ids, scores.size(1)).sum(1)
        if freq.size(0) > self.num_codes:
            freq[self.num_codes :] = 0
        alpha = torch.pow(self.penalty, freq)
        return torch.where(scores < 0, scores * alpha, scores / alpha)


def make_logits_processors(top_p=0.7, top_k=20, repetition_penalty=1.0, num_codes=626):
    """As the reference's ``gen_logits``: (warpers, processors)."""
    warpers = []
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p, min_tokens_to_keep=3))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k, min_tokens_to_keep=3))
    processors = []
    if repetition_penalty is not None and repetition_penalty != 1:
        processors.append(RepetitionPenaltyWindow(repetition_penalty, num_codes, 16))
    return warpers, processors


_MCG31_A = 1132489760  # MKL VSL_BRNG_MCG31 multiplier
_MCG31_M = 2**31 - 1
_MT_STATE_WORDS = 624


class ReferenceSampler:
    """Multinomial sampling that reproduces, bit for bit, ``torch.multinomial(probs, 1)`` of the reference
    environment (torch 2.3.1 CPU with MKL), so seeded runs give the reference's audio codes.

    That torch drew one 32-bit number from the torch generator per call, seeded MKL's MCG31 stream with it,
    filled ``q ~ Exp(1)`` as ``-ln(u)`` and returned ``argmax(probs / q)`` (the Gumbel-max trick: a correct
    multinomial draw). Newer torch draws ``q`` differently, so plain ``torch.multinomial`` no longer matches.

    ``seed``: a private Mersenne Twister seeded like ``torch.manual_seed(seed)`` (global RNG untouched).
    Otherwise the 32-bit draws come from ``generator`` (or torch's global generator), read from its state and
    then consumed, exactly as the reference consumed them.
    """

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        self._mt = np.random.RandomState(seed % 2**32) if seed is not None else None
        self._generator = generator
        self._powers = np.ones(1, dtype=np.int64)

    @property
    def private(self) -> bool:
        """Whether the draws come from a stream of this sampler's own (a seed or a generator), not torch's
        global one: only then may its draws be rewound while other callers draw (the TTS engine's rows)."""
        return self._mt is not None or self._generator is not None

    def _next_seed(self) -> int:
        if self._mt is not None:
            return int(self._mt.randint(0, 2**32, dtype=np.uint32))
        state = (self._generator.get_state() if self._generator is not None else torch.get_rng_state()).numpy()
        raw = state.tobytes()
        (left,) = struct.unpack_from("<i", raw, 8)
        (position,) = struct.unpack_from("<Q", raw, 16)
        key = np.frombuffer(raw, dtype="<u8", count=_MT_STATE_WORDS, offset=24).astype(np.uint32)
        peek = np.random.RandomState()
        peek.set_state(("MT19937", key, _MT_STATE_WORDS if left <= 1 else int(position), 0, 0.0))
        value = int(peek.randint(0, 2**32, dtype=np.uint32))
        # Consume the same draw from the torch generator (int32 random_ takes one 32-bit output, mod 2**31).
        drawn = int(torch.empty(1, dtype=torch.int32).random_(generator=self._generator))
        return value if drawn == value % 2**31 else drawn  # layout changed: still random, no longer exact

    def _exponential(self, seed: int, count: int) -> np.ndarray:
        while self._powers.shape[0] < count:  # a**i mod M, extended by doubling
            n = self._powers.shape[0]
            step = pow(_MCG31_A, n, _MCG31_M)
            self._powers = np.concatenate([self._powers, (self._powers * step) % _MCG31_M])
        state = seed % _MCG31_M or 1  # MKL: seed mod M, 0 -> 1; the seed state is the first output
        uniform = ((state * self._powers[:count]) % _MCG31_M).astype(np.float64) / _MCG31_M
        return -np.log(uniform.astype(np.float32))

    def snapshot(self):
        """The state of the random stream (host-side: no device read), for :meth:`restore`."""
        if self._mt is not None:
            return self._mt.get_state()
        return self._generator.get_state() if self._generator is not None else torch.get_rng_state()

    def restore(self, state) -> None:
        """Back to a :meth:`snapshot` (frames drawn past the end of speech are dropped, their draws undone)."""
        if self._mt is not None:
            self._mt.set_state(state)
        elif self._generator is not None:
            self._generator.set_state(state)
        else:
            torch.set_rng_state(state)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """probs ``[rows, n]`` (float32) -> indices ``[rows, 1]``."""
        q = _to_device(self._exponential(self._next_seed(), probs.numel()), probs.device)
        q = q.to(dtype=probs.dtype).view_as(probs)
        return torch.argmax(probs / q, dim=-1, keepdim=True)


def _to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host numbers onto ``device`` without waiting for the device: a copy from pageable memory to a GPU makes
    the host wait for every kernel queued before it (for each row's frame: the rows of a batched step would
    take turns), so they are staged in pinned memory (the caching host allocator keeps the block until the
    copy is done) and copied asynchronously."""
    if device.type != "cuda":
        return torch.from_numpy(values).to(device)
    staged = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
    staged.numpy()[...] = values
    return staged.to(device, non_blocking=True)


class TorchSampler:
    """Plain ``torch.multinomial`` with an optional generator (current torch's random stream)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, num_samples=1, generator=self.generator)


class FrameBudget:
    """Wraps the TTS sampler: after ``limit`` frames it draws the audio EOS, which ends the piece.

    ``generate_codes`` checks its own cap only after the 31 text chunks (775 frames), so a short cap has to
    act here; with the default 2048 frames it never fires before the reference's own cap would.
    """

    def __init__(self, sampler, limit: int) -> None:
        self.sampler, self.limit = sampler, int(limit)
        self.frames = 0
        self.capped = False

    @property
    def private(self) -> bool:
        """Whether the draws are the wrapped sampler's own stream (generation/tts_engine.py rewinds only those)."""
        return bool(getattr(self.sampler, "private", True))

    def snapshot(self):
        """For the frame loop's rewind past the end of speech (generation/tts_decode.py iter_frames)."""
        return self.sampler.snapshot(), self.frames, self.capped

    def restore(self, state) -> None:
        inner, self.frames, self.capped = state
        self.sampler.restore(inner)

    def sample(self, probs):
        drawn = self.sampler.sample(probs)
        self.frames += 1
        if self.frames > self.limit:
            drawn[0, 0] = AUDIO_EOS_ID
            self.capped = True
        return drawn
