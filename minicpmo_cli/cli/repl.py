"""The interactive chat: slash commands, multi-line input, Ctrl-C stops an answer, Ctrl-D leaves."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from minicpmo_cli.cli.answers import speak_answer, stream_reply
from minicpmo_cli.errors import MiniCPMOError
from minicpmo_cli.processing.limits import PromptTooLong

PROMPT = ">>> "
CONTINUATION = "... "
HELP_TEXT = """Commands:
  /image PATH     attach an image to your next message
  /audio PATH     attach an audio clip to your next message
  /video PATH     attach a video (frames and its sound) to your next message
  /speak on|off   also speak each answer (into answer.wav, answer-2.wav, ... or --speak's name)
  /mode M         assistant, roleplay or default: how answers use the voice (see chat -h)
  /voice V        answer in this saved voice or audio clip (/voice off: the model's own)
  /clear          forget the conversation
  /save FILE      save the conversation as JSON
  /load FILE      continue a conversation saved with /save
  /help           this help
  /exit           leave (Ctrl-D works too)
Start a message with \"\"\" to type several lines; end it with \"\"\".
Ctrl-C stops an answer (a stopped answer is not kept). When the conversation outgrows the model's context,
its oldest messages are forgotten (those with images, audio or video are kept); /clear starts over."""


class Repl:
    """A read-eval-print loop over one Conversation. Input comes from ``read_line`` (``input`` by default)."""

    def __init__(self, engine, conversation, decode, speak_path: Path | None = None,
                 read_line: Callable[[str], str] = input, out=None) -> None:
        self.engine = engine
        self.conversation = conversation
        self.decode = decode
        self.speak_path = speak_path
        self.speak = speak_path is not None
        self.spoken = 0
        self.read_line = read_line
        self.out = out or sys.stdout
        self.commands = {
            "/image": self.cmd_image, "/audio": self.cmd_audio, "/video": self.cmd_video,
            "/speak": self.cmd_speak, "/clear": self.cmd_clear, "/save": self.cmd_save, "/help": self.cmd_help,
            "/load": self.cmd_load, "/mode": self.cmd_mode, "/voice": self.cmd_voice,
        }

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> None:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        self.say("Chat with MiniCPM-o. /help for commands, Ctrl-D to leave.")
        while True:
            try:
                line = self.read_message()
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("")
                continue
            if line is None:
                return
            history = list(self.conversation.turns)
            try:
                self.handle(line)
            except KeyboardInterrupt:
                # Ctrl-C anywhere after the line was read (measuring the prompt, loading a tower, before the
                # first piece or while the answer streams) stops this message and keeps the session; a stopped
                # exchange is not kept in the history (the next answer must not build on half an answer).
                self.say(" [stopped]")
                self.conversation.turns[:] = history

    def read_message(self) -> str | None:
        line = self.read_line(PROMPT)
        if line.strip() in ("/exit", "/quit"):
            return None
        if not line.lstrip().startswith('"""'):
            return line
        lines = [line.lstrip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            lines.append(self.read_line(CONTINUATION))
        lines[-1] = lines[-1].rstrip()[:-3]
        return "\n".join(lines).strip()

    def handle(self, line: str) -> None:
        stripped = line.strip()
        if not stripped:
            return
        name, _, argument = stripped.partition(" ")
        if name in self.commands:
            try:
                self.commands[name](argument.strip())
            except MiniCPMOError as exc:
                self.say(f"error: {exc}")
            return
        if name.startswith("/") and " " not in stripped and len(name) > 1:
            self.say(f"unknown command {name}; /help lists them")
            return
        history = list(self.conversation.turns)
        try:
            self.answer(line)
        except (MiniCPMOError, ValueError, RuntimeError) as exc:
            # One failed answer must not end the session: report it, forget the failed turn (and undo any
            # trimming made for it), carry on.
            self.say(f"error: {exc}")
            self.conversation.turns[:] = history

    def answer(self, text: str) -> None:
        """Answer ``text``; when the conversation has outgrown the model's context, its oldest exchanges are
        forgotten (one line says so) until the prompt fits."""
        self.conversation.ask(text)
        forgotten = 0
        while True:
            notice = None if not forgotten else (
                f"[the conversation no longer fits the model's context: forgot its {forgotten} oldest "
                f"exchange{'s' if forgotten > 1 else ''} (the system prompt and attached media are kept)]")
            try:
                self.answer_once(notice)
                return
            except MiniCPMOError as exc:
                if not prompt_too_long(exc):
                    raise
                if not forget_oldest_exchange(self.conversation):
                    raise PromptTooLong(self.too_long_advice(exc)) from None
                forgotten += 1

    def too_long_advice(self, exc: Exception) -> str:
        if len(self.conversation.turns) == 1:  # the message alone (with its attachments) is too long
            return str(exc)
        return (f"{exc}; forgetting the oldest messages is not enough (the system prompt and attached media are "
                "kept): /clear to start over")

    def answer_once(self, notice: str | None) -> None:
        """One try at the answer; ``notice`` is said just before the answer (once it is sure to come)."""
        if self.speak:
            target = self.next_speech_path()
            answer = speak_answer(self.engine, self.conversation, self.decode, target)
            if notice:
                self.say(notice)
            self.say(answer)
            self.say(f"[spoken into {target}]")
        else:
            pieces: list[str] = []
            out = _NoticeFirst(self.out, notice)
            stream_reply(self.engine, self.conversation, self.decode, out, pieces)
            out.write("")
            self.say("")
            answer = "".join(pieces)
        self.conversation.answer(answer)

    def next_speech_path(self) -> Path:
        """answer.wav, answer-2.wav, ... (or --speak's name): the next one that does not exist yet."""
        base = self.speak_path or Path("answer.wav")
        while True:
            self.spoken += 1
            target = base if self.spoken == 1 else base.with_name(f"{base.stem}-{self.spoken}{base.suffix}")
            if not target.exists():
                return target

    def load_towers(self, vision: bool = False, audio: bool = False) -> None:
        """Load the vision/audio tower the first time a command needs it (chat starts without them)."""
        missing = [name for name, want in (("vision", vision), ("audio", audio))
                   if want and not self.engine.towers.get(name)]
        if missing:
            self.say(f"[loading the {' and '.join(missing)} model{'s' if len(missing) > 1 else ''}]")
            self.engine.ensure_towers(vision=vision, audio=audio)

    def cmd_image(self, path: str) -> None:
        full_path = self._need_path(path, "/image")
        self.load_towers(vision=True)
        self.conversation.attach_image(full_path)
        self.say(f"[image {path} attached]")

    def cmd_audio(self, path: str) -> None:
        full_path = self._need_path(path, "/audio")
        self.load_towers(audio=True)
        self.conversation.attach_audio(full_path)
        self.say(f"[audio {path} attached]")

    def cmd_video(self, path: str) -> None:
        from minicpmo_cli.api.chat import attach_video

        full_path = self._need_path(path, "/video")
        self.load_towers(vision=True, audio=True)
        attach_video(self.conversation, full_path)
        self.say(f"[video {path} attached]")

    def cmd_speak(self, argument: str) -> None:
        if argument not in ("on", "off"):
            self.say("usage: /speak on|off")
            return
        if argument == "on" and not self.engine.has_tts:
            self.say("[loading the speech model]")
            self.engine.enable_tts()
        self.speak = argument == "on"
        self.say(f"[speaking {argument}]")

    def cmd_clear(self, _argument: str) -> None:
        self.conversation.clear()
        self.say("[conversation cleared]")

    def cmd_save(self, path: str) -> None:
        from minicpmo_cli.outputs import write_text_atomic

        target = Path(self._need_path(path, "/save", must_exist=False))
        # Saving again to the same file is the usual REPL habit: allowed, but never silent.
        replaced = target.exists()
        write_text_atomic(target, self.conversation.to_json() + "\n")
        self.say(f"[saved to {target}{' (replaced the earlier file)' if replaced else ''}]")

    def cmd_load(self, path: str) -> None:
        """Replace the conversation by one saved with /save: its files are read again (they must still exist)."""
        import json

        from minicpmo_cli.errors import InputError

        source = self._need_path(path, "/load")
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
            turns = [(m["role"], m["content"]) for m in data["messages"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not a conversation saved with /save ({exc})", path) from None
        loaded = restore_turns(turns)  # every file read before anything is replaced
        self.conversation.clear()
        self.conversation.system = data.get("system", self.conversation.system)
        self.conversation.turns = loaded
        self.conversation.video_mode = any(s["type"] == "video" for _, sources in turns for s in sources)
        self.say(f"[loaded {len(loaded)} messages from {source}]")

    def cmd_mode(self, argument: str) -> None:
        from minicpmo_cli.api.chat import MODES

        if argument not in MODES:
            self.say(f"usage: /mode {'|'.join(MODES)}")
            return
        self.conversation.mode = argument
        hint = "" if argument == "default" or self.conversation.voice is not None else "; set a voice: /voice V"
        self.say(f"[mode {argument}{hint}]")

    def cmd_voice(self, argument: str) -> None:
        from minicpmo_cli.api.voices import resolve_voice

        if not argument:
            self.say("usage: /voice NAME|FILE, or /voice off")
            return
        if argument == "off":
            self.conversation.voice = None
            self.say("[voice off: the model's own voice]")
            return
        self.conversation.voice = resolve_voice(argument)
        if self.conversation.mode == "default":
            self.conversation.mode = "assistant"
        self.say(f"[voice {argument}, mode {self.conversation.mode}]")

    def cmd_help(self, _argument: str) -> None:
        self.say(HELP_TEXT)

    def _need_path(self, path: str, command: str, must_exist: bool = True) -> str:
        from minicpmo_cli.errors import InputError, UsageError

        if not path:
            raise UsageError(f"usage: {command} PATH")
        if must_exist and not Path(path).expanduser().exists():
            raise InputError("no such file", path)
        return str(Path(path).expanduser())


class _NoticeFirst:
    """A stream that writes ``notice`` (a line of its own) before the first text written to it."""

    def __init__(self, out, notice: str | None) -> None:
        self.out, self.notice = out, notice

    def write(self, text: str) -> None:
        if self.notice:
            self.out.write(self.notice + "\n")
            self.notice = None
        self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def prompt_too_long(exc: Exception) -> bool:
    """Whether ``exc`` says the prompt does not fit the context (cli.remote raises the same for a server's
    answer that says so)."""
    return isinstance(exc, PromptTooLong)


def _holds_media(turns) -> bool:
    return any(s.get("type") in ("image", "audio", "video") for turn in turns for s in turn.sources)


def forget_oldest_exchange(conversation) -> bool:
    """Drop the oldest exchange (a user message and the answers after it) that holds no image, audio or video,
    never the message being answered (the last); False when there is none."""
    turns = conversation.turns
    starts = [i for i, turn in enumerate(turns[:-1]) if turn.role == "user"] + [len(turns) - 1]
    for start, end in zip(starts, starts[1:]):
        if not _holds_media(turns[start:end]):
            del turns[start:end]
            return True
    return False


def restore_turns(saved: list[tuple[str, list[dict]]]):
    """Turns rebuilt from /save's JSON: text as written, images, audio and videos read again from their paths."""
    from minicpmo_cli.api.chat import Turn
    from minicpmo_cli.api.video import video_message_parts

    turns = []
    for role, sources in saved:
        turn = Turn(role)
        for source in sources:
            kind = source.get("type")
            if kind == "text":
                turn.add_text(source["text"])
            elif kind == "image":
                turn.add_image(source["path"])
            elif kind == "audio":
                turn.add_audio(source["path"])
            elif kind == "video":
                parts, video_sources = video_message_parts(source["path"], with_audio=bool(source.get("audio")))
                turn.parts.extend(parts)
                turn.sources.extend(video_sources)
        turns.append(turn)
    return turns
