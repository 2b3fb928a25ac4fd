"""A live session's settings as OpenAI's Realtime ``session`` object: read from ``session.update``, echoed
in ``session.created`` / ``session.updated``.

Supported: ``instructions``, ``audio.output.voice``, ``audio.input.format`` / ``audio.output.format``
(``audio/pcm`` at 24 kHz only), ``audio.input.turn_detection`` (``server_vad`` with ``threshold``,
``prefix_padding_ms``, ``silence_duration_ms``, ``interrupt_response``, ``create_response``; or null for
manual turns), ``output_modalities`` (``["audio"]`` or ``["text"]``), ``max_output_tokens``, ``truncation``
(``"auto"``, the default, ``"disabled"``, or ``{"type": "retention_ratio", "retention_ratio": 0.0-1.0,
"token_limits": {"post_instructions": N}}``; see api/live_model.py for what it does). The beta
names (top-level ``voice``, ``turn_detection``, ``input_audio_format: "pcm16"``) are read too. One
extension: ``seed`` (an integer) makes the session's answers reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from minicpmo_cli.media.vad_stream import DEFAULT_PREFIX_PADDING_MS, DEFAULT_SILENCE_MS, DEFAULT_THRESHOLD
from minicpmo_cli.units import OUTPUT_SAMPLE_RATE

PCM_FORMAT = {"type": "audio/pcm", "rate": OUTPUT_SAMPLE_RATE}
MAX_OUTPUT_TOKENS = 4096
# "auto" forgets the oldest turns until the conversation (after the system prompt) uses at most this share
# of the positions it may use: a truncation then buys several turns before the next one (each replays the
# kept turns through the LLM), as OpenAI's retention_ratio advises.
AUTO_RETENTION_RATIO = 0.75


class LiveError(Exception):
    """A client mistake in one event: answered with an ``error`` event; the session goes on."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True)
class TurnDetection:
    threshold: float = DEFAULT_THRESHOLD
    prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS
    silence_duration_ms: int = DEFAULT_SILENCE_MS
    interrupt_response: bool = True
    create_response: bool = True

    def to_json(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "interrupt_response": self.interrupt_response,
                "create_response": self.create_response, "idle_timeout_ms": None}


@dataclass(frozen=True)
class Truncation:
    """What happens when the conversation would outgrow the model's context (OpenAI's RealtimeTruncation)."""

    kind: str = "auto"  # auto | disabled | retention_ratio
    retention_ratio: float = AUTO_RETENTION_RATIO
    post_instructions: int | None = None  # token_limits.post_instructions: a lower limit after the system prompt

    def to_json(self) -> str | dict:
        if self.kind != "retention_ratio":
            return self.kind
        limits = None if self.post_instructions is None else {"post_instructions": self.post_instructions}
        return {"type": "retention_ratio", "retention_ratio": self.retention_ratio, "token_limits": limits}


@dataclass(frozen=True)
class SessionConfig:
    model: str
    instructions: str | None = None
    voice: str = "alloy"
    turn_detection: TurnDetection | None = TurnDetection()
    speak: bool = True  # output_modalities ["audio"] (False: ["text"])
    max_output_tokens: int | None = None
    seed: int | None = None
    truncation: Truncation = Truncation()

    def to_json(self, session_id: str) -> dict:
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": self.model,
            "output_modalities": ["audio"] if self.speak else ["text"], "instructions": self.instructions or "",
            "audio": {
                "input": {"format": PCM_FORMAT, "transcription": None, "noise_reduction": None,
                          "turn_detection": None if self.turn_detection is None else self.turn_detection.to_json()},
                "output": {"format": PCM_FORMAT, "voice": self.voice, "speed": 1.0},
            },
            "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
            "tools": [], "tool_choice": "auto", "tracing": None, "truncation": self.truncation.to_json(),
            "seed": self.seed,
        }

    def updated(self, session: dict) -> SessionConfig:
        """This config with ``session``'s fields applied; LiveError naming the first bad field."""
        changes: dict[str, Any] = {}
        kind = session.get("type")
        if kind not in (None, "realtime"):
            raise LiveError(f"session.type {kind!r} is not supported here (use 'realtime')", "invalid_value",
                            "session.type")
        if "instructions" in session:
            changes["instructions"] = _optional_str(session["instructions"], "session.instructions")
        audio = _object(session.get("audio"), "session.audio")
        inputs = _object(audio.get("input"), "session.audio.input")
        outputs = _object(audio.get("output"), "session.audio.output")
        for where, fmt in (("session.audio.input.format", inputs.get("format")),
                           ("session.audio.output.format", outputs.get("format")),
                           ("session.input_audio_format", session.get("input_audio_format")),
                           ("session.output_audio_format", session.get("output_audio_format"))):
            _check_format(fmt, where)
        voice = outputs.get("voice", session.get("voice"))
        if voice is not None:
            if not isinstance(voice, str) or not voice:
                raise LiveError("voice must be a voice name", "invalid_value", "session.audio.output.voice")
            changes["voice"] = voice
        for where, holder in (("session.audio.input.turn_detection", inputs),
                              ("session.turn_detection", session)):
            if "turn_detection" in holder:
                changes["turn_detection"] = _turn_detection(holder["turn_detection"], where, self.turn_detection)
        modalities = session.get("output_modalities", session.get("modalities"))
        if modalities is not None:
            changes["speak"] = _speak(modalities)
        if "max_output_tokens" in session or "max_response_output_tokens" in session:
            changes["max_output_tokens"] = _max_tokens(session.get("max_output_tokens",
                                                                   session.get("max_response_output_tokens")))
        if "seed" in session:
            seed = session["seed"]
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise LiveError("session.seed must be an integer or null", "invalid_value", "session.seed")
            changes["seed"] = seed
        if "truncation" in session:
            changes["truncation"] = _truncation(session["truncation"])
        return replace(self, **changes)


