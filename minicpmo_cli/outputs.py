"""Result writers (txt, json, jsonl, srt, vtt, wav), written atomically, with skip-existing helpers.

Every file goes to a temporary file in the destination folder first, is fsync'ed, then renamed over
the destination: a crash or Ctrl-C never leaves a half-written output, and a rerun of a batch can trust
that any output it finds is complete (see `should_skip`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

import numpy as np

from minicpmo_cli.errors import OutputError, UsageError, display_name, valid_text  # noqa: F401
from minicpmo_cli.temp_files import default_file_mode, make_temp_file, sweep_temp_files
from minicpmo_cli.units import OUTPUT_SAMPLE_RATE

PCM16_MAX = 32767  # full scale of signed 16-bit PCM
TEXT_FORMATS = ("txt", "json", "jsonl", "srt", "vtt")
STDIN_STEM = "stdin"  # output name for input "-"


@dataclass
class Segment:
    """A piece of a transcript with its time span in seconds."""

    start: float
    end: float
    text: str


@dataclass
class TranscriptRecord:
    """One input's result: what the json/jsonl writers print, one record per input."""

    path: str
    text: str = ""
    language: str | None = None
    duration: float | None = None  # s
    segments: list[Segment] = field(default_factory=list)
    error: str | None = None  # one-line reason when this input failed (then text is empty)

    def to_dict(self) -> dict:
        """The record as JSON-ready data; every string valid UTF-8.

        A path that is not valid UTF-8 (a file name made of other bytes) is given readably, each bad byte as
        U+FFFD, and exactly in ``path_bytes``: the name's bytes, base64-encoded (only then present).
        """
        data = _valid_strings(asdict(self))  # segments given as dicts instead of Segments pass through unchanged
        if data["path"] != self.path:
            data["path_bytes"] = base64.b64encode(os.fsencode(self.path)).decode("ascii")
        return data

    def timed_segments(self) -> list[Segment]:
        """Segments for srt/vtt; a record without segments is one segment spanning the whole input."""
        if self.segments:
            return [s if isinstance(s, Segment) else Segment(**s) for s in self.segments]
        if not self.text:
            return []
        return [Segment(0.0, float(self.duration or 0.0), self.text)]


