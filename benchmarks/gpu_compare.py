"""Stages of benchmarks/gpu_full_size.py that put our decoding next to transformers' ``generate``.

Rows: batch-1 decode tok/s and its share of the memory-bandwidth bound, prefill tok/s, asr of many clips
batched and one by one, TTS first audio and real-time factor, peak memory per command. "Ours" decoding is
``minicpmo_cli.generation.decode.generate_ids``; where that core is not in the package yet its cells say
"n/a (core missing)" and the other rows still run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

SAMPLE_RATE = 16000
TTS_SAMPLE_RATE = 24000
TTS_SENTENCE = "hello world, this is the assistant voice reading a short text aloud."
CORE_MISSING = "n/a (core missing)"


@dataclass
class Compared:
    """One measurement with our value and transformers' side by side (None: not measured, see note)."""

    metric: str
    unit: str
    ours: float | str | None
    baseline: float | str | None
    note: str = ""
    relative_to: str = ""  # another row's metric: the printed note adds "N.NNx" that row's own value


@dataclass
class Budget:
    """Sizes of the comparative stages (small with --cpu-smoke)."""

    decode_prompt: int = 1024
    new_tokens: int = 128
    prefill: list[int] = field(default_factory=lambda: [1024, 4096])
    asr_clips: int = 100
    asr_serial_clips: int = 20
    asr_seconds: float = 10.0
    asr_new_tokens: int = 32
    tts_frames: int = 200
    step: str | None = None  # eager | graph | compile; None: the library's default for the device
    image_side: int = 1344  # chat + image and omni: a 1344 x 1344 image is 9 slices + the overview


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median_time(fn: Callable[[], Any], device: str, repeats: int) -> float:
    fn()  # warm-up (and, compiled, the capture)
    return float(np.median([timed(fn, device)[0] for _ in range(repeats)]))


# ------------------------------------------------------------------------------------------ decoding
def load_core():
    """(generate_ids, DecodeSettings) of the decode core, or None where it is not there yet."""
    try:
        from minicpmo_cli.generation.decode import DecodeSettings, generate_ids
    except ImportError:
        return None
    return generate_ids, DecodeSettings


_ENGINES: dict[tuple, Any] = {}  # (id(llm), step) -> LLMEngine: its captured graphs outlive one call


def decode_kwargs(generate_ids, llm, step: str | None) -> dict:
    """How to run ``generate_ids`` in step mode ``step`` (None: the library's default for the device): on an
    engine of our own per mode where the core takes one (step runners), so that the graphs captured in the
    warm-up are replayed in the timed runs; else the older core's ``compile`` flag (graph and compile both
    meant its captured step; None: captured on CUDA, as it did by default)."""
    import inspect

    parameters = inspect.signature(generate_ids).parameters
    device = llm.lm_head.weight.device
    if "engine" in parameters:
        from minicpmo_cli.generation.engine import LLMEngine
        from minicpmo_cli.generation.step_runner import StepRunner, resolve_step

        mode = resolve_step(step, device)
        key = (id(llm), mode)
        if key not in _ENGINES:
            _ENGINES[key] = LLMEngine(llm, runner=StepRunner(mode), max_batch=1, threaded=False)
        return {"engine": _ENGINES[key]}
    if "compile" in parameters:
        return {"compile": device.type == "cuda" if step is None else step != "eager"}
    return {}


def speech_kwargs(step: str | None, device: str) -> dict:
    """The same for ``stream_speech``: a TTS step runner of our own per mode, or the older ``compile`` flag."""
    import inspect

    from minicpmo_cli.generation.speech import stream_speech

    parameters = inspect.signature(stream_speech).parameters
    if "runner" in parameters:
        from minicpmo_cli.generation.step_runner import StepRunner, resolve_step

        mode = resolve_step(step, device)
        key = ("tts", mode)
        if key not in _ENGINES:
            _ENGINES[key] = StepRunner(mode, "TTS")
        return {"runner": _ENGINES[key]}
    if "compile" in parameters:
        return {"compile": device.startswith("cuda") if step is None else step != "eager"}
    return {}


