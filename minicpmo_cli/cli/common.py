"""What every command shares: the global options, logging to stderr, and argv normalisation.

Nothing here imports torch or transformers: `minicpmo --help` must stay instant.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

DEFAULT_MODEL = "openbmb/MiniCPM-o-2_6"

# Global options that take a value, and those that are flags. They are accepted before and after the
# command (CLI.md): main() moves them in front of the command name before Typer parses argv.
GLOBAL_VALUE_OPTIONS = {"--model", "--revision", "--device", "--dtype", "--seed", "--server"}
GLOBAL_FLAG_OPTIONS = {"--offline", "-q", "--quiet", "-v", "--verbose", "--debug", "--no-progress"}


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
    server: str | None = None  # URL of a running `minicpmo serve`: asr, chat, tts and clone use it


_options = GlobalOptions()


def options() -> GlobalOptions:
    """The global options of this invocation (set by the root callback)."""
    return _options


def set_options(opts: GlobalOptions) -> None:
    global _options
    _options = opts


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


def use_color() -> bool:
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def err(message: str) -> None:
    """One line on stderr, whatever the verbosity."""
    print(message, file=sys.stderr, flush=True)


def info(message: str) -> None:
    if not _options.quiet:
        err(message)


def debug(message: str) -> None:
    if _options.verbose or _options.debug:
        err(message)


def warn(message: str) -> None:
    if not _options.quiet:
        err(f"warning: {message}")


def show_progress() -> bool:
    """Progress bars only on an interactive stderr, and never with --no-progress or -q."""
    return sys.stderr.isatty() and not (_options.no_progress or _options.quiet)


def examples_help(summary: str, *examples: str) -> str:
    """A command docstring that opens with copy-pasteable examples (CLI.md)."""
    # Click rewraps paragraphs; a paragraph that starts with \b is printed verbatim.
    return "\n\n".join([summary, "\b\nExamples:\n" + "\n".join(f"  $ {e}" for e in examples)])


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


def decoding_options(include: tuple[str, ...] = ALL_DECODING):
    """Give a command the decoding options named in ``include`` (listed after its own, in that order) and call
    it with one ``decode: DecodeOptions`` keyword argument instead of the separate values.

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
            return command(*args, decode=decode_options(**chosen), **kwargs)

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
    from minicpmo_cli.api.engine import DecodeOptions

    return DecodeOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, sampling=sampling,
                         temperature=temperature, top_p=top_p, top_k=top_k,
                         repetition_penalty=repetition_penalty, num_beams=num_beams)


def load_options():
    from minicpmo_cli.api.engine import LoadOptions

    o = _options
    return LoadOptions(model=o.model, revision=o.revision, offline=o.offline, device=o.device, dtype=o.dtype,
                       seed=o.seed)


def load_engine(*, vision: bool = True, audio: bool = True, tts: bool = False):
    """Load the model for a command, with a status line on stderr while it loads."""
    from minicpmo_cli.api.engine import load

    debug(f"loading {_options.model} (vision={vision}, audio={audio}, tts={tts})")
    return load(load_options(), vision=vision, audio=audio, tts=tts, warn=warn)


def wav_output_target(output: str, overwrite: bool) -> Path | None:
    """The wav path to write, or None for stdout (`-o -`); fails early, naming the path, when it cannot be."""
    from minicpmo_cli.errors import OutputError, UsageError

    if output == "-":
        if sys.stdout.isatty():
            raise UsageError("-o -: refusing to write wav bytes to a terminal (redirect stdout, or name a file)")
        return None
    path = Path(output).expanduser()
    if path.is_dir():
        raise OutputError("is a folder; give a .wav file name", path)
    if path.exists() and not overwrite:
        raise OutputError("already exists (pass --overwrite to replace it)", path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write here: the folder {folder} does not exist", path)
    probe_writable(folder, path)
    return path


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
