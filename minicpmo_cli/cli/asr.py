"""`minicpmo asr`: transcribe (or caption, tag, analyse) audio files, folders, globs or stdin."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from minicpmo_cli.cli import common, scale
from minicpmo_cli.errors import display_name

if TYPE_CHECKING:
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.cli.inputs import InputItem

FORMATS = ("txt", "json", "jsonl", "srt", "vtt", "all")
TEXT_FORMATS = ("txt", "json", "jsonl", "srt", "vtt")

HELP = common.examples_help(
    "Transcribe speech, or caption, tag or describe the speaker of audio. INPUT is a file, a folder "
    "(audio/video files inside; --recursive descends), a glob, or - for audio bytes on stdin. A voice-activity "
    "detector (Silero VAD) finds the speech; it goes to the model in pieces of at most 30 s cut in its pauses, "
    "and noise or music alone is never sent. srt/vtt/json cues follow the speech, with its times in the file.",
    "minicpmo asr meeting.mp3",
    "minicpmo asr recordings/ -o transcripts/ -f all --recursive",
    "cat clip.wav | minicpmo asr - -f jsonl",
    "minicpmo asr interview.m4a --task speaker --language zh",
    "minicpmo asr lecture_zh.mp3 --task translate -f srt -o subs/",
)


def register(app: typer.Typer) -> None:
    app.command(help=HELP)(asr)


# Every decoding option but --min-new-tokens.
@common.decoding_options(task="asr", include=("max_new_tokens", "sampling", "temperature", "top_p", "top_k",
                                  "repetition_penalty", "num_beams"))
def asr(
    inputs: Optional[list[str]] = typer.Argument(None, metavar="INPUT",
                                                 help="Audio/video files, folders, globs, or - for stdin."),
    output_dir: Optional[str] = typer.Option(None, "-o", "--output", "--output-dir", metavar="DIR|FILE|-",
                                             help="A folder (one file per input, named after it); for a single "
                                                  "input a file whose extension names the format (x.srt); "
                                                  "- for stdout (the default)."),
    output_format: Optional[str] = typer.Option(None, "-f", "--format",
                                                help="txt, json, jsonl, srt, vtt or all (default: txt, or the "
                                                     "-o file's extension)."),
    task: str = typer.Option("transcribe", "--task",
                             help="transcribe, translate, caption, speaker or scene. translate gives English text, "
                                  "asking: 'Please listen to the audio snippet carefully and translate its content "
                                  "into English.' (English speech gets the transcription prompt)."),
    language: str = typer.Option("auto", "--language",
                                 help="Spoken language: en, zh, or auto (decided per input from its first speech "
                                      "piece; json/jsonl and -v report it)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="A custom instruction instead of the task's."),
    recursive: bool = typer.Option(False, "-r", "--recursive", help="Descend into sub-folders."),
    files_from: Optional[str] = typer.Option(None, "--files-from", metavar="FILE|-",
                                             help="Read input paths from a file (one a line), - for stdin."),
    # Default: 4 on the CPU, from free memory on a GPU (api/asr.py); batching changes no transcript.
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, metavar="N",
                                             help="Audio pieces encoded per pass (the LLM then decodes each as "
                                                  "its own request) [default: 4 on the CPU, from free memory on a GPU]."),
    skip_existing: bool = typer.Option(True, "--skip-existing/--overwrite",
                                       help="Skip inputs whose output files exist (resume), or redo them."),
    vad: bool = typer.Option(True, "--vad/--no-vad",
                             help="Send only the speech the VAD finds, or everything in fixed pieces of <= 30 s."),
    vad_threshold: float = typer.Option(0.5, "--vad-threshold", metavar="P",
                                        help="Speech probability (0-1) from which the VAD counts audio as speech."),
    min_silence_ms: int = typer.Option(500, "--min-silence-ms", metavar="MS",
                                       help="A pause must last this long to end a speech region (and allow a cut)."),
    workers: Optional[int] = scale.WORKERS,
    devices: Optional[str] = scale.DEVICES,
    shard: Optional[str] = scale.SHARD,
    ray: Optional[str] = scale.RAY,
    # Default decoding is greedy (see api/asr.py); --sampling uses the guide's temperature 0.3.
    *,
    decode: DecodeOptions,
) -> None:
    from minicpmo_cli.api.asr import AsrOptions
    from minicpmo_cli.cli.inputs import resolve_inputs
    from minicpmo_cli.processing.limits import check_instruction

    if output_format is not None and output_format not in FORMATS:
        common.fail_usage(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    options = AsrOptions(task=task, language=language, prompt=prompt, batch_size=batch_size, vad=vad,
                         vad_threshold=vad_threshold, min_silence_ms=min_silence_ms)
    options.validate()  # --task / --language / --prompt / VAD settings, before anything is read
    check_instruction(prompt)
    spread = scale.options_of(workers, devices, shard, ray)
    common.check_local_model()
    items = resolve_inputs(list(inputs or []), files_from, recursive)
    if any(item.path == "-" for item in items) and sys.stdin.isatty():
        common.fail_usage("- reads audio from stdin, but stdin is a terminal: pipe a file in")
    sink = make_sink(items, output_dir, output_format, overwrite=not skip_existing)
    _transcribe_pending(scale.select_shard(items, spread.shard), sink, options, decode, spread)


def _transcribe_pending(items: list[InputItem], sink: Sink, options, decode, spread: scale.Scale) -> None:
    """Transcribe the items whose outputs are not there yet (a rerun resumes); exit 3 or 1 on failures.

    ``items`` is this shard's part, taken after make_sink's collision check, which sees every shard."""
    todo = [item for item in items if not sink.is_done(item)]
    if len(todo) < len(items):
        common.info(f"skipped {len(items) - len(todo)} input(s) whose outputs exist (--overwrite redoes them)")
    if not todo:
        return
    failed = run_batch(todo, options, decode, sink, spread)
    _exit_for_failures(failed, len(items))


# ---------------------------------------------------------------------------------------------- outputs
class Sink:
    """Where records go: files under -o (written as each input completes) or stdout."""

    def __init__(self, output_dir: Path | None, fmt: str, overwrite: bool, several: bool,
                 output_file: Path | None = None) -> None:
        self.output_dir = output_dir
        self.output_file = output_file  # -o FILE for a single input
        self.formats = TEXT_FORMATS if fmt == "all" else (fmt,)
        self.overwrite = overwrite
        self.several = several
        self.claims: dict[str, object] = {}  # input path -> its claim on the outputs (claims.py)
        self._swept: set[Path] = set()
        self.skipped = 0  # inputs another run did or is doing
        self.started = time.time()

    def targets(self, item: InputItem) -> list[Path]:
        from minicpmo_cli.outputs import output_path_for

        if self.output_file is not None:
            return [self.output_file]
        folder = self.output_dir / item.relative_dir
        return [output_path_for(item.path, folder, ext) for ext in self.formats]

    def is_done(self, item: InputItem) -> bool:
        from minicpmo_cli.outputs import should_skip

        writes_files = self.output_dir is not None or self.output_file is not None
        return writes_files and all(should_skip(t, self.overwrite) for t in self.targets(item))

    def claim(self, item: InputItem) -> bool:
        """Claim the item's outputs for this run: False when a live run works on them, or they got done.

        Concurrent runs over one -o folder so do each input once; a killed run's claims are taken over.
        """
        from minicpmo_cli.claims import Claimed, release, sweep_claims, try_claim

        if self.output_dir is None:
            return True
        from minicpmo_cli.outputs import ensure_output_dir

        stem = self.targets(item)[0].with_suffix("")
        if stem.parent not in self._swept:
            ensure_output_dir(stem.parent)  # a sub-folder of -o: claims live beside the outputs
            self._swept.add(stem.parent)
            sweep_claims(stem.parent)
        try:
            claim = try_claim(stem)
        except OSError as exc:  # a full disk: said of the file this input would write
            from minicpmo_cli.errors import OutputError

            raise OutputError(f"cannot write the file ({exc.strerror or exc})", self.targets(item)[0]) from None
        except Claimed as owner:
            common.debug(f"{display_name(item.path)}: skipped, another run ({owner}) is working on it")
            self.skipped += 1
            return False
        if self.is_done(item) or self._written_since_start(item):  # by another run, since we listed them
            release(claim)
            self.skipped += 1
            return False
        self.claims[item.path] = claim
        return True

    def _written_since_start(self, item: InputItem) -> bool:
        """With --overwrite: every output rewritten after this run started (by a concurrent run)."""
        try:
            return self.overwrite and all(t.stat().st_mtime >= self.started for t in self.targets(item))
        except OSError:
            return False

    def release(self, path: str) -> None:
        from minicpmo_cli.claims import release

        claim = self.claims.pop(path, None)
        if claim is not None:
            release(claim)

    def release_all(self) -> None:
        for path in list(self.claims):
            self.release(path)

    def emit(self, item: InputItem, record) -> None:
        from minicpmo_cli.outputs import WRITERS, ensure_output_dir, should_skip

        if self.output_dir is None and self.output_file is None:
            self._print(record)
            return
        if record.error is not None:
            return  # nothing is written for a failed input, so a rerun tries it again
        for fmt, target in zip(self.formats, self.targets(item)):
            if should_skip(target, self.overwrite):
                continue  # -f all with some formats done: write only the missing ones, never replace silently
            ensure_output_dir(target.parent)
            WRITERS[fmt]().write(_for_format(record, fmt), target)

    def _print(self, record) -> None:
        from minicpmo_cli.outputs import WRITERS

        fmt = self.formats[0]
        if record.error is not None and fmt != "jsonl":
            return
        text = WRITERS[fmt]().format(_for_format(record, fmt))
        if self.several and fmt != "jsonl":
            text = f"==> {display_name(record.path)} <==\n{text}"
        common.write_stdout(text)


def _for_format(record, fmt: str):
    """Subtitles get only the pieces that said something; json keeps every piece (they cover the audio)."""
    if fmt in ("srt", "vtt") and record.segments:
        spoken = [s for s in record.segments if s.text.strip()]
        return replace(record, segments=spoken) if spoken else replace(record, segments=[], text="")
    return record


def make_sink(items: list[InputItem], output_dir: Path | str | None, fmt: str | None, overwrite: bool) -> Sink:
    """Where the records go: stdout (no -o, or -o -), one file (-o x.srt, a single input) or a folder."""
    several = len(items) > 1
    output_dir, output_file, fmt = resolve_output(output_dir, fmt, len(items))
    if output_file is not None:
        common.check_output_file(output_file)
        return Sink(None, fmt, overwrite, several, output_file=output_file)
    if output_dir is None:
        if fmt == "all":
            common.fail_usage("-f all writes one file per format: give an output folder with -o DIR")
        if fmt == "json" and several:
            common.fail_usage("-f json prints one input; use -f jsonl for several, or -o DIR")
    else:
        _check_collisions(items, output_dir, fmt)
        from minicpmo_cli.outputs import ensure_output_dir

        ensure_output_dir(output_dir)
    return Sink(output_dir, fmt, overwrite, several)


def resolve_output(output: Path | str | None, fmt: str | None, count: int) -> tuple[Path | None, Path | None, str]:
    """-o as (folder, file, format). A name ending in a text format's extension that is not an existing folder
    is a file (one input only); anything else is a folder; - and nothing mean stdout."""
    if output is None or str(output) == "-":
        return None, None, fmt or "txt"
    path = Path(output).expanduser()
    extension = path.suffix.lower().lstrip(".")
    if path.is_dir() or extension not in TEXT_FORMATS:
        return path, None, fmt or "txt"
    if count > 1:
        common.fail_usage(f"-o {output} names one file, but there are {count} inputs: give a folder "
                          "(-o DIR) or - for stdout")
    if fmt not in (None, extension):
        common.fail_usage(f"-o {output} is a .{extension} file but --format is {fmt}: drop one of them")
    return None, path, extension


def _check_collisions(items: list[InputItem], output_dir: Path, fmt: str) -> None:
    """Two inputs named alike (a.wav, a.mp3) would write the same file: refuse before doing any work."""
    from minicpmo_cli.outputs import output_path_for

    seen: dict[Path, str] = {}
    for item in items:
        target = output_path_for(item.path, output_dir / item.relative_dir, "x")
        if target in seen:
            common.fail_usage(f"{seen[target]} and {item.path} would write the same output file "
                              f"{target.with_suffix('')}.*: transcribe them into different -o folders")
        seen[target] = item.path


# ---------------------------------------------------------------------------------------------- running
def _claimed_inputs(items: list[InputItem], sink: Sink):
    """The AudioInputs of the items this run claims, decoded lazily (stdin read when its turn comes)."""
    from minicpmo_cli.api.asr import AudioInput

    for item in items:
        if not sink.claim(item):
            continue
        common.debug(f"transcribing {display_name(item.path)}")
        if item.path == "-":
            yield AudioInput("-", _read_stdin_audio())
        else:
            yield AudioInput.from_path(item.path)


def _read_stdin_audio() -> bytes:
    from minicpmo_cli.errors import InputError
    from minicpmo_cli.processing.limits import MAX_STDIN_BYTES

    data = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise InputError(f"over {MAX_STDIN_BYTES >> 30} GB of audio on stdin: give it as a file instead "
                         "(files of any length are read from disk)", "<stdin>")
    return data


def _records(items: list[InputItem], options, decode, sink: Sink, spread: scale.Scale, progress):
    """The records of the items this run claims: from a server (--server), worker processes or Ray, or here."""
    from minicpmo_cli.api.asr import transcribe_many

    if common.options().server:
        from minicpmo_cli.cli import remote

        return remote.transcribe_many(remote.connect(), _claimed_inputs(items, sink), options, decode)
    if spread.parallel:  # worker processes or Ray: the same records, written here by the same Sink
        claimed = [item for item in items if sink.claim(item)]
        return (record for _, record in scale.transcribe(spread, claimed, options, decode,
                                                         ordered=sink.output_dir is None))
    from minicpmo_cli.api.asr_pipeline import Stages

    return transcribe_many(lambda: common.load_engine(vision=False, audio=True, tts=False),
                           _claimed_inputs(items, sink), options, decode, warn=common.warn, progress=progress,
                           stages=Stages(vad_device=common.options().device))


def run_batch(items: list[InputItem], options, decode, sink: Sink, spread: scale.Scale = scale.Scale()) -> int:
    """Transcribe every item with one model load, emitting each as it completes; returns the failures."""
    failed = 0
    for item in items:
        if item.error is not None:  # found while listing: a folder we may not read, a path through a file
            failed += 1
            common.err(f"minicpmo: error: {display_name(item.path)}: {item.error}")
    by_path = {item.path: item for item in items if item.error is None}
    try:
        with common.progress("transcribing", total=len(by_path) if len(by_path) > 1 else None) as row, \
                common.progress("audio pieces (at most 30 s each)") as pieces:
            for record in _records(list(by_path.values()), options, decode, sink, spread, pieces.steps):
                failed += _emit_record(sink, by_path[record.path], record)
                row.advance()
    finally:
        sink.release_all()  # interrupted: what this run held is free for the next one
    if sink.skipped:
        common.info(f"skipped {sink.skipped} input(s) that another run did or is doing (same -o folder)")
    return failed


def _emit_record(sink: Sink, item: InputItem, record) -> int:
    """Write (or print) one finished record and free its claim; 1 if it failed, else 0."""
    from minicpmo_cli.api.asr import input_name

    failed = record.error is not None
    common.first_output("first transcript")
    if failed:
        common.err(f"minicpmo: error: {display_name(input_name(record.path))}: {record.error}")
    else:
        common.debug(f"{display_name(input_name(record.path))}: language "
                     f"{record.language or 'unknown (no speech)'}, {len(record.segments)} segment(s)")
    sink.emit(item, record)
    sink.release(item.path)  # done, or failed: then the next run tries it again
    return int(failed)


def _exit_for_failures(failed: int, total: int) -> None:
    from minicpmo_cli.errors import EXIT_RUNTIME, InputError, PartialFailure

    if failed == 0:
        return
    if failed < total:
        raise PartialFailure(f"{failed} of {total} inputs failed; the others were done")
    if total == 1:
        raise typer.Exit(EXIT_RUNTIME)  # its one-line reason is already on stderr
    raise InputError(f"all {total} inputs failed")
