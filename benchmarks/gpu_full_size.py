#!/usr/bin/env python3
"""Full-size MiniCPM-o 2.6 on a CUDA GPU with random bf16 weights: speed and memory, ours next to transformers.

No checkpoint is downloaded: the model is built from the official config.json with parameters on the meta
device, then each tower is materialised on the GPU (``to_empty``) and filled with random numbers. Two tables:
per tower (allocation + random init = the load time without a disk, vision encode of 1 and 9 slices, Whisper
over 30 s), then ours against transformers' ``generate`` on the same weights (benchmarks/gpu_compare.py):
batch-1 decode tok/s and its share of the memory-bandwidth bound, prefill tok/s, asr of 100 x 10 s clips
batched and one by one, TTS first audio and real-time factor, peak memory per command.

    bash benchmarks/gpu_run.sh                            # offline install from the wheel folder, then this
    python benchmarks/gpu_full_size.py                    # needs a CUDA GPU (~20 GiB); ~5 min on an H200
    python benchmarks/gpu_full_size.py --dry-run          # no GPU: build on meta, print the memory plan
    python benchmarks/gpu_full_size.py --cpu-smoke        # no GPU: every stage on the tiny config, seconds

Random weights make the timings those of the real model (same shapes, same kernels) but not its outputs:
answers never stop early, so decoding and speech run for fixed lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

REFERENCE_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "config.json"  # beside the repo
EXIT_ENVIRONMENT = 4  # minicpmo_cli.errors.EXIT_ENVIRONMENT: the machine lacks what the command needs
SAMPLE_RATE = 16000  # Hz, Whisper input

# The official openbmb/MiniCPM-o-2_6 config.json, minus keys no module reads (Whisper decoder-only
# generation settings such as suppress_tokens), for machines without /work/shared.
OFFICIAL_CONFIG: dict[str, Any] = {
    "_name_or_path": "openbmb/MiniCPM-o-2_6", "model_type": "minicpmo", "version": 2.6,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151700, "batch_vision_input": True, "drop_vision_last_layer": False,
    "image_size": 448, "audio_chunk_length": 1.0, "audio_pool_step": 2, "chunk_input": True,
    "listen_speak_type": "asr", "patch_size": 14, "query_num": 64,
    "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv"}, "slice_mode": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_image_id": True, "vision_batch_size": 16,
    "audio_config": {
        "_name_or_path": "openai/whisper-medium", "model_type": "whisper", "d_model": 1024,
        "encoder_attention_heads": 16, "encoder_ffn_dim": 4096, "encoder_layers": 24,
        "decoder_attention_heads": 16, "decoder_ffn_dim": 4096, "decoder_layers": 24, "num_hidden_layers": 24,
        "max_source_positions": 1500, "num_mel_bins": 80, "torch_dtype": "float32",
    },
    "tts_config": {"model_type": "conditional_chattts", "llm_dim": 3584},
    "vision_config": {
        "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
    },
}


@dataclass
class Row:
    section: str
    metric: str
    value: float
    unit: str
    detail: str = ""


# ------------------------------------------------------------------------------------------ building
def load_config_dict(args) -> tuple[dict, str]:
    if args.config:
        return json.loads(Path(args.config).read_text()), args.config
    if REFERENCE_CONFIG.exists():
        return json.loads(REFERENCE_CONFIG.read_text()), str(REFERENCE_CONFIG)
    return dict(OFFICIAL_CONFIG), "embedded copy of the official config.json"


def make_config(config_dict: dict, tts_tokenizer_ids: dict[str, int], attn: str):
    """MiniCPMOConfig with the TTS special ids of the stand-in tokenizer (the sizes stay the official ones)."""
    from minicpmo_cli.model.config import MiniCPMOConfig

    values = {k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")}
    values["tts_config"] = {**values.get("tts_config", {}), **tts_tokenizer_ids}
    config = MiniCPMOConfig(**values)
    config._attn_implementation = attn
    return config


def build_on_meta(config, dtype):
    """(MiniCPMO with every tower, Vocos in float32 as the reference), parameters on meta."""
    import torch

    from minicpmo_cli.generation.guide import MiniCPMO
    from minicpmo_cli.model.loading import construction_context, parameters_on_meta
    from minicpmo_cli.model.vocoder import Vocos

    config.init_vision = config.init_audio = config.init_tts = True
    with construction_context(dtype=dtype), parameters_on_meta():
        model = MiniCPMO(config)
    with construction_context(dtype=torch.float32), parameters_on_meta():
        vocos = Vocos(config.tts_config)
    return model.eval(), vocos.eval()


def towers(model, vocos) -> list[tuple[str, Any]]:
    return [(name, child) for name, child in model.named_children()] + [("vocos", vocos)]


def random_fill(module, generator) -> None:
    """Well-scaled random weights: N(0, 0.02) matrices, unit norm gains, zero biases, positive WN gains."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("coef", "original0", "weight_g")):
                param.uniform_(0.5, 1.5, generator=generator)
            elif param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def materialise(module, device: str, generator) -> None:
    """``to_empty`` on ``device``, the CPU-computed buffers put back, random parameters."""
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    module.to_empty(device=device)
    for name, buf in module.named_buffers():
        buf.copy_(saved[name])
    random_fill(module, generator)


