"""A model-free engine for the CLI's behaviour tests: what the commands do with options, files, formats, exit
codes and the REPL, without the model's arithmetic.

It implements ``minicpmo_cli.api.protocol.Engine`` and ``ModelSteps`` with deterministic answers:

- chat / describe-video / omni text: ``echo: <last user text> [images: N, audio: M]`` (N, M: the images and
  audio clips in the whole prompt the model would see, voice prompts included);
- asr: ``clip 2.50 s`` for a 2.5 s piece (Chinese ``片段 2.50 秒`` when the instruction is Chinese, so
  ``--language auto`` detects zh for it);
- speech: a 220 Hz sine, 4 frames (of 512 samples at 24 kHz) per character of each sentence group, capped
  at ``max_frames`` frames a group as the real synthesis is.

Everything else the commands do runs for real: argument checks, media decoding, the VAD and segmentation,
prompt building and measuring (with the checkpoint's own processor), output files. Every call that reaches
the engine is recorded (:class:`Recorder`), so a test can assert which options reached it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from minicpmo_cli.units import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

SAMPLES_PER_FRAME = 512  # 24 kHz / 46.875 frames a second
FRAMES_PER_CHARACTER = 4
_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass
class Call:
    """One call that reached the engine: its kind and what it was given."""

    kind: str  # generate | transcribe | synthesize | ensure_towers | enable_tts
    msgs: list = field(default_factory=list)
    decode: Any = None  # generate: the resolved DecodeSettings; transcribe: the caller's DecodeOptions
    seed: int | None = None  # generate: the call's seed
    options: dict = field(default_factory=dict)  # the other keyword arguments
    answer: Any = None  # what the engine returned (text, or the texts of a transcribe call)


@dataclass
class Load:
    """One load of the engine: the load options the CLI built and the towers it asked for."""

    options: Any  # api.engine.LoadOptions
    towers: dict


@dataclass
class SpeechOutput:
    """What generate returns with generate_audio or return_spk_embed (the fields the task modules read)."""

    text: str
    audio_wav: Any = None
    sampling_rate: int | None = None
    spk_embeds: Any = None


def echo_answer(msgs: list[dict]) -> str:
    """The fake model's answer to a conversation."""
    users = [m for m in msgs if m.get("role") == "user"]
    parts = list(users[-1]["content"]) if users else []
    text = " ".join(p for p in parts if isinstance(p, str) and p != "<unit>").strip()
    contents = [p for m in msgs for p in (m["content"] if isinstance(m["content"], list) else [m["content"]])]
    images = sum(1 for p in contents if hasattr(p, "size") and hasattr(p, "mode"))  # PIL images
    audio = sum(1 for p in contents if isinstance(p, np.ndarray) and p.ndim == 1)
    return f"echo: {text} [images: {images}, audio: {audio}]"


def speech_samples(text: str, max_frames: int) -> tuple[np.ndarray, bool]:
    """The fake speech of ``text`` (a sine) and whether the frame cap cut it."""
    frames = max(1, FRAMES_PER_CHARACTER * len(text.strip()))
    capped = frames > max_frames
    n = min(frames, max_frames) * SAMPLES_PER_FRAME
    t = np.arange(n, dtype=np.float32) / OUTPUT_SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32), capped


@lru_cache(maxsize=4)
def _processor(folder: str):
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    return MiniCPMOProcessor.from_pretrained(folder)


@lru_cache(maxsize=4)
def _config(folder: str):
    from minicpmo_cli.model.config import MiniCPMOConfig

    return MiniCPMOConfig.from_pretrained(folder)


class FakeModel:
    """What the task modules read of ``engine.model`` besides the towers: the config, ChatTTS's tokenizer."""

    quantization = None

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.config = _config(folder)

    @property
    def tts_processor(self):  # sentence groups are cut with the real tokenizer (api.speech.text_groups)
        return _tts_tokenizer(self.folder)


@lru_cache(maxsize=4)
def _tts_tokenizer(folder: str):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(Path(folder) / "assets" / "chattts_tokenizer"))


