"""The root of the `minicpmo` command: global options, --version, error-to-exit-code mapping."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import typer

from minicpmo_cli import __version__
from minicpmo_cli.cli import common
from minicpmo_cli.errors import EXIT_ENVIRONMENT, EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, MiniCPMOError

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
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"minicpmo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
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
    seed: int = typer.Option(None, "--seed", envvar="MINICPMO_SEED",
                             help="Seed for repeatable sampling and a stable voice."),
    quiet: bool = typer.Option(False, "-q", "--quiet", envvar="MINICPMO_QUIET", help="Only errors on stderr."),
    verbose: bool = typer.Option(False, "-v", "--verbose", envvar="MINICPMO_VERBOSE", help="More detail on stderr."),
    debug: bool = typer.Option(False, "--debug", envvar="MINICPMO_DEBUG", help="Full tracebacks on errors."),
    no_progress: bool = typer.Option(False, "--no-progress", envvar="MINICPMO_NO_PROGRESS",
                                     help="No progress bars."),
    server: str = typer.Option(None, "--server", envvar="MINICPMO_SERVER", metavar="URL",
                               help="Send asr, chat, tts and clone to a running `minicpmo serve` at URL."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "on", "yes", "true")
    _configure_logging(quiet=quiet, verbose=verbose or debug)
    common.set_options(common.GlobalOptions(
        model=model, revision=revision, offline=offline, device=device, dtype=dtype, seed=seed,
        quiet=quiet, verbose=verbose, debug=debug, no_progress=no_progress, server=server or None,
    ))


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
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _register_commands() -> None:
    # Command modules import only typer at module level; torch comes in when a command runs.
    from minicpmo_cli.cli import asr, chat, doctor, serve, speech, video

    for module in (asr, chat, speech, video, doctor, serve):
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
            if not isinstance(info, (typer.models.ArgumentInfo, typer.models.OptionInfo)) or info.metavar:
                continue
            if isinstance(info, typer.models.ArgumentInfo):
                info.metavar = param.name.upper()
            elif "bool" not in str(param.annotation):
                info.metavar = metavar_for(param.annotation)


_register_commands()
_plain_metavars(app)


def _exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, MiniCPMOError):
        return exc.exit_code
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return EXIT_ENVIRONMENT
    return EXIT_RUNTIME


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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and turn every failure into one line and an exit code."""
    from minicpmo_cli.cli.chat import join_example_args

    args = join_example_args(common.hoist_global_options(list(sys.argv[1:] if argv is None else argv)))
    debug = "--debug" in args or os.environ.get("MINICPMO_DEBUG", "") not in ("", "0")
    try:
        code = app(args=args, prog_name="minicpmo", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        code = EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if _report_click_error(exc):
            sys.exit(exc.exit_code if type(exc).__name__ != "NoArgsIsHelpError" else EXIT_USAGE)
        if debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, MiniCPMOError):
            message = f"{type(exc).__name__}: {message}" + ("" if debug else " (run with --debug for details)")
        common.err(f"minicpmo: error: {message}")
        sys.exit(_exit_code_for(exc))
    if code == EXIT_INTERRUPTED:
        common.err("minicpmo: interrupted (finished outputs were kept)")
    sys.exit(code if isinstance(code, int) else 0)
