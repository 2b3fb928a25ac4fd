"""Loading a model for a task, choosing device and dtype, and the one generate call every task goes through."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator

from minicpmo_cli.errors import ModelLoadError
from minicpmo_cli.generation.presets import REFERENCE_SAMPLING, DecodeOptions, TaskSettings, resolve
from minicpmo_cli.model.devices import DTYPES, check_dtype_name, resolve_device, resolve_dtype
from minicpmo_cli.startup import StartupClock, mark

__all__ = ["DEFAULT_MODEL", "DTYPES", "REFERENCE_SAMPLING", "DecodeOptions", "Engine", "LoadOptions", "TaskSettings",
           "load", "resolve", "resolve_device", "resolve_dtype", "seed_everything"]

DEFAULT_MODEL = "openbmb/MiniCPM-o-2_6"
DEFAULT_MAX_BATCH = 16  # requests decoded together when neither max_batch nor a KV budget says


@dataclass(frozen=True)
class LoadOptions:
    model: str = DEFAULT_MODEL  # hub id or local checkpoint folder
    revision: str | None = None  # hub branch, tag or commit
    offline: bool = False  # cached files only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    step: str | None = None  # eager | trace | graph | compile; None: MINICPMO_STEP, else graph (CUDA) or trace
    compile: bool | None = None  # the older switch, an alias: True -> step "compile", False -> "eager"
    max_batch: int | None = 16  # KV slots of the LLM engine (requests decoded together); None: from the budget
    kv_cache_gb: float | None = None  # the KV slots' memory budget; None: on CUDA a share of the free memory
    quantize: str | None = None  # none | int8 | int4 (LLM decoder linears); None: as the checkpoint is


@dataclass
class Engine:
    """A loaded model with its processor, ready for the task functions of this package."""

    model: Any
    processor: Any
    device: str
    dtype: Any
    options: LoadOptions
    towers: dict[str, bool] = field(default_factory=dict)
    llm_engine: Any = None  # generation/engine.py LLMEngine: every greedy/sampled answer decodes on it
    tts_runner: Any = None  # generation/step_runner.py StepRunner of the TTS frame loop
    tts_frames: Any = None  # generation/tts_engine.py TTSEngine, made by frame_engine() on first use
    _tts_frames_lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def frame_engine(self):
        """The TTS engine (generation/tts_engine.py): the audio frames of every caller's utterances decode
        batched in it. Made on first use, with as many slots as the LLM engine and the TTS's step mode."""
        with self._tts_frames_lock:
            if self.tts_frames is None:
                from minicpmo_cli.generation.step_runner import StepRunner
                from minicpmo_cli.generation.tts_engine import TTSEngine

                mode = self.tts_runner.mode if self.tts_runner is not None else self.step_mode
                self.tts_frames = TTSEngine(self.model.tts, self.model.tts_processor,
                                            max_batch=self.options.max_batch, runner=StepRunner(mode, "TTS batch"))
            return self.tts_frames

    @cached_property
    def context(self) -> int:
        """The LLM's context in positions (read from the config once: its attribute reads are slow)."""
        from minicpmo_cli.processing.limits import context_limit

        return context_limit(self.model.config)

    @property
    def has_tts(self) -> bool:
        return bool(self.towers.get("tts")) and getattr(self.model, "vocos", None) is not None

    def enable_tts(self) -> None:
        """Load the speech tower into an engine loaded without it (the REPL's /speak on): only tts.* is read."""
        if self.has_tts:
            return
        from minicpmo_cli.model.loading import attach_towers

        attach_towers(self.model, ["tts"], self.device, self.dtype)
        self.model.init_tts()
        self.towers["tts"] = True

    @property
    def step_mode(self) -> str:
        """How decode steps run: eager | trace | graph | compile (generation/step_runner.py), fixed at load."""
        return self.llm_engine.runner.mode if self.llm_engine is not None else step_mode(self.options, self.device)

    def ensure_towers(self, vision: bool = False, audio: bool = False) -> list[str]:
        """Load the vision/audio tower into an engine loaded without it (the REPL's /image, /audio, /video):
        only that tower's tensors are read. Returns the towers it loaded."""
        from minicpmo_cli.model.loading import attach_towers

        wanted = [name for name, want in (("vision", vision), ("audio", audio)) if want and not self.towers.get(name)]
        attach_towers(self.model, wanted, self.device, self.dtype)
        self.towers.update({name: True for name in wanted})
        return wanted

    def generate(self, msgs: list[dict], settings: TaskSettings | DecodeOptions, *, stream: bool = False,
                 use_tts_template: bool = False, generate_audio: bool = False, omni_input: bool = False,
                 max_slice_nums: int | None = None, use_image_id: bool | None = None,
                 return_spk_embed: bool = False, usage: Any = None, cancel: Any = None) -> Any:
        """Messages -> the model's answer (str), an iterator of text pieces, or a dict result with audio.

        ``settings``: the call's resolved settings (generation/presets.py resolve); its seed, if any, gives
        each answer row a private generator (the same answer alone or next to other requests on the engine)
        and seeds the global generators right before this call (what the speech draws from). A DecodeOptions
        is resolved with the guide's generate() defaults (the "guide" preset). ``usage``: a generation.text.Usage this call's token counts
        are written to (the server's usage numbers; nothing is attached to the shared model). ``cancel``: a
        threading.Event whose setting stops the decode (a server request whose client left).
        """
        import torch

        from minicpmo_cli.generation.text import generate

        settings = as_settings(settings)
        inputs = self.processor.apply_chat_template(
            msgs=msgs, omni_input=omni_input, max_slice_nums=max_slice_nums, use_image_id=use_image_id,
            use_tts_template=use_tts_template,
        ).to(self.device)
        seed_call(settings.seed)
        with torch.inference_mode():
            return generate(
                self.model, **inputs, processor=self.processor, stream=stream, use_tts_template=use_tts_template,
                generate_audio=generate_audio, return_dict=generate_audio, return_spk_embed=return_spk_embed,
                engine=self.llm_engine, tts_runner=self.tts_runner, seed=settings.seed, decode=settings.decode,
                usage=usage, cancel=cancel,
            )

    def text_pieces(self, msgs: list[dict], settings: TaskSettings | DecodeOptions, *, stream: bool = True,
                    **kwargs: Any) -> Iterator[str]:
        """The answer as text pieces: streamed when sampling or greedy, one piece with beam search (which cannot
        stream)."""
        settings = as_settings(settings)
        result = self.generate(msgs, settings, stream=stream and not settings.decode.beam_search, **kwargs)
        if isinstance(result, str):
            yield result
        else:
            yield from result