def ours_generate(core, llm, embeds, mask, count: int, step: str | None):
    generate_ids, settings_class = core
    settings = settings_class(sampling=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                              min_new_tokens=0, max_new_tokens=count, stop_ids=[])  # random weights: run N
    return generate_ids(llm, embeds, mask, settings, **decode_kwargs(generate_ids, llm, step))


def transformers_generate(llm, embeds, mask, count: int):
    return llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=count, min_new_tokens=count,
                        do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)


def _prompt(model, length: int, device: str, seed: int):
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    embeds = model.llm.get_input_embeddings()(ids.to(device))
    return embeds, torch.ones(1, length, dtype=torch.long, device=device)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes moved per second by a device-to-device copy of 1 GiB (read + write both counted)."""
    import torch

    source = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), device, repeats)
    del source, target
    return 2 * 2**30 / seconds


def decode_bytes_per_token(model, prompt: int) -> int:
    """What one batch-1 step must read: every LLM weight but the embedding table, plus the KV cache."""
    llm = model.llm
    weights = sum(p.numel() * p.element_size() for p in llm.parameters())
    table = llm.get_input_embeddings().weight
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * table.element_size() * prompt
    return weights - table.numel() * table.element_size() + kv


def decode_rows(model, device: str, budget: Budget, repeats: int) -> list[Compared]:
    """Greedy batch-1 decode: (t(N) - t(1)) / (N - 1) per token, ours and transformers on the same weights."""
    import torch

    core = load_core()
    embeds, mask = _prompt(model, budget.decode_prompt, device, seed=2)
    n = budget.new_tokens

    def rate(make: Callable[[int], Any]) -> float:
        with torch.inference_mode():
            first = median_time(lambda: make(1), device, repeats)
            whole = median_time(lambda: make(n), device, repeats)
        return (n - 1) / (whole - first) if whole > first else float("nan")

    baseline = rate(lambda count: transformers_generate(model.llm, embeds, mask, count))
    ours: float | str = CORE_MISSING
    if core is not None:
        ours = rate(lambda count: ours_generate(core, model.llm, embeds, mask, count, budget.step))
    bandwidth = copy_bandwidth(device, repeats) if device.startswith("cuda") else float("nan")
    bound = bandwidth / decode_bytes_per_token(model, budget.decode_prompt)
    rows = [Compared(f"decode, batch 1, {budget.decode_prompt}-token prompt", "tokens/s", ours, baseline,
                     f"{n} new tokens; our step: {budget.step or 'default'}")]
    if bound == bound:
        share = (lambda v: v / bound * 100 if isinstance(v, float) else v)
        rows.append(Compared("decode share of the bandwidth bound", "%", share(ours), share(baseline),
                             f"bound {bound:.0f} tok/s = copy bandwidth {bandwidth / 1e9:.0f} GB/s / "
                             f"{decode_bytes_per_token(model, budget.decode_prompt) / 1e9:.2f} GB read per token"))
    return rows


def prefill_rows(model, device: str, budget: Budget, repeats: int) -> list[Compared]:
    """Prompt tokens per second up to the first new token (generate with one new token)."""
    import torch

    core = load_core()
    rows = []
    for length in budget.prefill:
        embeds, mask = _prompt(model, length, device, seed=1)
        with torch.inference_mode():
            baseline = length / median_time(lambda: transformers_generate(model.llm, embeds, mask, 1), device,
                                            repeats)
            ours: float | str = CORE_MISSING
            if core is not None:
                ours = length / median_time(lambda: ours_generate(core, model.llm, embeds, mask, 1, "eager"),
                                            device, repeats)
        rows.append(Compared(f"prefill, {length} tokens", "tokens/s", ours, baseline, "time to the first token"))
    return rows


def quantize_llm(model, mode: str) -> str:
    """The LLM's decoder linears quantized in place from their float weights, as ``--quantize`` loads them;
    returns the kernel the linears run on (and why)."""
    from minicpmo_cli.model import quant

    names = quant.decoder_linear_names(model.config.num_hidden_layers)
    old = {name: model.get_submodule(name) for name in names}
    swapped = quant.replace_linears(model, names, mode, old[names[0]].weight.dtype)
    for name in names:
        linear, new = old.pop(name), swapped[name]
        if mode == "int8":
            new.set_weight(*quant.quantize_int8(linear.weight.detach()))
        else:
            q, scales, zeros = quant.quantize_int4(linear.weight.detach(), quant.INT4_GROUP_SIZE)
            new.set_weight(q, scales, zeros, quant.INT4_GROUP_SIZE)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        del linear  # the float weight goes as soon as its quantized form exists
    info = quant.summarize(model, mode, "--quantize")
    return f"{info.kernel}: {info.kernel_reason}"


def quant_rows(model, device: str, budget: Budget, repeats: int, mode: str) -> list[Compared]:
    """Batch-1 decode with the LLM quantized (``mode``): tok/s as the bf16 decode row measures it, the LLM's
    weights, and the peak GPU memory of that decode (weights + cache + activations)."""
    import torch

    core = load_core()
    if core is None:
        return [Compared(f"decode, {mode}", "tokens/s", CORE_MISSING, None)]
    kernel = quantize_llm(model, mode)
    weights = sum(t.numel() * t.element_size() for t in (*model.llm.parameters(), *model.llm.buffers()))
    embeds, mask = _prompt(model, budget.decode_prompt, device, seed=2)
    n = budget.new_tokens
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        first = median_time(lambda: ours_generate(core, model.llm, embeds, mask, 1, budget.step), device, repeats)
        whole = median_time(lambda: ours_generate(core, model.llm, embeds, mask, n, budget.step), device, repeats)
    rate = (n - 1) / (whole - first) if whole > first else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    decode = f"decode, batch 1, {budget.decode_prompt}-token prompt"
    return [Compared(f"{decode}, LLM {mode}", "tokens/s", rate, None,
                     f"{n} new tokens; our step: {budget.step or 'default'}; kernel {kernel}", decode),
            Compared(f"peak GPU memory, chat decode, LLM {mode}", "GiB", peak, None,
                     f"LLM weights {weights / 2**30:.2f} GiB (the LLM alone: a text chat's towers)")]


# ------------------------------------------------------------------------------------------ asr
def asr_rows(engine, budget: Budget) -> list[Compared]:
    """``transcribe_many`` of N equal-length noise clips: batched (default batch size) against one by one."""
    from minicpmo_cli.api.asr import AsrOptions, AudioInput, engine_batch_size, transcribe_many
    from minicpmo_cli.api.engine import DecodeOptions

    rng = np.random.default_rng(5)
    clips = [(0.1 * rng.standard_normal(int(budget.asr_seconds * SAMPLE_RATE))).astype(np.float32)
             for _ in range(budget.asr_clips)]
    inputs = [AudioInput(f"clip{i}", clip) for i, clip in enumerate(clips)]
    decode = DecodeOptions(max_new_tokens=budget.asr_new_tokens, sampling=False, num_beams=1,
                           repetition_penalty=1.0)

    def transcribe(items, size):
        return list(transcribe_many(engine, items, AsrOptions(batch_size=size), decode))

    transcribe(inputs[:2], None)  # warm-up
    batched_s, batched = timed(lambda: transcribe(inputs, None), engine.device)
    serial = inputs[:budget.asr_serial_clips]
    serial_s, one_by_one = timed(lambda: transcribe(serial, 1), engine.device)
    audio = budget.asr_seconds
    same = [r.text for r in batched[:len(serial)]] == [r.text for r in one_by_one]
    batched_x = len(inputs) * audio / batched_s
    serial_x = len(serial) * audio / serial_s
    return [Compared(f"asr, {len(inputs)} x {audio:.0f} s clips", "x real time", batched_x, serial_x,
                     f"ours: batched (batch {engine_batch_size(engine)}), baseline: one by one over "
                     f"{len(serial)} clips; {batched_x / serial_x:.1f}x; transcripts identical: "
                     f"{'yes' if same else 'NO'}; {budget.asr_new_tokens} new tokens at most")]


# ------------------------------------------------------------------------------------------ tts
def tts_rows(model, vocos, tts_tokenizer, device: str, budget: Budget) -> list[Compared]:
    """Streaming speech of one sentence: time to the first audio chunk and the real-time factor. Ours: the
    TTS step on the decoding core (budget.step; captured unless eager) and the first chunk yielded as soon as it is
    decoded; baseline: the same stream eager, its first audio taken where the old loop yielded it (with the
    second chunk: it held each chunk back for the cross-fade). There is no transformers generate for ChatTTS."""
    import torch

    from minicpmo_cli.generation.speech import stream_speech

    spk = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    spk = spk.to(device, model.tts.dtype)

    def speak(step: str | None) -> tuple[float, float, float, float]:
        start = time.perf_counter()
        arrivals, samples = [], 0
        for chunk in stream_speech(model.tts, vocos, tts_tokenizer, spk, TTS_SENTENCE,
                                   max_new_tokens=budget.tts_frames, seed=0, **speech_kwargs(step, device)):
            sync(device)
            arrivals.append(time.perf_counter() - start)
            samples += len(chunk.wav)
        total = time.perf_counter() - start
        first = arrivals[0] if arrivals else float("nan")
        held_back = arrivals[1] if len(arrivals) > 1 else total
        return first, held_back, total, samples / TTS_SAMPLE_RATE

    with torch.inference_mode():
        speak(budget.step)  # warm-up (and, captured, the captures)
        first, _, total, seconds = speak(budget.step)
        speak("eager")
        _, old_first, old_total, _ = speak("eager")
    rtf = total / seconds if seconds else float("nan")
    old_rtf = old_total / seconds if seconds else float("nan")
    return [Compared("TTS first audio", "ms", first * 1000, old_first * 1000,
                     f"streaming, 25-frame first chunk; baseline: eager, first chunk held back to the second "
                     f"(the old loop); our step: {budget.step or 'default'}"),
            Compared("TTS real-time factor", "RTF", rtf, old_rtf,
                     f"{seconds:.1f} s of speech in {total:.2f} s ({budget.tts_frames} frames at most); "
                     f"baseline: eager")]


# ------------------------------------------------------------------------------------------ memory
def make_engine(model, vocos, tiny_dir: Path, device: str, dtype, step: str | None = None):
    """An api Engine around the random model, with the tiny checkpoint's processor (tokenizer, features)."""
    from minicpmo_cli.api.engine import Engine, LoadOptions
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    model.vocos = vocos
    options = LoadOptions(model=str(tiny_dir), device=device)
    engines = {}
    try:  # the step runners' engines (api/engine.py make_engines), where the package has them
        from minicpmo_cli.api.engine import make_engines

        options = LoadOptions(model=str(tiny_dir), device=device, step=step)
        engines = dict(zip(("llm_engine", "tts_runner"), make_engines(model, options, device)))
    except ImportError:
        pass
    return Engine(model=model, processor=MiniCPMOProcessor.from_pretrained(str(tiny_dir)), device=device,
                  dtype=dtype, options=options, towers={"vision": True, "audio": True, "tts": True}, **engines)


