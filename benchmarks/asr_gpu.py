#!/usr/bin/env python3
"""asr at GPU speed: the staged pipeline on the full-size model (random bf16 weights) over real speech clips.

Rows (each stage in a child process under its own time limit, stage_runner.py; startup excluded):
  - clips: 100 clips of 10 s made from the speech files carried in examples/ (speech_en.wav, speech_zh.wav,
    each clip a different stretch and loudness), ``transcribe_many`` (the staged pipeline: decode threads,
    batched VAD, prompts embedded a batch at a time, every piece its own request on the LLM engine) against
    the one-by-one loop (``transcribe`` per file, --batch-size 1) over the first ``--serial-clips``; goals:
    >= 1,000x real time and >= 20x the loop, the loop's transcripts identical to the batched ones;
  - long: 10 files of 10 minutes (examples/long_speech.mp3 repeated), x real time.
Random weights never stop an answer early: every piece decodes ``--max-new-tokens`` (a 10 s transcript is about
that long), so the timings are those of the real model's shapes, not of its outputs.

    bash benchmarks/gpu_run.sh                    # runs this as its "asr" part
    python benchmarks/asr_gpu.py                  # needs a CUDA GPU (~20 GiB)
    python benchmarks/asr_gpu.py --cpu-smoke      # the same plumbing on the CPU at the tiny checkpoint's sizes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SAMPLE_RATE = 16000
STAGES = ("clips", "long")
EXIT_ENVIRONMENT = 4  # minicpmo_cli.errors.EXIT_ENVIRONMENT


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--serial-clips", type=int, default=20, help="clips the one-by-one loop runs")
    parser.add_argument("--long-files", type=int, default=10)
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=64, help="the LLM engine's KV slots (serve's --max-batch)")
    parser.add_argument("--step", default=None, help="eager | graph | compile (default: the device's)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, few clips")
    parser.add_argument("--skip", default="", help="comma-separated stages to leave out: clips,long")
    parser.add_argument("--stage-timeout", type=float, default=240)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.clips, args.serial_clips, args.long_files, args.long_minutes = 8, 4, 2, 1.0
        args.max_new_tokens, args.slots = 4, 8
    args.device = "cpu" if args.cpu_smoke else "cuda"
    return args


# ------------------------------------------------------------------------------------------ audio
def speech_clips(count: int, seconds: float) -> list[np.ndarray]:
    """``count`` clips of real speech, each a different stretch of the carried examples at its own loudness."""
    from minicpmo_cli.media.audio import load_audio

    voices = [load_audio(str(EXAMPLES / name), SAMPLE_RATE) for name in ("speech_en.wav", "speech_zh.wav")]
    length = int(seconds * SAMPLE_RATE)
    clips = []
    for index in range(count):
        voice = voices[index % len(voices)]
        looped = np.tile(voice, 1 + length // len(voice) + 1)
        offset = (index * 1601) % len(voice)
        clips.append((looped[offset:offset + length] * (0.5 + 0.5 * (index % 5) / 4)).astype(np.float32))
    return clips


def long_files(count: int, minutes: float) -> list[np.ndarray]:
    from minicpmo_cli.media.audio import load_audio

    talk = load_audio(str(EXAMPLES / "long_speech.mp3"), SAMPLE_RATE)
    length = int(minutes * 60 * SAMPLE_RATE)
    looped = np.tile(talk, 1 + length // len(talk))
    return [np.roll(looped, index * 7919)[:length].copy() for index in range(count)]


# ------------------------------------------------------------------------------------------ the child
def build_engine(args, workdir: Path):
    """The api Engine over random weights (LLM, Whisper, projection) on the device: the official sizes in
    bf16, or with --cpu-smoke the tiny checkpoint's sizes in float32 (the same code path, here)."""
    import gpu_model
    import torch

    from minicpmo_cli.api.engine import Engine, LoadOptions, make_engines
    from minicpmo_cli.model.tiny import make_tiny_checkpoint
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    tiny = make_tiny_checkpoint(workdir / "tiny")
    tiny_config, ids = gpu_model.tiny_ids(tiny)
    config_dict = tiny_config if args.cpu_smoke else gpu_model.load_config_dict(argparse.Namespace(config=None))[0]
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    model, _ = gpu_model.build_on_meta(gpu_model.make_config(config_dict, ids, "sdpa"), dtype)
    generator = torch.Generator(device=args.device).manual_seed(0)
    for tower in (model.llm, model.apm, model.audio_projection_layer):
        gpu_model.materialise(tower, args.device, generator)
    del model.vpm, model.resampler, model.tts  # asr loads neither vision nor speech
    options = LoadOptions(model=str(tiny), device=args.device, max_batch=args.slots, step=args.step)
    llm_engine, tts_runner = make_engines(model, options, args.device)
    return Engine(model=model, processor=MiniCPMOProcessor.from_pretrained(str(tiny)), device=args.device,
                  dtype=dtype, options=options, towers={"vision": False, "audio": True, "tts": False},
                  llm_engine=llm_engine, tts_runner=tts_runner)


