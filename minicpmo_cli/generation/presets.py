"""Every task's decoding defaults in one table, and the one function that turns a user's choices into settings.

- :class:`DecodeOptions`: what a caller chose (the CLI's flags, the server's JSON fields, a library call);
  ``None`` means "the task's default".
- :data:`PRESETS`: per task, the usage guide's defaults (the reference's where the guide is silent), with the
  place each number comes from. This is the only home of ``max_new_tokens`` defaults.
- :func:`resolve`: (task, DecodeOptions) -> :class:`TaskSettings`, frozen and fully resolved (a
  :class:`~minicpmo_cli.generation.decode.DecodeSettings` plus the per-call seed). A contradictory
  combination, or an option that does not fit the chosen mode, is refused with a UsageError naming the
  parameters; nothing is dropped silently.

The reference's two modes (spec vision-llm §8) are the base every preset starts from: sampling (top_p 0.8,
top_k 100, temperature 0.7, repetition penalty 1.05) or, without sampling, beam search (3 beams, repetition
penalty 1.2). A preset changes some of those values for its task.

No torch here (imported by the CLI before any model work).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from minicpmo_cli.errors import UsageError

# The reference chat()'s decoding settings for each mode (vision-llm spec §8).
REFERENCE_SAMPLING = MappingProxyType({"top_p": 0.8, "top_k": 100, "temperature": 0.7, "repetition_penalty": 1.05})
REFERENCE_BEAM = MappingProxyType({"num_beams": 3, "repetition_penalty": 1.2})
SAMPLING_ONLY = ("temperature", "top_p", "top_k")  # options that mean nothing without sampling


@dataclass(frozen=True)
class DecodeOptions:
    """A caller's decoding choices; None means "the task's default" (see PRESETS)."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    sampling: bool | None = None  # True: top-p/top-k sampling; False: beam search (or greedy, see presets)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None
    seed: int | None = None  # seeds the random generators right before this call (same seed: same ids)

    def __post_init__(self) -> None:
        _check_mode(self.sampling, self.num_beams)

    def chosen(self) -> dict[str, Any]:
        """The options the caller set (not None)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Preset:
    """A task's defaults: the mode used when the caller does not choose, the answer length, and the values
    that differ from the reference's mode settings (``sampled`` in sampling mode, ``deterministic`` else)."""

    sampling: bool
    max_new_tokens: int
    sampled: Mapping[str, Any] = field(default_factory=dict)
    deterministic: Mapping[str, Any] = field(default_factory=dict)


PRESETS: Mapping[str, Preset] = MappingProxyType({
    # The guide's "Chat with single image / multiple images / few-shot": generate(sampling=True,
    # max_new_tokens=1024). Text chat, the REPL and the server's /v1/chat/completions.
    "chat": Preset(sampling=True, max_new_tokens=1024),
    # The guide's "Chat with video": sampling=True, max_new_tokens=1024 (plus its processing settings,
    # use_image_id=False and max_slice_nums=2, which api/video.py passes to the processor).
    "describe-video": Preset(sampling=True, max_new_tokens=1024),
    # ASR is ours, not the guide's (its ASR snippet samples at temperature 0.3 with 128 new tokens): greedy
    # by default (one beam, no repetition penalty: the beam mode's 1.2 punishes words that really repeat in
    # speech), 512 tokens for a 30 s piece of fast speech. --sampling gives the guide's temperature 0.3.
    "asr": Preset(sampling=False, max_new_tokens=512, sampled={"temperature": 0.3},
                  deterministic={"num_beams": 1, "repetition_penalty": 1.0}),
    # Every speech example of the guide (Mimick, configurable voices, assistant, voice creation, cloning):
    # sampling=True, max_new_tokens=128, temperature=0.3. tts, clone, mimick and speech-to-speech use it.
    "speech": Preset(sampling=True, max_new_tokens=128, sampled={"temperature": 0.3}),
    # The speaker state of the TTS prompt (tts --verbatim): the prompt pass's <|spk|> row is all that is
    # wanted, the same for any decoding, so one greedy token is generated.
    "speaker-state": Preset(sampling=False, max_new_tokens=1, deterministic={"num_beams": 1}),
    # The guide's omni "Normal generate inference": sampling=True, temperature=0.5, max_new_tokens=4096,
    # repetition_penalty=1.2.
    "omni": Preset(sampling=True, max_new_tokens=4096, sampled={"temperature": 0.5, "repetition_penalty": 1.2}),
    # The reference's streaming_generate defaults (the guide's "Streaming inference" sets none):
    # sampling, max_new_tokens=512, the reference sampling values; without sampling the session decodes
    # greedily (with the beam mode's repetition penalty 1.2): beam search cannot stream.
    "omni-stream": Preset(sampling=True, max_new_tokens=512, deterministic={"num_beams": 1}),
    # The reference generate()/chat() signature defaults (sampling=True, max_new_tokens=2048): what the
    # guide's own calls get for what they leave out.
    "guide": Preset(sampling=True, max_new_tokens=2048),
})
# A live turn's transcript of what the user said (realtime `conversation.item.done`): asr's greedy decoding,
# with room for the speech of one turn rather than a whole recording.
LIVE_TRANSCRIPT_TOKENS = 128