# ------------------------------------------------------------------------------------------ measuring
class Meter:
    """Median wall time over repeats (after a warm-up), with CUDA sync, and the peak memory above the start."""

    def __init__(self, device: str, repeats: int) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.repeats = repeats
        self.overall_peak = 0

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else 0

    def note_peak(self) -> None:
        if self.cuda:
            self.overall_peak = max(self.overall_peak, self.torch.cuda.max_memory_allocated())

    def measure(self, fn: Callable[[], Any], warmup: int = 1) -> tuple[float, Any, float]:
        """(median seconds, last result, peak MiB above what was allocated before)."""
        with self.torch.inference_mode():
            for _ in range(warmup):
                fn()
            self.sync()
            if self.cuda:
                self.note_peak()
                self.torch.cuda.reset_peak_memory_stats()
            base = self.allocated()
            times, result = [], None
            for _ in range(self.repeats):
                start = time.perf_counter()
                result = fn()
                self.sync()
                times.append(time.perf_counter() - start)
        extra = (self.torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else float("nan")
        self.note_peak()
        return statistics.median(times), result, extra


def mib(value: float) -> str:
    return "n/a" if value != value else f"{value:.0f} MiB"  # NaN on the CPU


def peak(extra: float) -> str:
    """The notes' "; peak +N MiB" (activation memory of a stage), nothing on the CPU."""
    return "" if extra != extra else f"; peak +{extra:.0f} MiB"


# ------------------------------------------------------------------------------------------ stages
def plan_rows(model, vocos) -> list[Row]:
    rows = []
    for name, tower in towers(model, vocos):
        params = sum(p.numel() for p in tower.parameters())
        size = sum(p.numel() * p.element_size() for p in tower.parameters())
        if params:
            rows.append(Row("plan (meta)", name, size / 2**20, "MiB", f"{params / 1e6:.1f} M parameters, "
                            f"{next(tower.parameters()).dtype}"))
    return rows


def bench_materialise(model, vocos, device: str, meter: Meter, seed: int) -> list[Row]:
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for name, tower in towers(model, vocos):
        if not any(True for _ in tower.parameters()):
            materialise(tower, device, generator)
            continue
        before = meter.allocated()
        start = time.perf_counter()
        materialise(tower, device, generator)
        meter.sync()
        seconds = time.perf_counter() - start
        grown = (meter.allocated() - before) / 2**20 if meter.cuda else float("nan")
        rows.append(Row("alloc + random init", name, seconds * 1000, "ms", f"allocated {mib(grown)}"))
    meter.note_peak()
    return rows


def bench_vision(model, meter: Meter, dtype, sizes: int = 2) -> list[Row]:
    """SigLIP + resampler over the slices of a 448x448 image (1 image) and a 1344x1344 one (1 + 9 slices)."""
    from PIL import Image

    from minicpmo_cli.model.tiny import PREPROCESSOR_CONFIG
    from minicpmo_cli.model.vision import encode_images
    from minicpmo_cli.processing.image import MiniCPMVImageProcessor

    processor = MiniCPMVImageProcessor(**PREPROCESSOR_CONFIG)
    rng = np.random.default_rng(0)
    rows = []
    for size, label in ((448, "1 slice (448x448)"), (1344, "9 slices + overview (1344x1344)"))[:sizes]:
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        batch = processor([[image]], max_slice_nums=9, return_tensors="pt")
        count = len(batch["pixel_values"][0])

        def encode():
            return encode_images(model.vpm, model.resampler, batch["pixel_values"], batch["tgt_sizes"],
                                 vision_batch_size=int(model.config.vision_batch_size), dtype=dtype)

        seconds, _, extra = meter.measure(encode)
        rows.append(Row("vision encode", label, seconds * 1000, "ms",
                        f"{count} image(s), {count * model.config.query_num} LLM tokens{peak(extra)}"))
    return rows


def bench_whisper(model, meter: Meter, device: str, seconds_of_audio: float = 30.0) -> list[Row]:
    """Log-mel (on the device) then the Whisper-medium encoder + projection + pooling over one 30 s window."""
    from minicpmo_cli.processing.audio import extract_audio_features

    audio = (0.1 * np.random.default_rng(3).standard_normal(int(seconds_of_audio * SAMPLE_RATE))).astype(np.float32)
    start = time.perf_counter()
    features, lens = extract_audio_features([[audio]], chunk_input=True, device=device)
    meter.sync()
    mel = time.perf_counter() - start
    data = {"audio_features": features, "audio_feature_lens": lens}
    seconds, embeds, extra = meter.measure(lambda: model.get_audio_embedding(data, chunk_length=1.0))
    tokens = sum(int(e.shape[0]) for e in embeds[0])
    return [Row("audio encode", f"Whisper, {seconds_of_audio:.0f} s", seconds * 1000, "ms",
                f"{seconds_of_audio / seconds:.0f}x real time; {tokens} LLM tokens; log-mel (first call) "
                f"{mel * 1000:.0f} ms{peak(extra)}")]


# ------------------------------------------------------------------------------------------ main
def render(rows: list[Row], header: list[str]) -> str:
    lines = header + ["", "| section | measurement | value | unit | notes |", "|---|---|---:|---|---|"]
    for row in rows:
        value = f"{row.value:.3g}" if abs(row.value) < 100 else f"{row.value:.0f}"
        lines.append(f"| {row.section} | {row.metric} | {value} | {row.unit} | {row.detail} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config.json to build (default: the shared reference or an embedded copy)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N; cpu only with --tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--attn", default="sdpa", help="LLM attention: sdpa (default) or flash_attention_2")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median shown)")
    parser.add_argument("--prefill", default="1024,4096", help="prefill lengths, comma-separated")
    parser.add_argument("--decode-prompt", type=int, default=1024, help="prompt length before decoding")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens")
    parser.add_argument("--asr-clips", type=int, default=100, help="10 s clips transcribed batched")
    parser.add_argument("--asr-serial-clips", type=int, default=20, help="of those, transcribed one by one")
    parser.add_argument("--no-compile", action="store_true", help="our decode core without CUDA graphs")
    parser.add_argument("--skip", default="", help="comma-separated: vision,audio,decode,prefill,asr,tts,memory")
    parser.add_argument("--dry-run", action="store_true", help="build on meta and print the memory plan only")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test config (a smoke test of this script)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU needed: every stage on the tiny config on the CPU at small sizes (seconds)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--repeats must be >= 1 and --new-tokens >= 2")
    try:
        args.prefill = [int(v) for v in args.prefill.split(",") if v.strip()]
    except ValueError:
        parser.error("--prefill is a comma-separated list of token counts, e.g. 1024,4096")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.cpu_smoke:
        args.tiny, args.device, args.dtype, args.repeats = True, "cpu", "float32", 1
        args.prefill, args.decode_prompt, args.new_tokens = [16], 16, 4
        args.asr_clips, args.asr_serial_clips = 4, 2
    return args


