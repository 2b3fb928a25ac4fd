"""Speech output tasks: read a text aloud (tts, clone), re-speak a recording (mimick), speak a chat answer.

How a text is read. The voice comes from the language model: the TTS is conditioned on the LLM's final hidden
state at ``<|spk|>`` of the prompt (spec audio-tts §3.3, §6), and the prompt carries the voice (a reference
clip under the guide's system prompts, or a spoken description). The guide's voice-cloning recipe then lets
the LLM write the answer, which the TTS speaks. By default (``verbatim=True``) we keep the guide's prompt for
the voice but give the TTS the user's text itself: that is the reference's audio whenever the LLM echoes the
text, and it cannot answer, shorten or paraphrase the text instead (which an echo can), nor cost LLM decoding.
``verbatim=False`` runs the guide's recipe literally (the LLM re-writes each piece).

Long text is never cut. It is split at sentence ends (then clauses, then spaces) into groups of at most
``group_tokens`` ChatTTS tokens (default 80, ~30 s of English: well inside the reference's 2048-frame cap),
each group is synthesised with the same speaker state (one voice throughout, as the reference's streaming
segmenter does) and the waveforms are concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from minicpmo_cli.api.engine import DecodeOptions, Engine
from minicpmo_cli.errors import InputError, UsageError
from minicpmo_cli.generation.presets import resolve
from minicpmo_cli.units import MAX_AUDIO_FRAMES, OUTPUT_SAMPLE_RATE, frames_for_seconds  # noqa: F401

GROUP_TOKENS = 80  # ChatTTS tokens per synthesised piece (see module docstring)
# Streamed speech (speak_stream): TTS frames (46.875 a second) before the first chunk, then per chunk; 25 is
# the reference's step (0.53 s of audio).
FIRST_CHUNK_FRAMES = 25
CHUNK_FRAMES = 25

# The decoding presets (generation/presets.py): the guide's settings for every speech example, and one
# greedy token where only the TTS prompt's speaker state is wanted.
SPEECH_TASK = "speech"
SPEAKER_STATE_TASK = "speaker-state"
# --mode -> the reference's get_sys_prompt mode (spec audio-tts §6, §7).
VOICE_MODES = {"clone": "voice_cloning", "assistant": "audio_assistant", "roleplay": "audio_roleplay"}
LANGUAGES = ("en", "zh")
READ_BELOW = "Please read the text below."  # the guide's voice-cloning user prompt
READ_ALOUD = "Please read the following text aloud: "  # plain read prompt (golden case e) without a voice


@dataclass
class Voice:
    """Who speaks: a reference clip (16 kHz samples) under a mode, a described voice, or the default."""

    reference: np.ndarray | None = None
    mode: str | None = None  # clone | assistant | roleplay (None: clone when a reference is given)
    instruction: str | None = None  # voice creation: "Speak like a ..." (the guide's instruction-to-speech)
    language: str = "en"  # of the system prompt: en | zh

    def check(self) -> None:
        if self.mode is not None and self.mode not in VOICE_MODES:
            raise UsageError(f"--mode must be one of {', '.join(VOICE_MODES)}, not {self.mode!r}")
        if self.language not in LANGUAGES:
            raise UsageError(f"--language must be en or zh, not {self.language!r}")
        if self.instruction is not None and (self.reference is not None or self.mode is not None):
            raise UsageError("--instruction creates a voice from a description: "
                             "it does not combine with --ref/--voice or --mode")
        if self.mode == "clone" and self.reference is None:
            raise UsageError("--mode clone needs a reference voice (--ref FILE or --voice NAME)")

    def system_message(self) -> dict | None:
        """The guide's system prompt for this voice, or None (plain reading, voice creation)."""
        from minicpmo_cli.processing.prompts import get_sys_prompt

        if self.reference is None and self.mode is None:
            return None
        mode = VOICE_MODES[self.mode or "clone"]
        return get_sys_prompt(ref_audio=self.reference, mode=mode, language=self.language)


@dataclass
class Piece:
    text: str  # what this piece said
    samples: int  # its length in the output
    capped: bool = False  # stopped by the audio length cap rather than by the model


@dataclass
class SpeechResult:
    text: str  # the text spoken (verbatim: the input; otherwise what the model wrote)
    wav: np.ndarray  # float32 mono
    sample_rate: int = OUTPUT_SAMPLE_RATE
    pieces: list[Piece] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return len(self.wav) / float(self.sample_rate)

    @property
    def capped(self) -> bool:
        return any(p.capped for p in self.pieces)


