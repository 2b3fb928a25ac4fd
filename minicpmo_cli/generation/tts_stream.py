"""Streamed speech as a row of the TTS engine (generation/tts_engine.py).

A :class:`StreamRow` runs the streaming schedule of generation/speech.py (``StreamSegment.schedule``: text
pieces consumed, text chunks prefilled, segments re-primed at sentence ends) in its engine slot; where the
one-at-a-time loop runs a 25-frame call with ``iter_frames``, the row opens a call and its frames are drawn in
the engine's batched steps, as every other row's. The schedule's prefills run on the engine's thread between
steps. As frames settle, the row hands them to its handle (``FramesKept``; ``SegmentStart`` / ``SegmentEnd``
around each segment); the caller decodes the audio chunks from them (generation/speech.py ``StreamDecoder``),
so the engine's thread never runs the vocoder.
"""

from __future__ import annotations

import torch

from minicpmo_cli.generation.speech import TEXT_PENDING, StreamSegment, StreamingSpeech
from minicpmo_cli.generation.tts_decode import FrameSampling, StepMask
from minicpmo_cli.generation.tts_requests import FramesKept, SegmentEnd, SegmentStart
from minicpmo_cli.generation.tts_rows import CALL_FRAMES, Row

_END = object()


class StreamRow(Row):
    """A :class:`~minicpmo_cli.generation.tts_requests.TTSStreamRequest` in its slot: the current segment,
    its suspended schedule, and the row's frame call (the parent's draws and end-of-speech reads).
    ``waiting``: its text feed had no piece when the schedule asked; the steps skip the row until it has."""

    waiting = False

    def start_piece(self) -> bool:
        """The first segment and its first call; False when the text asks for no frames at all."""
        engine, request = self.engine, self.handle.request
        self.sampling = FrameSampling.for_tts(self.tts, request.temperature, request.sampler)
        sampler = request.sampler
        private = getattr(sampler, "private", True)
        self.rewinds = hasattr(sampler, "snapshot") and hasattr(sampler, "restore") and private
        self.every = max(int(engine.check_every), 1) if self.rewinds else 1
        self.speech = StreamingSpeech(self.tts, None, engine.tokenizer, request.spk_embeds, self.sampling,
                                       request.max_new_tokens)
        self.feed = request.text_pieces
        self.texts = iter(self.feed)
        self._open_segment(None)
        return self._next_call()

    def _open_segment(self, previous) -> None:
        self.cache.zero()
        self.segment = StreamSegment(self.speech, previous, cache=self.cache)
        self.state = self.segment.state
        self.plan = self.segment.schedule(self.texts)
        self.handle._piece(SegmentStart(self.segment.primer_frames, self.segment.prev_text_len))

    def _next_call(self) -> bool:
        """Run the schedule up to its next frame call or a wait for text (True), across segments; False once
        it is over."""
        while True:
            step = next(self.plan, _END)
            if step is TEXT_PENDING:
                self.waiting = True
                return True
            if step is not _END:
                self._open_call()
                return True
            segment = self.segment
            self.handle._piece(SegmentEnd(segment.state.new_ids.clone(), segment.gen_text_raw))
            if segment.next_segment is None:
                return False
            self._open_segment(segment.next_segment)

    def _open_call(self) -> None:
        state = self.state
        if state.progress != state.cache.length + 1:
            raise ValueError(f"audio ids length {state.progress} != KV-cache length + 1 ({state.cache.length + 1})")
        state.reserve(CALL_FRAMES)
        state.finished = False
        self.mask = StepMask(self.tts, self.segment.text_mask())
        self.step, self.drawn = 0, []

    def settle(self, hits: list) -> None:
        super().settle(hits)
        self.handle._piece(FramesKept(self.state.new_ids.clone(), self.segment.gen_text_raw))

    def end_call(self) -> bool:
        return self._next_call()

    @property
    def text_ready(self) -> bool:
        """Whether a waiting row's text feed has a piece or is complete (a list always is)."""
        return bool(getattr(self.feed, "ready", True))

    def resume(self) -> bool:
        """A waiting row whose text came: its schedule goes on (False: it is over)."""
        self.waiting = False
        return self._next_call()

    def stop(self) -> None:
        """Aborted: the frames drawn are settled and handed over (the caller stops reading anyway)."""
        if self.state is not None and self.drawn:
            self.settle(torch.stack([d.eos for d in self.drawn]).tolist())
