#!/usr/bin/env python3
"""asr over many clips: the staged pipeline against the one before it, and the non-model part alone.

CPU proxy (the default): a tiny random checkpoint (model cost near zero, answers cut at --max-new-tokens), N clips
of 10 s of espeak-ng speech. Rows, per clip, startup (model load, clip making) excluded:
  - before: the base commit's whole tree (--base, exported with `git archive`, run in a child process with its
    own model code): per-file VAD under a lock on the decoding threads, one --language auto probe call per
    file, then the pieces in padded batches;
  - staged: this tree's pipeline (api/asr_pipeline.py): decode threads, the VAD over many files at once, the
    probes batched, then the pieces in batches;
  - staged on the fake engine (tests/fake_engine.py): everything but the model, the goal being <= 10 ms a clip.
Transcripts of before and staged are compared (the VAD's batched rounding may move a region edge that sits on
the threshold, so "identical" is reported, not assumed).

    python benchmarks/pipeline.py --asr-stages                    # 100 clips, tiny checkpoint, CPU
    python benchmarks/asr_stages.py --clips 20
    python benchmarks/asr_stages.py --gpu --model DIR             # the GPU rows: a checkpoint on cuda
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASE = "f5dea19"  # main before the staged pipeline
SENTENCE = ("Speech recognition turns spoken words into written text, and a good system keeps up with a speaker "
            "in real time, copes with noise and never cuts a sentence short.")
CLIP_SECONDS = 10.0


def make_clips(folder: Path, count: int) -> list[Path]:
    import soundfile

    from minicpmo_cli.media.audio import load_audio

    spoken = folder / "sentence.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), SENTENCE], check=True, capture_output=True)
    speech = load_audio(spoken)
    length = int(CLIP_SECONDS * 16000)
    paths = []
    for index in range(count):  # each clip a little different: speed of the voice by resampling-free shifts
        offset = (index * 1601) % max(1, len(speech) // 4)
        clip = np.zeros(length, np.float32)
        part = speech[offset:offset + length]
        clip[:len(part)] = part * (0.6 + 0.4 * ((index % 7) / 6))
        path = folder / f"clip{index:03d}.wav"
        soundfile.write(path, clip, 16000)
        paths.append(path)
    return paths


# The "before" row runs in a child process on the base commit's own tree (model code included): it reads the
# tiny checkpoint and the clips this process made, warms up on two clips, and prints one JSON line.
BEFORE_CHILD = r"""
import json, sys, time
from minicpmo_cli.api import asr
from minicpmo_cli.api.engine import DecodeOptions, LoadOptions, load
model, device, batch, tokens, repeats, *paths = sys.argv[1:]
engine = load(LoadOptions(model=model, device=device), vision=False, audio=True, tts=False)
inputs = [asr.AudioInput.from_path(p) for p in paths]
options = asr.AsrOptions(batch_size=None if batch == "auto" else int(batch))
decode = DecodeOptions(max_new_tokens=int(tokens))
list(asr.transcribe_many(engine, inputs[:2], options, decode))
seconds = []
for _ in range(int(repeats)):
    started = time.perf_counter()
    records = list(asr.transcribe_many(engine, inputs, options, decode))
    seconds.append(time.perf_counter() - started)