def read_messages(text: str, voice: Voice) -> list[dict]:
    """The conversation that makes the model read ``text`` in ``voice`` (guide: Voice Cloning pattern)."""
    system = voice.system_message()
    if voice.instruction is not None:
        content = [voice.instruction, READ_BELOW, text]
    elif system is not None:
        content = [READ_BELOW, text]
    else:
        content = [READ_ALOUD + text]
    return ([system] if system is not None else []) + [{"role": "user", "content": content}]


def speak(engine: Engine, text: str, voice: Voice | None = None, *, decode: DecodeOptions | None = None,
          verbatim: bool = True, max_frames: int = MAX_AUDIO_FRAMES, group_tokens: int = GROUP_TOKENS,
          progress: Callable[[int, int], None] | None = None, cancel: Any = None) -> SpeechResult:
    """Read ``text`` aloud in ``voice`` -> 24 kHz float32 speech, every sentence of it.

    ``progress(done, total)`` is called as each sentence group is spoken (long text takes minutes).
    ``cancel``: a threading.Event; once set, synthesis ends at the next audio frame (what was made is returned).
    """
    spk, groups, seed = _plan(engine, text, voice, decode, verbatim, group_tokens)
    return _synthesize_groups(engine, spk, groups, max_frames, progress, cancel=cancel, seed=seed)


def speak_lines(engine: Engine, texts: list[str], voice: Voice | None = None, *,
                decode: DecodeOptions | None = None, verbatim: bool = True, max_frames: int = MAX_AUDIO_FRAMES,
                in_flight: int | None = None) -> Iterator[tuple[int, SpeechResult]]:
    """Each text read as :func:`speak` reads it, the TTS frames of several texts decoded together on the
    engine's TTS engine: yields ``(index, result)`` as each text is done (in the order they finish, a finished
    text's slot refilled at once). At most ``in_flight`` texts (default: twice the TTS engine's slots) are
    submitted at a time; the next text's speaker state is made while the others decode. With a seed
    (``decode.seed``) every text's audio is what :func:`speak` makes of it alone; without one the texts draw
    from torch's global stream, in the order their frames are drawn."""
    import queue

    from minicpmo_cli.api.protocol import own_steps

    if own_steps(engine) is not None:  # an engine not backed by a model speaks each text itself
        for index, text in enumerate(texts):
            yield index, speak(engine, text, voice, decode=decode, verbatim=verbatim, max_frames=max_frames)
        return
    if max_frames < 1:
        raise UsageError("the audio length cap must be at least one frame")
    _need_tts(engine)
    limit = max(int(in_flight or 2 * engine.frame_engine().max_batch), 1)
    finished: queue.Queue[int] = queue.Queue()
    running: dict[int, _Synthesis] = {}
    upcoming = iter(enumerate(texts))
    while True:
        while len(running) < limit and (item := next(upcoming, None)) is not None:
            index, text = item
            spk, groups, seed = _plan(engine, text, voice, decode, verbatim, GROUP_TOKENS)
            running[index] = _Synthesis(engine, spk, groups, max_frames, seed,
                                        on_finish=lambda _, index=index: finished.put(index))
        if not running:
            return
        index = finished.get()
        yield index, running.pop(index).result()


def _plan(engine: Engine, text: str, voice: Voice | None, decode: DecodeOptions | None, verbatim: bool,
          group_tokens: int) -> tuple[Any, list[str], int | None]:
    """What :func:`speak` synthesises: (the speaker state, the text groups to speak, the seed of the draws)."""
    voice = voice or Voice()
    voice.check()
    if not text.strip():
        raise UsageError("nothing to say: the text is empty")
    _need_tts(engine)
    groups = text_groups(engine, text.strip(), group_tokens)
    decode = decode or DecodeOptions()
    resolve(SPEECH_TASK, decode)  # contradictory options fail here, whether the LLM writes the text or not
    if verbatim:
        _, spk = _speaker(engine, read_messages(groups[0], voice), decode, seed_only=True)
        # The speaker state came from one greedy token (no draws), so a private generator seeded with the
        # seed draws what the seeded global one would, whatever other threads draw meanwhile.
        return spk, groups, decode.seed
    spoken, spk = [], None
    for group in groups:
        answer, group_spk = _speaker(engine, read_messages(group, voice), decode,
                                     echo_tokens=_echo_budget(engine, group))
        spk = group_spk if spk is None else spk  # the first piece's voice for all pieces
        spoken += [piece for piece in text_groups(engine, answer, group_tokens) if piece.strip()]
    if not spoken:
        raise InputError("the model wrote no text to speak (--verbatim reads the text as given)")
    return spk, spoken, None