def step_mode(options: LoadOptions, device) -> str:
    """The step mode of ``options`` on ``device`` (``step``, else the ``compile`` alias, else the default)."""
    from minicpmo_cli.generation.step_runner import resolve_step

    mode = options.step
    if mode is None and options.compile is not None:
        mode = "compile" if options.compile else "eager"
    return resolve_step(mode, device)


def make_engines(model, options: LoadOptions, device):
    """(LLMEngine, TTS StepRunner) of a loaded model, in the step mode resolved once here; the LLM engine's
    KV budget and batch from :func:`kv_plan`."""
    from minicpmo_cli.generation.engine import LLMEngine
    from minicpmo_cli.generation.step_runner import StepRunner

    mode = step_mode(options, device)
    budget, max_batch = kv_plan(model.llm, options, device)
    llm_engine = LLMEngine(model.llm, runner=StepRunner(mode, "decode"), max_batch=max_batch, kv_budget=budget,
                           threads=engine_threads(model.llm, device))
    return llm_engine, StepRunner(mode, "TTS")


SMALL_HIDDEN = 1024  # below this width a decode step's matrices are too small for intra-op threads to pay


def engine_threads(llm, device) -> int | None:
    """Intra-op threads of the LLM engine's thread: one on the CPU for a small decoder (measured on the tiny
    checkpoint, 2 cores: a 16-row step took 2x longer on two threads than on one, the time going to waking
    OpenMP workers for matrices of 128 columns), else torch's default (None)."""
    if str(device).startswith("cuda") or getattr(llm.config, "hidden_size", SMALL_HIDDEN) >= SMALL_HIDDEN:
        return None
    return 1


def kv_plan(llm, options: LoadOptions, device) -> tuple[int | None, int]:
    """(KV budget in bytes or None, requests decoded together) of a loaded LLM: ``kv_cache_gb`` if given, else
    on CUDA a share of the memory free now (generation/kv_budget.py); ``max_batch`` if given, else what the
    budget holds at the default slot capacity (16 without a budget)."""
    from minicpmo_cli.generation import kv_budget

    budget = None if options.kv_cache_gb is None else int(options.kv_cache_gb * kv_budget.GIB)
    if budget is None and str(device).startswith("cuda"):
        import torch

        budget = kv_budget.budget_from_free(torch.cuda.mem_get_info(torch.device(device))[0])
    if options.max_batch is not None:
        return budget, options.max_batch
    if budget is None:
        return None, DEFAULT_MAX_BATCH
    context = getattr(llm.config, "max_position_embeddings", None)
    return budget, kv_budget.plan(llm.config, llm.lm_head.weight.element_size(), budget, context).max_batch


def as_settings(settings: TaskSettings | DecodeOptions | None) -> TaskSettings:
    return settings if isinstance(settings, TaskSettings) else resolve("guide", settings)


def seed_call(seed: int | None) -> None:
    """Seed the random generators for the call about to run (None: leave them as they are)."""
    if seed is not None:
        seed_everything(seed)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load(options: LoadOptions | str = DEFAULT_MODEL, *, vision: bool = True, audio: bool = True,
         tts: bool = False, warn: Callable[[str], None] | None = None, clock: StartupClock | None = None) -> Engine:
    """Load the model with only the towers a task needs (asr: no vision, no TTS; text chat: no TTS).
    ``clock``: marks the load's phases (imports, device start, weights read, ...; minicpmo_cli/startup.py)."""
    if isinstance(options, str):
        options = LoadOptions(model=options)
    check_dtype_name(options.dtype)  # a typo fails before any device warning
    device = resolve_device(options.device, warn)
    step_mode(options, device)  # a step mode this device cannot run fails before the weights are read
    dtype = resolve_dtype(options.dtype, device)
    from minicpmo_cli import registration
    from minicpmo_cli.generation.guide import MiniCPMO
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    registration.register()
    mark(clock, "imports", "torch, transformers, the model's code")
    try:
        model = MiniCPMO.from_pretrained(
            options.model, dtype=dtype, attn_implementation="sdpa", device_map=device,
            init_vision=vision, init_audio=audio, init_tts=tts, revision=options.revision,
            local_files_only=options.offline or None, load_processor=False, quantize=options.quantize,
            clock=clock,
        )
        processor = MiniCPMOProcessor.from_pretrained(model.config._name_or_path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the checkpoint: {exc}", options.model) from exc
    model.processor = processor
    mark(clock, "processor and tokenizers")
    if tts:
        model.init_tts()
        mark(clock, "speech tools", "TTS tokenizer, vocoder")
    llm_engine, tts_runner = make_engines(model, options, device)
    return Engine(model=model, processor=processor, device=device, dtype=dtype, options=options,
                  towers={"vision": vision, "audio": audio, "tts": tts}, llm_engine=llm_engine,
                  tts_runner=tts_runner)
