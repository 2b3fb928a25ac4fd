"""`minicpmo chat`: one-shot answers, or an interactive REPL on a terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from minicpmo_cli.cli import common
from minicpmo_cli.cli.answers import speak_answer, stream_reply

if TYPE_CHECKING:
    from minicpmo_cli.api.engine import DecodeOptions

HELP = common.examples_help(
    "Chat with the model about text, images and audio. One-shot when PROMPT is given, stdin is piped or media "
    "are attached; an interactive session on a terminal otherwise (type /help there). Piped stdin is read to "
    "its end and put before PROMPT: in shell loops, add --no-stdin.",
    'minicpmo chat "What is in this picture?" -i photo.jpg',
    'minicpmo chat "Compare the two images." -i a.png -i b.png',
    'cat notes.txt | minicpmo chat "Summarise this in three bullet points."',
    "minicpmo chat --system \"You are a terse assistant.\"",
    "minicpmo chat --mode roleplay --voice character.wav -a question.wav --speak answer.wav",
    "minicpmo chat --mode assistant --voice alice -a question.wav --speak answer.mp3",
)
MODE_HELP = ("With --voice: assistant (the guide's AI-assistant prompt: answers in that stable voice; the "
             "default with --voice) or roleplay (plays the speaker of the clip: voice and speaking style); "
             "default: no voice prompt.")


def register(app: typer.Typer) -> None:
    app.command(help=HELP)(chat)


@common.decoding_options(task="chat")
def chat(
    prompt: Optional[str] = typer.Argument(None, help="The question. Omit it on a terminal for the REPL."),
    image: list[Path] = typer.Option([], "-i", "--image", help="An image to ask about (repeatable)."),
    audio: list[Path] = typer.Option([], "-a", "--audio", help="An audio clip to ask about (repeatable)."),
    video: Optional[Path] = typer.Option(None, "--video", help="A video to ask about (frames + sound)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt."),
    example: list[str] = typer.Option([], "--example", help="Few-shot pair: --example IMAGE ANSWER "
                                      "(repeatable; the prompt is asked of each example image).",
                                      metavar="IMAGE ANSWER"),
    speak: Optional[Path] = typer.Option(None, "--speak", help="Also speak the answer into this audio file "
                                          "(.wav, .flac, .mp3 or .ogg)."),
    voice: Optional[str] = typer.Option(None, "--voice", help="Speak in this saved voice (or audio clip)."),
    mode: Optional[str] = typer.Option(None, "--mode", metavar="assistant|roleplay|default", help=MODE_HELP),
    language: str = typer.Option("en", "--language", help="Language of the spoken-answer prompt: en or zh."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --speak file."),
    no_stdin: bool = typer.Option(False, "--no-stdin", help="Never read stdin (by default piped stdin is read "
                                  "to its end and put before PROMPT): for loops like `while read f; do minicpmo "
                                  "chat ... --no-stdin; done < list`."),
    *,
    decode: DecodeOptions,
) -> None:
    from minicpmo_cli.cli.inputs import check_text_argument, read_text_input

    # binary data on stdin: "not UTF-8 text", exit 2
    stdin_text = None if no_stdin or sys.stdin.isatty() else read_text_input(None)
    check_text_argument(prompt, "PROMPT")
    check_text_argument(system, "--system")
    # A spoken question (-a q.wav) or other media with no PROMPT is a one-shot question, not a session.
    interactive = prompt is None and stdin_text is None and sys.stdin.isatty() and not (image or audio or video)
    if not interactive and not (prompt or stdin_text or "").strip() and not (image or audio or video):
        raise typer.BadParameter("nothing to ask: give a PROMPT, pipe text on stdin, or attach media")
    if voice is not None and speak is None and not interactive:
        raise typer.BadParameter("--voice needs --speak OUT.wav")
    if language not in ("en", "zh"):
        raise typer.BadParameter("--language must be en or zh")
    mode = check_mode(mode, voice, interactive)
    if speak is not None and not interactive:
        # Checked before the model loads: a bad path must not cost a whole answer.
        if common.audio_output_target(str(speak), overwrite) is None:
            raise typer.BadParameter("--speak needs a wav file name (stdout carries the text answer)")
    # Media are read before the model loads too, so a missing file fails fast.
    conversation = _conversation(prompt, image, audio, video, system, example, voice, language)
    conversation.mode = mode
    from minicpmo_cli.cli.remote import engine_or_load

    # Only the towers the first message needs; the REPL loads the others when /image, /audio or /video asks.
    engine = engine_or_load(vision=bool(image or video or example),
                            audio=bool(audio or video or voice is not None), tts=speak is not None)
    if interactive:
        from minicpmo_cli.cli.repl import Repl

        Repl(engine, conversation, decode, speak_path=speak).run()
        return
    text = "\n\n".join(t for t in (stdin_text and stdin_text.strip(), prompt) if t)
    answer_once(engine, conversation, text, decode, speak)


def check_mode(mode: str | None, voice: str | None, interactive: bool = False) -> str:
    """--mode with --voice: assistant (default) or roleplay need the voice (in the REPL: /voice); default takes
    none."""
    from minicpmo_cli.api.chat import MODES

    if mode is None:
        return "assistant" if voice is not None else "default"
    if mode not in MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "default" and voice is None and not interactive:
        raise typer.BadParameter(f"--mode {mode} speaks in a given voice: add --voice NAME|FILE (a saved voice "
                                 "or a 5-15 s clip) and --speak OUT.wav")
    if mode == "default" and voice is not None:
        raise typer.BadParameter("--voice works through --mode assistant or roleplay, not --mode default")
    return mode


def _conversation(prompt, images, audios, video, system, examples, voice, language):
    """The conversation with its few-shot pairs, attachments and voice, every file read and checked."""
    from minicpmo_cli.api.chat import Conversation, attach_video

    conversation = Conversation(system=system, language=language)
    if voice is not None:
        from minicpmo_cli.api.voices import resolve_voice

        conversation.voice = resolve_voice(voice)
    for example_image, answer in (_split_example(item) for item in examples):
        conversation.add_example(example_image, prompt or "", answer)
    for path in images:
        conversation.attach_image(path)
    for path in audios:
        conversation.attach_audio(path)
    if video is not None:
        attach_video(conversation, video)
    return conversation


# Typer has no two-value repeatable options, so main() joins `--example IMAGE ANSWER` into one argument.
EXAMPLE_SEPARATOR = "\x1f"


def join_example_args(argv: list[str]) -> list[str]:
    """Rewrite `--example IMAGE ANSWER` as `--example IMAGE<US>ANSWER` before Typer parses argv."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        if argv[i] == "--example":
            values = argv[i + 1:i + 3]
            # An option where IMAGE or ANSWER should be means the pair is incomplete: say so, instead of
            # letting the option become the answer (and its own value an argument).
            if len(values) < 2 or any(_looks_like_option(v) for v in values):
                given = values[0] if values and not _looks_like_option(values[0]) else ""
                out += ["--example", given + EXAMPLE_SEPARATOR + MISSING_ANSWER]
                i += 2 if given else 1
                continue
            out += ["--example", values[0] + EXAMPLE_SEPARATOR + values[1]]
            i += 3
            continue
        out.append(argv[i])
        i += 1
    return out


