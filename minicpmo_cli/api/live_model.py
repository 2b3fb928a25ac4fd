"""The model's side of a live conversation: one :class:`LiveModel` per connection, run on the model's thread.

Each method is a plain function of ``(engine, cancel)`` work that the caller runs where the model may run
(the server's worker, or a local lock): prefill the omni system prompt, prefill one unit of live input (1 s
of 16 kHz audio, with the latest camera frame when a new one came), answer (streaming text and 24 kHz speech
as it is generated), transcribe the user's turn. The conversation's state is an
:class:`~minicpmo_cli.generation.session.OmniSession` of its own: nothing is kept on the shared model, so
any number of connections hold their own conversations on one loaded model.

The conversation never outgrows the LLM's positions (``max_position_embeddings``). Before each prefill, and
before an answer, the session checks that the cache plus the new input plus room for a whole answer (the
generation prompt and ``max_output_tokens``) fits. When it would not, with ``truncation`` "auto" or
``retention_ratio`` the session forgets its oldest whole turns (user input with the answer that followed)
until the conversation after the system prompt uses at most the retained share of what it may use (0.75
for "auto"; ``token_limits.post_instructions`` lowers what it may use, never past the context), and
rebuilds its cache from the system prompt and the kept turns (generation/session_log.py); the turn being
spoken is always kept. With "disabled" the input is refused with a ``context_length_exceeded``
error instead, and so is the answer, until the client deletes old items (``conversation.item.delete``
takes an item out of the cache the same way) or turns truncation on. A turn that does not fit even alone is
refused either way. Kept for the rebuild: each kept call's input rows (about 7 KB a position for the 7B LLM
in bf16), bounded like the cache itself.
"""

from __future__ import annotations

import threading
import uuid
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from minicpmo_cli.api.live_session_config import Truncation
from minicpmo_cli.units import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

UNIT_SAMPLES = INPUT_SAMPLE_RATE  # the model's omni unit: 1 s of 16 kHz audio
MIN_PIECE_SAMPLES = INPUT_SAMPLE_RATE // 10  # a final piece shorter than 0.1 s is padded with silence


class ContextFull(Exception):
    """The conversation cannot take this input within the model's context: an ``error`` event."""

    event_code = "context_length_exceeded"
    event_kind = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class AnswerStats:
    """What one answer cost and produced (filled on the model's thread)."""

    input_tokens: int = 0  # positions prefilled since the last answer (the system prompt included)
    output_tokens: int = 0
    text: str = ""  # the whole answer as generated (up to where it stopped)
    sent_text: str = ""  # the text of the items handed out before a stop
    first_item_ms: float | None = None  # generation start -> first item (compute only)
    cancelled: bool = False
    cropped_to: int | None = None  # cache positions kept after a stop (None: all)
    context_tokens: int = 0  # cache positions after the answer
    context_limit: int = 0  # the model's positions
    dropped_item_ids: list[str] = field(default_factory=list)  # items forgotten since the last answer


def _preset_answer_tokens() -> int:
    from minicpmo_cli.generation.presets import PRESETS

    return PRESETS["omni-stream"].max_new_tokens


