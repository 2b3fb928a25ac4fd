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
import torch.nn.functional as F

from minicpmo_cli.generation.tts_decode import (
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

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``StaticKV.write``: new positions at ``slots`` of ``layer`` (a streamed segment's primer frames,
        generation/tts_decode.py ``prefill_audio``); that layer's filled part including them."""
        pool, end = self.engine.pool, self.length + keys.shape[2]
        key_rows = pool.keys[layer][self.slot : self.slot + 1]
        value_rows = pool.values[layer][self.slot : self.slot + 1]
        key_rows.index_copy_(2, slots, keys)
        value_rows.index_copy_(2, slots, values)
        return key_rows.narrow(2, 0, end), value_rows.narrow(2, 0, end)

    def ensure_capacity(self, needed: int) -> None:
        self.engine.make_room(needed)

    def zero(self) -> None:
        for buffer in (*self.engine.pool.keys, *self.engine.pool.values):
            buffer[self.slot].zero_()
        self.length = 0


class Row:
    """A request in its slot: which piece, which generate call, the frames drawn since the last settle."""

    waiting = False  # a streamed row waiting for text (generation/tts_stream.py); skipped by the steps

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

    def start_piece(self) -> bool:
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
        return True

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

    def draw(self, logits: torch.Tensor) -> None:
        """Draw this step's frame from the row's raw logits ``[num_vq, V]`` (the frame loop's own draw)."""
        banned = self.step < self.sampling.min_new_frames
        self._record(pick_frame(self.tts, self.state, self.sampling, logits, banned))

    def take(self, frame: torch.Tensor) -> None:
        """This step's frame ``[1, num_vq]``, drawn from probabilities made with other rows (:func:`draw_rows`)."""
        state = self.state
        state.ids[:, state.progress] = frame
        self._record(frame.eq(self.sampling.eos).any())

    def _record(self, eos: torch.Tensor) -> None:
        snapshot = self.sampling.sampler.snapshot() if self.rewinds else None
        self.drawn.append(DrawnFrame(self.step, self.state.progress, eos, snapshot))
        self.state.progress += 1
        self.step += 1

    @property
    def due(self) -> bool:
        """Whether the end of speech is due to be read: every few frames, and at the end of the call."""
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


def draw_rows(rows: list[Row], logits: torch.Tensor, stats=None) -> list[Row]:
    """Every row's frame of this step from the step's raw logits ``[slots, num_vq, V]``; the rows whose end
    of speech is due to be read. ``stats`` (a ``TTSStats``) counts the frames drawn together.

    Rows past their BOS step whose sampling reads no frame history (no repetition penalty: the official
    setting) and whose warpers have the same settings are scaled, warped, banned and softmaxed together: the
    same row-wise operations over ``[rows * num_vq, V]`` instead of one set of kernels per row (each row's
    probabilities are the ones it gets alone). Every row then draws with its own sampler; other rows draw
    one by one through the frame loop's own ``pick_frame``."""
    together = _batchable(rows)
    if len(together) > 1:
        for row, probs in zip(together, _probabilities(together, logits)):
            row.take(row.sampling.sampler.sample(probs).view(1, -1))
        if stats is not None:
            stats.frames_together += len(together)
    else:
        together = []
    done = {id(row) for row in together}
    for row in rows:
        if id(row) not in done:
            row.draw(logits[row.slot])
    return [row for row in rows if row.due]


def _batchable(rows: list[Row]) -> list[Row]:
    plain = [row for row in rows if not row.sampling.processors and row.state.progress != row.state.start]
    if not plain:
        return []
    key = _warper_key(plain[0].sampling)
    return [row for row in plain if _warper_key(row.sampling) == key]


def _warper_key(sampling) -> tuple:
    return tuple((type(w).__name__, tuple(sorted(vars(w).items()))) for w in sampling.warpers)


def _probabilities(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """``[rows, num_vq, V]``: per row its logits / temperature, the warpers, the EOS ban of its first frames
    of a call, softmax (in the frame loop's order)."""
    temperatures = torch.stack([row.sampling.temperature for row in rows])  # [rows, num_vq, 1]
    scaled = torch.stack([logits[row.slot] for row in rows]) / temperatures
    flat = scaled.reshape(-1, scaled.shape[-1])
    for warper in rows[0].sampling.warpers:
        flat = warper(None, flat)
    scaled = flat.view_as(scaled)
    for index, row in enumerate(rows):
        if row.step < row.sampling.min_new_frames:
            scaled[index, :, row.sampling.eos] = -torch.inf
    return F.softmax(scaled, dim=-1)


class _NoRewind:
    """Stands in for a sampler that is not rewound (checked every frame: there is nothing to rewind)."""

    def restore(self, state) -> None:
        raise AssertionError("a row checked every frame has no frames drawn past its end of speech")