def _object(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LiveError(f"{where} must be an object", "invalid_value", where)
    return value


def _optional_str(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise LiveError(f"{where} must be a string", "invalid_value", where)
    return value or None


def _check_format(fmt: Any, where: str) -> None:
    if fmt is None or fmt == "pcm16":
        return
    if isinstance(fmt, dict) and fmt.get("type") in ("audio/pcm", None) \
            and fmt.get("rate", OUTPUT_SAMPLE_RATE) == OUTPUT_SAMPLE_RATE:
        return
    raise LiveError(f"{where}: only audio/pcm at {OUTPUT_SAMPLE_RATE} Hz (16-bit mono) is supported, got {fmt!r}",
                    "unsupported_audio_format", where)


def _turn_detection(value: Any, where: str, current: TurnDetection | None) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LiveError(f"{where} must be an object or null", "invalid_value", where)
    if value.get("type", "server_vad") != "server_vad":
        raise LiveError(f"{where}.type {value.get('type')!r} is not supported (server_vad, or null for manual "
                        "turns)", "unsupported_turn_detection", f"{where}.type")
    base = current or TurnDetection()
    changes: dict[str, Any] = {}
    threshold = value.get("threshold")
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise LiveError(f"{where}.threshold must be a number between 0 and 1", "invalid_value",
                            f"{where}.threshold")
        changes["threshold"] = float(threshold)
    for name, low, high in (("prefix_padding_ms", 0, 5000), ("silence_duration_ms", 32, 10000)):
        number = value.get(name)
        if number is not None:
            if not isinstance(number, int) or isinstance(number, bool) or not low <= number <= high:
                raise LiveError(f"{where}.{name} must be an integer from {low} to {high}", "invalid_value",
                                f"{where}.{name}")
            changes[name] = number
    for name in ("interrupt_response", "create_response"):
        if value.get(name) is not None:
            if not isinstance(value[name], bool):
                raise LiveError(f"{where}.{name} must be true or false", "invalid_value", f"{where}.{name}")
            changes[name] = value[name]
    return replace(base, **changes)


def _speak(modalities: Any) -> bool:
    if not isinstance(modalities, list) or not modalities or any(m not in ("audio", "text") for m in modalities):
        raise LiveError("output_modalities must be ['audio'] or ['text']", "invalid_value",
                        "session.output_modalities")
    return "audio" in modalities


def _max_tokens(value: Any) -> int | None:
    if value in (None, "inf"):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_OUTPUT_TOKENS:
        raise LiveError(f"max_output_tokens must be 'inf' or an integer from 1 to {MAX_OUTPUT_TOKENS}",
                        "invalid_value", "session.max_output_tokens")
    return value


def _truncation(value: Any) -> Truncation:
    where = "session.truncation"
    if value in ("auto", "disabled"):
        return Truncation(kind=value)
    if not isinstance(value, dict) or value.get("type") != "retention_ratio":
        raise LiveError(f"{where} must be 'auto', 'disabled' or {{'type': 'retention_ratio', "
                        f"'retention_ratio': 0.0-1.0}}, got {value!r}", "invalid_value", where)
    ratio = value.get("retention_ratio")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio <= 1.0:
        raise LiveError(f"{where}.retention_ratio must be a number from 0.0 to 1.0, got {ratio!r}",
                        "invalid_value", f"{where}.retention_ratio")
    limits = _object(value.get("token_limits"), f"{where}.token_limits")
    post = limits.get("post_instructions")
    if post is not None and (not isinstance(post, int) or isinstance(post, bool) or post < 1):
        raise LiveError(f"{where}.token_limits.post_instructions must be a positive integer, got {post!r}",
                        "invalid_value", f"{where}.token_limits.post_instructions")
    return Truncation(kind="retention_ratio", retention_ratio=float(ratio), post_instructions=post)