def _valid_strings(value):
    """`value` (nested dicts, lists, strings) with every string made valid UTF-8 (lone surrogates -> U+FFFD)."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, dict):
        return {key: _valid_strings(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_valid_strings(item) for item in value]
    return value


# --- timestamps ---------------------------------------------------------------------------------


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """HH:MM:SS<marker>mmm, rounded to the millisecond (srt uses ',', vtt '.')."""
    if seconds < 0:
        raise ValueError(f"negative timestamp: {seconds}")
    total_ms = int(round(seconds * 1000.0))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


# --- writers ------------------------------------------------------------------------------------


class ResultWriter:
    """Formats a TranscriptRecord as text of one format; writes it to a file or a stream."""

    extension = ""

    def __init__(self, output_dir: str | os.PathLike[str] | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None

    def format(self, record: TranscriptRecord) -> str:
        raise NotImplementedError

    def output_path(self, record: TranscriptRecord) -> Path:
        if self.output_dir is None:
            raise UsageError("no output folder was given for this writer")
        return output_path_for(record.path, self.output_dir, self.extension)

    def write(self, record: TranscriptRecord, path: str | os.PathLike[str] | None = None) -> Path:
        """Write atomically to `path` (default: <output_dir>/<input stem>.<ext>); return the path."""
        target = Path(path) if path is not None else self.output_path(record)
        write_text_atomic(target, self.format(record))
        return target

    def write_to(self, stream: TextIO, record: TranscriptRecord) -> None:
        stream.write(self.format(record))
        stream.flush()

    def __call__(self, record: TranscriptRecord, path: str | os.PathLike[str] | None = None):
        return self.write(record, path)


class TxtWriter(ResultWriter):
    extension = "txt"

    def format(self, record: TranscriptRecord) -> str:
        return record.text.strip() + "\n"


class JsonWriter(ResultWriter):
    extension = "json"

    def format(self, record: TranscriptRecord) -> str:
        return json.dumps(record.to_dict(), ensure_ascii=False, indent=2) + "\n"


class JsonlWriter(ResultWriter):
    """One compact JSON object per line: one line per input, so many records can share a stream."""

    extension = "jsonl"

    def format(self, record: TranscriptRecord) -> str:
        return json.dumps(record.to_dict(), ensure_ascii=False) + "\n"


class SrtWriter(ResultWriter):
    extension = "srt"

    def format(self, record: TranscriptRecord) -> str:
        blocks = []
        for number, segment in enumerate(record.timed_segments(), start=1):
            span = f"{format_timestamp(segment.start, ',')} --> {format_timestamp(segment.end, ',')}"
            blocks.append(f"{number}\n{span}\n{segment.text.strip()}\n")
        return "\n".join(blocks)


class VttWriter(ResultWriter):
    extension = "vtt"

    def format(self, record: TranscriptRecord) -> str:
        blocks = ["WEBVTT\n"]
        for segment in record.timed_segments():
            span = f"{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}"
            blocks.append(f"{span}\n{segment.text.strip()}\n")
        return "\n".join(blocks)


class MultiWriter(ResultWriter):
    """`-f all`: every text format, one file each."""

    extension = ""

    def __init__(self, writers: Iterable[ResultWriter]) -> None:
        self.writers = list(writers)
        super().__init__(self.writers[0].output_dir if self.writers else None)

    def format(self, record: TranscriptRecord) -> str:
        raise UsageError("format 'all' writes one file per format; it cannot be printed as one text")

    def write(self, record: TranscriptRecord, path: str | os.PathLike[str] | None = None) -> list[Path]:
        if path is not None:
            raise UsageError("format 'all' needs an output folder, not a single output file")
        return [writer.write(record) for writer in self.writers]


WRITERS: dict[str, type[ResultWriter]] = {
    "txt": TxtWriter,
    "json": JsonWriter,
    "jsonl": JsonlWriter,
    "srt": SrtWriter,
    "vtt": VttWriter,
}


def get_writer(fmt: str, output_dir: str | os.PathLike[str] | None = None) -> ResultWriter:
    """The writer for `fmt` (txt, json, jsonl, srt, vtt or all); creates `output_dir` when given."""
    if output_dir is not None:
        ensure_output_dir(output_dir)
    if fmt == "all":
        return MultiWriter(WRITERS[name](output_dir) for name in TEXT_FORMATS)
    try:
        return WRITERS[fmt](output_dir)
    except KeyError:
        choices = ", ".join(TEXT_FORMATS + ("all",))
        raise UsageError(f"unknown output format {fmt!r} (choose from {choices})") from None


# --- paths and skip-existing --------------------------------------------------------------------


def output_path_for(input_path: str | os.PathLike[str], output_dir: str | os.PathLike[str], ext: str) -> Path:
    """<output_dir>/<input file name without its extension>.<ext>; input '-' is named 'stdin'."""
    stem = STDIN_STEM if str(input_path) == "-" else Path(input_path).stem
    return Path(output_dir) / f"{stem}.{ext.lstrip('.')}"


def should_skip(path: str | os.PathLike[str], overwrite: bool) -> bool:
    """True when `path` already exists and we were not asked to overwrite it (resuming a batch)."""
    return not overwrite and Path(path).exists()


def ensure_output_dir(output_dir: str | os.PathLike[str]) -> Path:
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError("exists and is not a folder", folder) from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({exc.strerror or exc})", folder) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", folder)
    sweep_temp_files(folder)  # what killed runs left here goes before this run writes
    return folder


# --- atomic writes ------------------------------------------------------------------------------


FILES_WRITTEN: list[Path] = []  # files this process completed: an interrupted run says how many it kept


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` through a synced temp file in the same folder and a rename."""
    target = _write_atomic(Path(path), lambda handle: handle.write(data))
    FILES_WRITTEN.append(target)
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return write_bytes_atomic(path, text.encode(encoding))


def _write_atomic(target: Path, fill: Callable[[io.BufferedWriter], object]) -> Path:
    descriptor, temp_name = make_temp_file(target)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, default_file_mode())  # mkstemp makes 0600; give the usual umask mode
        os.replace(temp_name, target)
    except BaseException as exc:  # also on Ctrl-C: never leave the temp file behind
        _remove_quietly(temp_name)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the file ({exc.strerror or exc})", target) from None
        raise
    return target


def _remove_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


# --- wav ----------------------------------------------------------------------------------------


def wav_bytes(samples: np.ndarray, sample_rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    """A complete mono PCM16 wav file in memory (for `-o -`, stdout)."""
    pcm = _to_pcm16(samples)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(sample_rate))
        wav.writeframes(pcm.tobytes())
    return buffer.getvalue()


def write_wav(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int = OUTPUT_SAMPLE_RATE) -> Path:
    """Write float samples (clipped to [-1, 1]) as a mono PCM16 wav, atomically."""
    return write_bytes_atomic(path, wav_bytes(samples, sample_rate))


# --- compressed audio (PyAV: FFmpeg's encoders inside its wheels) --------------------------------------

