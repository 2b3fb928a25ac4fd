#!/usr/bin/env python3
"""Full-size MiniCPM-o 2.6 on a CUDA GPU with random bf16 weights: speed and memory, ours next to transformers.

No checkpoint is downloaded: the model is built from the official config.json on meta, each tower filled on
the GPU with random numbers (gpu_model.py). Rows, each printed the moment it is measured: per tower
(allocation + random init = the load time without a disk, vision encode of 1 and 9 slices, Whisper over
30 s), then ours against transformers' ``generate`` on the same weights (gpu_compare.py): batch-1 decode
tok/s and its share of the memory-bandwidth bound, prefill tok/s, asr of 100 x 10 s clips batched and one
by one, TTS first audio and real-time factor, peak memory per command, and the LLM quantized (``--quantize
int8,int4``): decode tok/s and peak GPU memory.

Every stage runs under its own time limit in a child process (stage_runner.py): a stage that outlives its
limit or crashes is killed and reported in its row, the rows before it stay printed, and a new child runs
the stages after it.

    bash benchmarks/gpu_run.sh                            # everything the GPU session runs, one command
    python benchmarks/gpu_full_size.py                    # needs a CUDA GPU (~20 GiB); a few minutes on an H200
    python benchmarks/gpu_full_size.py --stage-timeout 90 --timeouts tts=60 --time-limit 300
    python benchmarks/gpu_full_size.py --dry-run          # no GPU: build on meta, print the memory plan
    python benchmarks/gpu_full_size.py --cpu-smoke        # no GPU: every stage on the tiny config, the same way

Random weights make the timings those of the real model (same shapes, same kernels) but not its outputs:
answers never stop early, so decoding and speech run for fixed lengths.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gpu_model import materialise, towers

SAMPLE_RATE = 16000  # Hz, Whisper input
EXIT_ENVIRONMENT = 4  # minicpmo_cli.errors.EXIT_ENVIRONMENT: the machine lacks what the command needs


@dataclass
class Row:
    section: str
    metric: str
    value: float
    unit: str
    detail: str = ""


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
# ------------------------------------------------------------------------------------------ options
MAIN_STAGES = ("vision", "audio", "decode", "prefill", "asr", "tts", "memory")
QUANT_MODES = ("int8", "int4")
CONCURRENT = "concurrent"  # many requests at once on the LLM engine: its own child (the LLM alone)
STAGE_TIMEOUT = 150.0  # seconds a stage may run (--stage-timeout); the model build gets BUILD_TIMEOUT
BUILD_TIMEOUT = 240.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", help="config.json to build (default: the shared reference or an embedded copy)")
    add("--device", default="cuda", help="cuda (default), cuda:N; cpu only with --tiny")
    add("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    add("--attn", default="sdpa", help="LLM attention: sdpa (default) or flash_attention_2")
    add("--repeats", type=int, default=3, help="timed runs per measurement (median shown)")
    add("--prefill", default="1024,4096", help="prefill lengths, comma-separated")
    add("--decode-prompt", type=int, default=1024, help="prompt length before decoding")
    add("--new-tokens", type=int, default=128, help="decoded tokens")
    add("--asr-clips", type=int, default=100, help="10 s clips transcribed batched")
    add("--asr-serial-clips", type=int, default=20, help="of those, transcribed one by one")
    add("--step", choices=("eager", "graph", "compile"), default=None,
        help="our decode step (default: the library's choice for the device); passed where the core takes it")
    add("--no-compile", action="store_true", help="same as --step eager")
    add("--quantize", default=",".join(QUANT_MODES), help="LLM quantizations measured after bf16 (none: skip)")
    add("--skip", default="", help="comma-separated stages: " + ",".join(MAIN_STAGES) + ",concurrent,quant")
    add("--stage-timeout", type=float, default=STAGE_TIMEOUT, help="seconds one stage may run (default 150)")
    add("--timeouts", default="", help="per-stage limits, e.g. build=300,tts=60 (seconds)")
    add("--time-limit", type=float, default=None, help="seconds for the whole run; later stages are not run")
    add("--dry-run", action="store_true", help="build on meta and print the memory plan only")
    add("--tiny", action="store_true", help="use the tiny test config (a smoke test of this script)")
    add("--cpu-smoke", action="store_true",
        help="no GPU needed: every stage on the tiny config on the CPU at small sizes (seconds)")
    add("--worker", action="store_true", help=argparse.SUPPRESS)  # a child: run --stages, report rows
    add("--stages", default="", help=argparse.SUPPRESS)
    add("--hang-in", default="", help="testing the time limits: make this stage hang")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--repeats must be >= 1 and --new-tokens >= 2")
    try:
        args.prefill = [int(v) for v in args.prefill.split(",") if v.strip()]
    except ValueError:
        parser.error("--prefill is a comma-separated list of token counts, e.g. 1024,4096")
    try:
        from stage_runner import parse_timeouts

        args.timeouts = parse_timeouts(args.timeouts)
    except ValueError as exc:
        parser.error(f"--timeouts: {exc}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.quantize = [] if args.quantize.strip() in ("", "none") else [q.strip() for q in args.quantize.split(",")]
    if any(q not in QUANT_MODES for q in args.quantize):
        parser.error(f"--quantize takes {', '.join(QUANT_MODES)} or none, not {','.join(args.quantize)}")
    if args.no_compile:
        args.step = "eager"
    if args.cpu_smoke:
        args.tiny, args.device, args.dtype, args.repeats = True, "cpu", "float32", 1
        args.prefill, args.decode_prompt, args.new_tokens = [16], 16, 4
        args.asr_clips, args.asr_serial_clips = 4, 2
        args.step = args.step or "eager"
    return args


def budget_for(args):
    from gpu_compare import Budget

    smoke = args.cpu_smoke
    return Budget(decode_prompt=args.decode_prompt, new_tokens=args.new_tokens, prefill=args.prefill,
                  asr_clips=args.asr_clips, asr_serial_clips=min(args.asr_serial_clips, args.asr_clips),
                  asr_seconds=1.0 if smoke else 10.0, asr_new_tokens=3 if smoke else 32,
                  tts_frames=8 if smoke else 200, step=args.step, image_side=448 if smoke else 1344)


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


def header_lines(args, source: str) -> list[str]:
    import torch

    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU" if args.device == "cpu" else "no GPU here"
    what = "tiny test config" if args.tiny else "full size, random weights"
    versions = f"torch {torch.__version__}"
    try:
        import transformers

        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    return [f"# minicpmo GPU benchmark ({what})", "",
            f"- device: {name}; {versions}; dtype {args.dtype}; LLM attention {args.attn}; "
            f"decode step: {args.step or 'the library default'}",
            f"- config: {source}; repeats {args.repeats} (median shown, after one warm-up)"]


# ------------------------------------------------------------------------------------------ the child
def worker(args: argparse.Namespace) -> int:
    """Build the model (stage "build"), then run ``--stages`` in order, each row reported as it is measured."""
    from stage_runner import BUILD, Reporter

    report = Reporter()
    stages = [s for s in args.stages.split(",") if s]
    report.start(BUILD)
    with tempfile.TemporaryDirectory(prefix="minicpmo-gpu-bench-") as tmp:
        if stages == [CONCURRENT]:  # many users at once: the LLM alone (benchmarks/gpu_concurrency.py)
            return concurrency_worker(args, Path(tmp), report)
        quant = [s.removeprefix("quant-") for s in stages if s.startswith("quant-")]
        if quant:  # a quantization child: the LLM alone, quantized in place (it cannot go back)
            import gpu_compare

            context = build_llm_only(args, Path(tmp))
            report.done(BUILD)
            for mode in quant:
                run_stage(report, f"quant-{mode}", args, lambda: gpu_compare.quant_rows(
                    context["model"], args.device, budget_for(args), args.repeats, mode))
            return 0
        context = build_all(args, Path(tmp), report)
        report.done(BUILD)
        for stage in stages:
            run_stage(report, stage, args, lambda: stage_rows(stage, args, context))
    return 0


def concurrency_worker(args, workdir: Path, report) -> int:
    import gpu_concurrency

    context = build_llm_only(args, workdir)
    report.done("build")
    load = gpu_concurrency.Load(requests=4, clients=2, rounds=1, prompt=16, new_tokens=4) if args.cpu_smoke \
        else gpu_concurrency.Load(prompt=args.decode_prompt // 2, new_tokens=args.new_tokens)
    run_stage(report, CONCURRENT, args, lambda: gpu_concurrency.concurrency_rows(
        context["model"].llm, args.device, args.step, load, args.repeats))
    return 0


def run_stage(report, stage: str, args, measure: Callable[[], list]) -> None:
    report.start(stage)
    if stage == args.hang_in:
        time.sleep(10**6)
    try:
        for row in measure():
            report.row(as_dict(row))
    except Exception as exc:  # the stage's error is its row; the child goes on with the next stage
        report.row({"table": "compared", "metric": stage, "unit": "-", "ours": f"error: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}", "baseline": None, "note": ""})
    report.done(stage)


def as_dict(row) -> dict:
    return {"table": "towers" if isinstance(row, Row) else "compared", **asdict(row)}


def build_all(args, workdir: Path, report) -> dict:
    """Every tower on the device; the plan and the per-tower allocation rows are the build's rows."""
    import gpu_compare
    import gpu_model
    import torch
    from transformers import AutoTokenizer

    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    tiny_dir = make_tiny_checkpoint(workdir / "tiny")
    tiny_config, ids = gpu_model.tiny_ids(tiny_dir)
    config_dict, _ = (tiny_config, "") if args.tiny else gpu_model.load_config_dict(args)
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny ops gain nothing from threads and suffer on a shared machine
    model, vocos = gpu_model.build_on_meta(gpu_model.make_config(config_dict, ids, args.attn), dtype)
    meter = Meter(args.device, args.repeats)
    start = time.perf_counter()
    rows = plan_rows(model, vocos) + bench_materialise(model, vocos, args.device, meter, seed=0)
    rows.append(Row("load", "all towers (allocate + random init, no disk)", time.perf_counter() - start, "s"))
    for row in rows:
        report.row(as_dict(row))
    tts_tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir / "assets" / "chattts_tokenizer"))
    engine = gpu_compare.make_engine(model, vocos, tiny_dir, args.device, dtype, args.step)
    return {"model": model, "vocos": vocos, "meter": meter, "dtype": dtype, "engine": engine,
            "tts_tokenizer": tts_tokenizer}


