"""Request bodies as the official `openai` client sends them (pydantic); unknown fields are ignored.

Fields past OpenAI's (top_k, repetition_penalty, num_beams, sampling; reference_audio, mode, language,
verbatim, max_audio_seconds for speech) are extensions the CLI's --server mode uses to ask for exactly what
the local command would do; stock clients never send them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]], None] = None


class AudioOutput(_Body):
    voice: str = "alloy"
    format: Literal["wav", "pcm16", "mp3", "flac", "opus"] = "wav"


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    modalities: Optional[list[Literal["text", "audio"]]] = None
    audio: Optional[AudioOutput] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1)
    # extensions
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    num_beams: Optional[int] = Field(None, ge=1)
    sampling: Optional[bool] = None
    language: Literal["en", "zh"] = "en"  # of the spoken-answer system prompt

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    @property
    def wants_audio(self) -> bool:
        return bool(self.modalities and "audio" in self.modalities)


class SpeechRequest(_Body):
    model: str
    input: str = Field(min_length=1, max_length=20000)
    voice: str = "alloy"
    instructions: Optional[str] = None
    response_format: Literal["wav", "pcm", "flac", "mp3", "opus", "aac"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # extensions
    reference_audio: Optional[str] = None  # base64 of an audio file: clone this voice
    mode: Optional[Literal["clone", "assistant", "roleplay"]] = None
    language: Literal["en", "zh"] = "en"
    verbatim: bool = True
    max_audio_seconds: Optional[float] = Field(None, gt=0.0)
    seed: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    max_new_tokens: Optional[int] = Field(None, ge=1)
    sampling: Optional[bool] = None
