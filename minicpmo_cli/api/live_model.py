"""The model's side of a live conversation: one :class:`LiveModel` per connection, run on the model's thread.

Each method is a plain function of ``(engine, cancel)`` work that the caller runs where the model may run
(the server's worker, or a local lock): prefill the omni system prompt, prefill one unit of live input (1 s
of 16 kHz audio, with the latest camera frame when a new one came), answer (streaming text and 24 kHz speech
as it is generated), transcribe the user's turn. The conversation's state is an
:class:`~minicpmo_cli.generation.session.OmniSession` of its own: nothing is kept on the shared model, so
any number of connections hold their own conversations on one loaded model.
"""

from __future__ import annotations

import threading
import uuid
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from minicpmo_cli.units import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

UNIT_SAMPLES = INPUT_SAMPLE_RATE  # the model's omni unit: 1 s of 16 kHz audio
MIN_PIECE_SAMPLES = INPUT_SAMPLE_RATE // 10  # a final piece shorter than 0.1 s is padded with silence


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


@dataclass
class LiveModel:
    """One connection's conversation with the model (its own OmniSession, system prompt, decoding)."""

    instructions: str | None = None
    ref_audio: np.ndarray | None = None  # the voice to answer in (16 kHz); None: the built-in voice
    session: Any = None
    started: bool = False
    generation_start: int | None = None  # cache length when the last answer began (for truncation)
    generation_prompt: int = 0  # tokens of the generation prompt at that point
    answered_length: int = 0  # cache length after the last answer
    _session_id: str = field(default_factory=lambda: f"live-{uuid.uuid4().hex}")

    # ------------------------------------------------------------------------------------------ prefill
    def _ensure_started(self, engine) -> int:
        """Prefill the omni system prompt once; returns its cost in positions."""
        if self.started:
            return 0
        from minicpmo_cli.api.video import omni_system_message

        if self.session is None:
            self.session = engine.model.new_session()
        system = omni_system_message(self.ref_audio, "en")
        if self.instructions:
            system = {**system, "content": list(system["content"]) + ["\n" + self.instructions]}
        self.session.prefill(self._session_id, [system], processor=engine.processor)
        self.started = True
        return self.length()

    def length(self) -> int:
        from minicpmo_cli.generation.session import session_length

        return 0 if self.session is None else session_length(self.session)

    def prefill(self, engine, parts: list[Any]) -> float:
        """Append user content (text, 16 kHz audio, PIL images) to the conversation; returns the ms it took."""
        started = time.perf_counter()
        self._ensure_started(engine)
        self.session.prefill(self._session_id, [{"role": "user", "content": parts}], processor=engine.processor)
        self.generation_start = None  # something follows the last answer: it can no longer be cropped
        return (time.perf_counter() - started) * 1000.0

    def prefill_unit(self, engine, audio: np.ndarray, frame=None) -> float:
        """One omni unit: ``<unit>``, the frame (if any), then up to 1 s of 16 kHz audio."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        if 0 < len(audio) < MIN_PIECE_SAMPLES:
            audio = np.concatenate([audio, np.zeros(MIN_PIECE_SAMPLES - len(audio), np.float32)])
        parts: list[Any] = ["<unit>"] + ([frame] if frame is not None else []) + ([audio] if len(audio) else [])
        return self.prefill(engine, parts)

    # ------------------------------------------------------------------------------------------ answer
    def answer(self, engine, cancel: threading.Event, emit: Callable[[str, np.ndarray], None], *,
               decode, seed: int | None, speak: bool = True) -> AnswerStats:
        """Generate the answer to what the conversation holds; ``emit(text, audio24k)`` per item as it comes.

        ``cancel`` stops it between items; the cache is then cropped back to about the text that was
        emitted (the LLM runs ahead of the speech), so the model remembers what the user heard.
        """
        from minicpmo_cli.api.engine import seed_call
        from minicpmo_cli.generation.session import GENERATION_PROMPT

        self._ensure_started(engine)
        if speak:
            engine.enable_tts()
        tokenizer = engine.processor.tokenizer
        self.generation_start = self.length()
        self.generation_prompt = len(tokenizer(GENERATION_PROMPT, add_special_tokens=False)["input_ids"])
        stats = AnswerStats(input_tokens=self.generation_start - self.answered_length)
        seed_call(seed)
        clock = time.perf_counter()
        items = self.session.generate(processor=engine.processor, use_tts=speak, decode=decode, seed=seed)
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
        self.answered_length = self.length()
        return stats

    def crop_answer(self, engine, kept_text: str) -> int | None:
        """Forget the last answer's positions past ``kept_text`` (its tokens, re-tokenized: approximate at
        the cut). Only while nothing was prefilled after that answer; returns the new length or None."""
        if self.generation_start is None or self.session is None or self.session.llm_cache is None:
            return None
        tokens = len(engine.processor.tokenizer(kept_text, add_special_tokens=False)["input_ids"]) if kept_text else 0
        cache = self.session.llm_cache
        keep = min(cache.length, self.generation_start + self.generation_prompt + tokens)
        cache.length = keep
        self.answered_length = keep
        self.session.llm_generate_completed = False  # the next turn closes the answer with <|tts_eos|>
        return keep

    # ------------------------------------------------------------------------------------------ transcript
    @staticmethod
    def transcribe(engine, audio: np.ndarray) -> str:
        """What the user said in a turn (the model's own ASR prompt, greedy): the item's transcript."""
        from minicpmo_cli.api.asr import AsrOptions, transcribe
        from minicpmo_cli.generation.presets import DecodeOptions

        if len(audio) < MIN_PIECE_SAMPLES:
            return ""
        record = transcribe(engine, np.asarray(audio, np.float32), AsrOptions(vad=False),
                            DecodeOptions(max_new_tokens=128))
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
