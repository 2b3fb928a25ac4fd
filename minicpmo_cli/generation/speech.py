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

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation.tts_decode import (
    FrameSampling,
    TTSState,
    generate_frames,
    iter_frames,
    prefill_audio,
    prefill_text,
    text_chunk_bounds,
)
from minicpmo_cli.model.tts import DEFAULT_TEMPERATURES
from minicpmo_cli.model.tts_sampling import ReferenceSampler
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

OUTPUT_CHUNK_FRAMES = 25  # audio frames per generate call (reference output_chunk_size)
CONTEXT_FRAMES = 4  # frames of left context re-decoded with each streamed chunk
OVERLAP_SAMPLES = 512 * CONTEXT_FRAMES  # their samples: cross-faded with the end of the audio before
MIN_CHUNK_FRAMES = CONTEXT_FRAMES + 1  # a chunk must add audio beyond the cross-faded part
TEXT_PENDING = "text pending"  # what a segment's schedule yields while its text source has no piece yet


@dataclass
class SpeechChunk:
    """One streamed piece: the LLM text accumulated since the previous chunk and its audio."""

    text: str
    wav: np.ndarray
    sample_rate: int = OUTPUT_SAMPLE_RATE


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
    runner=None,
) -> torch.Tensor:
    """Audio codes ``[1, T, num_vq]`` for one text that fits the 300 reserved positions (reference
    ``_generate_mel_spec`` up to the codes). ``runner``: the TTS step runner (None: eager)."""
    prompt, num_tokens = prepare_tts_text(tts_tokenizer, text, tts.streaming_text_reserved_len, tts.num_spk_embs)
    input_ids = encode_tts_prompt(tts_tokenizer, prompt).to(tts.device)
    # On the model's device once, not copied there at every audio frame.
    text_mask = build_streaming_text_mask(num_tokens, tts.streaming_text_reserved_len, tts.num_spk_embs).to(tts.device)
    sampling = FrameSampling.for_tts(tts, temperature, sampler if sampler is not None else make_sampler())
    options = {"force_no_stop": force_no_stop, "runner": runner}
    state = TTSState(tts, OUTPUT_CHUNK_FRAMES, runner)
    for chunk_idx in range(math.ceil(tts.condition_length / tts.streaming_text_chunk_size)):
        begin, end = text_chunk_bounds(tts, chunk_idx)
        if end > begin:
            prefill_text(tts, state, input_ids[:, begin:end], begin, spk_embeds if begin == 0 else None)
        if generate_frames(tts, state, sampling, text_mask, OUTPUT_CHUNK_FRAMES, **options):
            return state.new_ids
    while True:
        finished = generate_frames(tts, state, sampling, text_mask, OUTPUT_CHUNK_FRAMES, **options)
        if finished or state.new_ids.shape[1] > max_new_tokens:
            return state.new_ids


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
    runner=None,
) -> np.ndarray:
    """Whole-utterance speech for ``text`` (an LLM answer; ``<|tts_bos|>``/``<|tts_eos|>`` are handled).

    ``spk_embeds``: the LLM's final hidden state at ``<|spk|>`` (``[1, llm_dim]``). ``temperature``: per
    codebook (reference default 0.1/0.3/0.1/0.3) or one value for all. ``max_new_tokens``: frame cap per
    piece (~46.9 frames/s). ``seed``: private RNG (None uses torch's global RNG, as the reference).
    ``streaming=True`` runs the streaming schedule and joins its chunks. ``runner``: the TTS step runner.
    Returns float32 mono at 24 kHz.
    """
    text = extract_tts_text(text)
    if streaming:
        chunks = stream_speech(
            tts, vocos, tts_tokenizer, spk_embeds, as_text_rounds(text), temperature=temperature,
            max_new_tokens=max_new_tokens, seed=seed, runner=runner,
        )
        wavs = [chunk.wav for chunk in chunks]
        return np.concatenate(wavs).astype(np.float32) if wavs else np.zeros(0, dtype=np.float32)
    sampler = make_sampler(seed)
    wavs = []
    for piece in split_tts_text(tts_tokenizer, text, tts.streaming_text_reserved_len - 1):
        codes = generate_codes(
            tts, tts_tokenizer, spk_embeds, piece, temperature=temperature,
            max_new_tokens=max_new_tokens, sampler=sampler, runner=runner,
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
    runner=None,
    first_chunk_frames: int = OUTPUT_CHUNK_FRAMES,
    chunk_frames: int = OUTPUT_CHUNK_FRAMES,
) -> Iterator[SpeechChunk]:
    """Streaming speech as the reference's ``_generate_mel_spec_audio_streaming``: consumes text as it
    arrives (e.g. LLM rounds) and yields :class:`SpeechChunk` s as soon as they are decoded: the first once
    ``first_chunk_frames`` frames exist, then one per ``chunk_frames`` frames (``chunk_frames * 512`` samples;
    25 frames = 0.533 s). The chunk sizes change only when audio is decoded, not which codes are drawn.
    See :class:`StreamingSpeech` for the schedule. ``runner``: the TTS step runner (None: eager)."""
    check_chunk_frames(first_chunk_frames, chunk_frames)
    pieces = iter(as_text_rounds(text_pieces) if isinstance(text_pieces, str) else text_pieces)
    sampling = FrameSampling.for_tts(tts, temperature, make_sampler(seed))
    speech = StreamingSpeech(tts, vocos, tts_tokenizer, spk_embeds, sampling, max_new_tokens, runner,
                              (int(first_chunk_frames), int(chunk_frames)))
    yield from speech.run(pieces)