@dataclass
class LiveModel:
    """One connection's conversation with the model (its own OmniSession, system prompt, decoding)."""

    instructions: str | None = None
    ref_audio: np.ndarray | None = None  # the voice to answer in (16 kHz); None: the built-in voice
    session: Any = None
    started: bool = False
    generation_start: int | None = None  # cache length when the last answer began (for truncation)
    generation_prompt: int = 0  # tokens of the generation prompt at that point
    truncation: Truncation = Truncation()
    answer_tokens: int = field(default_factory=_preset_answer_tokens)  # room kept for the next answer
    context: int = 0  # the LLM's positions (known once started)
    input_tokens: int = 0  # positions prefilled since the last answer
    dropped: list[str] = field(default_factory=list)  # items forgotten since the last answer
    refused: bool = False  # an input was refused (truncation disabled): the turn's answer is refused too
    refused_item: str | None = None  # whose input: the rest of that item is skipped
    _pending: int = 0  # positions of the prefill being made
    _session_id: str = field(default_factory=lambda: f"live-{uuid.uuid4().hex}")

    # ------------------------------------------------------------------------------------------ prefill
    def _ensure_started(self, engine) -> int:
        """Prefill the omni system prompt once; returns its cost in positions."""
        if self.started:
            return 0
        from minicpmo_cli.api.video import omni_system_message

        from minicpmo_cli.generation.session import GENERATION_PROMPT, OmniSession

        if self.session is None:
            self.session = OmniSession(engine.model, keep_log=True)
        self.session.before_append = self._make_room
        system = omni_system_message(self.ref_audio, "en")
        if self.instructions:
            system = {**system, "content": list(system["content"]) + ["\n" + self.instructions]}
        self.session.prefill(self._session_id, [system], processor=engine.processor)
        self.started = True
        self.context = int(engine.model.llm.config.max_position_embeddings)
        prompt_ids = engine.processor.tokenizer(GENERATION_PROMPT, add_special_tokens=False)["input_ids"]
        self.generation_prompt = len(prompt_ids)
        self.input_tokens += self.length()
        return self.length()

    def length(self) -> int:
        from minicpmo_cli.generation.session import session_length

        return 0 if self.session is None else session_length(self.session)

    def prefill(self, engine, parts: list[Any], item_id: str | None = None) -> float:
        """Append user content (text, 16 kHz audio, PIL images) to the conversation; returns the ms it took.
        After a refused input (truncation disabled) the rest of that item is skipped."""
        started = time.perf_counter()
        self._ensure_started(engine)
        if self.refused and item_id == self.refused_item:
            return 0.0
        try:
            self.session.prefill(self._session_id, [{"role": "user", "content": parts}], processor=engine.processor,
                                 log_tag=item_id)
        except ContextFull:
            self.refused, self.refused_item = True, item_id
            raise
        self.refused = False  # a later item was read: the refusal was told (an error event) and is over
        self.input_tokens += self._pending
        self.generation_start = None  # something follows the last answer: it can no longer be cropped
        return (time.perf_counter() - started) * 1000.0

    # ------------------------------------------------------------------------------------------ context
    def _limit(self) -> int:
        """The longest cache that still leaves room for a whole answer (and within token_limits)."""
        limit = self.context - self.generation_prompt - self.answer_tokens
        post = self.truncation.post_instructions
        return limit if post is None else min(limit, self.session.log.system_end + post)

    def _make_room(self, count: int, turn_start: bool) -> None:
        """Called before ``count`` positions are appended (``turn_start``: they begin a user turn); forgets
        the oldest turns if they would not fit (see the module docstring), or raises ContextFull."""
        self._pending = count
        length, limit, log = self.length(), self._limit(), self.session.log
        if length + count <= limit:
            return
        needed = f"{length + count} positions and {self.generation_prompt + self.answer_tokens} for the answer"
        if self.truncation.kind == "disabled":
            raise ContextFull(f"the conversation needs {needed}, over the model's context of {self.context} "
                              "(session.truncation is 'disabled': enable it, delete old items, or start a new session)")
        cuts = log.cut_points() + ([len(log.entries)] if turn_start else [])
        fits = [i for i in cuts if log.system_end + log.kept_size(i) + count <= limit]
        if not fits:
            raise ContextFull(f"this turn alone needs {needed}, over the model's context of {self.context}: "
                              "send shorter turns or lower max_output_tokens")
        target = log.system_end + self.truncation.retention_ratio * (limit - log.system_end)
        within = [i for i in fits if log.system_end + log.kept_size(i) + count <= target]
        from minicpmo_cli.generation.session_log import forget

        for tag in forget(self.session, within[0] if within else fits[0]):
            if tag is not None and tag not in self.dropped:
                self.dropped.append(tag)

    def prefill_unit(self, engine, audio: np.ndarray, frame=None, item_id: str | None = None) -> float:
        """One omni unit: ``<unit>``, the frame (if any), then up to 1 s of 16 kHz audio."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        if 0 < len(audio) < MIN_PIECE_SAMPLES:
            audio = np.concatenate([audio, np.zeros(MIN_PIECE_SAMPLES - len(audio), np.float32)])
        parts: list[Any] = ["<unit>"] + ([frame] if frame is not None else []) + ([audio] if len(audio) else [])
        return self.prefill(engine, parts, item_id)

    # ------------------------------------------------------------------------------------------ answer
    def answer(self, engine, cancel: threading.Event, emit: Callable[[str, np.ndarray], None], *,
               decode, seed: int | None, speak: bool = True, item_id: str | None = None) -> AnswerStats:
        """Generate the answer to what the conversation holds; ``emit(text, audio24k)`` per item as it comes.

        ``cancel`` stops it between items; the cache is then cropped back to about the text that was
        emitted (the LLM runs ahead of the speech), so the model remembers what the user heard.
        """
        from minicpmo_cli.api.engine import seed_call

        self._ensure_started(engine)
        self.answer_tokens = decode.max_new_tokens
        refused, self.refused = self.refused, False
        if refused:
            raise ContextFull("the conversation is over the model's context: this turn's input was refused "
                              "(session.truncation is 'disabled')")
        self._make_room(0, False)
        if speak:
            engine.enable_tts()
        self.generation_start = self.length()
        stats = AnswerStats(input_tokens=self.input_tokens, context_limit=self.context)
        stats.dropped_item_ids, self.dropped = self.dropped, []
        self.input_tokens = 0
        seed_call(seed)
        clock = time.perf_counter()
        items = self.session.generate(processor=engine.processor, use_tts=speak, decode=decode, seed=seed,
                                      log_tag=item_id)
        try:
            for item in items:
                text = item.text if speak else item["text"]
                audio = np.asarray(item.audio_wav, np.float32).reshape(-1) if speak else np.zeros(0, np.float32)
                if stats.first_item_ms is None:
                    stats.first_item_ms = (time.perf_counter() - clock) * 1000.0
                stats.text += text
                if cancel.is_set():
                    stats.cancelled = True
                    break
                stats.sent_text += text
                emit(text, audio)
        finally:
            items.close()
        stats.output_tokens = max(0, self.length() - self.generation_start - self.generation_prompt)
        if stats.cancelled:
            stats.cropped_to = self.crop_answer(engine, stats.sent_text)
        stats.context_tokens = self.length()
        return stats

    def crop_answer(self, engine, kept_text: str) -> int | None:
        """Forget the last answer's positions past ``kept_text`` (its tokens, re-tokenized: approximate at
        the cut). Only while nothing was prefilled after that answer; returns the new length or None."""
        if self.generation_start is None or self.session is None or self.session.llm_cache is None:
            return None
        tokens = len(engine.processor.tokenizer(kept_text, add_special_tokens=False)["input_ids"]) if kept_text else 0
        from minicpmo_cli.generation.session_log import crop

        crop(self.session, self.generation_start + self.generation_prompt + tokens)
        return self.length()

    def prefill_answer(self, engine, ids: list[int], completed: bool, item_id: str | None = None) -> None:
        """Put an answer's cached ids (the generation prompt and its tokens, as the log holds them) into the
        conversation without generating it."""
        from minicpmo_cli.generation.session import GENERATION_PROMPT
        from minicpmo_cli.generation.session_log import append_answer, closer_rows

        self._ensure_started(engine)
        self._make_room(len(ids), False)
        closer = closer_rows(GENERATION_PROMPT, engine.processor.tokenizer)
        append_answer(self.session, ids, completed, item_id, closer)
        self.generation_start = None

    def delete_item(self, engine, item_id: str) -> bool:
        """Take an item out of the model's context (its cache is rebuilt from there on); whether it was in."""
        from minicpmo_cli.generation.session_log import delete

        if self.session is None or self.session.llm_cache is None:
            return False
        self.generation_start = None
        return delete(self.session, item_id)

    # ------------------------------------------------------------------------------------------ transcript
    @staticmethod
    def transcribe(engine, audio: np.ndarray) -> str:
        """What the user said in a turn (the model's own ASR prompt, greedy): the item's transcript."""
        from minicpmo_cli.api.asr import AsrOptions, transcribe
        from minicpmo_cli.generation.presets import LIVE_TRANSCRIPT_TOKENS, DecodeOptions

        if len(audio) < MIN_PIECE_SAMPLES:
            return ""
        record = transcribe(engine, np.asarray(audio, np.float32), AsrOptions(vad=False),
                            DecodeOptions(max_new_tokens=LIVE_TRANSCRIPT_TOKENS))
        return record.text


def pcm16_bytes(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> little-endian 16-bit PCM."""
    clipped = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def pcm16_samples(data: bytes) -> np.ndarray:
    """Little-endian 16-bit PCM -> float32 in [-1, 1] (an odd trailing byte is dropped)."""
    usable = len(data) - (len(data) % 2)
    return np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0


class InputResampler:
    """24 kHz pcm16 pieces -> 16 kHz float32, as one continuous stream (no seams at piece edges)."""

    def __init__(self, rate: int = OUTPUT_SAMPLE_RATE) -> None:
        import soxr

        self.rate = rate
        self._stream = soxr.ResampleStream(rate, INPUT_SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def feed(self, samples: np.ndarray) -> np.ndarray:
        return self._stream.resample_chunk(np.asarray(samples, np.float32)).reshape(-1)


def resample_once(samples: np.ndarray, rate: int = OUTPUT_SAMPLE_RATE) -> np.ndarray:
    from minicpmo_cli.media.audio import resample

    return resample(samples, rate, INPUT_SAMPLE_RATE)