def command_workloads(engine, vocos, tts_tokenizer, budget) -> dict[str, Callable[[], Any]]:
    """One representative piece of work per command, for its peak memory."""
    import torch
    from PIL import Image

    from minicpmo_cli.api.asr import AsrOptions, AudioInput, transcribe_many
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.generation.speech import stream_speech

    rng = np.random.default_rng(6)
    side = budget.image_side
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    second = (0.1 * rng.standard_normal(SAMPLE_RATE)).astype(np.float32)
    clips = [AudioInput(f"c{i}", (0.1 * rng.standard_normal(int(budget.asr_seconds * SAMPLE_RATE))).astype(
        np.float32)) for i in range(budget.asr_clips)]
    greedy = DecodeOptions(max_new_tokens=budget.new_tokens, sampling=False, num_beams=1)
    model = engine.model
    spk = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(4))

    def speech():
        for _ in stream_speech(model.tts, vocos, tts_tokenizer, spk.to(engine.device, model.tts.dtype),
                               TTS_SENTENCE, max_new_tokens=budget.tts_frames, seed=0,
                               **speech_kwargs(budget.step, engine.device)):
            pass

    return {
        "asr": lambda: list(transcribe_many(engine, clips, AsrOptions(batch_size=None),
                                            DecodeOptions(max_new_tokens=budget.asr_new_tokens, sampling=False,
                                                          num_beams=1))),
        "chat": lambda: engine.generate([{"role": "user", "content": ["Tell me a story."]}], greedy),
        "chat + image": lambda: engine.generate([{"role": "user", "content": [image, "Describe it."]}], greedy),
        "tts": speech,
        "omni": lambda: (engine.generate([{"role": "user", "content": [image, second, "What happens?"]}], greedy,
                                         omni_input=True), speech()),
    }



