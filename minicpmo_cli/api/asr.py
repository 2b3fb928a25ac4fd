"""Audio understanding: transcription (ASR), audio captions, speaker analysis and scene tags.

Every input is decoded to 16 kHz mono and segmented by the Silero VAD (``processing/segments.py``): speech
regions grouped into pieces of at most 30 s (the Whisper window), cut only inside pauses, non-speech never
sent; each piece is sent as the guide's message ``[task prompt + "\\n", audio]``
under the TTS chat template (audio switches it on, as the reference). The model stage (api/asr_model.py)
embeds the pieces of several inputs a batch at a time (``batch_size``) and decodes each as its own request on
the LLM engine; the answers are the same as one piece at a time (see ``embed_prompts``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np

from minicpmo_cli.api.asr_model import (  # noqa: F401 - the model stage, re-exported for callers and tests
    ASR_TASK, CPU_BATCH_SIZE, FREE_MEMORY_SHARE, MAX_AUTO_BATCH_SIZE, PIECE_BYTES, SORT_WINDOW_BATCHES, PieceRun,
    PieceText, TranscriptionCancelled, default_batch_size, embed_prompts, engine_batch_size, generate_batch,
    has_audio_tokens, loaded_once)
from minicpmo_cli.api.asr_front import (  # noqa: F401 - the front, named here for callers and tests
    _Job, _reason, _segment_group, _start_job, _stream_job, input_name)
from minicpmo_cli.api.asr_pipeline import Stages, import_decoding_modules, staged_groups
from minicpmo_cli.api.asr_stream import hand_on
from minicpmo_cli.api.engine import DecodeOptions, Engine
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


# ------------------------------------------------------------------------------------------ results
def join_pieces(texts: Iterable[str]) -> str:
    """Piece texts joined with a space, or with nothing where both sides are CJK (no spaces in Chinese)."""
    return join_texts(texts)


def detect_language(text: str) -> str | None:
    """A guess from the script of the answer for --language auto: "zh" when it holds CJK, else "en"."""
    if not text.strip():
        return None
    return "zh" if _CJK.search(text) else "en"


def _queue_pieces(group: list[tuple[_Job, Any]], run: PieceRun, options: AsrOptions) -> None:
    """Hand the new pieces of a segmented group to the model stage (a streamed input brings its pieces over
    several groups: api/asr_stream.py ``hand_on``). --language auto: the first speech piece of each input goes
    first, with the English prompt (:func:`_decide_language`), and the input's other pieces, those of later
    parts too, are held back until its answer has chosen their prompt."""
    english = task_prompt("transcribe", "en")
    for job, samples in group:
        new = hand_on(job, samples)
        if new.first:
            run.open_jobs.append(job)
        pieces = [(index, samples[start:end]) for index, (start, end) in new.spans]
        run.advance(found=len(pieces))
        if options.detects_language and new.probe and pieces and has_audio_tokens(pieces[0][1]):
            job.held = pieces  # the probe's answer releases them, with what arrives meanwhile
            run.probe(job, pieces[0][1], english, lambda job_, first: _decide_language(job_, first, options),
                      job.held)
        elif job.held is not None:
            job.held.extend(pieces)
        else:
            run.add(job, [(index, clip) for index, clip in pieces if job.texts[index] is None])


def _decide_language(job: _Job, first: PieceText, options: AsrOptions) -> None:
    """The script of the probe's answer (CJK or not) gives the input's language, and so the prompt of all its
    pieces. For English the probe is already the first piece's transcript; Chinese pieces are all transcribed
    with the Chinese prompt."""
    job.held = None  # pieces found from now on go straight to the model
    job.language = detect_language(first.text) or "en"
    job.instruction = task_prompt(options.task, job.language)
    if job.instruction == task_prompt("transcribe", "en"):
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


# ------------------------------------------------------------------------------------------ entry points
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
    model stage (api/asr_model.py :class:`PieceRun`) sends the --language auto probes first, then the pieces
    gathered SORT_WINDOW_BATCHES batches at a time, sorted by length (equal lengths share one Whisper call),
    ``options.batch_size`` a pass (None: :func:`engine_batch_size`), each piece its own request on the LLM
    engine, which refills a finished row at once; answers do not depend on the batching. ``engine`` may
    be a function that loads it: it is then called only once some audio needs the model (a batch of unreadable
    files, or a rerun that finds nothing left to do, loads nothing). ``progress(done, known)`` is called as pieces are
    found and finished (known grows as inputs are decoded): a long single file shows its pieces go by.
    ``on_piece(path, text)`` is called with each piece's text as soon as it and the pieces before it in its
    input are done (streamed transcriptions). ``cancel``: an Event; once it is set (a server request whose
    client left) no further batch goes to the model, what is on it is aborted and
    :class:`TranscriptionCancelled` is raised.
    """
    options.validate()
    resolve(ASR_TASK, decode)  # contradictory decoding options fail before any audio is decoded
    if stages.vad_device is None and isinstance(getattr(engine, "device", None), str):
        stages = replace(stages, vad_device=engine.device)  # a loaded engine: the VAD runs where it does
    model = loaded_once(engine)
    tell = None if on_piece is None else (lambda job: _tell_pieces(job, on_piece))
    run = PieceRun(model, options.batch_size, decode, lambda job: _finish(job, options, warn), tell, progress,
                   cancel)
    try:
        for group in staged_groups(inputs, lambda item: _start_job(item, options),
                                   lambda found, vad: _segment_group(found, options, vad), stages,
                                   prepare=lambda: import_decoding_modules(options.vad),
                                   stream=lambda item, seconds: _stream_job(item, options, seconds)):
            _queue_pieces(group, run, options)
            yield from run.pump()
        yield from run.pump(final=True)
    finally:
        run.close()


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
