"""Audio understanding: transcription (ASR), audio captions, speaker analysis and scene tags.

Every input is decoded to 16 kHz mono and segmented by the Silero VAD (``processing/segments.py``): speech
regions grouped into pieces of at most 30 s (the Whisper window), cut only inside pauses, non-speech never
sent; each piece is sent as the guide's message ``[task prompt + "\\n", audio]``
under the TTS chat template (audio switches it on, as the reference). Pieces of several inputs share one
forward pass (``batch_size``); the answers are the same as one piece at a time (see ``embed_prompts``).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np

from minicpmo_cli.api.asr_front import (  # noqa: F401 - the front, named here for callers and tests
    _Job, _reason, _segment_group, _start_job, _stream_job, input_name)
from minicpmo_cli.api.asr_pipeline import Stages, import_decoding_modules, staged_groups
from minicpmo_cli.api.asr_stream import hand_on
from minicpmo_cli.api.engine import DecodeOptions, Engine, seed_call
from minicpmo_cli.errors import InputError, UsageError
from minicpmo_cli.generation.presets import resolve
from minicpmo_cli.outputs import TranscriptRecord
from minicpmo_cli.processing import prompts
from minicpmo_cli.processing.segments import Piece, join_texts, piece_segments
from minicpmo_cli.units import INPUT_SAMPLE_RATE

TASKS = ("transcribe", "translate", "caption", "speaker", "scene")
LANGUAGES = ("auto", "en", "zh")  # what the model transcribes; auto decides per input (see _detect_language)
# --task translate: ours, not the guide's (it has no translation prompt), worded like its ASR prompt. English
# speech is transcribed with the guide's English prompt instead: its transcript is its English translation.
TRANSLATE_PROMPT = "Please listen to the audio snippet carefully and translate its content into English."
MAX_PIECE_SECONDS = 30.0  # s: one Whisper window; longer audio is split in its pauses
DEFAULT_VAD_THRESHOLD = 0.5  # Silero's speech probability threshold
DEFAULT_MIN_SILENCE_MS = 500  # a pause this long ends a speech region (and may take a cut)
DEFAULT_PIECE_PAD_MS = 200  # processing/segments.py's PIECE_PAD_SECONDS

# Decoding: the "asr" preset of generation/presets.py (greedy unless --sampling; 512 new tokens; why there).
# A piece that hits the token limit is reported, never silently cut.
ASR_TASK = "asr"

# The guide's message puts a newline after the task prompt ("...transcribe the content.\n"), which the
# chat join turns into a blank line before the audio; golden case c_asr confirms the prompt text.
PROMPT_SUFFIX = "\n"

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")

AudioSource = Union[str, bytes, np.ndarray]


def task_prompt(task: str = "transcribe", language: str = "auto", custom: str | None = None) -> str:
    """The instruction sent with the audio: ``custom`` when given, else the guide's prompt for the task.

    ``language`` is the spoken language. Only transcription has a Chinese prompt in the guide; the other
    tasks use their English prompt for every language (the model answers them in either). Translation of
    Chinese (or auto: not yet known) speech uses TRANSLATE_PROMPT; of English speech, the English ASR prompt.
    """
    if language not in LANGUAGES:
        raise UsageError(f"--language {language!r} is not supported: the model transcribes en (English) and "
                         f"zh (Chinese); use en, zh or auto")
    if custom is not None:
        if not custom.strip():
            raise UsageError("--prompt is empty")
        text = custom
    elif task == "transcribe" or (task == "translate" and language == "en"):
        text = prompts.ASR_ZH if language == "zh" else prompts.ASR_EN
    elif task == "translate":
        text = TRANSLATE_PROMPT
    elif task in ("caption", "speaker", "scene"):
        text = prompts.TASK_PROMPTS[task]
    else:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    return text if text.endswith(PROMPT_SUFFIX) else text + PROMPT_SUFFIX


@dataclass(frozen=True)
class AsrOptions:
    task: str = "transcribe"  # transcribe | translate (to English) | caption | speaker | scene
    language: str = "auto"  # spoken language en | zh; auto: decided per input from its first speech piece
    prompt: str | None = None  # a custom instruction instead of the task's prompt
    batch_size: int | None = 1  # pieces per forward pass; None: chosen for the device (engine_batch_size)
    max_piece_seconds: float = MAX_PIECE_SECONDS  # longer audio is split in its pauses
    vad: bool = True  # False: fixed pieces cut at the quietest point, silence and noise sent too
    vad_threshold: float = DEFAULT_VAD_THRESHOLD
    min_silence_ms: int = DEFAULT_MIN_SILENCE_MS
    piece_pad_ms: int = DEFAULT_PIECE_PAD_MS  # audio kept before and after the speech of a piece

    @property
    def instruction(self) -> str:
        return task_prompt(self.task, self.language, self.prompt)

    @property
    def detects_language(self) -> bool:
        """True when the prompt depends on a spoken language that --language auto leaves open."""
        return self.language == "auto" and self.prompt is None and self.task in ("transcribe", "translate")

    def validate(self) -> None:
        """UsageError for a bad task, language, prompt or segmentation setting (before any work is done)."""
        _ = self.instruction
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if not 0.0 < self.vad_threshold < 1.0:
            raise UsageError(f"--vad-threshold must be between 0 and 1 (a speech probability), "
                             f"not {self.vad_threshold}")
        if self.min_silence_ms < 0:
            raise UsageError(f"--min-silence-ms must be 0 or more, not {self.min_silence_ms}")
        if not 0 <= self.piece_pad_ms < self.max_piece_seconds * 500:
            raise UsageError(f"the padding around speech must be 0 or more and leave room for speech, "
                             f"not {self.piece_pad_ms} ms")

    def segment(self, samples: np.ndarray) -> list[Piece]:
        """The pieces the model hears: speech regions grouped by the VAD, or fixed pieces with --no-vad."""
        from minicpmo_cli.processing.segments import segment_audio

        if not self.vad:
            return segment_audio(samples, INPUT_SAMPLE_RATE, vad=False, max_seconds=self.max_piece_seconds)
        from minicpmo_cli.media.vad import speech_regions
        from minicpmo_cli.processing.segments import vad_pieces

        regions = speech_regions(samples, self.vad_threshold, self.min_silence_ms)
        return vad_pieces(samples, regions, INPUT_SAMPLE_RATE, self.max_piece_seconds, self.piece_pad_ms / 1000)


@dataclass
class AudioInput:
    """One input: ``path`` names it in records ("-" for stdin); ``source`` is what is decoded."""

    path: str
    source: AudioSource

    @classmethod
    def from_path(cls, path) -> AudioInput:
        return cls(str(path), str(path))


@dataclass
class PieceText:
    text: str
    truncated: bool = False  # the answer hit max_new_tokens without an end token


# ------------------------------------------------------------------------------------------ model calls
def embed_prompts(model, inputs) -> Any:
    """LLM input embeddings of a batch, with the audio of each group of identical-length samples encoded together.

    Why not ``model.generate`` on the batch: the reference's Whisper mask compares encoder frame indices
    with *mel* lengths, so in a batch a clip whose last 1 s chunk is partial lets that chunk attend to
    padding frames and its embeddings change with the longest clip beside it. Samples whose pieces have the
    same lengths share one Whisper call (no padding between them); every other sample is encoded on its own
    (trimmed to its own frames). Either way each sample gets exactly its single-clip embeddings, so batching
    changes no transcript.
    """
    import torch

    from minicpmo_cli.model.audio import identical_length_groups

    data = dict(inputs)
    chunk_length = model.config.audio_chunk_length
    with torch.inference_mode():
        embeds, _ = model.get_vllm_embedding(data)
        for samples, rows, frames in identical_length_groups(data.get("audio_feature_lens") or []):
            group = {
                "audio_features": data["audio_features"][rows, :, :frames],
                "audio_feature_lens": [data["audio_feature_lens"][i] for i in samples],
                "audio_bounds": [data["audio_bounds"][i] for i in samples],
            }
            index = torch.tensor(samples, device=embeds.device)
            part = embeds.index_select(0, index)
            model.get_omni_embedding(group, part, chunk_length=chunk_length)  # writes the audio rows into part
            embeds.index_copy_(0, index, part)
    return embeds


def generate_batch(engine: Engine, clips: list[np.ndarray], instruction: str | list[str],
                   decode: DecodeOptions) -> list[PieceText]:
    """One forward pass over several clips (left-padded); the answer to ``[instruction, clip]`` for each
    (``instruction``: one for all, or one per clip)."""
    from minicpmo_cli.api.protocol import own_steps

    steps = own_steps(engine)
    if steps is not None:  # an engine not backed by a model answers itself (api/protocol.py)
        return steps.transcribe_clips(clips, instruction, decode)
    from minicpmo_cli.generation.text import TTS_EOS, run_llm_generate
    from minicpmo_cli.processing.answer_text import decode_text, terminator_ids

    settings = resolve(ASR_TASK, decode)
    instructions = [instruction] * len(clips) if isinstance(instruction, str) else list(instruction)
    msgs = [[{"role": "user", "content": [text, clip]}] for text, clip in zip(instructions, clips)]
    inputs = engine.processor.apply_chat_template(msgs=msgs, use_tts_template=True,
                                                  audio_device=engine.device).to(engine.device)
    embeds = embed_prompts(engine.model, inputs)
    tokenizer = engine.processor.tokenizer
    seed_call(settings.seed)
    sequences, _ = run_llm_generate(engine.model, embeds, inputs["attention_mask"], tokenizer, settings.decode,
                                    engine=getattr(engine, "llm_engine", None), seed=settings.seed)
    stops = set(terminator_ids(tokenizer))
    texts = decode_text(sequences, tokenizer)
    return [PieceText(text.replace(TTS_EOS, "").strip(), truncated=not stops.intersection(row.tolist()))
            for text, row in zip(texts, sequences)]


def _has_audio_tokens(clip: np.ndarray) -> bool:
    """False for a sliver too short to give the LLM a single audio embedding (answered with "")."""
    from minicpmo_cli.processing.audio import audio_token_count

    return len(clip) > 0 and audio_token_count(len(clip)) > 0


# ------------------------------------------------------------------------------------------ results
def join_pieces(texts: Iterable[str]) -> str:
    """Piece texts joined with a space, or with nothing where both sides are CJK (no spaces in Chinese)."""
    return join_texts(texts)


def detect_language(text: str) -> str | None:
    """A guess from the script of the answer for --language auto: "zh" when it holds CJK, else "en"."""
    if not text.strip():
        return None
    return "zh" if _CJK.search(text) else "en"


def _detect_languages(probes: list[tuple[_Job, np.ndarray]], model: Callable[[], Engine], options: AsrOptions,
                      decode: DecodeOptions, batch_size: Callable[[], int]) -> None:
    """--language auto: the first speech piece of each input, transcribed with the English prompt, all inputs'
    probes batched together (batching changes no answer); the script of each answer (CJK or not) gives that
    input's language, and so the prompt of all its pieces. For English the probe is already the first piece's
    transcript; Chinese pieces are all transcribed with the Chinese prompt."""
    english = task_prompt("transcribe", "en")
    clips = [(job, samples[job.spans[0][0]:job.spans[0][1]]) for job, samples in probes]
    clips = [(job, clip) for job, clip in clips if _has_audio_tokens(clip)]
    size = batch_size() if clips else 1
    for start in range(0, len(clips), size):
        part = clips[start:start + size]
        for (job, _), first in zip(part, generate_batch(model(), [clip for _, clip in part], english, decode)):
            job.language = detect_language(first.text) or "en"
            job.instruction = task_prompt(options.task, job.language)
            if job.instruction == english:
                job.texts[0] = first


def _tell_pieces(job: _Job, on_piece: Callable[[str, str], None]) -> None:
    """Hand on the texts of the job's pieces that are done and follow the ones already handed on."""
    while job.told < len(job.texts) and job.texts[job.told] is not None:
        on_piece(job.record.path, job.texts[job.told].text)
        job.told += 1


