"""`minicpmo asr`: transcribe (or caption, tag, analyse) audio files, folders, globs or stdin."""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from minicpmo_cli.cli import common

if TYPE_CHECKING:
    from minicpmo_cli.api.engine import DecodeOptions

FORMATS = ("txt", "json", "jsonl", "srt", "vtt", "all")
TEXT_FORMATS = ("txt", "json", "jsonl", "srt", "vtt")
# What a folder argument contributes: audio files and videos with a sound track (decoded by PyAV).
MEDIA_EXTENSIONS = frozenset(
    ".wav .mp3 .flac .ogg .oga .opus .m4a .aac .wma .aif .aiff .aifc .amr .caf .mka .ac3 .au .spx .webm .mp4 "
    ".m4v .mkv .mov .avi .mpg .mpeg .ts .3gp .flv .wmv".split()
)
DEFAULT_BATCH_SIZE = 4  # pieces per forward pass: batching does not change any transcript (api/asr.py)

HELP = common.examples_help(
    "Transcribe speech, or caption, tag or describe the speaker of audio. INPUT is a file, a folder "
    "(audio/video files inside; --recursive descends), a glob, or - for audio bytes on stdin. Long audio is "
    "split at silences into pieces of at most 30 s; srt/vtt/json carry their times.",
    "minicpmo asr meeting.mp3",
    "minicpmo asr recordings/ -o transcripts/ -f all --recursive",
    "cat clip.wav | minicpmo asr - -f jsonl",
    "minicpmo asr interview.m4a --task speaker --language zh",
)


def register(app: typer.Typer) -> None:
    app.command(help=HELP)(asr)


# Every decoding option but --min-new-tokens.
@common.decoding_options(include=("max_new_tokens", "sampling", "temperature", "top_p", "top_k",
                                  "repetition_penalty", "num_beams"))