def check_chunk_frames(first_chunk_frames: int, chunk_frames: int) -> None:
    """Streamed chunk sizes must be whole frames beyond the re-decoded context (UsageError otherwise)."""
    for name, value in (("first_chunk_frames", first_chunk_frames), ("chunk_frames", chunk_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or not MIN_CHUNK_FRAMES <= value <= MAX_AUDIO_FRAMES:
            raise UsageError(f"{name} must be a whole number of frames from {MIN_CHUNK_FRAMES} to "
                             f"{MAX_AUDIO_FRAMES}, not {value!r}")


def decode_codes(tts, vocos, codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[1, T, num_vq]`` -> float32 wav ``[T * 512]`` on the CPU (one streamed chunk)."""
    if codes.shape[1] == 0:
        return torch.zeros(0)
    with torch.inference_mode():
        mel = tts.decode_to_mel_specs(codes)
        return vocos.decode(mel.float()).squeeze(0).cpu().float()


class _ChunkedWav:
    """A segment's audio, decoded as its frames are sampled: the first chunk after ``first_frames`` new
    frames, then every ``frames``; each decode takes 4 frames of left context, whose 2048 samples are
    cross-faded with the end of the audio before (the reference's ``_linear_overlap_add2_wav``).

    Only the last 2048 samples of what was decoded wait (the cross-fade with the next chunk changes them), so
    a chunk is yielded as soon as it is decoded; joined, the chunks are the reference's held-back stream to
    float rounding.
    """

    def __init__(self, decode, first_frames: int, frames: int, decoded: int = 0) -> None:
        self.decode, self.first_frames, self.frames = decode, first_frames, frames
        self.decoded = decoded  # frames decoded so far (a continued segment starts after its primer frames)
        self.emitted_any = False
        self.tail: torch.Tensor | None = None  # the last samples, still to be cross-faded

    def due(self, frames: int) -> bool:
        return frames - self.decoded >= (self.frames if self.emitted_any else self.first_frames)

    def push(self, new_ids: torch.Tensor) -> torch.Tensor:
        """Decode the frames of ``new_ids`` not decoded yet (with context); the samples that are final."""
        codes = new_ids[:, max(self.decoded - CONTEXT_FRAMES, 0) :]
        self.decoded = new_ids.shape[1]
        self.emitted_any = True
        wav = self.decode(codes)
        if self.tail is not None:
            faded, rest = _overlap_add_pair(self.tail, wav, overlap=self.tail.shape[0])
            wav = torch.cat([faded, rest])
        keep = min(OVERLAP_SAMPLES, wav.shape[0])
        self.tail = wav[wav.shape[0] - keep :]
        return wav[: wav.shape[0] - keep]

    def finish(self, new_ids: torch.Tensor) -> torch.Tensor:
        """Everything not yielded yet: the undecoded frames and the held samples."""
        head = self.push(new_ids) if new_ids.shape[1] > self.decoded else torch.zeros(0)
        tail, self.tail = (self.tail if self.tail is not None else torch.zeros(0)), None
        return torch.cat([head, tail])



class StreamDecoder:
    """The audio of a streamed request of the TTS engine (generation/tts_stream.py), decoded by its caller:
    from the row's events, the chunks the one-at-a-time loop (:meth:`StreamingSpeech.run`) yields for the
    same frames, at the same frame counts. ``decode``: codes ``[1, T, num_vq]`` -> float32 wav."""

    def __init__(self, decode, first_frames: int = OUTPUT_CHUNK_FRAMES, frames: int = OUTPUT_CHUNK_FRAMES) -> None:
        self.decode, self.chunks = decode, (int(first_frames), int(frames))
        self.wav: _ChunkedWav | None = None
        self.counted, self.text_offset = 0, 0

    def feed(self, event) -> Iterator[SpeechChunk]:
        """The chunks due after ``event`` (a SegmentStart, FramesKept or SegmentEnd of tts_requests.py)."""
        kind = type(event).__name__
        if kind == "SegmentStart":
            self.wav = _ChunkedWav(self.decode, *self.chunks, event.primer_frames)
            self.counted, self.text_offset = event.primer_frames, event.text_offset
        elif kind == "FramesKept":
            # the loop checks every kept frame's count in order; a read that drops frames adds none
            for count in range(self.counted + 1, event.new_ids.shape[1] + 1):
                if self.wav.due(count):
                    yield from self._chunk(self.wav.push(event.new_ids[:, :count]), event.text)
            self.counted = max(self.counted, event.new_ids.shape[1])
        elif kind == "SegmentEnd":
            yield from self._chunk(self.wav.finish(event.new_ids), event.text)

    def _chunk(self, wav: torch.Tensor, text: str) -> Iterator[SpeechChunk]:
        if wav.shape[0] == 0:
            return
        chunk_text, self.text_offset = text[self.text_offset :], len(text)
        yield SpeechChunk(text=chunk_text, wav=wav.numpy().astype(np.float32))


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


class StreamingSpeech:
    """The reference streaming schedule, segment by segment.

    Per text piece: digits are spelled out and ``*`` removed; whenever the TTS text reaches the next multiple
    of 10 tokens, the next text chunk is prefilled and 25 frames are generated; as the frames come, they are
    decoded and yielded in chunks (:class:`_ChunkedWav`: 4 frames of left context, cross-faded over 2048
    samples). Once the text has >= 120 tokens and a piece ends a sentence, the segment is
    closed and a new one starts, primed with the last 5 text tokens and last 50 frames of the old one. At the
    end of the text the rest is prefilled through ``[Etts]`` and generation runs to EOS (or the frame cap).
    Not reproduced: ``enable_regenerate`` (off by default in the reference).
    """

    SEGMENT_SHIFT = 180  # a new segment may start once the text has 300 - 180 tokens
    CONTEXT_TEXT_TOKENS = 5
    CONTEXT_AUDIO_FRAMES = 50

    def __init__(self, tts, vocos, tokenizer, spk_embeds, sampling: FrameSampling, max_new_tokens: int,
                 runner=None, chunks: tuple[int, int] = (OUTPUT_CHUNK_FRAMES, OUTPUT_CHUNK_FRAMES)) -> None:
        self.tts, self.vocos, self.tokenizer = tts, vocos, tokenizer
        self.spk_embeds, self.sampling, self.max_new_tokens = spk_embeds, sampling, max_new_tokens
        self.runner, self.chunks = runner, chunks

    def chunked_wav(self, decoded: int = 0) -> _ChunkedWav:
        return _ChunkedWav(lambda codes: decode_codes(self.tts, self.vocos, codes), *self.chunks, decoded)

    def run(self, pieces: Iterator[str]) -> Iterator[SpeechChunk]:
        """The schedule driven here: each of its frame calls runs the frame loop, chunks decoded as frames come."""
        previous = None  # (text ids [1, 5], text left over, audio ids [1, 50, 4]) of a closed segment
        while True:
            segment = StreamSegment(self, previous)
            wav = self.chunked_wav(segment.primer_frames)
            for step in segment.schedule(pieces):
                if step is TEXT_PENDING:  # a source that is polled: ask it again
                    continue
                for frames in iter_frames(self.tts, segment.state, self.sampling, segment.text_mask(),
                                          OUTPUT_CHUNK_FRAMES, runner=self.runner):
                    if wav.due(frames):
                        yield from segment.chunk(wav.push(segment.state.new_ids))
            yield from segment.chunk(wav.finish(segment.state.new_ids))  # the rest, without cross-fade
            if segment.next_segment is None:
                return
            previous = segment.next_segment


class StreamSegment:
    """One segment of the streaming schedule: its decode state and text. :meth:`schedule` consumes text pieces
    and prefills; it yields where a 25-frame call is to run on :attr:`state` (under :meth:`text_mask`): the
    one-at-a-time loop runs it with ``iter_frames`` (:meth:`StreamingSpeech.run`), the TTS engine as a row's
    call (generation/tts_stream.py). A text source may give None (no piece yet): the schedule then yields
    ``TEXT_PENDING`` and asks again when resumed. ``cache``: the segment's KV cache is this one (an engine
    slot, zeroed)."""

    def __init__(self, owner: StreamingSpeech, previous, cache=None) -> None:
        self.o = owner
        tts = owner.tts
        self.state = TTSState(tts, OUTPUT_CHUNK_FRAMES, owner.runner, cache=cache)
        self.generated = False  # any frames sampled in this segment
        self.chunk_idx, self.prev_text_len = 0, 0
        self.gen_text, self.tts_text, self.num_tokens = "", "", 0
        self.primer_frames = 0  # frames of a continued segment spoken by the segment before
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

    def text_mask(self):
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
        prefill_text(tts, self.state, ids, 0, self.o.spk_embeds)
        prefill_audio(tts, self.state, audio_ids[:, :-1], self.text_mask())
        self.chunk_idx = int(self.num_tokens / tts.streaming_text_chunk_size)
        self.state.append_ids(audio_ids)
        self.gen_text = self.o.tokenizer.decode(text_ids[0].tolist(), add_special_tokens=False) + text_left
        self.prev_text_len = len(self.gen_text)
        self.primer_frames = audio_ids.shape[1]  # the primer frames were spoken before
        # Deviation: the reference leaves the prompt empty until the next LLM piece arrives, so leftover text is
        # dropped when the text ends exactly at a segment cut; preparing it here lets the tail be spoken.
        self._prompt()

    def _prefill(self, begin: int, end: int) -> None:
        tts = self.o.tts
        self._input_ids = encode_tts_prompt(self.o.tokenizer, self.tts_text).to(tts.device)
        spk = self.o.spk_embeds if self.chunk_idx == 0 else None
        prefill_text(tts, self.state, self._input_ids[:, begin:end], begin, spk)

    def _generate(self) -> Iterator[None]:
        """One generate call (25 frames), run by whoever drives the schedule while it is suspended here."""
        yield
        self.chunk_idx += 1
        self.generated = True

    def chunk(self, wav: torch.Tensor, text: str | None = None) -> Iterator[SpeechChunk]:
        """A chunk of ``wav`` with the text that came since the last chunk (``text``: the segment's text as
        it was when these frames were drawn; by default as it is now)."""
        if wav.shape[0] == 0:
            return
        text = self.gen_text_raw if text is None else text
        chunk_text = text[self.prev_text_len :]
        self.prev_text_len = len(text)
        yield SpeechChunk(text=chunk_text, wav=wav.numpy().astype(np.float32))

    def schedule(self, pieces: Iterator[str]) -> Iterator[None]:
        tts = self.o.tts
        prefix, chunk = 1 + tts.num_spk_embs, tts.streaming_text_chunk_size
        language, finished, text_left = None, False, None
        count = 0
        for piece in pieces:
            if piece is None:  # a text feed with nothing yet (generation/tts_requests.py TextFeed)
                yield TEXT_PENDING
                continue
            count += 1
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
                self._prefill(*text_chunk_bounds(tts, self.chunk_idx))
                yield from self._generate()
                if self.state.finished:
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
                yield from self._generate()
                if self.state.finished:
                    break
                if self.state.new_ids.shape[1] > self.o.max_new_tokens:
                    stopped = True
                    break
        if text_left is not None and not stopped and self.generated:
            ids = encode_tts_prompt(self.o.tokenizer, self.tts_text)
            last = self.num_tokens + prefix  # index of [Etts]
            self.next_segment = (
                ids[:, last - self.o.CONTEXT_TEXT_TOKENS : last],
                text_left,
                self.state.new_ids[:, -self.o.CONTEXT_AUDIO_FRAMES :],
            )
