"""Speech synthesis: (LLM ``<|spk|>`` state, answer text) -> 24 kHz float32 waveform.

Non-streaming follows the reference's ``_generate_mel_spec``: text prefilled in chunks (12 positions, then
10) interleaved with 25-frame ``generate`` calls over 31 chunks, then 25-frame calls until EOS or more than
``max_new_tokens`` frames; DVAE -> Vocos. Streaming follows ``_generate_mel_spec_audio_streaming`` (see
:func:`stream_speech`). Sampling is reference-exact (``ReferenceSampler``): with the same seed and inputs the
codes equal the reference's.

Long text: the reference reserves 300 ChatTTS tokens and silently cuts longer answers. Here text longer than
299 tokens is split at sentence (then clause, then word) boundaries into pieces that fit (see
``split_tts_text``); each piece is synthesised with the same speaker state and the waveforms are
concatenated. Text that fits takes exactly the reference path. Each piece is still capped at
``max_new_tokens`` frames (2048 = 43.7 s, as the reference). Streaming keeps the reference's own scheme: a new
segment starts at a sentence end once the text has 120 tokens (only a single sentence over ~300 tokens is cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from minicpmo_cli.model.tts import AUDIO_EOS_ID, DEFAULT_TEMPERATURES
from minicpmo_cli.model.tts_sampling import ReferenceSampler, make_logits_processors
from minicpmo_cli.processing.tts_text import (
    TTS_EOS,
    build_streaming_text_mask,
    detect_language,
    encode_tts_prompt,
    extract_tts_text,
    prepare_tts_text,
    sentence_end,
    spell_digits,
    split_tts_text,
)
from minicpmo_cli.units import MAX_AUDIO_FRAMES, OUTPUT_SAMPLE_RATE

OUTPUT_CHUNK_FRAMES = 25  # audio frames per tts.generate call (reference output_chunk_size)


@dataclass
class SpeechChunk:
    """One streamed piece: the LLM text accumulated since the previous chunk and its audio."""

    text: str
    wav: np.ndarray
    sample_rate: int = OUTPUT_SAMPLE_RATE


class _Sampler:
    """Bundles the sampling settings every ``tts.generate`` call of one utterance shares."""

    def __init__(self, tts, temperature, sampler) -> None:
        temps = [float(temperature)] * tts.num_vq if isinstance(temperature, (int, float)) else list(temperature)
        self.temperature = torch.tensor(temps, dtype=torch.float, device=tts.device)
        self.warpers, self.processors = make_logits_processors(
            tts.top_p, tts.top_k, tts.repetition_penalty, tts.num_audio_tokens
        )
        self.sampler = sampler

    def generate(self, tts, audio_ids, cache, text_mask, force_no_stop=False):
        return tts.generate(
            input_ids=audio_ids,
            past_key_values=cache,
            temperature=self.temperature,
            eos_token=AUDIO_EOS_ID,
            streaming_tts_text_mask=text_mask,
            force_no_stop=force_no_stop,
            max_new_token=OUTPUT_CHUNK_FRAMES,
            logits_warpers=self.warpers,
            logits_processors=self.processors,
            sampler=self.sampler,
        )


def as_text_rounds(text: str) -> list[str]:
    """Cut a finished text into small pieces (a digit run, or up to 4 other characters, after optional
    whitespace), like the few-token
    LLM rounds the streaming schedule was built for; joined they give ``text`` back exactly. A single
    whole-text piece would defeat the schedule's sentence-boundary segmenting."""
    import re

    return re.findall(r"\s*(?:\d+|[^\s\d]{1,4})|\s+$", text)


def make_sampler(seed: int | None = None):
    """Reference-exact multinomial sampler: ``seed`` -> a private RNG seeded like ``torch.manual_seed(seed)``
    (the global RNG stays untouched); None -> torch's global RNG, as the reference."""
    return ReferenceSampler(seed=None if seed is None else int(seed))