def budget_for(args):
    from gpu_compare import Budget

    smoke = args.cpu_smoke
    return Budget(decode_prompt=args.decode_prompt, new_tokens=args.new_tokens, prefill=args.prefill,
                  asr_clips=args.asr_clips, asr_serial_clips=min(args.asr_serial_clips, args.asr_clips),
                  asr_seconds=1.0 if smoke else 10.0, asr_new_tokens=3 if smoke else 32,
                  tts_frames=8 if smoke else 200, compile=not (args.no_compile or smoke),
                  image_side=448 if smoke else 1344)


def check_device(args) -> str | None:
    """None when the device is usable, else the message to exit with."""
    import torch

    if args.dry_run:
        return None
    if args.device == "cpu":
        return None if args.tiny else "--device cpu is only for the --tiny smoke test (the full model needs a GPU)"
    if not args.device.startswith("cuda"):
        return f"--device must be cuda, cuda:N or (with --tiny) cpu, not {args.device!r}"
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"no CUDA GPU found (torch {torch.__version__}, {built}): this benchmark needs one. "
                "Without a GPU: --dry-run prints the full-size memory plan, --cpu-smoke runs every stage on "
                "the tiny config.")
    return None


def header_lines(args, source: str, device: str) -> list[str]:
    import torch

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    what = "tiny test config" if args.tiny else "full size, random weights"
    return [f"# minicpmo GPU benchmark ({what})", "",
            f"- device: {name}; torch {torch.__version__}; dtype {args.dtype}; LLM attention {args.attn}",
            f"- config: {source}; repeats {args.repeats} (median shown, after one warm-up)"]