def mimick(engine: Engine, audio: np.ndarray, *, decode: DecodeOptions | None = None,
           max_frames: int = MAX_AUDIO_FRAMES, progress: Callable[[int, int], None] | None = None) -> SpeechResult:
    """The guide's Mimick: transcribe a recording and re-speak it in the speaker's voice.

    Recordings longer than 30 s are cut at quiet places into pieces the encoder handles; each piece is
    transcribed and re-spoken on its own, and the results are joined.
    """
    from minicpmo_cli.processing.prompts import MIMICK
    from minicpmo_cli.processing.segments import fixed_pieces

    _need_tts(engine)
    decode = decode or DecodeOptions()
    texts, wavs, pieces = [], [], []
    spans = [(p.start, p.end) for p in fixed_pieces(audio)] or [(0, len(audio))]
    for number, (start, end) in enumerate(spans):
        if progress is not None:
            progress(number, len(spans))
        msgs = [{"role": "user", "content": [MIMICK, audio[start:end]]}]
        answer, spk = _speaker(engine, msgs, decode)
        part = _synthesize_groups(engine, spk, text_groups(engine, answer, GROUP_TOKENS), max_frames)
        texts.append(answer.strip())
        wavs.append(part.wav)
        pieces += part.pieces
    return SpeechResult(text=" ".join(t for t in texts if t), wav=_join(wavs), pieces=pieces)


def speak_text(engine: Engine, text: str, path: str | Path, voice: Any = None, language: str = "en", *,
               max_frames: int = MAX_AUDIO_FRAMES) -> Path:
    """Speak ``text`` word for word into the wav file ``path`` (chat --speak, the REPL's /speak).

    ``voice``: a saved voice name, an audio file, 16 kHz samples, or None for the model's default voice.
    ``max_frames``: cap per sentence group (46.875 frames per second).
    """
    from minicpmo_cli.api.voices import resolve_voice
    from minicpmo_cli.outputs import write_wav

    reference = None if voice is None else resolve_voice(voice)
    result = speak(engine, text, Voice(reference=reference, language=language), max_frames=max_frames)
    return write_wav(path, result.wav, result.sample_rate)


def speak_stream(engine: Engine, text: str, voice: Voice | None = None, *,
                 first_chunk_frames: int = FIRST_CHUNK_FRAMES, chunk_frames: int = CHUNK_FRAMES,
                 max_frames: int = MAX_AUDIO_FRAMES, seed: int | None = None) -> Iterator[np.ndarray]:
    """Read ``text`` aloud word for word as it is synthesised: yields 24 kHz float32 pieces, the first as
    soon as ``first_chunk_frames`` frames exist, then one per ``chunk_frames`` frames (the reference's
    streaming schedule; long text continues in new segments at sentence ends). ``max_frames``: cap per
    segment, checked after every 25-frame step; ``seed``: seeds the draws (same seed, same audio). Bad
    arguments raise UsageError before anything runs.
    """
    from minicpmo_cli.generation.speech import check_chunk_frames

    voice = voice or Voice()
    voice.check()
    check_chunk_frames(first_chunk_frames, chunk_frames)
    if not text.strip():
        raise UsageError("nothing to say: the text is empty")
    if max_frames < 1:
        raise UsageError("the audio length cap must be at least one frame")
    _need_tts(engine)
    _, spk = _speaker(engine, read_messages(text_groups(engine, text.strip())[0], voice), DecodeOptions(seed=seed),
                      seed_only=True)
    # One greedy token made the speaker state (no draws): a private generator seeded with ``seed`` draws what
    # the seeded global one would, and other threads cannot disturb it.
    return _stream_pieces(engine, spk, text.strip(), (first_chunk_frames, chunk_frames), max_frames, seed)


