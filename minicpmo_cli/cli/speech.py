"""Speech output commands: `tts`, `clone`, `mimick` and `voices` (saved voice profiles).

Only typer and the shared CLI helpers are imported at module level; the model comes in when a command runs.
Everything that can be checked without the model (text, reference clip, output path, voice name) is
checked first, so a typo fails in a second instead of after the model has loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from minicpmo_cli.cli import common, scale

if TYPE_CHECKING:
    from minicpmo_cli.api.engine import DecodeOptions

TTS_HELP = common.examples_help(
    "Read text aloud into a 24 kHz wav. The text comes from the argument, stdin (-) or --text-file; long text "
    "is read in full, sentence group by sentence group. Pick the voice with --voice NAME (a saved voice), "
    "--ref FILE (clone it) or --instruction (describe it).",
    'minicpmo tts "Hello there, nice to meet you." -o hello.wav',
    'minicpmo tts "Welcome back." --ref speaker.wav --mode roleplay -o welcome.wav',
    'minicpmo tts --text-file lines.txt --lines --voice alice -o out/',
    'echo "Speak up." | minicpmo tts - --instruction "A calm, deep male voice." -o - > speak.wav',
    'minicpmo tts "Streaming, as it is made." --stream --first-chunk-frames 10 -o - | aplay',
)
CLONE_HELP = common.examples_help(
    "Zero-shot voice cloning: read TEXT in the voice of the reference clip (5-15 s of clean speech works "
    "best). --save-voice NAME keeps the clip as a voice profile for --voice NAME.",
    'minicpmo clone speaker.wav "This is my cloned voice." -o cloned.wav',
    'minicpmo clone speaker.wav "Saved for later." -o out.wav --save-voice alice',
    'minicpmo clone --voice alice "Using a saved voice." -o again.wav',
)
MIMICK_HELP = common.examples_help(
    "Transcribe a recording (printed on stdout) and re-speak it in the speaker's voice (the model's "
    "Mimick task).",
    "minicpmo mimick speech.wav -o respoken.wav",
    "minicpmo mimick interview.mp3 -o copy.wav --seed 7 > transcript.txt",
)
VOICES_HELP = common.examples_help(
    "List saved voice profiles (name, duration, created); `voices add` saves one, `voices remove` deletes it. "
    "They live in $MINICPMO_HOME/voices, else ~/.local/share/minicpmo/voices ($XDG_DATA_HOME).",
    "minicpmo voices",
    "minicpmo voices add alice speaker.wav",
    "minicpmo voices remove alice",
)

VOICES_ADD_HELP = common.examples_help(
    "Save an audio clip (any format; 5-15 s of clean speech works best) as voice profile NAME, for --voice NAME.",
    "minicpmo voices add alice speaker.wav",
    "minicpmo voices add alice better-take.m4a --overwrite",
)
VOICES_REMOVE_HELP = common.examples_help(
    "Delete saved voice profiles.",
    "minicpmo voices remove alice",
    "minicpmo voices remove alice bob",
)

OUTPUT = typer.Option(..., "-o", "--output", help="Output audio file: .wav, .flac, .mp3 or .ogg (the extension picks "
                                                    "the format), or - for wav bytes on stdout (not a terminal).")
VOICE = typer.Option(None, "--voice", help="A saved voice name (see: minicpmo voices) or an audio file.")
MODE = typer.Option(None, "--mode", help="Voice mode with a reference: clone (read in that voice), assistant "
                                         "or roleplay (the guide's system prompts).")
LANGUAGE = typer.Option("en", "--language", help="Language of the voice system prompt: en or zh.")
VERBATIM = typer.Option(True, "--verbatim/--no-verbatim",
                        help="Read the text word for word (default), or let the language model re-write it first "
                             "(the guide's recipe; it may change or shorten it; decoding options apply).")
MAX_AUDIO_SECONDS = typer.Option(None, "--max-audio-seconds", min=0.05,
                                 help="Cap on the speech of each sentence group, in seconds (default 43.7, the "
                                      "model's own cap).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace existing output files.")
STREAM = typer.Option(False, "--stream", help="Write the wav while the speech is made (the reference's streaming "
                                              "schedule), chunk by chunk, instead of at the end; -o a .wav file or -.")
FIRST_CHUNK_FRAMES = typer.Option(None, "--first-chunk-frames", min=5, max=2048,
                                  help="With --stream: audio frames (46.875 a second) before the first chunk is "
                                       "written (default 25).")
CHUNK_FRAMES = typer.Option(None, "--chunk-frames", min=5, max=2048,
                            help="With --stream: audio frames per later chunk (default 25).")
# The decoding options of tts, clone and mimick (those of `chat` less --min-new-tokens and --num-beams).
SPEECH_DECODING = ("max_new_tokens", "sampling", "temperature", "top_p", "top_k", "repetition_penalty")


def register(app: typer.Typer) -> None:
    app.command(help=TTS_HELP)(tts)
    app.command(help=CLONE_HELP)(clone)
    app.command(help=MIMICK_HELP)(mimick)
    voices_app = typer.Typer(help=VOICES_HELP, invoke_without_command=True, no_args_is_help=False,
                             context_settings={"help_option_names": ["-h", "--help"]})
    voices_app.callback(invoke_without_command=True)(voices)
    voices_app.command("add", help=VOICES_ADD_HELP)(voices_add)
    voices_app.command("remove", help=VOICES_REMOVE_HELP)(voices_remove)
    app.add_typer(voices_app, name="voices")


# --- commands ---------------------------------------------------------------------------------------------


@common.decoding_options(include=SPEECH_DECODING, task="speech")
def tts(
    text: Optional[str] = typer.Argument(None, help="The text to read, or - to read it from stdin."),
    output: str = OUTPUT,
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Read the text from this file (- for stdin)."),
    lines: bool = typer.Option(False, "--lines", help="One wav per non-empty line, named 0001.wav, 0002.wav, ... "
                                                      "in the folder -o names (existing ones are skipped); the "
                                                      "lines' speech is made together, each wav written as its "
                                                      "line is done."),
    voice: Optional[str] = VOICE,
    ref: Optional[str] = typer.Option(None, "--ref", help="A reference clip whose voice to clone."),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="Describe the voice to create, e.g. "
                                              "\"A cheerful young woman, speaking fast.\""),
    mode: Optional[str] = MODE,
    language: str = LANGUAGE,
    verbatim: bool = VERBATIM,
    max_audio_seconds: Optional[float] = MAX_AUDIO_SECONDS,
    overwrite: bool = OVERWRITE,
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="With --lines: worker processes, each with its own model."),
    devices: Optional[str] = typer.Option(None, "--devices", metavar="0,1,...|all",
                                          help="With --lines: one worker per listed GPU (all: every GPU here)."),
    stream: bool = STREAM,
    first_chunk_frames: Optional[int] = FIRST_CHUNK_FRAMES,
    chunk_frames: Optional[int] = CHUNK_FRAMES,
    *,
    decode: DecodeOptions,
) -> None:
    from minicpmo_cli.errors import UsageError

    if voice is not None and ref is not None:
        raise UsageError("give --voice NAME or --ref FILE, not both")
    if stream or first_chunk_frames is not None or chunk_frames is not None:
        _check_stream(stream, first_chunk_frames, chunk_frames, lines, verbatim)
    spread = scale.options_of(workers, devices, None, None)
    if spread.parallel and not lines:
        raise UsageError("--workers and --devices share out the lines of --lines: add --lines")
    body = _read_text(text, text_file)
    speaker = _make_voice(voice or ref, mode, instruction, language)
    _warn_unused_decoding(verbatim, decode)
    if lines:
        items = [line.strip() for line in body.splitlines() if line.strip()]
        _need_text(" ".join(items))
        _tts_lines(items, output, speaker, decode, verbatim, max_audio_seconds, overwrite, spread)
        return
    _need_text(body)
    if stream:
        _tts_stream(body, common.wav_output_target(output, overwrite), speaker, max_audio_seconds,
                    first_chunk_frames, chunk_frames)
        return
    target = common.audio_output_target(output, overwrite)
    from minicpmo_cli.cli import remote

    engine = remote.engine_or_load(vision=False, audio=speaker.reference is not None, tts=True)
    speak = remote.speak_function(engine)
    with common.progress("speaking (sentence groups)") as row:
        progress = {} if remote.is_remote(engine) else {"progress": row.steps}
        result = speak(engine, body, speaker, decode=decode, verbatim=verbatim,
                       max_frames=_max_frames(max_audio_seconds), **progress)
    _emit(result, target, max_audio_seconds)


@common.decoding_options(include=SPEECH_DECODING, task="speech")
def clone(
    ref: Optional[str] = typer.Argument(None, help="Reference clip: the voice to clone (or use --voice NAME)."),
    text: Optional[str] = typer.Argument(None, help="The text to read, or - to read it from stdin."),
    output: str = OUTPUT,
    voice: Optional[str] = typer.Option(None, "--voice", help="Clone a saved voice instead of a REF file."),
    save_voice: Optional[str] = typer.Option(None, "--save-voice", help="Also keep the reference as voice NAME."),
    mode: str = typer.Option("clone", "--mode", help="clone (read in that voice), assistant or roleplay."),
    language: str = LANGUAGE,
    verbatim: bool = VERBATIM,
    max_audio_seconds: Optional[float] = MAX_AUDIO_SECONDS,
    overwrite: bool = OVERWRITE,
    *,
    decode: DecodeOptions,
) -> None:
    from minicpmo_cli.api import voices as profiles
    from minicpmo_cli.errors import OutputError, UsageError

    if voice is not None:
        if text is not None:
            raise UsageError("with --voice NAME give only the TEXT, not a REF file as well")
        ref, text = None, ref
    if voice is None and ref is None:
        raise UsageError("nothing to clone: give a REF clip (or --voice NAME) and the TEXT")
    if save_voice is not None:
        profiles.check_voice_name(save_voice)
        if profiles.voice_exists(save_voice) and not overwrite:
            raise OutputError(f"a voice named {save_voice!r} already exists (remove it first, or --overwrite)",
                              save_voice)
    body = _read_text(text, None)
    _need_text(body)
    speaker = _make_voice(voice or ref, mode, None, language)
    _warn_unused_decoding(verbatim, decode)
    target = common.audio_output_target(output, overwrite)
    from minicpmo_cli.cli import remote

    engine = remote.engine_or_load(vision=False, audio=True, tts=True)
    speak = remote.speak_function(engine)
    with common.progress("speaking (sentence groups)") as row:
        progress = {} if remote.is_remote(engine) else {"progress": row.steps}
        result = speak(engine, body, speaker, decode=decode, verbatim=verbatim,
                       max_frames=_max_frames(max_audio_seconds), **progress)
    _emit(result, target, max_audio_seconds)
    if save_voice is not None:
        source = ref if ref is not None else speaker.reference
        profile = profiles.save_voice(save_voice, source, overwrite=overwrite)
        common.info(f"saved voice {profile.name!r} ({profile.duration:.1f} s) to {profile.path}")
        _advise_length(profile)


@common.decoding_options(include=SPEECH_DECODING, task="speech")
def mimick(
    audio: str = typer.Argument(..., help="The recording to re-speak (any audio format)."),
    output: str = OUTPUT,
    max_audio_seconds: Optional[float] = MAX_AUDIO_SECONDS,
    overwrite: bool = OVERWRITE,
    *,
    decode: DecodeOptions,
) -> None:
    from minicpmo_cli.media.audio import load_audio

    samples = load_audio(audio)
    target = common.audio_output_target(output, overwrite)
    from minicpmo_cli.cli.remote import runs_locally

    runs_locally("mimick", "the server has no route that re-speaks a recording in its speaker's voice")
    engine = common.load_engine(vision=False, audio=True, tts=True)
    from minicpmo_cli.api.speech import mimick as run_mimick

    with common.progress("transcribing and re-speaking (pieces)") as row:
        result = run_mimick(engine, samples, decode=decode, max_frames=_max_frames(max_audio_seconds),
                            progress=row.steps)
    if target is None:
        common.err(result.text)  # stdout carries the wav
    else:
        print(result.text, flush=True)
    _emit(result, target, max_audio_seconds)


def voices(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from minicpmo_cli.api.voices import list_voices, voices_dir

    profiles = list_voices()
    if not profiles:
        common.info(f"no saved voices in {voices_dir()} (save one: minicpmo voices add NAME clip.wav)")
        return
    width = max(4, *(len(p.name) for p in profiles))
    print(f"{'NAME':<{width}}  DURATION  CREATED")
    for profile in profiles:
        print(f"{profile.name:<{width}}  {profile.duration:7.1f}s  {profile.created}")
    common.debug(f"voices folder: {voices_dir()}")


def voices_add(
    name: str = typer.Argument(..., help="The name to use with --voice."),
    clip: str = typer.Argument(..., help="The reference clip (any audio format)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a voice of the same name."),
) -> None:
    from minicpmo_cli.api.voices import save_voice

    profile = save_voice(name, clip, overwrite=overwrite)
    common.info(f"saved voice {profile.name!r} ({profile.duration:.1f} s) to {profile.path}")
    _advise_length(profile)


def _advise_length(profile) -> None:
    from minicpmo_cli.api.voices import length_advice

    advice = length_advice(profile.duration)
    if advice is not None:
        common.warn(f"voice {profile.name!r}: {advice}")


def voices_remove(names: list[str] = typer.Argument(..., help="Voice names to delete.")) -> None:
    from minicpmo_cli.api.voices import remove_voice

    for name in names:
        path = remove_voice(name)
        common.info(f"removed voice {name!r} ({path})")


# --- helpers ----------------------------------------------------------------------------------------------


def _read_text(text: str | None, text_file: Path | None) -> str:
    """The text to speak: the argument, stdin (- or piped), or a UTF-8 file (anything else: exit 2)."""
    from minicpmo_cli.cli.inputs import check_text_argument, read_text_input
    from minicpmo_cli.errors import UsageError

    if text is not None and text_file is not None:
        raise UsageError("give the text as an argument or with --text-file, not both")
    if text_file is not None:
        return read_text_input(text_file)
    if text == "-" or (text is None and not sys.stdin.isatty()):
        return read_text_input(None)
    if text is None:
        raise UsageError("nothing to say: give TEXT, - (text on stdin) or --text-file FILE")
    return check_text_argument(text, "TEXT")


def _need_text(text: str) -> None:
    from minicpmo_cli.errors import UsageError

    if not text.strip():
        raise UsageError("nothing to say: the text is empty")


def _make_voice(reference: str | None, mode: str | None, instruction: str | None, language: str):
    """The Voice, with the reference clip loaded and the options checked (before the model loads)."""
    from minicpmo_cli.api.speech import Voice
    from minicpmo_cli.api.voices import resolve_voice
    from minicpmo_cli.errors import UsageError

    speaker = Voice(mode=mode, instruction=instruction, language=language)
    if mode in ("assistant", "roleplay") and reference is None and instruction is None:
        # The guide's prompts for these modes are built around a reference clip; without one the library
        # would fall back to the default voice with only a warning.
        raise UsageError(f"--mode {mode} speaks in the voice of a reference clip: add --ref FILE or "
                         "--voice NAME (5-15 s of clean speech), or drop --mode for the default voice")
    if reference is not None:
        speaker.reference = resolve_voice(reference)
    speaker.check()
    return speaker


def _warn_unused_decoding(verbatim: bool, decode: DecodeOptions) -> None:
    # The seed is not one of them: it seeds the speech drawn as well.
    if verbatim and set(decode.chosen()) - {"seed"}:
        common.warn("decoding options only apply with --no-verbatim: the text is read as given")


def _max_frames(seconds: float | None) -> int:
    from minicpmo_cli.api.speech import MAX_AUDIO_FRAMES, frames_for_seconds

    return MAX_AUDIO_FRAMES if seconds is None else frames_for_seconds(seconds)


def _emit(result, target: Path | None, max_audio_seconds: float | None) -> None:
    """Write the speech to ``target`` (atomically) or as wav bytes to stdout."""
    from minicpmo_cli.outputs import wav_bytes, write_audio

    common.first_output("first audio")
    if target is None:
        sys.stdout.buffer.write(wav_bytes(result.wav, result.sample_rate))
        sys.stdout.buffer.flush()
    else:
        write_audio(target, result.wav, result.sample_rate)
        common.info(f"wrote {target} ({result.duration:.1f} s)")
    for number, piece in enumerate(result.pieces, start=1):
        common.debug(f"piece {number}/{len(result.pieces)}: {piece.samples / result.sample_rate:.2f} s"
                     f"{' (capped)' if piece.capped else ''}: {piece.text!r}")
    if result.capped:
        cap = "the model's cap" if max_audio_seconds is None else f"--max-audio-seconds {max_audio_seconds:g}"
        common.warn(f"some speech was cut short by {cap}")


def _check_stream(stream: bool, first_chunk_frames, chunk_frames, lines: bool, verbatim: bool) -> None:
    from minicpmo_cli.errors import UsageError

    if not stream:
        name = "--first-chunk-frames" if first_chunk_frames is not None else "--chunk-frames"
        raise UsageError(f"{name} sets the chunks of streamed speech: add --stream")
    if lines:
        raise UsageError("--stream writes one wav as it is spoken: it does not combine with --lines")
    if not verbatim:
        raise UsageError("--stream reads the text as given: it does not combine with --no-verbatim")


def _tts_stream(body: str, target: Path | None, speaker, max_audio_seconds, first_chunk_frames, chunk_frames):
    """tts --stream: each chunk goes to the wav (a file valid after every chunk, or stdout) as it is made."""
    import time

    from minicpmo_cli.api.speech import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, speak_stream
    from minicpmo_cli.cli.remote import runs_locally
    from minicpmo_cli.cli.stdout_wav import StdoutWav

    runs_locally("tts --stream", "the server sends speech whole, not as it is made (drop --stream to use it)")
    engine = common.load_engine(vision=False, audio=speaker.reference is not None, tts=True)
    started = time.perf_counter()
    pieces = speak_stream(engine, body, speaker, max_frames=_max_frames(max_audio_seconds),
                          first_chunk_frames=first_chunk_frames or FIRST_CHUNK_FRAMES,
                          chunk_frames=chunk_frames or CHUNK_FRAMES, seed=common.options().seed)
    writer = StdoutWav() if target is None else _file_wav(target)
    with writer:
        for number, piece in enumerate(pieces):
            if number == 0:
                common.first_output("first audio")
                common.debug(f"first audio after {1000 * (time.perf_counter() - started):.0f} ms")
            writer.write(piece)
    if target is not None:
        common.info(f"wrote {target} ({writer.seconds:.1f} s)")


def _file_wav(target: Path):
    from minicpmo_cli.outputs import WavStreamWriter

    return WavStreamWriter(target)


def _tts_lines(items: list[str], output: str, speaker, decode, verbatim: bool, max_audio_seconds, overwrite: bool,
               spread: scale.Scale = scale.Scale()):
    """--lines: one wav per line into the folder ``output`` (0001.wav, ...); existing files are skipped."""
    from minicpmo_cli.errors import UsageError
    from minicpmo_cli.outputs import ensure_output_dir, should_skip

    if output == "-":
        raise UsageError("--lines writes one wav per line: -o must name a folder, not -")
    folder = ensure_output_dir(output)
    width = max(4, len(str(len(items))))
    targets = [folder / f"{index:0{width}d}.wav" for index in range(1, len(items) + 1)]
    todo = [(item, path) for item, path in zip(items, targets) if not should_skip(path, overwrite)]
    if len(todo) < len(items):
        common.info(f"skipping {len(items) - len(todo)} line(s) already spoken (--overwrite to redo them)")
    if not todo:
        return
    if spread.parallel:
        _tts_lines_parallel(todo, speaker, decode, verbatim, max_audio_seconds, spread)
        return
    from minicpmo_cli.cli import remote

    engine = remote.engine_or_load(vision=False, audio=speaker.reference is not None, tts=True)
    options = {"decode": decode, "verbatim": verbatim, "max_frames": _max_frames(max_audio_seconds)}
    if remote.is_remote(engine):  # the server batches its requests itself: one line at a time from here
        results = ((index, remote.speak(engine, item, speaker, **options)) for index, (item, _) in enumerate(todo))
    else:  # every line submitted to the TTS engine: a line that finishes is written and its slot refilled
        from minicpmo_cli.api.speech import speak_lines

        results = speak_lines(engine, [item for item, _ in todo], speaker, **options)
    with common.progress("speaking lines", total=len(todo)) as row:
        for index, result in results:
            _emit(result, todo[index][1], max_audio_seconds)
            row.advance()


def _tts_lines_parallel(todo: list[tuple[str, Path]], speaker, decode, verbatim: bool, max_audio_seconds,
                        spread: scale.Scale) -> None:
    """--lines on worker processes: each speaks lines with its own model; the wavs are written here."""
    from minicpmo_cli.api.jobs import TtsJob
    from minicpmo_cli.errors import PartialFailure

    job = TtsJob(common.load_options(), speaker, decode, verbatim, _max_frames(max_audio_seconds))
    failed = 0
    for index, result in scale.pool(spread, 1, job).run([line for line, _ in todo]):
        if isinstance(result, str):  # a line a worker died on twice
            failed += 1
            common.err(f"minicpmo: error: {todo[index][1].name}: {result}")
            continue
        _emit(result, todo[index][1], max_audio_seconds)
    if failed:
        raise PartialFailure(f"{failed} of {len(todo)} lines failed; the others were spoken")
