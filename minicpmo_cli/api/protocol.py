"""What the task functions of this package (api/chat, asr, speech, video) ask of an engine.

``api.engine.Engine`` is the real one: the model on a device, with its processor. Anything else that has
these members can stand in for it, e.g. the test suite's fake engine, which answers the CLI's commands
without the model (deterministic text and audio, no torch work) so that options, files, formats, exit codes
and the REPL are tested without the model's arithmetic.

A few steps of the tasks reach past ``generate`` into the model's towers (asr's batched decode, the speech
synthesis of sentence groups). The task modules run those steps on ``engine.model`` themselves; an engine
that is not backed by a model provides them as methods (:class:`ModelSteps`) and the task modules call
those instead (:func:`own_steps`). The real engine has none of them: its model does the work.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    """The members every engine has (see api.engine.Engine for what each does)."""

    device: str  # "cpu", "cuda", "cuda:N"
    towers: dict[str, bool]  # which of vision / audio / tts are loaded
    processor: Any  # MiniCPMOProcessor: prompts are measured with it before any model work (processing/limits)
    model: Any  # the model, or an object with its ``config`` (the context length is read from it)

    @property
    def has_tts(self) -> bool: ...

    def enable_tts(self) -> None:
        """Load the speech tower into an engine loaded without it."""

    def ensure_towers(self, vision: bool = False, audio: bool = False) -> list[str]:
        """Load the vision / audio tower if missing; returns the towers it loaded."""

    def generate(self, msgs: list[dict], settings: Any, *, stream: bool = False, use_tts_template: bool = False,
                 generate_audio: bool = False, omni_input: bool = False, max_slice_nums: int | None = None,
                 use_image_id: bool | None = None, return_spk_embed: bool = False, usage: Any = None,
                 cancel: Any = None) -> Any:
        """Messages -> the answer: a str, an iterator of text pieces (``stream``), or a result with ``text``
        and ``audio_wav`` / ``sampling_rate`` (``generate_audio``) or ``spk_embeds`` (``return_spk_embed``).
        ``settings``: the call's resolved TaskSettings (generation/presets.py), seed included; ``usage``: a
        generation.text.Usage to fill with the call's token counts; ``cancel``: an Event that stops the
        decode when set (None: runs to the end)."""

    def text_pieces(self, msgs: list[dict], settings: Any, *, stream: bool = True, **kwargs: Any) -> Iterator[str]:
        """The answer as text pieces (streamed when sampling, one piece with beam search)."""


@runtime_checkable
class ModelSteps(Protocol):
    """The steps the task modules otherwise run on ``engine.model`` themselves."""

    def transcribe_clips(self, clips: list, instruction: str | list[str], decode: Any) -> list:
        """api.asr.generate_batch: the answer (a PieceText) to ``[instruction, clip]`` for each clip."""

    def synthesize(self, spk: Any, groups: list[str], max_frames: int,
                   progress: Callable[[int, int], None] | None = None) -> Any:
        """api.speech's synthesis: speak each sentence group with the speaker state ``spk`` -> SpeechResult
        (24 kHz float32, one Piece per group, at most ``max_frames`` frames a group)."""


def own_steps(engine: Any) -> ModelSteps | None:
    """``engine`` when it runs the model steps itself (an engine not backed by a model), else None."""
    return engine if isinstance(engine, ModelSteps) else None