def _text_chunk_bounds(tts, chunk_idx: int) -> tuple[int, int]:
    """Positions of text chunk ``chunk_idx``: ``[0, 12)`` then ``[10k + 2, min(10k + 12, 302))``."""
    size, prefix = tts.streaming_text_chunk_size, 1 + tts.num_spk_embs
    if chunk_idx == 0:
        return 0, size + prefix
    return chunk_idx * size + prefix, min((chunk_idx + 1) * size + prefix, tts.condition_length - 1)


def generate_codes(
    tts,
    tts_tokenizer,
    spk_embeds: torch.Tensor,
    text: str,
    *,
    temperature=DEFAULT_TEMPERATURES,
    max_new_tokens: int = MAX_AUDIO_FRAMES,
    sampler=None,
    force_no_stop: bool = False,
) -> torch.Tensor:
    """Audio codes ``[1, T, num_vq]`` for one text that fits the 300 reserved positions (reference
    ``_generate_mel_spec`` up to the codes)."""
    prompt, num_tokens = prepare_tts_text(tts_tokenizer, text, tts.streaming_text_reserved_len, tts.num_spk_embs)
    input_ids = encode_tts_prompt(tts_tokenizer, prompt).to(tts.device)
    # On the model's device once, not copied there at every audio frame.
    text_mask = build_streaming_text_mask(num_tokens, tts.streaming_text_reserved_len, tts.num_spk_embs).to(tts.device)
    sampler = _Sampler(tts, temperature, sampler if sampler is not None else make_sampler())
    cache, audio_ids = tts.new_kv_cache(), tts.new_audio_input_ids()
    outputs = None
    for chunk_idx in range(math.ceil(tts.condition_length / tts.streaming_text_chunk_size)):
        begin, end = _text_chunk_bounds(tts, chunk_idx)
        if end > begin:
            position_ids = torch.arange(begin, end, device=tts.device)[None]
            spk = spk_embeds if begin == 0 else None
            cache = tts.prefill_text(input_ids[:, begin:end], position_ids, cache, spk)
        outputs = sampler.generate(tts, audio_ids, cache, text_mask, force_no_stop)
        audio_ids, cache = outputs.audio_input_ids, outputs.past_key_values
        if outputs.finished:
            return outputs.new_ids
    while True:
        outputs = sampler.generate(tts, audio_ids, cache, text_mask, force_no_stop)
        audio_ids, cache = outputs.audio_input_ids, outputs.past_key_values
        if outputs.finished or outputs.new_ids.shape[1] > max_new_tokens:
            return outputs.new_ids


def codes_to_wav(tts, vocos, codes: torch.Tensor) -> np.ndarray:
    """Codes ``[1, T, num_vq]`` -> DVAE mel -> Vocos (float32) -> wav ``[T * 512]`` float32."""
    if codes.shape[1] == 0:
        return np.zeros(0, dtype=np.float32)
    mel = tts.decode_to_mel_specs(codes)
    return vocos.decode(mel.float()).squeeze(0).cpu().numpy().astype(np.float32)


