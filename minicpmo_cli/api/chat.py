"""Chat: a conversation of text, images and audio, answered as a whole or streamed piece by piece."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from minicpmo_cli.api.engine import DecodeOptions, Engine
from minicpmo_cli.generation.presets import resolve

# The decoding preset of `chat` (generation/presets.py): the guide's vision chat settings; with a video
# attached, the guide's "chat with video" one.
CHAT_TASK = "chat"
VIDEO_TASK = "describe-video"


# Marker tokens whose positions the processor pairs up into image/audio/speaker bounds. An answer that happens
# to contain one (a small or confused model can emit them) would make every later prompt of the conversation
# unbalanced, so they are removed from answers kept in the history.
PLACEHOLDER_MARKERS = ("<image>", "</image>", "<slice>", "</slice>", "<|audio_start|>", "<|audio_end|>",
                       "<|spk_bos|>", "<|spk_eos|>")


def strip_placeholder_markers(text: str) -> str:
    for marker in PLACEHOLDER_MARKERS:
        text = text.replace(marker, "")
    return text


@dataclass
class Turn:
    """One message. ``parts`` go to the model; ``sources`` say where each part came from, for /save."""

    role: str
    parts: list[Any] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def add_text(self, text: str) -> None:
        self.parts.append(text)
        self.sources.append({"type": "text", "text": text})

    def add_image(self, path: str | Path) -> None:
        from minicpmo_cli.media.image import load_image

        self.parts.append(load_image(path))
        self.sources.append({"type": "image", "path": str(path)})

    def add_audio(self, path: str | Path) -> None:
        from minicpmo_cli.media.audio import load_audio

        self.parts.append(load_audio(path))
        self.sources.append({"type": "audio", "path": str(path)})

    @property
    def has_audio(self) -> bool:
        return any(s["type"] == "audio" for s in self.sources)


@dataclass
class Conversation:
    """The history of a chat, plus attachments waiting for the next user message."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    pending: Turn = field(default_factory=lambda: Turn("user"))
    video_mode: bool = False  # a video was attached: the guide's video settings apply (see reply)
    voice: Any = None  # 16 kHz reference clip: the voice of spoken answers, through the mode's system prompt
    language: str = "en"  # language of that system prompt
    # The guide's conversation modes with a voice: "assistant" (audio_assistant: a stable assistant voice) or
    # "roleplay" (audio_roleplay: the reference's voice and speaking style); "default": no voice prompt.
    mode: str = "assistant"

    def attach_image(self, path: str | Path) -> None:
        self.pending.add_image(path)

    def attach_audio(self, path: str | Path) -> None:
        self.pending.add_audio(path)

    def add_example(self, image: str | Path, question: str, answer: str) -> None:
        """A few-shot pair as the guide writes it: user [image, question], assistant [answer]."""
        user = Turn("user")
        user.add_image(image)
        user.add_text(question)
        reply = Turn("assistant")
        reply.add_text(answer)
        self.turns += [user, reply]

    def ask(self, text: str) -> Turn:
        """Close the pending user message with ``text`` and append it to the history."""
        turn, self.pending = self.pending, Turn("user")
        if text:
            turn.add_text(text)
        self.turns.append(turn)
        return turn

    def answer(self, text: str) -> None:
        reply = Turn("assistant")
        reply.add_text(strip_placeholder_markers(text))
        self.turns.append(reply)

    def clear(self) -> None:
        self.turns.clear()
        self.pending = Turn("user")

    def messages(self, spoken: bool = False) -> list[dict[str, Any]]:
        """The model's messages: the mode's voice prompt (with a voice) or --system, then the turns.

        ``spoken`` is kept for callers; the voice prompt is part of every answer once a voice is set, so the
        conversation the model sees does not change when speech is switched on or off.
        """
        return self.system_messages() + [{"role": t.role, "content": list(t.parts)} for t in self.turns]

    def system_messages(self) -> list[dict[str, Any]]:
        if self.voice is not None and self.mode in CONVERSATION_MODES:
            from minicpmo_cli.processing.prompts import get_sys_prompt

            # The guide's audio_assistant / audio_roleplay: msgs = [sys_prompt, ...] with the reference clip
            # inside (which gives that message the role "user"); --system text, if any, follows in it.
            voice_prompt = get_sys_prompt(ref_audio=self.voice, mode=CONVERSATION_MODES[self.mode],
                                          language=self.language)
            return [{"role": voice_prompt["role"], "content": list(voice_prompt["content"])
                     + ([self.system] if self.system else [])}]
        return [{"role": "system", "content": [self.system]}] if self.system else []

    def has_voice_prompt(self) -> bool:
        return self.voice is not None and self.mode in CONVERSATION_MODES

    def uses_audio(self) -> bool:
        return any(t.has_audio for t in self.turns)

    def to_json(self) -> str:
        data = {"system": self.system, "messages": [{"role": t.role, "content": t.sources} for t in self.turns]}
        return json.dumps(data, ensure_ascii=False, indent=2)


