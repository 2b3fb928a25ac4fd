#!/usr/bin/env python3
"""CPU pipeline benchmark: every task of the library, end to end, on a tiny random checkpoint.

Measures, through the library API (``minicpmo_cli.api``): load time per task (text-only, ASR towers, all
towers), prompt prefill time and decode tokens/s for text chat, ASR speed on a 30 s and a 70 s clip, image
chat time for one image, TTS speed for a sentence, and peak RSS. Prints a markdown table.

    python benchmarks/pipeline.py                       # tiny random checkpoint, made in a temp folder
    python benchmarks/pipeline.py --repeats 5 --threads 2
    python benchmarks/pipeline.py --model /path/to/MiniCPM-o-2_6 --threads 16
    python benchmarks/pipeline.py --asr-stages [--clips 100] [--gpu --model DIR]   # asr: staged vs before

Random weights rarely emit an end token, so on the tiny checkpoint every answer runs to its token budget
(a worst case for decode time), and speech is generated for a fixed number of frames (``force_no_stop``).
With ``--model`` the model stops where it likes; the table says how much it produced.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

SAMPLE_RATE = 16000  # Hz, what the audio encoder takes
TTS_SAMPLE_RATE = 24000  # Hz, what the vocoder writes
TTS_SENTENCE = "Hello, this is a short test of the speech synthesis, read aloud at a normal pace."
IMAGE_QUESTION = "What is in the image? Describe it briefly."
FILLER = ("The quick brown fox jumps over the lazy dog while a cat watches from the tree. "
          "Please summarize the main content of this text in one sentence. ")
SPEECH_TEXT = (
    "Speech recognition turns spoken words into written text. A good system keeps up with a speaker in real "
    "time, copes with noise, and never cuts a sentence short. This clip was made by a speech synthesizer to "
    "measure how fast the model listens. It talks about the weather, the news, and the time of day. "
    "Tomorrow will be sunny in the morning, with clouds later in the afternoon and a light wind from the "
    "west. In other news, the city library opens a new reading room on Monday, with long tables, quiet "
    "corners and a view of the river. Visitors may borrow up to ten books at once. "
)


@dataclass
class Row:
    task: str
    metric: str
    value: float
    unit: str
    detail: str = ""


# ------------------------------------------------------------------------------------------ helpers
def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def greedy(new_tokens: int, force_length: bool):
    """Greedy decoding of exactly ``new_tokens`` (``force_length``) or at most that many."""
    from minicpmo_cli.api.engine import DecodeOptions

    return DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens if force_length else None, seed=0)


# ------------------------------------------------------------------------------------------ inputs
def speech_clips(folder: Path, lengths: list[float]) -> tuple[dict[float, np.ndarray], str]:
    """16 kHz clips of the given lengths: espeak-ng speech if installed, else syllable-like tone bursts."""
    longest = max(lengths)
    wav = folder / "speech.wav"
    if shutil.which("espeak-ng"):
        text = SPEECH_TEXT * 4
        subprocess.run(["espeak-ng", "-s", "165", "-w", str(wav), text], check=True, capture_output=True)
        from minicpmo_cli.media.audio import load_audio

        samples = load_audio(str(wav), SAMPLE_RATE)
        while len(samples) < longest * SAMPLE_RATE:
            samples = np.concatenate([samples, samples])
        source = "espeak-ng speech"
    else:
        samples = synthetic_speech(longest)
        source = "synthetic tone bursts (espeak-ng not found)"
    return {s: np.ascontiguousarray(samples[: int(s * SAMPLE_RATE)], dtype=np.float32) for s in lengths}, source


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Tone bursts at a syllable rate with short pauses, so silence splitting has somewhere to cut."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(120 + 40 * np.sin(2 * np.pi * 0.3 * t)) / SAMPLE_RATE  # gliding 80-160 Hz
    voice = np.sin(phase) + 0.3 * np.sin(2 * phase)
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * ((t % 4.0) < 3.4)  # 4 Hz syllables, 0.6 s pause per 4 s
    return (0.3 * voice * syllables + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def long_prompt(tokenizer, target_tokens: int) -> str:
    """Repeated filler cut to ``target_tokens`` tokens of this tokenizer (the chat template adds a few)."""
    per_copy = max(1, len(tokenizer.encode(FILLER, add_special_tokens=False)))
    ids = tokenizer.encode(FILLER * (target_tokens // per_copy + 1), add_special_tokens=False)
    return tokenizer.decode(ids[:target_tokens])


def random_image(size: tuple[int, int], seed: int = 0):
    """A smooth random picture (upscaled noise); the model sees only pixels, so content does not matter."""
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


class _TimingStreamer:
    """A ``generate`` streamer that only notes when each new token arrives (``put`` is called once with the
    prompt ids, empty for ``inputs_embeds``, then once per generated token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class GenerateCall:
    start: float
    stamps: list[float]
    tokens: int

    @property
    def decode_rate(self) -> float:
        """Tokens/s after the first: from token timestamps of one call, so no two noisy runs are subtracted."""
        if len(self.stamps) < 2 or self.stamps[-1] <= self.stamps[0]:
            return float("nan")
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


class GenerateProbe:
    """Wraps ``llm.generate`` on the instance to count the tokens it returns and time each token.

    Counting ids, not re-tokenised text: random ids do not survive decode + encode. Timing uses a streamer,
    which transformers allows for greedy/sampling (batch 1) but not beam search: that is only counted."""

    def __init__(self, engine) -> None:
        self.llm = engine.model.llm
        self.calls: list[GenerateCall] = []

    def __enter__(self) -> "GenerateProbe":
        original = self.llm.generate

        def probed(*args, **kwargs):
            streamer = None
            if kwargs.get("streamer") is None and kwargs.get("num_beams", 1) == 1:
                streamer = kwargs["streamer"] = _TimingStreamer()
            start = time.perf_counter()
            sequences = original(*args, **kwargs)
            stamps = streamer.stamps if streamer is not None else []
            self.calls.append(GenerateCall(start, stamps, int(sequences.shape[1])))
            return sequences

        self.llm.generate = probed  # an instance attribute shadows the method until __exit__
        return self

    def __exit__(self, *exc) -> None:
        del self.llm.generate

    def reset_then(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` that first forgets earlier calls, so after ``timed`` ``calls`` are the last run's."""
        def run():
            self.calls = []
            return fn()
        return run

    @property
    def tokens(self) -> int:
        return sum(call.tokens for call in self.calls)


# ------------------------------------------------------------------------------------------ benchmarks
LOAD_TASKS = (
    ("text-only (LLM)", dict(vision=False, audio=False, tts=False)),
    ("asr (LLM + audio)", dict(vision=False, audio=True, tts=False)),
    ("all towers (+vision, TTS)", dict(vision=True, audio=True, tts=True)),
)


def bench_loads(options, repeats: int) -> tuple[list[Row], Any]:
    """Load time and RSS growth per task; returns the all-towers engine for the other benchmarks."""
    from minicpmo_cli import api

    rows, engine = [], None
    for label, towers in LOAD_TASKS:
        engine = None
        gc.collect()
        before = current_rss_mib()
        seconds, engine = timed(lambda: api.load(options, **towers), repeats)
        grown = current_rss_mib() - before
        rows.append(Row("load", label, seconds * 1000, "ms", f"RSS +{grown:.0f} MiB (last load)"))
    return rows, engine


def bench_text_chat(engine, prompt_tokens: int, new_tokens: int, repeats: int, force: bool) -> list[Row]:
    """Time to first token (template, embeddings, prefill) and decode speed, from per-token timestamps."""
    prompt = long_prompt(engine.processor.tokenizer, prompt_tokens)
    msgs = [{"role": "user", "content": [prompt]}]
    n_prompt = engine.processor.apply_chat_template(msgs=msgs)["input_ids"].shape[1]
    engine.generate(msgs, greedy(2, True))  # warm-up: first-call allocations, lazy imports
    first_token, rates, produced = [], [], 0
    with GenerateProbe(engine) as probe:
        for _ in range(repeats):
            start = time.perf_counter()
            engine.generate(msgs, greedy(new_tokens, force))
            call = probe.calls[-1]
            first_token.append(call.stamps[0] - start if call.stamps else float("nan"))
            rates.append(call.decode_rate)
            produced = call.tokens
    ttft = statistics.median(first_token)
    return [
        Row("text chat", f"prefill, {n_prompt}-token prompt", ttft * 1000, "ms",
            f"time to first token; {n_prompt / ttft:.0f} prompt tokens/s"),
        Row("text chat", "decode, batch 1", statistics.median(rates), "tokens/s",
            f"{produced} new tokens, greedy, KV cache"),
    ]


def bench_asr(engine, clips: dict[float, np.ndarray], source: str, repeats: int) -> list[Row]:
    """``api.asr.transcribe`` on each clip (VAD pieces of <= 30 s, greedy, 512-token cap)."""
    from minicpmo_cli.api.asr import AsrOptions, transcribe

    rows = []
    for seconds, samples in sorted(clips.items()):
        pieces = len(AsrOptions().segment(samples))
        with GenerateProbe(engine) as counter:
            wall, _ = timed(counter.reset_then(lambda: transcribe(engine, samples)), repeats)
        rows.append(Row("asr", f"{seconds:.0f} s clip", seconds / wall, "x real time",
                        f"RTF {wall / seconds:.3f} (wall {wall:.2f} s); {pieces} piece(s), {counter.tokens} tokens "
                        f"out; {source}"))
    return rows


def bench_image_chat(engine, size: tuple[int, int], new_tokens: int, repeats: int, force: bool) -> list[Row]:
    """One image + question: slicing, vision encode, prefill and ``new_tokens`` of greedy decoding."""
    import torch

    image = random_image(size)
    msgs = [{"role": "user", "content": [image, IMAGE_QUESTION]}]
    inputs = engine.processor.apply_chat_template(msgs=msgs)
    slices = len(inputs["pixel_values"][0])
    data = {k: inputs[k] for k in ("input_ids", "pixel_values", "tgt_sizes", "image_bound")}

    def encode():
        with torch.inference_mode():
            return engine.model.get_vllm_embedding(data)

    encode()  # warm-up
    vision, _ = timed(encode, repeats)
    whole, _ = timed(lambda: engine.generate(msgs, greedy(new_tokens, force)), repeats)
    label = f"{size[0]}x{size[1]} image ({slices} images: 1 overview + {slices - 1} slices)"
    return [
        Row("image chat", "vision encode (SigLIP + resampler)", vision * 1000, "ms", label),
        Row("image chat", f"whole answer, {new_tokens} new tokens", whole * 1000, "ms",
            f"{inputs['input_ids'].shape[1]}-token prompt; processing + encode + prefill + decode"),
    ]


def speaker_state(engine, text: str):
    """The LLM's ``<|spk|>`` state for a read-aloud prompt under the TTS template (what TTS is conditioned on)."""
    import torch

    from minicpmo_cli.generation.text import spk_embeds_from_hidden

    msgs = [{"role": "user", "content": [f"Please read the following text aloud: {text}"]}]
    inputs = engine.processor.apply_chat_template(msgs=msgs, use_tts_template=True).to(engine.device)
    with torch.inference_mode():
        embeds, _ = engine.model.get_inputs_embeds(dict(inputs))
        hidden = engine.model.llm.model(inputs_embeds=embeds).last_hidden_state
    return spk_embeds_from_hidden(hidden, inputs["spk_bounds"])


def bench_tts(engine, repeats: int, force: bool) -> list[Row]:
    """Sentence -> audio codes (ChatTTS) -> mel (DVAE) -> wav (Vocos), timed per stage."""
    from minicpmo_cli.generation.speech import codes_to_wav, generate_codes, make_sampler

    model = engine.model
    spk = speaker_state(engine, TTS_SENTENCE)

    def codes():
        return generate_codes(model.tts, model.tts_processor, spk, TTS_SENTENCE, sampler=make_sampler(0),
                              force_no_stop=force, max_new_tokens=0 if force else 2048)

    gen, result = timed(codes, repeats)
    vocode, wav = timed(lambda: codes_to_wav(model.tts, model.vocos, result), repeats)
    frames = int(result.shape[1])
    audio = len(wav) / TTS_SAMPLE_RATE
    how = "fixed length (random weights: no stop)" if force else "stops at the model's end code"
    return [
        Row("tts", "speech codes", frames / gen, "frames/s", f"{frames} frames = {audio:.1f} s audio; {how}"),
        Row("tts", "DVAE + vocoder", audio / vocode, "x real time", f"{vocode * 1000:.0f} ms for {audio:.1f} s"),
        Row("tts", "sentence, codes + vocoder", audio / (gen + vocode), "x real time",
            f"RTF {(gen + vocode) / audio:.3f}; sentence of {len(TTS_SENTENCE.split())} words"),
    ]


# ------------------------------------------------------------------------------------------ report
def render(rows: list[Row], header: list[str]) -> str:
    lines = header + ["", "| task | measurement | value | unit | notes |", "|---|---|---:|---|---|"]
    for row in rows:
        value = f"{row.value:.3g}" if abs(row.value) < 100 else f"{row.value:.0f}"
        lines.append(f"| {row.task} | {row.metric} | {value} | {row.unit} | {row.detail} |")
    return "\n".join(lines)


def machine_header(args, model_label: str, threads: int) -> list[str]:
    import torch
    import transformers

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"# minicpmo pipeline benchmark ({model_label})",
        "",
        f"- machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"load average {load} (before the run); torch {torch.__version__}, transformers {transformers.__version__}",
        f"- device {args.device}, torch threads {threads}, repeats {args.repeats} (median shown)",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random one made in a temp folder)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for the tiny checkpoint, torch's default otherwise)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on the CPU), bfloat16, float16, float32")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="text chat prompt length")
    parser.add_argument("--new-tokens", type=int, default=128, help="text chat decode length")
    parser.add_argument("--image-size", default="1344x896", help="WxH of the image chat picture")
    parser.add_argument("--image-tokens", type=int, default=32, help="new tokens of the image chat answer")
    parser.add_argument("--clips", default="30,70", help="ASR clip lengths in seconds, comma-separated")
    parser.add_argument("--skip", default="", help="comma-separated: text,asr,image,tts")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        args.image_size = tuple(int(v) for v in args.image_size.lower().split("x"))
        args.clips = [float(v) for v in args.clips.split(",") if v.strip()]
    except ValueError:
        parser.error("--image-size is WxH (e.g. 1344x896) and --clips a list of seconds (e.g. 30,70)")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def run(args: argparse.Namespace, workdir: Path) -> str:
    import torch

    from minicpmo_cli.api.engine import LoadOptions

    tiny = args.model is None
    if tiny:
        from minicpmo_cli.model.tiny import make_tiny_checkpoint

        model_dir = make_tiny_checkpoint(workdir / "tiny")
    else:
        model_dir = Path(args.model)
    # One thread for the tiny model: its ops are too small to split, and on a busy machine extra OpenMP
    # threads spin against other processes (measured here: ~10x slower TTS decoding with 2 threads).
    threads = args.threads or (1 if tiny else torch.get_num_threads())
    torch.set_num_threads(threads)
    options = LoadOptions(model=str(model_dir), device=args.device, dtype=args.dtype)
    header = machine_header(args, "tiny random checkpoint" if tiny else str(model_dir), threads)
    rows, engine = bench_loads(options, args.repeats)
    force = tiny  # random weights never choose to stop: fix the amount of work instead
    if "text" not in args.skip:
        rows += bench_text_chat(engine, args.prompt_tokens, args.new_tokens, args.repeats, force)
    if "asr" not in args.skip and args.clips:
        clips, source = speech_clips(workdir, args.clips)
        rows += bench_asr(engine, clips, source, args.repeats)
    if "image" not in args.skip:
        rows += bench_image_chat(engine, args.image_size, args.image_tokens, args.repeats, force)
    if "tts" not in args.skip:
        rows += bench_tts(engine, args.repeats, force)
    rows.append(Row("process", "peak RSS", peak_rss_mib(), "MiB", "resource.getrusage ru_maxrss"))
    if str(engine.device).startswith("cuda"):
        rows.append(Row("process", "peak GPU memory", torch.cuda.max_memory_allocated() / 2**20, "MiB",
                        "torch.cuda.max_memory_allocated"))
    return render(rows, header)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--asr-stages" in argv:  # the staged asr pipeline against the one before it (benchmarks/asr_stages.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import asr_stages

        return asr_stages.main([a for a in argv if a != "--asr-stages"])
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minicpmo-bench-") as tmp:
        table = run(args, Path(tmp))
    print(table)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
