"""The root of the `minicpmo` command: global options, --version, error-to-exit-code mapping."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Optional

import typer

from minicpmo_cli import __version__
from minicpmo_cli.cli import common
from minicpmo_cli.errors import (
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    MiniCPMOError,
    describe_error,
)
from minicpmo_cli.startup import StartupClock

app = typer.Typer(
    name="minicpmo",
    help=(
        "Run MiniCPM-o 2.6 from the command line: chat about images, audio and video, transcribe speech, "
        "speak text, clone voices.\n\n"
        "\b\nExamples:\n"
        "  $ minicpmo asr meeting.mp3\n"
        "  $ minicpmo chat \"What is in this picture?\" -i photo.jpg\n"
        "  $ minicpmo tts \"Hello there\" -o hello.wav\n"
        "  $ minicpmo doctor"
    ),
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"minicpmo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    model: str = typer.Option(common.DEFAULT_MODEL, "--model", envvar="MINICPMO_MODEL",
                              help="Hugging Face hub id or local checkpoint folder."),
    revision: str = typer.Option(None, "--revision", envvar="MINICPMO_REVISION",
                                 help="Hub revision (branch, tag or commit)."),
    offline: bool = typer.Option(False, "--offline", envvar="MINICPMO_OFFLINE",
                                 help="Use cached files only (also HF_HUB_OFFLINE=1)."),
    device: str = typer.Option("auto", "--device", envvar="MINICPMO_DEVICE",
                               help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", envvar="MINICPMO_DTYPE",
                              help="auto, bfloat16, float16 or float32."),
    quantize: str = typer.Option(None, "--quantize", envvar="MINICPMO_QUANTIZE",
                                 help="Weight-only quantization of the LLM: none, int8 or int4 "
                                      "(default: as the checkpoint is; a GPTQ int4 checkpoint is int4)."),
    seed: int = typer.Option(None, "--seed", envvar="MINICPMO_SEED",
                             help="Seed for repeatable sampling and a stable voice."),
    quiet: bool = typer.Option(False, "-q", "--quiet", envvar="MINICPMO_QUIET", help="Only errors on stderr."),
    verbose: bool = typer.Option(False, "-v", "--verbose", envvar="MINICPMO_VERBOSE", help="More detail on stderr."),
    debug: bool = typer.Option(False, "--debug", envvar="MINICPMO_DEBUG", help="Full tracebacks on errors."),
    no_progress: bool = typer.Option(False, "--no-progress", envvar="MINICPMO_NO_PROGRESS",
                                     help="No progress bars."),
    step: str = typer.Option(
        None, "--step", envvar="MINICPMO_STEP", metavar="MODE", show_default=False,
        help="How decode steps run: eager, trace (the LLM step as one TorchScript call), graph (CUDA graphs; "
             "needs a CUDA GPU) or compile (torch.compile). Default: graph with CUDA, trace on the CPU."),
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", envvar="MINICPMO_COMPILE", show_default=False,
        help="Aliases: --compile is --step compile, --no-compile is --step eager."),
    server: str = typer.Option(None, "--server", envvar="MINICPMO_SERVER", metavar="URL",
                               help="Send asr, chat, describe-video, tts and clone to a running `minicpmo serve` "
                                    "at URL (mimick, omni and tts --stream say so and run here)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "on", "yes", "true")
    if quantize is not None and quantize.strip().lower() not in ("none", "int8", "int4"):
        raise typer.BadParameter(f"--quantize must be none, int8 or int4, not {quantize!r}")
    _configure_logging(quiet=quiet, verbose=verbose or debug)
    # In typer's context, not a module global: each command's context inherits ctx.obj (common.options()).
    ctx.obj = common.GlobalOptions(
        model=model, revision=revision, offline=offline, device=device, dtype=dtype, seed=seed,
        quiet=quiet, verbose=verbose, debug=debug, no_progress=no_progress, step=step, compile=compile,
        quantize=quantize, server=server or None, clock=StartupClock(),
    )
    ctx.call_on_close(_end_of_command)


def _end_of_command() -> None:
    """-v: the start-up lines end with the rest of a model command (after its first output)."""
    clock = common.startup_clock()
    if clock is not None and clock.printing:
        clock.mark("rest of the command")


class _StderrLine(logging.Handler):
    """Each log record as one line on the stderr of the moment (not the one that existed at setup)."""

    def emit(self, record: logging.LogRecord) -> None:
        common.err(self.format(record))


def _configure_logging(quiet: bool, verbose: bool) -> None:
    """Library warnings (ours and transformers') go to stderr as one line each; -q hides them, -v adds info."""
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    handler = _StderrLine()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbose else "warning: %(message)s"))
    package = logging.getLogger("minicpmo_cli")
    package.handlers[:] = [handler]
    package.setLevel(level)
    import warnings

    warnings.showwarning = _show_warning
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _register_commands() -> None:
    # Command modules import only typer at module level; torch comes in when a command runs.
    from minicpmo_cli.cli import asr, chat, doctor, live, models, serve, speech, video

    for module in (asr, chat, speech, video, doctor, models, serve, live):
        module.register(app)