def stream_answer_speech(engine: Engine, spk, text: str, *, seed: int | None = None,
                         first_chunk_frames: int = FIRST_CHUNK_FRAMES, chunk_frames: int = CHUNK_FRAMES,
                         max_frames: int = MAX_AUDIO_FRAMES) -> Iterator[np.ndarray]:
    """A written answer spoken with the speaker state ``spk`` of its prompt, as it is synthesised: 24 kHz
    float32 pieces on the streaming schedule of :func:`speak_stream`. ``seed``: a private generator (None:
    torch's global one, continuing the draws of the answer's own sampling). Closing the iterator stops it."""
    from minicpmo_cli.generation.speech import check_chunk_frames

    check_chunk_frames(first_chunk_frames, chunk_frames)
    if not text.strip():
        return iter(())
    return _stream_pieces(engine, spk, text.strip(), (first_chunk_frames, chunk_frames), max_frames, seed)


def _stream_pieces(engine: Engine, spk, text: str, chunks: tuple[int, int], max_frames: int,
                   seed: int | None = None) -> Iterator[np.ndarray]:
    """The streaming schedule of ``text`` as a streamed request of the engine's TTS engine (its frames decoded
    batched with every other caller's), the chunks vocoded here as its frames come: the samples of the
    one-at-a-time loop (generation/speech.py ``stream_speech``) for the same seed. Closing the iterator
    aborts the request (its slot is freed at the engine's next step)."""
    import torch

    from minicpmo_cli.generation.speech import StreamDecoder, as_text_rounds, decode_codes, make_sampler
    from minicpmo_cli.generation.tts_engine import TTSStreamRequest
    from minicpmo_cli.processing.tts_text import extract_tts_text

    model = engine.model
    request = TTSStreamRequest(spk.to(model.tts.device), as_text_rounds(extract_tts_text(text)), make_sampler(seed),
                               max_new_tokens=max_frames)
    handle = engine.frame_engine().submit(request)
    decoder = StreamDecoder(lambda codes: decode_codes(model.tts, model.vocos, codes), *chunks)
    try:
        for event in handle.pieces():
            with torch.inference_mode():
                chunks_due = list(decoder.feed(event))
            for chunk in chunks_due:
                yield chunk.wav
    finally:
        if not handle.done:
            handle.abort()


def speak_answer(engine: Engine, spk, text: str, *, cancel: Any = None, seed: int | None = None) -> np.ndarray:
    """A written answer spoken with its prompt's speaker state ``spk``, whole: the synthesis of a chat answer
    (generation/text.py ``synthesize``) on the engine's TTS engine (its frames batched with other callers');
    ``cancel`` (a threading.Event) aborts it at the next audio frame. ``seed``: the draws come from a private
    generator seeded alike, which draws what the global one seeded for the call would (the written half drew
    from a generator of its own), whatever other threads draw meanwhile; None: torch's global generator."""
    from minicpmo_cli.generation.speech import make_sampler
    from minicpmo_cli.generation.tts_engine import TTSPiece, TTSRequest
    from minicpmo_cli.processing.tts_text import extract_tts_text, split_tts_text

    _need_tts(engine)
    model = engine.model
    tts, spk = model.tts, spk.to(model.tts.device)
    texts = split_tts_text(model.tts_processor, extract_tts_text(text), tts.streaming_text_reserved_len - 1)
    sampler = make_sampler(seed)
    request = TTSRequest(spk, [TTSPiece(piece, sampler) for piece in texts], cancel=cancel)
    return _join([_vocode(engine, codes) for codes in engine.frame_engine().submit(request).pieces()])


def text_groups(engine: Engine, text: str, group_tokens: int = GROUP_TOKENS) -> list[str]:
    """``text`` cut at sentence ends into pieces of at most ``group_tokens`` ChatTTS tokens."""
    from minicpmo_cli.processing.tts_text import split_tts_text

    groups = [g for g in split_tts_text(engine.model.tts_processor, text, group_tokens) if g.strip()]
    return groups or [text]


# --- internals ------------------------------------------------------------------------------------------


def _need_tts(engine: Engine) -> None:
    if not engine.has_tts:
        engine.enable_tts()


def _echo_budget(engine: Engine, group: str) -> int:
    """LLM tokens for re-writing ``group``: twice its own length plus room for the end tokens."""
    return 2 * len(engine.processor.tokenizer.encode(group, add_special_tokens=False)) + 16