def asr(
    inputs: Optional[list[str]] = typer.Argument(None, metavar="INPUT",
                                                 help="Audio/video files, folders, globs, or - for stdin."),
    output_dir: Optional[Path] = typer.Option(None, "-o", "--output-dir",
                                              help="Write one file per input here (named after it)."),
    output_format: str = typer.Option("txt", "-f", "--format", help="txt, json, jsonl, srt, vtt or all."),
    task: str = typer.Option("transcribe", "--task", help="transcribe, caption, speaker or scene."),
    language: str = typer.Option("auto", "--language", help="en, zh or auto (prompt language)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="A custom instruction instead of the task's."),
    recursive: bool = typer.Option(False, "-r", "--recursive", help="Descend into sub-folders."),
    files_from: Optional[str] = typer.Option(None, "--files-from", metavar="FILE|-",
                                             help="Read input paths from a file (one a line), - for stdin."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", min=1,
                                   help="Audio pieces per forward pass."),
    skip_existing: bool = typer.Option(True, "--skip-existing/--overwrite",
                                       help="Skip inputs whose output files exist (resume), or redo them."),
    # Default decoding is greedy (see api/asr.py); --sampling uses the guide's temperature 0.3.
    *,
    decode: DecodeOptions,
) -> None:
    from minicpmo_cli.api.asr import AsrOptions

    if output_format not in FORMATS:
        common.fail_usage(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    options = AsrOptions(task=task, language=language, prompt=prompt, batch_size=batch_size)
    _ = options.instruction  # validates --task / --language / --prompt before anything is read
    items = resolve_inputs(list(inputs or []), files_from, recursive)
    if any(item.path == "-" for item in items) and sys.stdin.isatty():
        common.fail_usage("- reads audio from stdin, but stdin is a terminal: pipe a file in")
    sink = make_sink(items, output_dir, output_format, overwrite=not skip_existing)
    todo = [item for item in items if not sink.is_done(item)]
    if len(todo) < len(items):
        common.info(f"skipped {len(items) - len(todo)} input(s) whose outputs exist (--overwrite redoes them)")
    if not todo:
        return
    failed = run_batch(todo, options, decode, sink)
    _exit_for_failures(failed, len(items))


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class InputItem:
    """An input path ("-" for stdin) and where its outputs go, relative to -o (sub-folders of a folder)."""

    path: str
    relative_dir: Path = Path(".")


def resolve_inputs(args: list[str], files_from: str | None, recursive: bool) -> list[InputItem]:
    """Expand folders and globs, add --files-from lines; missing paths stay in (reported as failures)."""
    if files_from is not None:
        args = args + _read_list(files_from)
    if not args:
        common.fail_usage("no input: give INPUT paths, a folder, a glob, - for stdin, or --files-from")
    if args.count("-") > 1 or ("-" in args and files_from == "-"):
        common.fail_usage("stdin (-) can be read only once")
    items: list[InputItem] = []
    for arg in args:
        items.extend(_expand(arg, recursive))
    unique = list({item.path: item for item in reversed(items)}.values())[::-1]  # first occurrence wins
    if not unique:
        common.fail_usage("no audio or video files found in the given inputs")
    return unique


def _read_list(source: str) -> list[str]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        common.fail_usage(f"--files-from {source}: cannot read it ({exc.strerror or exc})")
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _expand(arg: str, recursive: bool) -> list[InputItem]:
    path = Path(arg)
    if arg == "-" or path.is_file():
        return [InputItem(arg)]
    if path.is_dir():
        found = _media_files(path, recursive)
        if not found:
            common.warn(f"{arg}: no audio or video files in this folder")
        return [InputItem(str(f), f.parent.relative_to(path)) for f in found]
    if glob.has_magic(arg):  # the shell did not expand it (quoted, or Windows): do it here
        # `**` means "any depth" as in bash's globstar, with or without --recursive.
        matches = sorted(glob.glob(arg, recursive=recursive or "**" in arg))
        if not matches:
            common.warn(f"{arg}: no files match this pattern")
        return [item for match in matches for item in _expand(match, recursive)]
    return [InputItem(arg)]  # missing: the decoder reports it as a failed input, the others go on


def _media_files(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates
                  if p.suffix.lower() in MEDIA_EXTENSIONS and p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- outputs
class Sink:
    """Where records go: files under -o (written as each input completes) or stdout."""

    def __init__(self, output_dir: Path | None, fmt: str, overwrite: bool, several: bool) -> None:
        self.output_dir = output_dir
        self.formats = TEXT_FORMATS if fmt == "all" else (fmt,)
        self.overwrite = overwrite
        self.several = several

    def targets(self, item: InputItem) -> list[Path]:
        from minicpmo_cli.outputs import output_path_for

        folder = self.output_dir / item.relative_dir
        return [output_path_for(item.path, folder, ext) for ext in self.formats]

    def is_done(self, item: InputItem) -> bool:
        from minicpmo_cli.outputs import should_skip

        return self.output_dir is not None and all(should_skip(t, self.overwrite) for t in self.targets(item))

    def emit(self, item: InputItem, record) -> None:
        from minicpmo_cli.outputs import WRITERS, ensure_output_dir, should_skip

        if self.output_dir is None:
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
            text = f"==> {record.path} <==\n{text}"
        sys.stdout.write(text)
        sys.stdout.flush()


def _for_format(record, fmt: str):
    """Subtitles get only the pieces that said something; json keeps every piece (they cover the audio)."""
    if fmt in ("srt", "vtt") and record.segments:
        spoken = [s for s in record.segments if s.text.strip()]
        return replace(record, segments=spoken) if spoken else replace(record, segments=[], text="")
    return record


def make_sink(items: list[InputItem], output_dir: Path | None, fmt: str, overwrite: bool) -> Sink:
    several = len(items) > 1
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
def _audio_inputs(items: list[InputItem]):
    from minicpmo_cli.api.asr import AudioInput

    for item in items:
        if item.path == "-":
            yield AudioInput("-", sys.stdin.buffer.read())
        else:
            yield AudioInput.from_path(item.path)


def run_batch(items: list[InputItem], options, decode, sink: Sink) -> int:
    """Transcribe every item with one model load, emitting each as it completes; returns the failures."""
    from minicpmo_cli.api.asr import input_name, transcribe_many

    def load():
        return common.load_engine(vision=False, audio=True, tts=False)

    if common.options().server:
        from minicpmo_cli.cli import remote

        records = remote.transcribe_many(remote.connect(), _audio_inputs(items), options, decode)
    else:
        records = transcribe_many(load, _audio_inputs(items), options, decode, warn=common.warn)
    failed = 0
    with _Progress(len(items)) as advance:
        for item, record in zip(items, records):
            if record.error is not None:
                failed += 1
                common.err(f"minicpmo: error: {input_name(record.path)}: {record.error}")
            sink.emit(item, record)
            advance()
    return failed


class _Progress:
    """A rich progress bar on an interactive stderr; a no-op otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = None

    def __enter__(self):
        if common.show_progress() and self.total > 1:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            task = self.bar.add_task("transcribing", total=self.total)
            return lambda: self.bar.advance(task)
        return lambda: None

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _exit_for_failures(failed: int, total: int) -> None:
    from minicpmo_cli.errors import EXIT_RUNTIME, InputError, PartialFailure

    if failed == 0:
        return
    if failed < total:
        raise PartialFailure(f"{failed} of {total} inputs failed; the others were done")
    if total == 1:
        raise typer.Exit(EXIT_RUNTIME)  # its one-line reason is already on stderr
    raise InputError(f"all {total} inputs failed")