def _plain_metavars(typer_app: typer.Typer) -> None:
    """Help shows `-i PATH` and `PROMPT`, not typer's `<list[Path]>` and `{prompt}`, unless a metavar is set."""
    import inspect

    def metavar_for(annotation) -> str:
        text = str(annotation)
        return "PATH" if "Path" in text else "N" if "int" in text else "NUM" if "float" in text else "TEXT"

    infos = [c.callback for c in typer_app.registered_commands]
    if typer_app.registered_callback is not None:
        infos.append(typer_app.registered_callback.callback)
    for group in typer_app.registered_groups:
        infos += [c.callback for c in group.typer_instance.registered_commands]
    for callback in filter(None, infos):
        for param in inspect.signature(callback).parameters.values():
            info = param.default
            if not isinstance(info, (typer.models.ArgumentInfo, typer.models.OptionInfo)):
                continue
            if "Path" in str(param.annotation):
                # Our loaders report an unreadable file (exit 1, one line naming it), not click (exit 2).
                info.readable = False
            if info.metavar:
                continue
            if isinstance(info, typer.models.ArgumentInfo):
                info.metavar = param.name.upper()
            elif "bool" not in str(param.annotation):
                info.metavar = metavar_for(param.annotation)


def _plain_argument_display() -> None:
    """Usage lines as `minicpmo mimick [OPTIONS] AUDIO` and help rows as `AUDIO  The recording...`.

    typer 0.2x writes required arguments as `{AUDIO}` in usage lines and adds a type (`<str>`, `<path>`,
    `<list[str]>`) after every argument name in the help; neither is shell syntax a user can copy. Patched
    where those (private) methods exist; other typer versions keep their own display.
    """
    from typer import core

    argument = getattr(core, "TyperArgument", None)
    if argument is None or not hasattr(argument, "_usage_display_name") or not hasattr(argument, "display_type_rich"):
        return

    def usage_name(self) -> str:
        name = self.metavar or (self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    argument._usage_display_name = usage_name
    argument.display_type_rich = lambda self, ctx: None


_register_commands()
_plain_metavars(app)
_plain_argument_display()


def _exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, MiniCPMOError):
        return exc.exit_code
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's, without torch
        return EXIT_ENVIRONMENT
    return EXIT_RUNTIME


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
    except (OSError, ValueError):
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (torch's, PIL's, ...) as one line like ours, without the category's class name."""
    text = str(message).strip().splitlines()
    if text and not common.options().quiet:
        common.err(f"warning: {text[0]}")


def _report_click_error(exc: Exception) -> bool:
    """Click's usage errors (typer vendors click, so matched by shape): one line, like every other error."""
    if not (callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)):
        return False
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        print(ctx.get_help())
        return True
    where = f" (see: {ctx.command_path} -h)" if ctx is not None else ""
    common.err(f"minicpmo: error: {exc.format_message()}{where}")
    return True


def _valid_utf8_stdout() -> None:
    """Text on stdout is always valid UTF-8: a character that cannot be written (a lone surrogate from a file
    name that is not UTF-8) becomes U+FFFD instead of raising or writing invalid bytes."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is None:
        return  # replaced by a test harness
    encoding = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "")
    try:
        reconfigure(errors="replace", **({} if encoding == "utf8" else {"encoding": "utf-8"}))
    except (ValueError, OSError):
        pass


def _kept_files() -> str:
    """What an interrupted run leaves: the files it finished (never a half-written one), if any."""
    outputs = sys.modules.get("minicpmo_cli.outputs")  # not imported: nothing was written
    written = list(getattr(outputs, "FILES_WRITTEN", []))
    if not written:
        return " (no output file was written)"
    return f" ({len(written)} output file(s) kept, all complete; the last: {written[-1]})"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and turn every failure into one line and an exit code."""
    from minicpmo_cli.cli.chat import join_example_args
    from minicpmo_cli.cli.scale import ray_flag_args

    args = join_example_args(common.hoist_global_options(list(sys.argv[1:] if argv is None else argv)))
    _valid_utf8_stdout()
    if "minicpmo_cli.outputs" in sys.modules:  # a second run in one process (tests) counts its own files
        sys.modules["minicpmo_cli.outputs"].FILES_WRITTEN.clear()
    args = ray_flag_args(args)
    debug = "--debug" in args or os.environ.get("MINICPMO_DEBUG", "") not in ("", "0")
    try:
        code = app(args=args, prog_name="minicpmo", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        code = EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if _report_click_error(exc):
            sys.exit(exc.exit_code if type(exc).__name__ != "NoArgsIsHelpError" else EXIT_USAGE)
        if isinstance(exc, BrokenPipeError):  # stdout's reader went away (`| head`): nothing left to say
            _silence_stdout()
            sys.exit(EXIT_RUNTIME)
        if debug:
            traceback.print_exc()
        common.err(f"minicpmo: error: {common.in_flag_words(exc, describe_error(exc, debug))}")
        sys.exit(_exit_code_for(exc))
    if code == EXIT_INTERRUPTED:
        common.err(f"minicpmo: interrupted{_kept_files()}")
    sys.exit(code if isinstance(code, int) else 0)