def generate_speech(
    tts,
    vocos,
    tts_tokenizer,
    spk_embeds: torch.Tensor,
    text: str,
    *,
    temperature: float | Sequence[float] = DEFAULT_TEMPERATURES,
    max_new_tokens: int = MAX_AUDIO_FRAMES,
    seed: int | None = None,
    streaming: bool = False,
) -> np.ndarray:
    """Whole-utterance speech for ``text`` (an LLM answer; ``<|tts_bos|>``/``<|tts_eos|>`` are handled).

    ``spk_embeds``: the LLM's final hidden state at ``<|spk|>`` (``[1, llm_dim]``). ``temperature``: per
    codebook (reference default 0.1/0.3/0.1/0.3) or one value for all. ``max_new_tokens``: frame cap per
    piece (~46.9 frames/s). ``seed``: private RNG (None uses torch's global RNG, as the reference).
    ``streaming=True`` runs the streaming schedule and joins its chunks. Returns float32 mono at 24 kHz.
    """
    text = extract_tts_text(text)
    if streaming:
        chunks = stream_speech(
            tts, vocos, tts_tokenizer, spk_embeds, as_text_rounds(text), temperature=temperature,
            max_new_tokens=max_new_tokens, seed=seed,
        )
        wavs = [chunk.wav for chunk in chunks]
        return np.concatenate(wavs).astype(np.float32) if wavs else np.zeros(0, dtype=np.float32)
    sampler = make_sampler(seed)
    wavs = []
    for piece in split_tts_text(tts_tokenizer, text, tts.streaming_text_reserved_len - 1):
        codes = generate_codes(
            tts, tts_tokenizer, spk_embeds, piece, temperature=temperature,
            max_new_tokens=max_new_tokens, sampler=sampler,
        )
        wavs.append(codes_to_wav(tts, vocos, codes))
    return np.concatenate(wavs).astype(np.float32) if wavs else np.zeros(0, dtype=np.float32)


def stream_speech(
    tts,
    vocos,
    tts_tokenizer,
    spk_embeds: torch.Tensor,
    text_pieces: Iterable[str] | str,
    *,
    temperature: float | Sequence[float] = DEFAULT_TEMPERATURES,
    max_new_tokens: int = MAX_AUDIO_FRAMES,
    seed: int | None = None,
) -> Iterator[SpeechChunk]:
    """Streaming speech as the reference's ``_generate_mel_spec_audio_streaming``: consumes text as it
    arrives (e.g. LLM rounds) and yields :class:`SpeechChunk` s of 12 800 samples (0.533 s; the last may
    differ). See :class:`_StreamingSpeech` for the schedule."""
    pieces = iter(as_text_rounds(text_pieces) if isinstance(text_pieces, str) else text_pieces)
    sampler = _Sampler(tts, temperature, make_sampler(seed))
    runner = _StreamingSpeech(tts, vocos, tts_tokenizer, spk_embeds, sampler, max_new_tokens)
    yield from runner.run(pieces)


