"""What every command shares: the global options, logging to stderr, and argv normalisation.

Nothing here imports torch or transformers: `minicpmo --help` must stay instant.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from minicpmo_cli.startup import StartupClock

DEFAULT_MODEL = "openbmb/MiniCPM-o-2_6"

# Global options that take a value, and those that are flags. They are accepted before and after the
# command (CLI.md): main() moves them in front of the command name before Typer parses argv.
GLOBAL_VALUE_OPTIONS = {"--model", "--revision", "--device", "--dtype", "--seed", "--quantize", "--server", "--step"}
GLOBAL_FLAG_OPTIONS = {"--offline", "-q", "--quiet", "-v", "--verbose", "--debug", "--no-progress", "--compile",
                       "--no-compile"}


@dataclass
class GlobalOptions:
    model: str = DEFAULT_MODEL
    revision: str | None = None
    offline: bool = False
    device: str = "auto"
    dtype: str = "auto"
    seed: int | None = None
    quiet: bool = False
    verbose: bool = False
    debug: bool = False
    no_progress: bool = False
    step: str | None = None  # eager | trace | graph | compile; None: graph with CUDA, trace on the CPU (api/engine.py)
    compile: bool | None = None  # --compile / --no-compile: aliases of --step compile / --step eager
    quantize: str | None = None  # none | int8 | int4; None: as the checkpoint is
    server: str | None = None  # URL of a running `minicpmo serve`: asr, chat, tts and clone use it
    clock: StartupClock | None = None  # this command's start-up phases (minicpmo_cli/startup.py), -v prints them


DEFAULT_OPTIONS = GlobalOptions()


def options() -> GlobalOptions:
    """The global options of this invocation: the root callback keeps them in typer's context (``ctx.obj``),
    which every command's context inherits. Outside a command (library use, a thread of our own, after the
    command has returned) they are the defaults: nothing of one invocation leaks into the next."""
    context = _current_context()
    found = context.find_object(GlobalOptions) if context is not None else None
    return found if found is not None else DEFAULT_OPTIONS


def _current_context():
    """The click context of the command running in this thread, or None. Typer vendors click from 0.2x on
    (``typer._click``); older typers use click itself."""
    import importlib

    for name in ("typer._click.globals", "click.globals"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.get_current_context(silent=True)
    return None


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move global options found after the command name in front of it, so Typer's root callback sees them.

    `minicpmo asr x.wav --device cpu` becomes `minicpmo --device cpu asr x.wav`. Parsing stops at `--`.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_VALUE_OPTIONS:
            if "=" in arg:
                front.append(arg)
            else:
                front.extend(argv[i : i + 2])
                i += 1
        elif arg in GLOBAL_FLAG_OPTIONS:
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def startup_clock() -> StartupClock | None:
    """This command's start-up clock (None outside a command: library use)."""
    return options().clock


def first_output(name: str) -> None:
    """Mark the command's first output of a kind (first answer text, first audio, first transcript)."""
    clock = startup_clock()
    if clock is not None:
        clock.once(name)


def use_color() -> bool:
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def err(message: str) -> None:
    """One line on stderr, whatever the verbosity; valid UTF-8 even when it names a file that is not."""
    from minicpmo_cli.errors import valid_text

    print(valid_text(message), file=sys.stderr, flush=True)


def info(message: str) -> None:
    if not options().quiet:
        err(message)


def debug(message: str) -> None:
    if options().verbose or options().debug:
        err(message)


def warn(message: str) -> None:
    if not options().quiet:
        err(f"warning: {message}")


def show_progress() -> bool:
    """Progress bars only on an interactive stderr, and never with --no-progress or -q."""
    return sys.stderr.isatty() and not (options().no_progress or options().quiet)


# ---------------------------------------------------------------------------------------------- progress
# One rich Progress on screen at a time (rich allows a single live display): nested steps (the model loading
# inside a batch) add a row to it. It draws on stderr only and never captures stdout: stdout carries data
# (transcripts, answers, wav bytes) whatever stderr is.
_bar = None
_bar_rows = 0


class _Row:
    """One row of the progress display: a bar when the total is known, a spinner otherwise."""

    def __init__(self, task_id=None) -> None:
        self.task_id = task_id

    def advance(self, steps: float = 1) -> None:
        if _bar is not None and self.task_id is not None:
            _bar.advance(self.task_id, steps)

    def update(self, *, total: float | None = None, completed: float | None = None,
               description: str | None = None) -> None:
        if _bar is not None and self.task_id is not None:
            fields = {"total": total, "completed": completed, "description": description}
            _bar.update(self.task_id, **{k: v for k, v in fields.items() if v is not None})

    def steps(self, done: int, total: int) -> None:
        """The ``progress(done, total)`` callback the api functions take."""
        self.update(total=total, completed=done)