def _finish(job: _Job, options: AsrOptions, warn: Callable[[str], None] | None) -> TranscriptRecord:
    record = job.record
    if record.error is not None:
        return record
    record.segments = [segment for piece, answer in zip(job.pieces, job.texts)
                       for segment in piece_segments(piece, answer.text, INPUT_SAMPLE_RATE)]
    record.text = join_pieces(piece.text for piece in job.texts)
    record.language = job.language or detect_language(record.text)
    if warn is not None:
        for (start, end), piece in zip(job.spans, job.texts):
            if piece.truncated:
                span = f"{start / INPUT_SAMPLE_RATE:.1f}-{end / INPUT_SAMPLE_RATE:.1f} s"
                warn(f"{input_name(record.path)}: the answer for {span} "
                     f"reached --max-new-tokens and may be cut short")
    return record


# ------------------------------------------------------------------------------------------ batch sizes
CPU_BATCH_SIZE = 4  # pieces per pass on the CPU: more only adds padding work
MAX_AUTO_BATCH_SIZE = 128
# GPU memory one 30 s piece may need, with margin: its KV cache (~800 prompt + 512 new positions x 28 layers
# x 4 KV heads x 128 x (key, value) x 2 bytes = 56 KiB a position, ~75 MiB), the prefill activations of
# ~800 positions (~60 MiB in the 18,944-wide MLP) and its Whisper pass (16 heads x 1500^2 attention scores).
PIECE_BYTES = 256 * 2**20
FREE_MEMORY_SHARE = 0.8  # leave the rest to the allocator's fragmentation and other processes