def compare_stages(args, model, vocos, engine, tts_tokenizer, device: str) -> list:
    import gpu_compare

    budget = budget_for(args)
    stages = [
        ("decode", lambda: gpu_compare.decode_rows(model, device, budget, args.repeats)),
        ("prefill", lambda: gpu_compare.prefill_rows(model, device, budget, args.repeats)),
        ("asr", lambda: gpu_compare.asr_rows(engine, budget)),
        ("tts", lambda: gpu_compare.tts_rows(model, vocos, tts_tokenizer, device, budget)),
        ("memory", lambda: gpu_compare.memory_rows(
            model, vocos, gpu_compare.command_workloads(engine, vocos, tts_tokenizer, budget), device)),
    ]
    rows = []
    for name, stage in stages:
        if name in args.skip:
            continue
        try:
            rows += stage()
        except Exception as exc:  # one broken stage must not lose the others' rows on a rented GPU
            rows.append(gpu_compare.Compared(name, "-", f"error: {type(exc).__name__}: {exc}", None))
        print(f"[done] {name}", file=sys.stderr, flush=True)
    return rows


def run(args: argparse.Namespace, workdir: Path) -> str:
    import gpu_compare
    import torch

    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    # The tiny checkpoint lends its tokenizers and processor (random weights need no real ones) and, with
    # --tiny, its config; the full-size TTS keeps its sizes and only takes the stand-in tokenizer's ids.
    tiny_dir = make_tiny_checkpoint(workdir / "tiny")
    tiny_config = json.loads((tiny_dir / "config.json").read_text())
    ids = {k: tiny_config["tts_config"][k] for k in ("spk_emb_token_id", "audio_bos_token_id", "text_eos_token_id")}
    config_dict, source = (tiny_config, str(tiny_dir / "config.json")) if args.tiny else load_config_dict(args)
    dtype = getattr(torch, args.dtype)
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny ops gain nothing from threads and suffer on a shared machine
    model, vocos = build_on_meta(make_config(config_dict, ids, args.attn), dtype)
    rows = plan_rows(model, vocos)
    device = "cpu" if args.dry_run else args.device
    header = header_lines(args, source, device)
    if args.dry_run:
        total = sum(r.value for r in rows)
        rows.append(Row("plan (meta)", "all towers", total, "MiB", "weights only, no activations or KV cache"))
        return render(rows, header)
    meter = Meter(device, args.repeats)
    start = time.perf_counter()
    rows += bench_materialise(model, vocos, device, meter, seed=0)
    rows.append(Row("load", "all towers (allocate + random init, no disk)", time.perf_counter() - start, "s"))
    from transformers import AutoTokenizer

    tts_tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir / "assets" / "chattts_tokenizer"))
    for name, stage in (("vision", lambda: bench_vision(model, meter, dtype, 1 if args.cpu_smoke else 2)),
                        ("audio", lambda: bench_whisper(model, meter, device))):
        if name not in args.skip:
            rows += stage()
            print(f"[done] {name}", file=sys.stderr, flush=True)
    engine = gpu_compare.make_engine(model, vocos, tiny_dir, device, dtype)
    compared = compare_stages(args, model, vocos, engine, tts_tokenizer, device)
    if meter.cuda:
        meter.note_peak()
        rows.append(Row("memory", "peak GPU memory", meter.overall_peak / 2**20, "MiB",
                        "torch.cuda.max_memory_allocated over the towers table"))
    return render(rows, header) + "\n\n## ours vs transformers generate (same weights, same run)\n\n" + \
        "\n".join(gpu_compare.render(compared))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_device(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minicpmo-gpu-bench-") as tmp:
        table = run(args, Path(tmp))
    print(table)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