COMMAND_TOWERS = {  # what each command loads (api/engine.py load(...) flags)
    "asr": ("llm", "apm", "audio_projection_layer"),
    "chat": ("llm",),
    "chat + image": ("llm", "vpm", "resampler"),
    "tts": ("llm", "tts", "vocos"),
    "omni": ("llm", "vpm", "resampler", "apm", "audio_projection_layer", "tts", "vocos"),
}


def tower_bytes(model, vocos, names) -> int:
    modules = {name: child for name, child in model.named_children()} | {"vocos": vocos}
    return sum(p.numel() * p.element_size() for name in names for p in modules[name].parameters())


def peak_extra(fn: Callable[[], Any], device: str) -> float:
    """Bytes allocated at the peak of ``fn`` above what was allocated before it."""
    import torch

    if not device.startswith("cuda"):
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def memory_rows(model, vocos, workloads: dict[str, Callable[[], Any]], device: str) -> list[Compared]:
    """Peak memory of each command: the weights of the towers it loads + the activation peak of its work."""
    rows = []
    for command, work in workloads.items():
        try:
            extra = peak_extra(work, device)
        except Exception as exc:  # a failing workload must not hide the other rows
            rows.append(Compared(f"peak memory, {command}", "GiB", f"error: {exc}", None))
            continue
        weights = tower_bytes(model, vocos, COMMAND_TOWERS[command])
        total = (weights + extra) / 2**30 if extra == extra else float("nan")
        rows.append(Compared(f"peak memory, {command}", "GiB", total, None,
                             f"weights {weights / 2**30:.1f} GiB + peak activations "
                             f"{extra / 2**30 if extra == extra else float('nan'):.2f} GiB"))
    return rows