# chat --mode -> the reference's get_sys_prompt mode ("default" has no voice prompt).
CONVERSATION_MODES = {"assistant": "audio_assistant", "roleplay": "audio_roleplay"}
MODES = ("assistant", "roleplay", "default")


def _video_settings(conversation: Conversation) -> dict[str, Any]:
    # The guide's settings for video: no image ids, at most 2 slices per frame.
    return {"use_image_id": False, "max_slice_nums": 2} if conversation.video_mode else {}


def reply_with_speech(engine: Engine, conversation: Conversation, decode: DecodeOptions, usage: Any = None):
    """Answer the last user message in text and speech: (text, 24 kHz float32 wav, sample rate).

    Speech comes from the same generation (the TTS chat template and the LLM's speaker state), as the
    reference's ``generate_audio=True``; it cannot stream text. ``usage``: a generation.text.Usage to fill.
    """
    from minicpmo_cli.processing.limits import check_prompt_fits

    msgs = conversation.messages(spoken=True)
    check_prompt_fits(engine, msgs, answer_tokens=decode.max_new_tokens if decode else None,
                      use_tts_template=True, **_video_settings(conversation))
    if not engine.has_tts:
        engine.enable_tts()
    result = engine.generate(msgs, chat_settings(conversation, decode), use_tts_template=True,
                             generate_audio=True, usage=usage, **_video_settings(conversation))
    return result.text, result.audio_wav, result.sampling_rate


def reply_with_speaker(engine: Engine, conversation: Conversation, decode: DecodeOptions, usage: Any = None,
                       cancel: Any = None):
    """The written half of a spoken answer: (answer text, the prompt's speaker state ``[n, D]``), the same text
    :func:`reply_with_speech` speaks; api.speech ``speak_answer`` / ``stream_answer_speech`` then speak it
    (whole, or as it is synthesised). ``cancel``: an Event that stops the decode when set."""
    from minicpmo_cli.processing.limits import check_prompt_fits

    msgs = conversation.messages(spoken=True)
    check_prompt_fits(engine, msgs, use_tts_template=True, **_video_settings(conversation))
    if not engine.has_tts:
        engine.enable_tts()
    result = engine.generate(msgs, chat_settings(conversation, decode), use_tts_template=True,
                             return_spk_embed=True, usage=usage, cancel=cancel, **_video_settings(conversation))
    return str(result.text or ""), result.spk_embeds


def reply(engine: Engine, conversation: Conversation, decode: DecodeOptions,
          stream: bool = True, usage: Any = None) -> Iterator[str]:
    """Answer the conversation's last user message, yielding text pieces (one piece when not streaming).

    Beam search (``sampling=False``) cannot stream, so it yields the whole answer at once. ``usage``: a
    generation.text.Usage filled with the prompt and completion token counts as the answer is made.
    """
    from minicpmo_cli.processing.limits import check_prompt_fits

    msgs = conversation.messages()
    tts_template = conversation.uses_audio() or conversation.has_voice_prompt()
    check_prompt_fits(engine, msgs, answer_tokens=decode.max_new_tokens if decode else None,
                      use_tts_template=tts_template, **_video_settings(conversation))
    yield from engine.text_pieces(msgs, chat_settings(conversation, decode), stream=stream, usage=usage,
                                  use_tts_template=tts_template, **_video_settings(conversation))


def chat_settings(conversation: Conversation, decode: DecodeOptions | None):
    """The resolved decoding settings of the next answer (a usage error for contradictory options)."""
    return resolve(VIDEO_TASK if conversation.video_mode else CHAT_TASK, decode)


def attach_video(conversation: Conversation, path: str | Path) -> None:
    """Attach a video's frames (1 fps, at most 64) and its sound to the next user message."""
    from minicpmo_cli.api.video import video_message_parts

    parts, sources = video_message_parts(path)
    conversation.pending.parts.extend(parts)
    conversation.pending.sources.extend(sources)
    conversation.video_mode = True
