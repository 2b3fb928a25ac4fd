"""Request bodies as the official `openai` client sends them (pydantic); unknown fields are ignored.

Every field has a type and every number a bound, so that no client mistake reaches the model as a value it
cannot take (a 400 naming the field instead of a 500): content parts are typed by their ``type``, floats
must be finite (JSON's ``Infinity`` and ``NaN`` are refused), seeds fit 64 bits, and text may not hold lone
surrogates (which no UTF-8 encoder takes). Counts are capped (messages, parts, stop strings), so no request
is large in a way the byte limit does not already see.

Fields past OpenAI's (top_k, repetition_penalty, num_beams, sampling; reference_audio, mode, language,
verbatim, max_audio_seconds for speech) are extensions the CLI's --server mode uses to ask for exactly what
the local command would do; stock clients never send them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_MESSAGES = 2048  # OpenAI's own limit
MAX_PARTS = 256  # content parts in one request, all messages together
MAX_MEDIA_PARTS = 64  # images, audio clips and videos in one request
MAX_STOPS = 4  # as OpenAI
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what the random generators take
MAX_URL = 64 * 1024 * 1024  # characters of a data: URL (the body limit is the real bound)
MAX_NAME = 256  # model and voice names
MAX_VIDEO_FRAMES = 64  # frames sampled from one video at most (api/video.py MAX_FRAMES)
MAX_VIDEO_FPS = 30.0  # frames a second a video_url may ask to be sampled at


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Request(_Body):
    """A whole request body: its text is checked for lone surrogates first, wherever it is."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        where = _surrogate_at(data, "")
        if where is not None:
            raise PydanticCustomError("lone_surrogate", "{where}: the text holds a lone surrogate (not valid "
                                      "Unicode; encode text as UTF-8)", {"where": where or "body"})
        return data


def _surrogate_at(value: Any, where: str) -> str | None:
    """The path of the first string (or key) in ``value`` with a lone surrogate; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            found = _surrogate_at(key, path) if isinstance(key, str) else None
            found = found if found is not None else _surrogate_at(item, path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _surrogate_at(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------------------------------ content parts
class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str = Field(max_length=MAX_URL)
    detail: Optional[Literal["auto", "low", "high"]] = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Body):
    data: str = Field(max_length=MAX_URL)
    format: Optional[str] = Field(None, max_length=16)  # wav, mp3 (OpenAI's); any container the decoders read


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(_Body):
    url: str = Field(max_length=MAX_URL)
    # Extensions (describe-video --fps / --max-frames): how the frames are sampled; at most the guide's 64
    # frames, so one video's memory stays what the default asks.
    fps: Optional[float] = Field(None, gt=0, le=MAX_VIDEO_FPS)
    max_frames: Optional[int] = Field(None, ge=1, le=MAX_VIDEO_FRAMES)


class VideoPart(_Body):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart, VideoPart], Field(discriminator="type")]
PART_TYPES = ("text", "image_url", "input_audio", "video_url")


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    # Parts are checked against their types, then kept as plain dicts: what the chat route reads.
    content: Union[str, list[ContentPart], None] = None

    @field_validator("content", mode="after")
    @classmethod
    def _as_dicts(cls, content: Any) -> Any:
        return [part.model_dump(exclude_none=True) for part in content] if isinstance(content, list) else content


# ------------------------------------------------------------------------------------------ requests
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
TopK = Annotated[int, Field(ge=0, le=1_000_000)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=100.0)]  # the logits are divided or multiplied by it


class AudioOutput(_Body):
    voice: str = Field("alloy", max_length=MAX_NAME)
    format: Literal["wav", "pcm16", "mp3", "flac", "opus"] = "wav"


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Request):
    model: str = Field(max_length=MAX_NAME)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    modalities: Optional[list[Literal["text", "audio"]]] = Field(None, max_length=2)
    audio: Optional[AudioOutput] = None
    max_tokens: Optional[int] = Field(None, ge=1)  # bounded by the model's context in the route
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[Seed] = None
    stop: Union[Annotated[str, Field(max_length=MAX_NAME)],
                Annotated[list[Annotated[str, Field(max_length=MAX_NAME)]], Field(max_length=MAX_STOPS)],
                None] = None
    n: Optional[int] = Field(None, ge=1, le=128)
    # extensions
    top_k: Optional[TopK] = None
    repetition_penalty: Optional[RepetitionPenalty] = None
    num_beams: Optional[int] = Field(None, ge=1, le=16)
    sampling: Optional[bool] = None
    language: Literal["en", "zh"] = "en"  # of the spoken-answer system prompt

    @model_validator(mode="after")
    def _part_counts(self) -> "ChatRequest":
        parts = [p for m in self.messages if isinstance(m.content, list) for p in m.content]
        if len(parts) > MAX_PARTS:
            raise PydanticCustomError("too_many_parts", "messages: {count} content parts; at most {limit} in a "
                                      "request", {"count": len(parts), "limit": MAX_PARTS})
        media = sum(p["type"] != "text" for p in parts)
        if media > MAX_MEDIA_PARTS:
            raise PydanticCustomError("too_many_parts", "messages: {count} images, audio clips and videos; at "
                                      "most {limit} in a request", {"count": media, "limit": MAX_MEDIA_PARTS})
        return self

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    @property
    def wants_audio(self) -> bool:
        return bool(self.modalities and "audio" in self.modalities)

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def text_chars(self) -> int:
        """Characters of text in all messages (a cheap bound on the prompt, before any tokenizing)."""
        return sum(len(m.content) if isinstance(m.content, str) else
                   sum(len(p["text"]) for p in m.content if p["type"] == "text")
                   for m in self.messages if m.content)


class SpeechRequest(_Request):
    model: str = Field(max_length=MAX_NAME)
    input: str = Field(min_length=1, max_length=20000)
    voice: str = Field("alloy", max_length=MAX_NAME)
    instructions: Optional[str] = Field(None, max_length=4096)
    response_format: Literal["wav", "pcm", "flac", "mp3", "opus", "aac"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # extensions
    reference_audio: Optional[str] = Field(None, max_length=MAX_URL)  # base64 of an audio file: clone this voice
    mode: Optional[Literal["clone", "assistant", "roleplay"]] = None
    language: Literal["en", "zh"] = "en"
    verbatim: bool = True
    max_audio_seconds: Optional[float] = Field(None, gt=0.0, le=3600.0)
    seed: Optional[Seed] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=10.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[TopK] = None
    repetition_penalty: Optional[RepetitionPenalty] = None
    max_new_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    sampling: Optional[bool] = None