texts = [(r.text, [(s.start, s.end) for s in r.segments]) for r in records]
print("@@before " + json.dumps({"seconds": seconds, "texts": texts}))
"""


def base_tree(base: str) -> Path:
    """The base commit's files, exported into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="asr-base-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", base], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_before(base: str, model: str, device: str, paths: list[Path], args) -> tuple[list[float], list]:
    """(seconds of each repeat, transcripts) of the base tree's asr, in a child process."""
    import json
    import os

    root = base_tree(base)
    env = {**os.environ, "PYTHONPATH": str(root)}
    batch = "auto" if args.batch_size is None else str(args.batch_size)
    command = [sys.executable, "-c", BEFORE_CHILD, model, device, batch, str(args.max_new_tokens),
               str(args.repeats), *map(str, paths)]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("@@before ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the base tree's asr failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("@@before "):])
    return result["seconds"], [(text, [tuple(s) for s in spans]) for text, spans in result["texts"]]


def timed(run) -> tuple[float, list]:
    started = time.perf_counter()
    records = list(run())
    return time.perf_counter() - started, records


def cues(records) -> list:
    return [(r.text, [(s.start, s.end) for s in r.segments]) for r in records]


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row; the median is printed")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the device's (4 on the CPU)")
    parser.add_argument("--base", default=BASE, help="the commit whose pipeline is 'before'")
    parser.add_argument("--gpu", action="store_true", help="the GPU rows: --model on cuda")
    parser.add_argument("--model", default=None, help="a checkpoint (default: a tiny random one)")
    parser.add_argument("--skip-before", action="store_true", help="no base-tree row (profiling this tree)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from minicpmo_cli.api import asr
    from minicpmo_cli.api.engine import DecodeOptions, LoadOptions, load

    workdir = Path(tempfile.mkdtemp(prefix="asr-stages-"))
    model = args.model
    if model is None:
        from minicpmo_cli.model.tiny import make_tiny_checkpoint

        model = str(workdir / "tiny")
        make_tiny_checkpoint(model)
    device = "cuda" if args.gpu else "cpu"
    paths = make_clips(workdir, args.clips)
    inputs = [asr.AudioInput.from_path(p) for p in paths]
    rows: dict[str, list[float]] = {"before": [], "staged": [], "fake": []}
    texts = {}
    if not args.skip_before:
        rows["before"], texts["before"] = run_before(args.base, model, device, paths, args)
    engine = load(LoadOptions(model=model, device=device), vision=False, audio=True, tts=False)
    options = asr.AsrOptions(batch_size=args.batch_size)
    decode = DecodeOptions(max_new_tokens=args.max_new_tokens)
    list(asr.transcribe_many(engine, inputs[:2], options, decode))  # warm-up: first calls, VAD model load
    for _ in range(args.repeats):
        seconds, records = timed(lambda: asr.transcribe_many(engine, inputs, options, decode))
        rows["staged"].append(seconds)
        texts["staged"] = cues(records)
    sys.path.insert(0, str(REPO))
    from tests.fake_engine import Recorder

    fake = Recorder().load(LoadOptions(model=model, device="cpu"), vision=False, audio=True, tts=False)
    list(asr.transcribe_many(fake, inputs[:2], options, decode))
    for _ in range(args.repeats):
        rows["fake"].append(timed(lambda: asr.transcribe_many(fake, inputs, options, decode))[0])
    report(args, model, device, rows, texts)
    return 0


def report(args, model: str, device: str, rows: dict, texts: dict) -> None:
    per_clip = {name: 1000 * statistics.median(values) / args.clips for name, values in rows.items() if values}
    print(f"asr of {args.clips} clips of {CLIP_SECONDS:.0f} s ({'tiny random' if args.model is None else model}, "
          f"{device}, --max-new-tokens {args.max_new_tokens}, median of {args.repeats}; startup excluded)\n")
    print("| pipeline | ms per clip | x real time |")
    print("|---|---:|---:|")
    labels = {"before": f"before ({args.base}, its own tree)", "staged": "staged",
              "fake": "staged, fake engine (non-model part)"}
    for name, value in per_clip.items():
        print(f"| {labels[name]} | {value:.1f} | {CLIP_SECONDS * 1000 / value:.0f} |")
    if "before" in per_clip:
        print(f"\nstaged vs before: {per_clip['before'] / per_clip['staged']:.2f}x lower wall time per clip; "
              f"transcripts and cue times identical: {texts['before'] == texts['staged']}")


if __name__ == "__main__":
    sys.exit(main())