MISSING_ANSWER = "\x00missing"  # marks a --example pair that lacks a value (see join_example_args)


def _looks_like_option(arg: str) -> bool:
    return arg.startswith("--") or (len(arg) == 2 and arg[0] == "-" and arg[1].isalpha())


def _split_example(item: str) -> tuple[str, str]:
    if EXAMPLE_SEPARATOR not in item:
        raise typer.BadParameter(f"--example {item!r}: expected two values, IMAGE ANSWER")
    path, answer = item.split(EXAMPLE_SEPARATOR, 1)
    if answer == MISSING_ANSWER:
        what = f"--example {path} has no ANSWER" if path else "--example has no IMAGE and ANSWER"
        raise typer.BadParameter(f"{what}: write --example IMAGE ANSWER")
    return path, answer


def answer_once(engine, conversation, text: str, decode, speak: Path | None) -> str:
    """Ask, stream the answer to stdout (or print it whole with its speech when speaking)."""
    conversation.ask(text)
    if speak is not None:
        answer = speak_answer(engine, conversation, decode, speak)
    else:
        pieces: list[str] = []
        stream_reply(engine, conversation, decode, sys.stdout, pieces)
        answer = "".join(pieces)
    sys.stdout.write((answer if speak is not None else "") + "\n")
    if speak is not None:
        sys.stdout.flush()  # the answer first, then the line that says where its speech went
        common.info(f"speech written to {speak}")
    conversation.answer(answer)
    return answer
