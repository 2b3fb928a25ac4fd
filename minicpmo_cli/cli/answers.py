"""Answering a conversation on the terminal, shared by one-shot `chat` and the REPL: text streamed to a
stream as it is generated, or text plus speech written to a wav file."""

from __future__ import annotations

from pathlib import Path

from minicpmo_cli.cli import common


def stream_reply(engine, conversation, decode, out, pieces: list[str]) -> None:
    """Write the answer to ``out`` as it is generated, collecting it in ``pieces`` (kept if interrupted)."""
    from contextlib import closing

    from minicpmo_cli.api.chat import reply
    from minicpmo_cli.cli import remote

    reply = remote.reply if remote.is_remote(engine) else reply
    # closing(): Ctrl-C ends the generation thread too, not only the printing.
    with closing(reply(engine, conversation, decode, stream=True)) as stream:
        for piece in stream:
            common.first_output("first answer text")
            pieces.append(piece)
            out.write(piece)
            out.flush()


def speak_answer(engine, conversation, decode, target: Path) -> str:
    """Generate the answer with speech and write the wav atomically; returns the text."""
    from minicpmo_cli.api.chat import reply_with_speech
    from minicpmo_cli.cli import remote
    from minicpmo_cli.outputs import write_audio

    reply_with_speech = remote.reply_with_speech if remote.is_remote(engine) else reply_with_speech
    with common.status("answering in text and speech"):
        text, wav, rate = reply_with_speech(engine, conversation, decode)
    common.first_output("answer with speech")
    write_audio(target, wav, sample_rate=rate)
    return text  # the caller says where the speech went, after the answer it belongs to
