"""One utterance in a slot of the TTS engine (generation/tts_engine.py): the schedule of the one-at-a-time
loop (generation/speech.py ``generate_codes``) cut into steps, so that many rows share each batched step.

Per piece: the text prompt and its streaming mask; then 25-frame generate calls, each after the prefill of
its text chunk (12 positions, then 10) over the 31 chunks, then calls until the end of speech or the frame
cap. Within a call a row draws through the frame loop's own pieces (``pick_frame``: temperature, processors
and warpers skipped on the BOS step, the EOS ban for the first frames of each call, the row's own sampler),
and its end of speech is settled as ``iter_frames`` settles it (``settle_frames``: every few frames, the
frames past the EOS dropped and the sampler rewound), so each row draws what it draws alone.
"""

from __future__ import annotations

import math

import torch

from minicpmo_cli.generation.tts_decode import (
    CHECK_FRAMES,
    DrawnFrame,
    FrameSampling,
    StepMask,
    TTSState,
    pick_frame,
    prefill_text,
    settle_frames,
    text_chunk_bounds,
)
from minicpmo_cli.generation.tts_requests import TTSHandle

CALL_FRAMES = 25  # frames per generate call (the reference's output_chunk_size; speech.OUTPUT_CHUNK_FRAMES)


class SlotCache:
    """A row's slot as the cache of its :class:`TTSState`: views of the slot's buffers in the engine's current
    pool (growth replaces the pool, so they are looked up at each use) and the slot's filled length."""

    def __init__(self, engine, slot: int) -> None:
        self.engine, self.slot = engine, slot

    @property
    def keys(self) -> list[torch.Tensor]:
        return [k[self.slot : self.slot + 1] for k in self.engine.pool.keys]

    @property
    def values(self) -> list[torch.Tensor]:
        return [v[self.slot : self.slot + 1] for v in self.engine.pool.values]

    @property
    def length(self) -> int:
        return self.engine.pool.lengths[self.slot]

    @length.setter
    def length(self, value: int) -> None:
        self.engine.pool.lengths[self.slot] = int(value)

    @property
    def capacity(self) -> int:
        return self.engine.pool.capacity

    def advance(self, count: int) -> None:
        self.engine.pool.lengths[self.slot] += int(count)

    def ensure_capacity(self, needed: int) -> None:
        self.engine.make_room(needed)

    def zero(self) -> None:
        for buffer in (*self.engine.pool.keys, *self.engine.pool.values):
            buffer[self.slot].zero_()
        self.length = 0


class Row:
    """A request in its slot: which piece, which generate call, the frames drawn since the last settle."""

    def __init__(self, engine, handle: TTSHandle, slot: int) -> None:
        self.engine, self.handle, self.slot = engine, handle, slot
        self.cache = SlotCache(engine, slot)
        self.piece = 0
        self.call = 0  # generate calls of this piece so far
        self.step = 0  # frames drawn in this call
        self.drawn: list[DrawnFrame] = []
        self.state: TTSState | None = None
        self.sampling: FrameSampling | None = None
        self.mask: StepMask | None = None
        self.every = 1
        self.rewinds = False

    @property
    def tts(self):
        return self.engine.tts

    @property
    def chunks(self) -> int:
        return math.ceil(self.tts.condition_length / self.tts.streaming_text_chunk_size)

    def start_piece(self) -> None:
        """A fresh state for the current piece in the zeroed slot, and its first call (first text chunk)."""
        tts, request = self.tts, self.handle.request
        self.cache.zero()
        self.state = TTSState(tts, CALL_FRAMES, cache=self.cache)
        sampler = request.pieces[self.piece].sampler
        self.sampling = FrameSampling.for_tts(tts, request.temperature, sampler)
        self.rewinds = hasattr(sampler, "snapshot") and hasattr(sampler, "restore")
        # a sampler on torch's global stream is never rewound here: other rows draw from it in between
        private = getattr(sampler, "private", True)
        self.every = max(int(self.engine.check_every), 1) if self.rewinds and private else 1
        if not private:
            self.rewinds = False
        self.call = 0
        self.begin_call()

    def begin_call(self) -> None:
        """Prefill this call's text chunk (calls past the 31 chunks have none) and open a 25-frame call."""
        tts, state = self.tts, self.state
        input_ids, _ = self.handle.prompts[self.piece]
        if self.call < self.chunks:
            begin, end = text_chunk_bounds(tts, self.call)
            if end > begin:
                spk = self.handle.request.spk_embeds if begin == 0 else None
                prefill_text(tts, state, input_ids[:, begin:end], begin, spk)
        if state.progress != state.cache.length + 1:
            raise ValueError(f"audio ids length {state.progress} != KV-cache length + 1 ({state.cache.length + 1})")
        state.reserve(CALL_FRAMES)
        state.finished = False
        self.mask = StepMask(tts, self.handle.prompts[self.piece][1])
        self.step, self.drawn = 0, []

    def draw(self, logits: torch.Tensor) -> bool:
        """Draw this step's frame from the row's raw logits ``[num_vq, V]``; True when the end of speech is
        due to be read (every few frames, and at the end of the call)."""
        state, sampling = self.state, self.sampling
        banned = self.step < sampling.min_new_frames
        eos = pick_frame(self.tts, state, sampling, logits, banned)
        snapshot = sampling.sampler.snapshot() if self.rewinds else None
        self.drawn.append(DrawnFrame(self.step, state.progress, eos, snapshot))
        state.progress += 1
        self.step += 1
        return len(self.drawn) >= self.every or self.step == CALL_FRAMES

    def settle(self, hits: list) -> None:
        """The EOS flags of the frames drawn since the last settle (read by the engine for all rows at once)."""
        sampler = self.sampling.sampler if self.rewinds else _NoRewind()
        for _ in settle_frames(self.state, self.drawn, sampler, None, hits=hits):
            pass
        self.drawn = []

    @property
    def call_over(self) -> bool:
        return self.state.finished or self.step == CALL_FRAMES

    def end_call(self) -> bool:
        """After a call: the next call, or the piece is done (EOS, or past the cap once the text is all in);
        then the next piece. False once the request's last piece is done."""
        state = self.state
        if not state.finished:
            self.call += 1
            capped = self.call > self.chunks and state.new_ids.shape[1] > self.handle.request.max_new_tokens
            if not capped:
                self.begin_call()
                return True
        self.handle._piece(state.new_ids.clone())
        self.piece += 1
        if self.piece < len(self.handle.request.pieces):
            self.start_piece()
            return True
        return False

    def stop(self) -> None:
        """Aborted: settle what was drawn (one read) and hand over the frames kept so far of this piece."""
        if self.state is None:
            return
        if self.drawn:
            self.settle(torch.stack([d.eos for d in self.drawn]).tolist())
        if self.state.new_ids.shape[1]:
            self.handle._piece(self.state.new_ids.clone())


class _NoRewind:
    """Stands in for a sampler that is not rewound (checked every frame: there is nothing to rewind)."""

    def restore(self, state) -> None:
        raise AssertionError("a row checked every frame has no frames drawn past its end of speech")