def build_llm_only(args, workdir: Path) -> dict:
    import gpu_model
    import torch

    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    tiny_config, ids = gpu_model.tiny_ids(make_tiny_checkpoint(workdir / "tiny"))
    config_dict, _ = (tiny_config, "") if args.tiny else gpu_model.load_config_dict(args)
    if args.device == "cpu":
        torch.set_num_threads(1)
    model, _ = gpu_model.build_on_meta(gpu_model.make_config(config_dict, ids, args.attn), getattr(torch, args.dtype))
    gpu_model.materialise(model.llm, args.device, torch.Generator(device=args.device).manual_seed(0))
    return {"model": model}


def stage_rows(stage: str, args, context: dict) -> list:
    import gpu_compare

    model, vocos, engine = context["model"], context["vocos"], context["engine"]
    device, budget = args.device, budget_for(args)
    if stage == "vision":
        return bench_vision(model, context["meter"], context["dtype"], 1 if args.cpu_smoke else 2)
    if stage == "audio":
        return bench_whisper(model, context["meter"], device)
    if stage == "decode":
        return gpu_compare.decode_rows(model, device, budget, args.repeats)
    if stage == "prefill":
        return gpu_compare.prefill_rows(model, device, budget, args.repeats)
    if stage == "asr":
        return gpu_compare.asr_rows(engine, budget)
    if stage == "tts":
        return gpu_compare.tts_rows(model, vocos, context["tts_tokenizer"], device, budget)
    if stage == "memory":
        rows = gpu_compare.memory_rows(model, vocos, gpu_compare.command_workloads(
            engine, vocos, context["tts_tokenizer"], budget), device)
        meter = context["meter"]
        if meter.cuda:
            meter.note_peak()
            rows.append(Row("memory", "peak GPU memory", meter.overall_peak / 2**20, "MiB",
                            "torch.cuda.max_memory_allocated over the towers table"))
        return rows
    raise ValueError(f"unknown stage {stage!r}")


