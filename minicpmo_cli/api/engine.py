"""Loading a model for a task, choosing device and dtype, and the one generate call every task goes through."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

from minicpmo_cli.errors import EnvironmentProblem, ModelLoadError, UsageError

DEFAULT_MODEL = "openbmb/MiniCPM-o-2_6"
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class LoadOptions:
    model: str = DEFAULT_MODEL  # hub id or local checkpoint folder
    revision: str | None = None  # hub branch, tag or commit
    offline: bool = False  # cached files only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    seed: int | None = None  # seeds torch/numpy/random before each generation
    compile: bool | None = None  # capture the decode step; None: MINICPMO_COMPILE, else on with CUDA only
    quantize: str | None = None  # none | int8 | int4 (LLM decoder linears); None: as the checkpoint is


@dataclass(frozen=True)
class DecodeOptions:
    """Text decoding options; None means "the reference's default for the chosen mode" (spec §8)."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    sampling: bool | None = None  # True: top-p/top-k sampling; False: beam search (3 beams)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None

    def __post_init__(self) -> None:
        if self.sampling and self.num_beams is not None and self.num_beams > 1:
            raise UsageError(f"sampling and num_beams={self.num_beams} contradict each other: beam search does "
                             "not sample (drop one of --sampling / --num-beams)")

    def merged(self, **defaults: Any) -> dict[str, Any]:
        """The generate() keyword arguments: a task's defaults overridden by what the user set."""
        chosen = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return {**{k: v for k, v in defaults.items() if v is not None}, **chosen}


@dataclass
class Engine:
    """A loaded model with its processor, ready for the task functions of this package."""

    model: Any
    processor: Any
    device: str
    dtype: Any
    options: LoadOptions
    towers: dict[str, bool] = field(default_factory=dict)

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
    def compile(self) -> bool:
        """Whether decoding runs the captured (torch.compile) step (generation/decode.py resolve_compile)."""
        from minicpmo_cli.generation.decode import resolve_compile

        return resolve_compile(self.options.compile, self.device)

    def ensure_towers(self, vision: bool = False, audio: bool = False) -> list[str]:
        """Load the vision/audio tower into an engine loaded without it (the REPL's /image, /audio, /video):
        only that tower's tensors are read. Returns the towers it loaded."""
        from minicpmo_cli.model.loading import attach_towers

        wanted = [name for name, want in (("vision", vision), ("audio", audio)) if want and not self.towers.get(name)]
        attach_towers(self.model, wanted, self.device, self.dtype)
        self.towers.update({name: True for name in wanted})
        return wanted

    def seed(self) -> None:
        if self.options.seed is not None:
            seed_everything(self.options.seed)

    def generate(self, msgs: list[dict], decode: DecodeOptions, *, stream: bool = False,
                 use_tts_template: bool = False, generate_audio: bool = False, omni_input: bool = False,
                 max_slice_nums: int | None = None, use_image_id: bool | None = None,
                 defaults: dict[str, Any] | None = None) -> Any:
        """Messages -> the model's answer (str), an iterator of text pieces, or a dict result with audio."""
        import torch

        inputs = self.processor.apply_chat_template(
            msgs=msgs, omni_input=omni_input, max_slice_nums=max_slice_nums, use_image_id=use_image_id,
            use_tts_template=use_tts_template,
        ).to(self.device)
        kwargs = decode.merged(**(defaults or {}))
        self.seed()
        with torch.inference_mode():
            return self.model.generate(
                **inputs, processor=self.processor, stream=stream, use_tts_template=use_tts_template,
                generate_audio=generate_audio, return_dict=generate_audio, compile=self.compile, **kwargs,
            )

    def text_pieces(self, msgs: list[dict], decode: DecodeOptions, *, stream: bool = True,
                    defaults: dict[str, Any] | None = None, **kwargs: Any) -> Iterator[str]:
        """The answer as text pieces: streamed when sampling, one piece with beam search (which cannot stream)."""
        stream = stream and bool(decode.merged(**(defaults or {})).get("sampling", True))
        result = self.generate(msgs, decode, stream=stream, defaults=defaults, **kwargs)
        if isinstance(result, str):
            yield result
        else:
            yield from result


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str, warn: Callable[[str], None] | None = None) -> str:
    """auto: CUDA when present, else CPU (with a warning: the full model is slow there)."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if warn is not None:
            warn("no CUDA GPU found: running on the CPU, which is slow for the full model")
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EnvironmentProblem(f"--device {device} asked for, but no CUDA GPU is usable here")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise EnvironmentProblem(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
        return device
    if device == "cpu":
        return "cpu"
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")


def resolve_dtype(dtype: str, device: str):
    """auto: bfloat16 on GPUs that support it (else float16), float32 on the CPU."""
    import torch

    dtype = (dtype or "auto").lower()
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "auto":
        if device.startswith("cuda"):
            # Native bf16 needs compute capability 8 (Ampere+); is_bf16_supported() also says yes to the
            # slow emulated path of older GPUs, and looks at the current device rather than the chosen one.
            major, _ = torch.cuda.get_device_capability(torch.device(device))
            return torch.bfloat16 if major >= 8 else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def load(options: LoadOptions | str = DEFAULT_MODEL, *, vision: bool = True, audio: bool = True,
         tts: bool = False, warn: Callable[[str], None] | None = None) -> Engine:
    """Load the model with only the towers a task needs (asr: no vision, no TTS; text chat: no TTS)."""
    if isinstance(options, str):
        options = LoadOptions(model=options)
    if (options.dtype or "auto").lower() not in DTYPES:  # a typo fails before any device warning
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {options.dtype!r}")
    device = resolve_device(options.device, warn)
    dtype = resolve_dtype(options.dtype, device)
    from minicpmo_cli import registration
    from minicpmo_cli.generation.guide import MiniCPMO
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    registration.register()

    try:
        model = MiniCPMO.from_pretrained(
            options.model, dtype=dtype, attn_implementation="sdpa", device_map=device,
            init_vision=vision, init_audio=audio, init_tts=tts, revision=options.revision,
            local_files_only=options.offline or None, load_processor=False, quantize=options.quantize,
        )
        processor = MiniCPMOProcessor.from_pretrained(model.config._name_or_path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the checkpoint: {exc}", options.model) from exc
    model.processor = processor
    if tts:
        model.init_tts()
    return Engine(model=model, processor=processor, device=device, dtype=dtype, options=options,
                  towers={"vision": vision, "audio": audio, "tts": tts})