def _speaker(engine: Engine, msgs: list[dict], decode: DecodeOptions | None = None,
             echo_tokens: int | None = None, seed_only: bool = False) -> tuple[str, Any]:
    """Run the LLM on ``msgs`` under the TTS template -> (its answer, speaker state ``[1, D]``).

    ``decode=None`` or ``seed_only``: only the speaker state is wanted, so one greedy token is generated (the
    state is the prompt pass's ``<|spk|>`` row, the same for any decoding); ``seed_only`` keeps the seed of
    ``decode`` (the speech drawn next then follows it).
    """
    from dataclasses import replace

    if decode is None or seed_only:
        settings = resolve(SPEAKER_STATE_TASK, DecodeOptions(seed=None if decode is None else decode.seed))
    else:
        if echo_tokens is not None and decode.max_new_tokens is None:
            decode = replace(decode, max_new_tokens=echo_tokens)
        settings = resolve(SPEECH_TASK, decode)
    # return_spk_embed makes generate() return the speaker state without synthesising speech itself, so
    # the synthesis below can split long text and cap the length (generate's own path can do neither).
    result = engine.generate(msgs, settings, use_tts_template=True, return_spk_embed=True)
    return str(result.text or ""), result.spk_embeds


def _synthesize_groups(engine: Engine, spk, groups: list[str], max_frames: int,
                       progress: Callable[[int, int], None] | None = None, *, cancel: Any = None,
                       seed: int | None = None) -> SpeechResult:
    """Each group spoken with ``spk``; ``seed``: one private generator for all groups (None: the global one);
    ``cancel`` set: the request is aborted at the TTS engine's next step (the current piece keeps the frames
    made so far, no further group starts)."""
    if max_frames < 1:
        raise UsageError("the audio length cap must be at least one frame")
    from minicpmo_cli.api.protocol import own_steps

    steps = own_steps(engine)
    if steps is not None:  # an engine not backed by a model speaks itself (api/protocol.py)
        return steps.synthesize(spk, groups, max_frames, progress)
    return _Synthesis(engine, spk, groups, max_frames, seed, cancel).result(progress)


class _Synthesis:
    """The groups of one text submitted to the engine's TTS engine as one request (one slot; the groups in
    order, drawing from one stream), then vocoded group by group as their codes come."""

    def __init__(self, engine: Engine, spk, groups: list[str], max_frames: int, seed: int | None,
                 cancel: Any = None, on_finish: Callable | None = None) -> None:
        from minicpmo_cli.generation.tts_engine import TTSPiece, TTSRequest
        from minicpmo_cli.model.tts_sampling import FrameBudget, ReferenceSampler
        from minicpmo_cli.processing.tts_text import extract_tts_text

        self.engine, self.text = engine, " ".join(groups).strip()
        self.groups = [extract_tts_text(group) for group in groups]
        draws = ReferenceSampler(seed=seed)  # reference-exact draws: the same seed gives the same audio
        self.budgets = [FrameBudget(draws, max_frames) for _ in self.groups]
        pieces = [TTSPiece(group, budget) for group, budget in zip(self.groups, self.budgets)]
        request = TTSRequest(spk.to(engine.model.tts.device), pieces, max_new_tokens=max_frames, cancel=cancel,
                             on_finish=on_finish)
        self.handle = engine.frame_engine().submit(request)

    def result(self, progress: Callable[[int, int], None] | None = None) -> SpeechResult:
        wavs, pieces = [], []
        if progress is not None:
            progress(0, len(self.groups))
        for number, codes in enumerate(self.handle.pieces()):
            wav = _vocode(self.engine, codes)
            wavs.append(wav)
            pieces.append(Piece(text=self.groups[number], samples=len(wav), capped=self.budgets[number].capped))
            if progress is not None:
                progress(number + 1, len(self.groups))
        if progress is not None and len(pieces) < len(self.groups):
            progress(len(self.groups), len(self.groups))
        return SpeechResult(text=self.text, wav=_join(wavs), pieces=pieces)


def _vocode(engine: Engine, codes) -> np.ndarray:
    import torch

    from minicpmo_cli.generation.speech import codes_to_wav

    with torch.inference_mode():
        return codes_to_wav(engine.model.tts, engine.model.vocos, codes)


def _join(wavs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(wavs).astype(np.float32) if wavs else np.zeros(0, dtype=np.float32)