def _overlap_add_pair(prev: torch.Tensor, cur: torch.Tensor, overlap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``_linear_overlap_add2_wav``: triangular cross-fade of ``cur`` onto the last ``overlap``
    samples of ``prev``; returns (the first ``len(prev)`` samples, the rest)."""
    len0, len1 = prev.shape[-1], cur.shape[-1]
    total = len0 + len1 - overlap
    t = torch.linspace(0, 1, max(len0, len1) + overlap + 2, dtype=prev.dtype)[1:-1]
    weight = 0.5 - (t - 0.5).abs()
    out = torch.zeros(total, dtype=prev.dtype)
    weight_sum = torch.zeros(total, dtype=prev.dtype)
    out[:len0] += weight[-len0:] * prev
    weight_sum[:len0] += weight[-len0:]
    offset = len0 - overlap
    out[offset : offset + len1] += weight[:len1] * cur
    weight_sum[offset : offset + len1] += weight[:len1]
    out = out / weight_sum
    return out[:len0], out[len0:]


class _StreamingSpeech:
    """The reference streaming schedule, segment by segment.

    Per text piece: digits are spelled out and ``*`` removed; whenever the TTS text reaches the next multiple
    of 10 tokens, the next text chunk is prefilled and 25 frames are generated; the new frames (with 4 frames
    of left context) are decoded, cross-faded over 2048 samples with the held-back previous chunk, and the
    previous chunk is yielded. Once the text has >= 120 tokens and a piece ends a sentence, the segment is
    closed and a new one starts, primed with the last 5 text tokens and last 50 frames of the old one. At the
    end of the text the rest is prefilled through ``[Etts]`` and generation runs to EOS (or the frame cap).
    Not reproduced: ``enable_regenerate`` (off by default in the reference).
    """

    SEGMENT_SHIFT = 180  # a new segment may start once the text has 300 - 180 tokens
    CONTEXT_FRAMES = 4
    CONTEXT_TEXT_TOKENS = 5
    CONTEXT_AUDIO_FRAMES = 50

    def __init__(self, tts, vocos, tokenizer, spk_embeds, sampler: _Sampler, max_new_tokens: int) -> None:
        self.tts, self.vocos, self.tokenizer = tts, vocos, tokenizer
        self.spk_embeds, self.sampler, self.max_new_tokens = spk_embeds, sampler, max_new_tokens

    def run(self, pieces: Iterator[str]) -> Iterator[SpeechChunk]:
        previous = None  # (text ids [1, 5], text left over, audio ids [1, 50, 4]) of a closed segment
        while True:
            segment = _Segment(self, previous)
            yield from segment.run(pieces)
            if segment.next_segment is None:
                return
            previous = segment.next_segment


class _Segment:
    def __init__(self, owner: _StreamingSpeech, previous) -> None:
        self.o = owner
        tts = owner.tts
        self.cache, self.audio_ids = tts.new_kv_cache(), tts.new_audio_input_ids()
        self.chunk_idx, self.new_ids_len, self.prev_text_len = 0, 0, 0
        self.gen_text, self.tts_text, self.num_tokens = "", "", 0
        self.prev_wav: torch.Tensor | None = None
        self.outputs = None
        self.next_segment = None
        self.is_continuation = previous is not None
        if previous is not None:
            self._prime(*previous)
        self.gen_text_raw = self.gen_text

    def _prompt(self):
        tts = self.o.tts
        self.tts_text, self.num_tokens = prepare_tts_text(
            self.o.tokenizer, self.gen_text, tts.streaming_text_reserved_len, tts.num_spk_embs
        )
        return self.tts_text

    def _text_mask(self):
        tts = self.o.tts
        return build_streaming_text_mask(self.num_tokens, tts.streaming_text_reserved_len,
                                         tts.num_spk_embs).to(tts.device)

    def _prime(self, text_ids: torch.Tensor, text_left: str, audio_ids: torch.Tensor) -> None:
        """Continue from the last text tokens and audio frames of the previous segment (reference quirks kept:
        the old frames are prefilled with a broadcast, bidirectional mask)."""
        tts = self.o.tts
        self.num_tokens = text_ids.shape[1]
        start_ids = encode_tts_prompt(self.o.tokenizer, "[Stts]" + "[spk_emb]" * tts.num_spk_embs).to(tts.device)
        ids = torch.cat([start_ids, text_ids.to(tts.device)], dim=1)
        position_ids = torch.arange(0, ids.shape[1], device=tts.device)[None]
        self.cache = tts.prefill_text(ids, position_ids, self.cache, self.o.spk_embeds)
        self.cache = tts.prefill_audio_ids(audio_ids[:, :-1], self.cache, self._text_mask())
        self.chunk_idx = int(self.num_tokens / tts.streaming_text_chunk_size)
        self.audio_ids = torch.cat([self.audio_ids, audio_ids.to(tts.device)], dim=1)
        self.gen_text = self.o.tokenizer.decode(text_ids[0].tolist(), add_special_tokens=False) + text_left
        self.prev_text_len = len(self.gen_text)
        self.new_ids_len = audio_ids.shape[1]
        # Deviation: the reference leaves the prompt empty until the next LLM piece arrives, so leftover text is
        # dropped when the text ends exactly at a segment cut; preparing it here lets the tail be spoken.
        self._prompt()

    def _prefill(self, begin: int, end: int) -> None:
        tts = self.o.tts
        self._input_ids = encode_tts_prompt(self.o.tokenizer, self.tts_text).to(tts.device)
        position_ids = torch.arange(begin, end, device=tts.device)[None]
        spk = self.o.spk_embeds if self.chunk_idx == 0 else None
        self.cache = tts.prefill_text(self._input_ids[:, begin:end], position_ids, self.cache, spk)

    def _generate_and_emit(self) -> Iterator[SpeechChunk]:
        tts = self.o.tts
        self.outputs = self.o.sampler.generate(tts, self.audio_ids, self.cache, self._text_mask())
        self.audio_ids, self.cache = self.outputs.audio_input_ids, self.outputs.past_key_values
        self.chunk_idx += 1
        new_ids = self.outputs.new_ids
        codes = new_ids[:, max(self.new_ids_len - self.o.CONTEXT_FRAMES, 0) :]
        self.new_ids_len = new_ids.shape[1]
        wav = self._decode(codes)
        if self.prev_wav is None:
            self.prev_wav = wav
            return
        ready, self.prev_wav = _overlap_add_pair(self.prev_wav, wav, overlap=512 * self.o.CONTEXT_FRAMES)
        yield self._chunk(ready)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[1] == 0:
            return torch.zeros(0)
        mel = self.o.tts.decode_to_mel_specs(codes)
        return self.o.vocos.decode(mel.float()).squeeze(0).cpu().float()

    def _chunk(self, wav: torch.Tensor) -> SpeechChunk:
        text = self.gen_text_raw[self.prev_text_len :]
        self.prev_text_len = len(self.gen_text_raw)
        return SpeechChunk(text=text, wav=wav.numpy().astype(np.float32))

    def run(self, pieces: Iterator[str]) -> Iterator[SpeechChunk]:
        tts = self.o.tts
        prefix, chunk = 1 + tts.num_spk_embs, tts.streaming_text_chunk_size
        language, finished, text_left = None, False, None
        for count, piece in enumerate(pieces, start=1):
            text = piece.split(TTS_EOS)[0]
            self.gen_text_raw += text
            if count <= 2:  # as the reference: decided on the first two pieces of a segment
                language = detect_language(self.gen_text_raw)
            self.gen_text += spell_digits(text, language).replace("*", "")  # '*': markdown emphasis
            self._prompt()
            if self.num_tokens >= tts.streaming_text_reserved_len - self.o.SEGMENT_SHIFT and sentence_end(text):
                cut = self.gen_text.rfind(sentence_end(text)) + 1
                self.gen_text, text_left = self.gen_text[:cut], self.gen_text[cut:]
                self._prompt()
                break
            if self.num_tokens >= (self.chunk_idx + 1) * chunk:
                self._prefill(*_text_chunk_bounds(tts, self.chunk_idx))
                yield from self._generate_and_emit()
                if self.outputs.finished:
                    finished = True
                    break
        stopped = False
        if not finished and self.tts_text:
            begin = 0 if self.chunk_idx == 0 else self.chunk_idx * chunk + prefix
            # [Etts] included; clamped because a 300-token text has no [Etts] slot (the reference overflows).
            end = min(self.num_tokens + prefix + 1, tts.condition_length - 1)
            if end > begin:
                self._prefill(begin, end)
            while True:
                yield from self._generate_and_emit()
                if self.outputs.finished:
                    break
                if self.outputs.new_ids.shape[1] > self.o.max_new_tokens:
                    stopped = True
                    break
        if self.prev_wav is not None:
            yield self._chunk(self.prev_wav)  # last chunk, without cross-fade
        if text_left is not None and not stopped and self.outputs is not None:
            ids = encode_tts_prompt(self.o.tokenizer, self.tts_text)
            last = self.num_tokens + prefix  # index of [Etts]
            self.next_segment = (
                ids[:, last - self.o.CONTEXT_TEXT_TOKENS : last],
                text_left,
                self.outputs.new_ids[:, -self.o.CONTEXT_AUDIO_FRAMES :],
            )