def _new_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                    redirect_stdout=False, redirect_stderr=True)


@contextlib.contextmanager
def progress(description: str, total: float | None = None):
    """A transient row on an interactive stderr while the block runs; yields it (``advance``, ``update``).

    Without a terminal on stderr, or with --no-progress / -q, nothing is drawn and the row does nothing.
    """
    global _bar, _bar_rows
    if not show_progress():
        yield _Row()
        return
    if _bar is None:
        _bar = _new_bar()
        _bar.start()
    _bar_rows += 1
    row = _Row(_bar.add_task(description, total=total))
    _bar.refresh()  # drawn now, not at the next tick: a short step still shows what it was
    try:
        yield row
    finally:
        _bar_rows -= 1
        if _bar is not None:
            _bar.remove_task(row.task_id)
            if _bar_rows == 0:
                _bar.stop()
                _bar = None


def status(description: str):
    """A spinner with the elapsed time for one long step (loading, speaking): ``with common.status(...):``."""
    return progress(description, total=None)


def write_stdout(text: str) -> None:
    """Data on stdout. When stdout is the same terminal as the progress display, the display steps aside
    for the write (else the text would land in the middle of the bar)."""
    if _bar is not None and sys.stdout.isatty():
        _bar.stop()
        sys.stdout.write(text)
        sys.stdout.flush()
        _bar.start()
        return
    sys.stdout.write(text)
    sys.stdout.flush()


def examples_help(summary: str, *examples: str) -> str:
    """A command docstring that opens with copy-pasteable examples (CLI.md)."""
    # Click rewraps paragraphs; a paragraph that starts with \b is printed verbatim.
    return "\n\n".join([summary, "\b\nExamples:\n" + "\n".join(f"  $ {e}" for e in examples), GLOBAL_OPTIONS_NOTE])


GLOBAL_OPTIONS_NOTE = ("Global options work here too, before or after the command: --model ID_OR_DIR, --revision, "
                       "--offline, --device, --dtype, --seed, -q, -v, --debug, --no-progress (see: minicpmo -h).")


def fail_usage(message: str) -> None:
    raise typer.BadParameter(message)


# Decoding options shared by every command that generates text (typer OptionInfo objects can be reused).
MAX_NEW_TOKENS = typer.Option(None, "--max-new-tokens", min=1, help="Longest answer, in tokens.")
MIN_NEW_TOKENS = typer.Option(None, "--min-new-tokens", min=0, help="Shortest answer, in tokens.")
SAMPLING = typer.Option(None, "--sampling/--no-sampling",
                        help="Sample (top-p/top-k), or decode deterministically "
                             "(chat: beam search with 3 beams, as the reference; asr: greedy).")
TEMPERATURE = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature.")
TOP_P = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
TOP_K = typer.Option(None, "--top-k", min=0, help="Sample among the k best tokens.")
REPETITION_PENALTY = typer.Option(None, "--repetition-penalty", min=0.0, help="Penalty for repeated tokens.")
NUM_BEAMS = typer.Option(None, "--num-beams", min=1, help="Beams for beam search.")

# Parameter name -> (type, typer option), in the order the options are listed in --help.
DECODING_PARAMETERS = {
    "max_new_tokens": (Optional[int], MAX_NEW_TOKENS),
    "min_new_tokens": (Optional[int], MIN_NEW_TOKENS),
    "sampling": (Optional[bool], SAMPLING),
    "temperature": (Optional[float], TEMPERATURE),
    "top_p": (Optional[float], TOP_P),
    "top_k": (Optional[int], TOP_K),
    "repetition_penalty": (Optional[float], REPETITION_PENALTY),
    "num_beams": (Optional[int], NUM_BEAMS),
}
ALL_DECODING = tuple(DECODING_PARAMETERS)