@dataclass(frozen=True)
class TaskSettings:
    """One call's fully resolved settings: how to decode, and the seed to draw with (None: unseeded)."""

    decode: Any  # generation.decode.DecodeSettings (stop ids are the tokenizer's, added where it is known)
    seed: int | None = None

    @property
    def sampling(self) -> bool:
        return self.decode.sampling

    @property
    def max_new_tokens(self) -> int:
        return self.decode.max_new_tokens


def preset(task: str) -> Preset:
    try:
        return PRESETS[task]
    except KeyError:
        raise UsageError(f"no decoding preset for task {task!r}; known: {', '.join(PRESETS)}",
                         parameters=("task",)) from None


def resolve(task: str | Preset, options: DecodeOptions | None = None) -> TaskSettings:
    """The task's preset overridden by what the caller set -> frozen, validated settings.

    The mode is the caller's ``sampling`` when set, else beam search when they asked for ``num_beams > 1``,
    else the preset's. Refused: sampling with ``num_beams > 1``, and temperature/top_p/top_k without sampling.
    """
    from minicpmo_cli.generation.settings import DecodeSettings

    chosen = task if isinstance(task, Preset) else preset(task)
    options = options or DecodeOptions()
    sampling = options.sampling
    if sampling is None:
        sampling = False if (options.num_beams or 1) > 1 else chosen.sampling
    _check_mode(sampling, options.num_beams)
    misfits = [name for name in SAMPLING_ONLY if getattr(options, name) is not None] if not sampling else []
    if misfits:
        raise UsageError(f"{', '.join(misfits)} only {'applies' if len(misfits) == 1 else 'apply'} with "
                         f"sampling; this call decodes by {_mode_name(chosen, options)} (set sampling=True, "
                         f"or leave out {' and '.join(misfits)})", parameters=("sampling", *misfits))
    values = dict(REFERENCE_SAMPLING if sampling else REFERENCE_BEAM)
    values.update(chosen.sampled if sampling else chosen.deterministic)
    values.update({k: v for k, v in options.chosen().items() if k not in ("sampling", "seed")})
    values.setdefault("max_new_tokens", chosen.max_new_tokens)
    values["min_new_tokens"] = values.get("min_new_tokens") or 0
    if sampling:
        values.pop("num_beams", None)
    return TaskSettings(decode=DecodeSettings(sampling=sampling, **values), seed=options.seed)


def _check_mode(sampling: bool | None, num_beams: int | None) -> None:
    if sampling and num_beams is not None and num_beams > 1:
        raise UsageError(f"sampling and num_beams={num_beams} contradict each other: beam search does not "
                         "sample (use one of sampling=True, num_beams)", parameters=("sampling", "num_beams"))


def _mode_name(chosen: Preset, options: DecodeOptions) -> str:
    """What a call without sampling does: beam search, or greedy search with one beam."""
    beams = options.num_beams
    if beams is None:
        beams = {**REFERENCE_BEAM, **chosen.deterministic}["num_beams"]
    return "beam search" if beams > 1 else "greedy search"