class FakeEngine:
    """api.protocol.Engine and ModelSteps without a model; ``calls`` records what reached it."""

    dtype = "float32"
    compile = False

    def __init__(self, folder: str, options: Any, towers: dict, calls: list[Call]) -> None:
        self.options = options
        self.device = "cpu"
        self.towers = dict(towers)
        self.processor = _processor(folder)
        self.model = FakeModel(folder)
        self.calls = calls

    @property
    def has_tts(self) -> bool:
        return bool(self.towers.get("tts"))

    def enable_tts(self) -> None:
        if not self.has_tts:
            self.calls.append(Call("enable_tts"))
        self.towers["tts"] = True

    def ensure_towers(self, vision: bool = False, audio: bool = False) -> list[str]:
        wanted = [name for name, want in (("vision", vision), ("audio", audio)) if want and not self.towers.get(name)]
        self.towers.update({name: True for name in wanted})
        if wanted:
            self.calls.append(Call("ensure_towers", options={"towers": wanted}))
        return wanted

    def generate(self, msgs, settings, *, stream=False, use_tts_template=False, generate_audio=False,
                 omni_input=False, max_slice_nums=None, use_image_id=None, return_spk_embed=False,
                 usage=None, cancel=None) -> Any:
        from minicpmo_cli.api.engine import as_settings

        settings = as_settings(settings)  # as the real engine: a plain DecodeOptions gets the guide's defaults
        answer = echo_answer(msgs)
        if usage is not None:  # one "token" per word, like the pieces streamed
            usage.prompt_tokens, usage.completion_tokens = len(str(msgs).split()), len(answer.split())
        self.calls.append(Call("generate", msgs=msgs, decode=settings.decode, seed=settings.seed, answer=answer,
                               options={"stream": stream, "use_tts_template": use_tts_template,
                                        "generate_audio": generate_audio, "omni_input": omni_input,
                                        "max_slice_nums": max_slice_nums, "use_image_id": use_image_id}))
        if return_spk_embed:
            return SpeechOutput(text=answer, spk_embeds=np.ones((1, 8), np.float32))
        if generate_audio:
            wav, _ = speech_samples(answer, 2048)
            return SpeechOutput(text=answer, audio_wav=wav, sampling_rate=OUTPUT_SAMPLE_RATE)
        return _pieces(answer) if stream else answer

    def text_pieces(self, msgs, settings, *, stream=True, **kwargs) -> Iterator[str]:
        from minicpmo_cli.api.engine import as_settings

        settings = as_settings(settings)
        result = self.generate(msgs, settings, stream=stream and settings.sampling, **kwargs)
        yield from [result] if isinstance(result, str) else result

    # ModelSteps -------------------------------------------------------------------------------------------
    def transcribe_clips(self, clips, instruction, decode) -> list:
        from minicpmo_cli.api.asr import PieceText

        instructions = [instruction] * len(clips) if isinstance(instruction, str) else list(instruction)
        seconds = [len(c) / INPUT_SAMPLE_RATE for c in clips]
        texts = [f"片段 {s:.2f} 秒" if _CJK.search(i) else f"clip {s:.2f} s" for s, i in zip(seconds, instructions)]
        self.calls.append(Call("transcribe", decode=decode, answer=texts,
                               options={"instructions": instructions, "samples": [len(c) for c in clips]}))
        return [PieceText(text) for text in texts]

    def synthesize(self, spk, groups, max_frames, progress: Callable[[int, int], None] | None = None):
        from minicpmo_cli.api.speech import Piece, SpeechResult

        wavs, pieces = [], []
        for number, group in enumerate(groups):
            if progress is not None:
                progress(number, len(groups))
            wav, capped = speech_samples(group, max_frames)
            wavs.append(wav)
            pieces.append(Piece(text=group, samples=len(wav), capped=capped))
        if progress is not None:
            progress(len(groups), len(groups))
        self.calls.append(Call("synthesize", options={"groups": list(groups), "max_frames": max_frames}))
        wav = np.concatenate(wavs) if wavs else np.zeros(0, np.float32)
        return SpeechResult(text=" ".join(groups).strip(), wav=wav, pieces=pieces)


def _pieces(answer: str) -> Iterator[str]:
    words = answer.split(" ")
    yield words[0]
    for word in words[1:]:
        yield " " + word


class Recorder:
    """Installed as ``api.engine.load`` (the one place the CLI creates an engine): loads FakeEngines and keeps
    every load and every call, across all the engines of a test."""

    def __init__(self) -> None:
        self.loads: list[Load] = []
        self.calls: list[Call] = []
        self.engines: list[FakeEngine] = []

    def load(self, options, *, vision: bool = True, audio: bool = True, tts: bool = False,
             warn: Callable[[str], None] | None = None, clock=None) -> FakeEngine:
        from minicpmo_cli.api.engine import LoadOptions, resolve_device, resolve_dtype

        if isinstance(options, str):
            options = LoadOptions(model=options)
        device = resolve_device(options.device, warn)  # the real checks: --device cuda without a GPU, ...
        resolve_dtype(options.dtype, device)
        towers = {"vision": vision, "audio": audio, "tts": tts}
        self.loads.append(Load(options, towers))
        engine = FakeEngine(str(options.model), options, towers, self.calls)
        self.engines.append(engine)
        return engine

    def of_kind(self, kind: str) -> list[Call]:
        return [call for call in self.calls if call.kind == kind]

    @property
    def last(self) -> Call:
        return self.calls[-1]


def main() -> None:
    """`python -m tests.fake_engine ARGS`: the `minicpmo` entry point with the fake engine installed, for the tests
    that need a process of its own (a pseudo-terminal) but not the model."""
    from minicpmo_cli.api import engine as engine_module
    from minicpmo_cli.cli.app import main as cli_main

    engine_module.load = Recorder().load
    cli_main(sys.argv[1:])


if __name__ == "__main__":
    main()