def decoding_options(include: tuple[str, ...] = ALL_DECODING, task: str | None = None):
    """Give a command the decoding options named in ``include`` (listed after its own, in that order) and call
    it with one ``decode: DecodeOptions`` keyword argument instead of the separate values (with --seed).
    ``task``: its decoding preset (generation/presets.py); options that contradict each other or do not fit
    the mode fail there, before the command does any work.

    Typer reads the parameters from ``inspect.signature`` and the types from ``typing.get_type_hints``, so
    the wrapper gets a rewritten ``__signature__`` and its own ``__annotations__``.
    """
    unknown = [name for name in include if name not in DECODING_PARAMETERS]
    if unknown:
        raise ValueError(f"not decoding options: {', '.join(unknown)}")

    def decorate(command):
        signature = inspect.signature(command)
        if "decode" not in signature.parameters:
            raise TypeError(f"{command.__name__} needs a `decode` parameter")
        own = [p for p in signature.parameters.values() if p.name != "decode"]
        added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                   default=DECODING_PARAMETERS[name][1], annotation=DECODING_PARAMETERS[name][0])
                 for name in include]

        @functools.wraps(command)
        def run(*args, **kwargs):
            chosen = {name: kwargs.pop(name, None) for name in include}
            decode = decode_options(**chosen)
            if task is not None:
                from minicpmo_cli.generation.presets import resolve

                resolve(task, decode)
            return command(*args, decode=decode, **kwargs)

        run.__signature__ = signature.replace(parameters=own + added)
        # A new dict: functools.wraps shares the wrapped function's. `decode` leaves it, since its (string)
        # annotation names a type this module does not import.
        run.__annotations__ = {
            **{k: v for k, v in command.__annotations__.items() if k != "decode"},
            **{name: DECODING_PARAMETERS[name][0] for name in include},
        }
        return run

    return decorate


def decode_options(max_new_tokens=None, min_new_tokens=None, sampling=None, temperature=None, top_p=None,
                   top_k=None, repetition_penalty=None, num_beams=None):
    """The command's decoding options, seeded by the global --seed (a per-call option of the library)."""
    from minicpmo_cli.generation.presets import DecodeOptions

    return DecodeOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, sampling=sampling,
                         temperature=temperature, top_p=top_p, top_k=top_k,
                         repetition_penalty=repetition_penalty, num_beams=num_beams, seed=options().seed)


# The library's parameter names -> this CLI's flags, for its error messages (`dtype must be ...` is said as
# `--dtype must be ...`). Names with an underscore are always parameter names; plain words only when the
# error says it names them (MiniCPMOError.parameters).
PARAMETER_FLAGS = {
    "model": "--model", "revision": "--revision", "device": "--device", "dtype": "--dtype", "seed": "--seed",
    "quantize": "--quantize", "compile": "--compile", "step": "--step", "sampling": "--sampling", "temperature": "--temperature",
    "top_p": "--top-p", "top_k": "--top-k", "repetition_penalty": "--repetition-penalty",
    "num_beams": "--num-beams", "max_new_tokens": "--max-new-tokens", "min_new_tokens": "--min-new-tokens",
    "sampling=True": "--sampling", "sampling=False": "--no-sampling",
}


def in_flag_words(exc: BaseException, message: str) -> str:
    """``message`` (describing ``exc``) with the library's parameter names said as this CLI's flags."""
    import re

    named = set(getattr(exc, "parameters", ()) or ())
    names = [n for n in PARAMETER_FLAGS if "_" in n or n.split("=")[0] in named]
    if not names:
        return message
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?![\w-])")
    return pattern.sub(lambda m: PARAMETER_FLAGS[m.group(1)], message)


def load_options():
    from minicpmo_cli.api.engine import LoadOptions

    o = options()
    return LoadOptions(model=o.model, revision=o.revision, offline=o.offline, device=o.device, dtype=o.dtype,
                       step=o.step, compile=o.compile, quantize=o.quantize)


FULL_MODEL_SIZE = "about 16 GB"  # the official checkpoint's files that are downloaded (HUB_ALLOW_PATTERNS)


def load_engine(*, vision: bool = True, audio: bool = True, tts: bool = False):
    """Load the model for a command: the checkpoint is found (or downloaded, saying what, how big and where)
    before torch is imported, so a bad --model fails at once; then a status line while the model loads."""
    import time
    from dataclasses import replace

    from minicpmo_cli.api.engine import load

    if not show_progress():  # --no-progress, -q or no terminal: the hub's download bars too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    started = time.perf_counter()
    clock = startup_clock()
    if clock is not None:  # -v: the start-up phases from here on, each as it ends (and those before, now)
        clock.start_printing(err if options().verbose or options().debug else None)
        clock.mark("options and inputs")
    folder = checkpoint_folder()
    if clock is not None:
        clock.mark("checkpoint found")
    debug(f"loading {options().model} from {folder} (vision={vision}, audio={audio}, tts={tts})")
    with status(f"loading the model from {folder}"):
        engine = load(replace(load_options(), model=str(folder)), vision=vision, audio=audio, tts=tts, warn=warn,
                      clock=clock)
    quantization = getattr(engine.model, "quantization", None)
    if quantization is not None:
        debug(quantization.describe())
    attention = getattr(getattr(engine.model, "config", None), "_attn_implementation", None) or "sdpa"
    debug(f"model loaded in {time.perf_counter() - started:.1f} s: device {engine.device}, "
          f"dtype {str(engine.dtype).replace('torch.', '')}, attention {attention}")
    return engine