def render(rows: list[Compared]) -> list[str]:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        return "nan" if value != value else (f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}")

    lines = ["| measurement | unit | ours | transformers generate / baseline | notes |", "|---|---|---:|---:|---|"]
    lines += [f"| {r.metric} | {r.unit} | {cell(r.ours)} | {cell(r.baseline)} | {r.note} |" for r in rows]
    return lines


class TablePrinter:
    """Rows as markdown lines the moment they come; a table header whenever the kind of row changes."""

    HEADERS = {
        "towers": ["| section | measurement | value | unit | notes |", "|---|---|---:|---|---|"],
        "compared": ["| measurement | unit | ours | transformers generate / baseline | notes |",
                     "|---|---|---:|---:|---|"],
    }

    def __init__(self) -> None:
        self.kind = None
        self.ours: dict[str, float] = {}  # compared rows' own values, for the quantized rows' ratio

    def row(self, row: dict) -> None:
        kind = row.get("table", "compared")
        if kind != self.kind:
            self._print(["", *self.HEADERS[kind]])
            self.kind = kind
        if kind == "towers":
            value = row["value"]
            cell = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
            self._print([f"| {row['section']} | {row['metric']} | {cell} | {row['unit']} | {row['detail']} |"])
            return
        relative = row.pop("relative_to", "")
        ours, base = row["ours"], self.ours.get(relative)
        if relative and isinstance(ours, (int, float)) and ours == ours and base and base == base:
            row["note"] += f"; {ours / base:.2f}x the unquantized row"
        if isinstance(ours, (int, float)):
            self.ours[row["metric"]] = ours
        self._print(render([Compared(**{k: v for k, v in row.items() if k != "table"})])[2:])

    def note(self, stage: str, status: str, seconds: float) -> None:
        print(f"[{stage}] {status} ({seconds:.0f} s)", file=sys.stderr, flush=True)
        if status != "done":
            self.row({"table": "compared", "metric": f"stage {stage}", "unit": "-", "ours": status,
                      "baseline": None, "note": "its rows are lost; the other stages ran on"})

    @staticmethod
    def _print(lines: list[str]) -> None:
        print("\n".join(lines), flush=True)