def timed(fn, device: str) -> tuple[float, list]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def clips_rows(engine, args) -> list[dict]:
    from minicpmo_cli.api.asr import AsrOptions, AudioInput, engine_batch_size, transcribe, transcribe_many
    from minicpmo_cli.api.engine import DecodeOptions

    clips = speech_clips(args.clips, args.clip_seconds)
    inputs = [AudioInput(f"clip{i}", clip) for i, clip in enumerate(clips)]
    decode = DecodeOptions(max_new_tokens=args.max_new_tokens)
    list(transcribe_many(engine, inputs[:4], AsrOptions(batch_size=None), decode))  # warm-up
    batched_s, batched = timed(lambda: list(transcribe_many(engine, inputs, AsrOptions(batch_size=None), decode)),
                               args.device)
    serial = clips[:args.serial_clips]
    serial_s, alone = timed(lambda: [transcribe(engine, clip, AsrOptions(batch_size=1), decode) for clip in serial],
                            args.device)
    audio = len(clips) * args.clip_seconds
    fast, slow = audio / batched_s, len(serial) * args.clip_seconds / serial_s
    same = [r.text for r in batched[:len(serial)]] == [r.text for r in alone]
    note = (f"{len(clips)} x {args.clip_seconds:.0f} s real speech, batch {engine_batch_size(engine)}, "
            f"{args.slots} engine slots, {args.max_new_tokens} new tokens a piece")
    return [{"metric": f"asr, {len(clips)} clips, staged", "unit": "x real time", "ours": fast,
             "baseline": None, "note": f"{note}; goal >= 1000"},
            {"metric": "asr, one-by-one loop (transcribe per file)", "unit": "x real time", "ours": slow,
             "baseline": None, "note": f"over {len(serial)} clips"},
            {"metric": "asr, staged vs the loop", "unit": "x", "ours": fast / slow, "baseline": None,
             "note": f"goal >= 20; transcripts identical: {'yes' if same else 'NO'}"}]


def long_rows(engine, args) -> list[dict]:
    from minicpmo_cli.api.asr import AsrOptions, AudioInput, transcribe_many
    from minicpmo_cli.api.engine import DecodeOptions

    files = long_files(args.long_files, args.long_minutes)
    inputs = [AudioInput(f"talk{i}", audio) for i, audio in enumerate(files)]
    decode = DecodeOptions(max_new_tokens=args.max_new_tokens)
    seconds, records = timed(lambda: list(transcribe_many(engine, inputs, AsrOptions(batch_size=None), decode)),
                             args.device)
    pieces = sum(len(r.segments) > 0 and len(r.segments) for r in records)
    audio = len(files) * args.long_minutes * 60
    return [{"metric": f"asr, {len(files)} files of {args.long_minutes:.0f} min", "unit": "x real time",
             "ours": audio / seconds, "baseline": None,
             "note": f"{pieces} cues; {seconds:.1f} s wall; {args.max_new_tokens} new tokens a piece"}]


def worker(args) -> int:
    from stage_runner import BUILD, Reporter

    report = Reporter()
    report.start(BUILD)
    with tempfile.TemporaryDirectory(prefix="minicpmo-asr-gpu-") as tmp:
        engine = build_engine(args, Path(tmp))
        report.done(BUILD)
        for stage in [s for s in args.stages.split(",") if s]:
            report.start(stage)
            try:
                for row in (clips_rows if stage == "clips" else long_rows)(engine, args):
                    report.row({"table": "compared", **row})
            except Exception as exc:  # the stage's error is its row; the next stage still runs
                report.row({"table": "compared", "metric": stage, "unit": "-", "baseline": None, "note": "",
                            "ours": f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            report.done(stage)
    return 0


# ------------------------------------------------------------------------------------------ the parent
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_model, gpu_compare, stage_runner
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here (--cpu-smoke runs the same plumbing on the CPU)", file=sys.stderr)
        return EXIT_ENVIRONMENT
    import gpu_compare
    from stage_runner import BUILD, Limits, run_groups

    stages = [s for s in STAGES if s not in args.skip.split(",")]
    print(f"asr at GPU speed ({'tiny sizes, CPU smoke' if args.cpu_smoke else 'full size'}, random weights"
          f", {args.device}; startup excluded)", flush=True)
    limits = Limits(stage=lambda stage: 300 if stage == BUILD else args.stage_timeout, total=args.time_limit)
    printer = gpu_compare.TablePrinter()
    script = str(Path(__file__).resolve())
    outcome = run_groups(lambda todo: [sys.executable, script, *argv, "--worker", "--stages", ",".join(todo)],
                         [stages], limits, printer.row, printer.note)
    lost = sorted(stage for stage, status in outcome.status.items() if status != "done")
    print(f"\n(stages lost: {', '.join(lost) or 'none'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