def check_local_model() -> None:
    """A --model that names a local folder is checked now, before any audio is decoded or segmented (the
    VAD imports torch): a wrong path fails at once. Hub ids are left for the load (it may download)."""
    from minicpmo_cli.model.checkpoint_files import means_local_folder

    o = options()
    if o.server is None and (Path(o.model).expanduser().exists() or means_local_folder(o.model)):
        checkpoint_folder()


def checkpoint_folder() -> Path:
    """The local folder of --model: as given, or from the hub cache, downloading it first when it is not there."""
    from minicpmo_cli.model.checkpoint_files import cached_snapshot, means_local_folder, resolve_checkpoint_dir

    o = options()
    path = Path(o.model).expanduser()
    if path.is_dir() or path.exists() or means_local_folder(o.model):
        return resolve_checkpoint_dir(o.model)  # the folder, or a one-line error naming it
    snapshot = cached_snapshot(o.model, o.revision)
    if snapshot is not None and any(snapshot.glob("*.safetensors")):
        return resolve_checkpoint_dir(o.model, o.revision, local_files_only=True)
    if not o.offline:
        from huggingface_hub import constants

        size = FULL_MODEL_SIZE if o.model == DEFAULT_MODEL else "its checkpoint files"
        info(f"downloading {o.model} ({size}) into {constants.HF_HUB_CACHE}; "
             "this happens once, later runs read the cache")
    with paused_progress():  # the hub draws its own download bars
        return resolve_checkpoint_dir(o.model, o.revision, local_files_only=o.offline or None)


@contextlib.contextmanager
def paused_progress():
    """Take our progress display off the screen while someone else draws there (the hub's download bars)."""
    if _bar is None:
        yield
        return
    _bar.stop()
    try:
        yield
    finally:
        _bar.start()


def wav_output_target(output: str, overwrite: bool, extensions: tuple[str, ...] = (".wav",)) -> Path | None:
    """The wav path to write, or None for stdout (`-o -`); fails early, naming the path, when it cannot be.

    ``extensions``: the audio formats the command can write (by file extension); others are refused.
    """
    from minicpmo_cli.errors import OutputError, UsageError

    if output == "-":
        if sys.stdout.isatty():
            raise UsageError("-o -: refusing to write wav bytes to a terminal (redirect stdout, or name a file)")
        return None
    path = Path(output).expanduser()
    try:
        if path.is_dir():
            raise OutputError(f"is a folder; give a file name ending in {', '.join(extensions)}", path)
        if path.suffix.lower() not in extensions:
            named = f"a {path.suffix} file" if path.suffix else "a file without an extension"
            raise UsageError(f"{output}: cannot write {named} here; name a {', '.join(extensions)} file")
        if path.exists() and not overwrite:
            raise OutputError("already exists (pass --overwrite to replace it)", path)
        folder = path.parent
        if not folder.is_dir():
            raise OutputError(f"cannot write here: the folder {folder} does not exist", path)
    except OSError as exc:  # a folder of the path we may not enter
        raise OutputError(f"cannot write here ({(exc.strerror or str(exc)).lower()})", path) from None
    probe_writable(folder, path)
    return path


def check_output_file(path: Path) -> None:
    """A file output (-o FILE) must be writable in an existing folder: say so before any work is done."""
    from minicpmo_cli.errors import OutputError

    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write here: the folder {folder} does not exist", path)
    probe_writable(folder, path)


def audio_output_target(output: str, overwrite: bool) -> Path | None:
    """Like wav_output_target, for commands that write any format outputs.write_audio knows (wav/flac/mp3/ogg)."""
    from minicpmo_cli.outputs import AUDIO_EXTENSIONS

    return wav_output_target(output, overwrite, AUDIO_EXTENSIONS)


def probe_writable(folder: Path, path: Path) -> None:
    """Create and delete a scratch file in ``folder``: os.access says yes to root even where writes fail."""
    import tempfile

    from minicpmo_cli.errors import OutputError

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".minicpmo-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write here: the folder {folder} is not writable ({exc.strerror or exc})",
                          path) from None