def default_batch_size(device_type: str, free_bytes: int | None) -> int:
    """Pieces per pass when --batch-size is not given: CPU_BATCH_SIZE on the CPU, else from free GPU memory.

    ``free_bytes`` is what the GPU has free with the model loaded; the batch takes FREE_MEMORY_SHARE of it
    at PIECE_BYTES a piece, between 1 and MAX_AUTO_BATCH_SIZE.
    """
    if device_type != "cuda" or free_bytes is None:
        return CPU_BATCH_SIZE
    return max(1, min(MAX_AUTO_BATCH_SIZE, int(free_bytes * FREE_MEMORY_SHARE) // PIECE_BYTES))


def engine_batch_size(engine: Engine) -> int:
    """:func:`default_batch_size` for the engine's device (asks CUDA how much memory is free)."""
    import torch

    device = torch.device(engine.device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return default_batch_size(device.type, free)


# ------------------------------------------------------------------------------------------ entry points
SORT_WINDOW_BATCHES = 4  # pieces of up to this many batches are sorted by length before batching



def _loaded_once(engine: Engine | Callable[[], Engine]) -> Callable[[], Engine]:
    """``engine``, or a function that loads it the first time it is called and returns it after."""
    loaded: list[Engine] = [] if callable(engine) else [engine]  # an Engine, or any api.protocol.Engine

    def model() -> Engine:
        if not loaded:
            loaded.append(engine())
        return loaded[0]
    return model


def _run_batch(batch: list[tuple[_Job, int, np.ndarray]], model: Callable[[], Engine],
               decode: DecodeOptions) -> None:
    """Answer each piece of ``batch`` into its job (slivers without audio tokens get "" without the model)."""
    for job, index, clip in batch:
        if not _has_audio_tokens(clip):
            job.texts[index] = PieceText("")
    todo = [(job, index, clip) for job, index, clip in batch if job.texts[index] is None]
    if todo:
        results = generate_batch(model(), [clip for _, _, clip in todo], [job.instruction for job, _, _ in todo],
                                 decode)
        for (job, index, _), result in zip(todo, results):
            job.texts[index] = result


def transcribe_many(engine: Engine | Callable[[], Engine], inputs: Iterable[AudioInput],
                    options: AsrOptions = AsrOptions(), decode: DecodeOptions = DecodeOptions(),
                    warn: Callable[[str], None] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    stages: Stages = Stages(),
                    on_piece: Callable[[str, str], None] | None = None,
                    cancel: Any = None) -> Iterator[TranscriptRecord]:
    """One record per input, in input order, each yielded as soon as it (and those before it) is done.

    Inputs are decoded in threads ahead of the model and segmented by the VAD many files at a time
    (api/asr_pipeline.py, ``stages``); a bad one gives a record with ``error`` set and the others go on. The
    --language auto probes of the files segmented together are batched. The pieces of consecutive inputs are
    gathered SORT_WINDOW_BATCHES batches at a time, sorted by length (less padding; equal lengths share one
    Whisper call) and sent ``options.batch_size`` at a time (None: :func:`engine_batch_size`). ``engine`` may
    be a function that loads it: it is then called only once some audio needs the model (a batch of unreadable
    files, or a rerun that finds nothing left to do, loads nothing). ``progress(done, known)`` is called as pieces are
    found and finished (known grows as inputs are decoded): a long single file shows its pieces go by.
    ``on_piece(path, text)`` is called with each piece's text as soon as it and the pieces before it in its
    input are done (streamed transcriptions). ``cancel``: an Event; once it is set (a server request whose
    client left) no further batch goes to the model and :class:`TranscriptionCancelled` is raised.
    """
    options.validate()
    resolve(ASR_TASK, decode)  # contradictory decoding options fail before any audio is decoded
    if stages.vad_device is None and isinstance(getattr(engine, "device", None), str):
        stages = replace(stages, vad_device=engine.device)  # a loaded engine: the VAD runs where it does
    model = _loaded_once(engine)
    run = _PieceRun(model, options, decode, warn, progress, on_piece, cancel)
    for group in staged_groups(inputs, lambda item: _start_job(item, options),
                               lambda found, vad: _segment_group(found, options, vad), stages,
                               prepare=lambda: import_decoding_modules(options.vad),
                               stream=lambda item, seconds: _stream_job(item, options, seconds)):
        handed = [(job, samples, hand_on(job, samples)) for job, samples in group]  # streamed parts join here
        probes = [(job, samples) for job, samples, new in handed if new.probe] if options.detects_language else []
        if probes:
            _detect_languages(probes, model, options, decode, run.batch_size)
        for job, samples, new in handed:  # as one input at a time: a sort window fills from the inputs in order
            if new.first:
                run.open_jobs.append(job)
            run.waiting.extend((job, i, samples[s:e]) for i, (s, e) in new.spans if job.texts[i] is None)
            run.advance(found=len(new.spans))
            if run.waiting and len(run.waiting) >= run.window():
                yield from run.run_waiting()
            yield from run.finished()
    while run.waiting:
        yield from run.run_waiting()
    yield from run.finished()


class _PieceRun:
    """The pieces of a transcribe_many run between the VAD and the records: the inputs still open (in input
    order), the pieces not yet sent to the model, the batch size (found once the model is loaded) and the
    progress counts."""

    def __init__(self, model: Callable[[], Engine], options: AsrOptions, decode: DecodeOptions,
                 warn: Callable[[str], None] | None, progress: Callable[[int, int], None] | None,
                 on_piece: Callable[[str, str], None] | None, cancel: Any = None) -> None:
        self.model, self.options, self.decode = model, options, decode
        self.warn, self.progress, self.on_piece, self.cancel = warn, progress, on_piece, cancel
        self.open_jobs: deque[_Job] = deque()
        self.waiting: list[tuple[_Job, int, np.ndarray]] = []  # pieces not yet sent to the model
        self.sizes: list[int] = [] if options.batch_size is None else [options.batch_size]
        self.counts = [0, 0]  # pieces done, pieces known: for ``progress``

    def advance(self, done: int = 0, found: int = 0) -> None:
        self.counts[:] = self.counts[0] + done, self.counts[1] + found
        if self.progress is not None:
            self.progress(*self.counts)

    def batch_size(self) -> int:
        if not self.sizes:
            self.sizes.append(engine_batch_size(self.model()))
        return self.sizes[0]

    def window(self) -> int:  # one batch at a time when batches are single pieces: sorting would gain nothing
        return self.batch_size() * (SORT_WINDOW_BATCHES if self.batch_size() > 1 else 1)

    def finished(self) -> Iterator[TranscriptRecord]:
        if self.on_piece is not None:
            for job in self.open_jobs:
                _tell_pieces(job, self.on_piece)
        while self.open_jobs and self.open_jobs[0].done:
            yield _finish(self.open_jobs.popleft(), self.options, self.warn)

    def run_waiting(self) -> Iterator[TranscriptRecord]:
        pieces = sorted(self.waiting, key=lambda piece: len(piece[2]))  # stable: equal lengths keep input order
        self.waiting.clear()
        size = self.batch_size()
        for start in range(0, len(pieces), size):
            if self.cancel is not None and self.cancel.is_set():
                raise TranscriptionCancelled("the transcription was cancelled")
            _run_batch(pieces[start:start + size], self.model, self.decode)
            self.advance(done=min(size, len(pieces) - start))
            yield from self.finished()


class TranscriptionCancelled(Exception):
    """The caller set the transcription's cancel event: what was left of it was not sent to the model."""


def transcribe(engine: Engine, audio: AudioSource, options: AsrOptions = AsrOptions(),
               decode: DecodeOptions = DecodeOptions(), path: str | None = None,
               cancel: Any = None) -> TranscriptRecord:
    """One audio (a file path, the bytes of a file, or 16 kHz mono samples) -> its record.

    Raises InputError when the audio cannot be read (``transcribe_many`` reports it in the record instead).
    """
    name = path or (audio if isinstance(audio, str) else "-")
    record = next(transcribe_many(engine, [AudioInput(name, audio)], options, decode, cancel=cancel))
    if record.error is not None:
        raise InputError(record.error, input_name(name))
    return record