# ------------------------------------------------------------------------------------------ the parent
def child_command(args_list: list[str]):
    script = str(Path(__file__).resolve())

    def command(stages: list[str]) -> list[str]:
        return [sys.executable, script, *args_list, "--worker", "--stages", ",".join(stages)]

    return command


def parent(args: argparse.Namespace, argv: list[str]) -> int:
    import gpu_compare
    import gpu_model
    from stage_runner import BUILD, Limits, run_groups

    source = "tiny test config" if args.tiny else gpu_model.load_config_dict(args)[1]
    print("\n".join(header_lines(args, source)), flush=True)
    groups = [[s for s in MAIN_STAGES if s not in args.skip]]
    if CONCURRENT not in args.skip:
        groups.append([CONCURRENT])
    if "quant" not in args.skip:
        groups += [[f"quant-{mode}"] for mode in args.quantize]
    limits = Limits(stage=lambda stage: args.timeouts.get(stage, BUILD_TIMEOUT if stage == BUILD
                                                          else args.stage_timeout), total=args.time_limit)
    printer = gpu_compare.TablePrinter()
    start = time.perf_counter()
    outcome = run_groups(child_command(argv), [g for g in groups if g], limits, printer.row, printer.note)
    lost = sorted(stage for stage, status in outcome.status.items() if status != "done")
    print(f"\n(total {time.perf_counter() - start:.0f} s; stages lost: {', '.join(lost) or 'none'})", flush=True)
    return 0


def dry_run(args) -> int:
    import gpu_compare
    import gpu_model
    import torch

    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    config_dict, source = gpu_model.load_config_dict(args)
    with tempfile.TemporaryDirectory(prefix="minicpmo-gpu-plan-") as tmp:
        _, ids = gpu_model.tiny_ids(make_tiny_checkpoint(Path(tmp) / "tiny"))
    model, vocos = gpu_model.build_on_meta(gpu_model.make_config(config_dict, ids, args.attn),
                                           getattr(torch, args.dtype))
    rows = plan_rows(model, vocos)
    rows.append(Row("plan (meta)", "all towers", sum(r.value for r in rows), "MiB",
                    "weights only, no activations or KV cache"))
    print("\n".join(header_lines(args, source)))
    printer = gpu_compare.TablePrinter()
    for row in rows:
        printer.row(as_dict(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_model, gpu_compare, stage_runner
    args = parse_args(argv)
    problem = check_device(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    if args.dry_run:
        return dry_run(args)
    if args.worker:
        return worker(args)
    return parent(args, [a for a in argv if a not in ("--worker",)])


if __name__ == "__main__":
    raise SystemExit(main())