# Output file extension -> (container, encoder). Ogg carries Opus (Vorbis has only FFmpeg's experimental encoder).
ENCODED_AUDIO = {".flac": ("flac", "flac"), ".mp3": ("mp3", "libmp3lame"), ".ogg": ("ogg", "libopus"),
                 ".opus": ("ogg", "libopus")}
AUDIO_EXTENSIONS = (".wav",) + tuple(ENCODED_AUDIO)


def check_audio_extension(path: str | os.PathLike[str]) -> str:
    """The lower-case extension of an audio output path; a UsageError when it is not one we can write."""
    suffix = Path(path).suffix.lower()
    if suffix not in AUDIO_EXTENSIONS:
        named = f"a {suffix} file" if suffix else "a file without an extension"
        raise UsageError(f"-o {path}: cannot write {named}; name a {', '.join(AUDIO_EXTENSIONS)} file")
    return suffix


def encoded_audio_bytes(samples: np.ndarray, sample_rate: int, suffix: str) -> bytes:
    """Mono speech as a complete flac/mp3/ogg file in memory, encoded by PyAV from the same PCM16 as the wav."""
    import av  # lazily: the wav path needs no FFmpeg

    container, codec = ENCODED_AUDIO[suffix]
    pcm = _to_pcm16(samples).reshape(1, -1)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=int(sample_rate), layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = int(sample_rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:  # None flushes the encoder
            out.mux(packet)
    return buffer.getvalue()


def write_audio(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int = OUTPUT_SAMPLE_RATE) -> Path:
    """Write speech in the format the file extension names (wav, flac, mp3, ogg/opus), atomically."""
    suffix = check_audio_extension(path)
    if suffix == ".wav":
        return write_wav(path, samples, sample_rate)
    return write_bytes_atomic(path, encoded_audio_bytes(samples, sample_rate, suffix))


def _to_pcm16(samples: np.ndarray) -> np.ndarray:
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)  # [n, 1] or [1, n]: already mono
    if audio.ndim != 1:
        raise ValueError(f"expected mono samples of shape [n], got shape {audio.shape}")
    audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
    # Little-endian int16 is what the wav format stores, whatever the machine's byte order.
    return np.rint(np.clip(audio, -1.0, 1.0) * PCM16_MAX).astype("<i2")


# --- wav written as it is spoken ---------------------------------------------------------------


class WavStreamWriter:
    """A 24 kHz mono PCM16 wav written chunk by chunk, valid on disk after every chunk.

    Samples go to a temp file next to the target whose header is patched after each write; on a normal
    end or Ctrl-C (KeyboardInterrupt) the temp file is renamed over the target, so what was spoken so far
    is kept; on any other error it is removed (no half files).
    """

    def __init__(self, path: str | os.PathLike[str], sample_rate: int = OUTPUT_SAMPLE_RATE) -> None:
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self.samples_written = 0
        self._temp: str | None = None
        self._handle = None
        self._wav: wave.Wave_write | None = None

    def __enter__(self) -> WavStreamWriter:
        descriptor, self._temp = make_temp_file(self.path)  # named after us: swept if we are killed
        self._handle = os.fdopen(descriptor, "w+b")
        self._wav = wave.open(self._handle, "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(self.sample_rate)
        self._wav.writeframes(b"")  # header now, so even an answer with no speech leaves a valid file
        self._handle.flush()
        return self

    def write(self, samples: np.ndarray) -> None:
        """Append float samples (clipped to [-1, 1]); the header then says the new length."""
        audio = np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1), nan=0.0, posinf=1.0, neginf=-1.0)
        pcm = np.rint(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
        self._wav.writeframes(pcm.tobytes())  # wave patches the RIFF/data sizes after each call
        self._handle.flush()
        self.samples_written += len(pcm)

    @property
    def seconds(self) -> float:
        return self.samples_written / self.sample_rate

    def close(self, keep: bool = True) -> None:
        if self._wav is None:
            return
        wav, self._wav = self._wav, None
        try:
            wav.close()  # final header patch; the file object stays open (wave does not own it)
            self._handle.flush()
            os.fsync(self._handle.fileno())
        finally:
            self._handle.close()
        if keep:
            os.chmod(self._temp, default_file_mode())
            os.replace(self._temp, self.path)
            FILES_WRITTEN.append(Path(self.path))
        else:
            os.unlink(self._temp)

    def __exit__(self, exc_type, exc, tb) -> None:
        # Ctrl-C keeps what was spoken, but an interrupted answer with no speech yet leaves no file (a rerun
        # would otherwise refuse to overwrite an empty wav).
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.close(keep=exc_type is None or (interrupted and self.samples_written > 0))
