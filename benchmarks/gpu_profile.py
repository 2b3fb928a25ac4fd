#!/usr/bin/env python3
"""One decode step of the full-size LLM under torch.profiler: where its time goes, and at what bandwidth.

The LLM (Qwen2-7B of MiniCPM-o 2.6, random bf16 weights, gpu_model.py) decodes after a ``--prompt``-token
prompt through our decode core. Two profiles, N+1 and 1 new tokens, are subtracted op by op, so what is left
is N decode steps (prefill and the first sample cancel out), divided by N:

- per aten op (and its input shapes), eager step: calls per step, device time per step, bytes read per step
  (the inputs' sizes; an in-place op's target is left out, it is written, not read) and the achieved GB/s.
  Batch-1 decode must read every weight once per token, so the GB/s of the matrix products against the
  device's copy bandwidth says how close each comes to the limit; what is not a weight read (norms, rotary,
  the float32 logits over 151,700 entries, sampling) shows up as time with few bytes;
- per GPU kernel, for the step the library runs by default on CUDA (the captured one, where the core has a
  step runner: ``--step graph``): calls and time per step;
- on CUDA, the attention backend torch picks for a decode call with cuDNN attention on and off, and the
  time of 64 calls whose key length grows by one each (the eager loop's pattern).

    python benchmarks/gpu_profile.py                      # CUDA GPU, ~16 GB; well under a minute on an H200
    python benchmarks/gpu_profile.py --quantize int4 --prompt 4096 --steps 32 --top 30
    python benchmarks/gpu_profile.py --cpu-smoke          # no GPU: the tiny config on the CPU (CPU time)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

EXIT_ENVIRONMENT = 4
VIEWS = {"aten::t", "aten::transpose", "aten::view", "aten::as_strided", "aten::reshape", "aten::expand",
         "aten::slice", "aten::narrow", "aten::select", "aten::unsqueeze", "aten::permute", "aten::detach",
         "aten::_reshape_alias", "aten::alias", "aten::squeeze", "aten::unflatten"}  # they read nothing
DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
               "bool": 1, "signed char": 1, "unsigned char": 1, "c10::Float8_e4m3fn": 1}


@dataclass
class OpRow:
    name: str
    shapes: str
    calls: float  # per step
    seconds: float  # device time per step (CPU time on the CPU)
    bytes: float  # read per step

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens before the profiled steps")
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled (averaged)")
    parser.add_argument("--top", type=int, default=25, help="rows of each table")
    parser.add_argument("--quantize", default="none", choices=("none", "int8", "int4"))
    parser.add_argument("--step", default="graph", choices=("eager", "graph", "compile"),
                        help="the step of the kernel table (default graph; the op table is always eager)")
    parser.add_argument("--config", help="config.json to build (default: the shared reference or an embedded copy)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the tiny config on the CPU, a few steps")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.dtype, args.prompt, args.steps = "cpu", "float32", 16, 3
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def build_llm(args, workdir: Path):
    import gpu_model
    import torch

    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    tiny_config, ids = gpu_model.tiny_ids(make_tiny_checkpoint(workdir / "tiny"))
    config_dict, source = (tiny_config, "tiny test config") if args.cpu_smoke else gpu_model.load_config_dict(args)
    if args.device == "cpu":
        torch.set_num_threads(1)
    model, _ = gpu_model.build_on_meta(gpu_model.make_config(config_dict, ids, "sdpa"), getattr(torch, args.dtype))
    gpu_model.materialise(model.llm, args.device, torch.Generator(device=args.device).manual_seed(0))
    return model, source


# ------------------------------------------------------------------------------------------ profiling
def profile_generate(model, embeds, mask, count: int, step: str, device: str):
    """The events of one ``generate_ids`` call of ``count`` new tokens (after an unprofiled warm-up)."""
    import gpu_compare
    import torch
    from torch.profiler import ProfilerActivity, profile

    core = gpu_compare.load_core()
    gpu_compare.ours_generate(core, model.llm, embeds, mask, count, step)  # warm-up / capture
    gpu_compare.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.inference_mode(), profile(activities=activities, record_shapes=True) as prof:
        gpu_compare.ours_generate(core, model.llm, embeds, mask, count, step)
        gpu_compare.sync(device)
    return prof


def input_bytes(event, fallback: int) -> int:
    """Bytes of the op's tensor inputs (an in-place op's first input, its target, left out)."""
    if event.name in VIEWS:
        return 0
    shapes = list(getattr(event, "input_shapes", None) or [])
    dtypes = list(getattr(event, "input_dtypes", None) or [])
    total = 0
    for index, shape in enumerate(shapes):
        if not isinstance(shape, (list, tuple)) or not shape or not all(isinstance(d, int) for d in shape):
            continue
        if index == 0 and event.name.endswith("_"):
            continue
        size = DTYPE_BYTES.get(dtypes[index], fallback) if index < len(dtypes) else fallback
        count = 1
        for dim in shape:
            count *= dim
        total += count * size
    return total


def op_table(prof, cuda: bool, fallback: int, lengths: range) -> dict[tuple[str, str], list[float]]:
    """(op, shapes) -> [calls, seconds, bytes], over the ops that ran work themselves (self time). A size in
    ``lengths`` (the cache lengths the steps went through) is written L, so one op of every step is one row."""
    table: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for event in prof.events():
        if event.device_type.name != "CPU":
            continue
        seconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        if seconds <= 0:
            continue
        key = (event.name, short_shapes(event.input_shapes, lengths))
        row = table[key]
        row[0] += 1
        row[1] += seconds
        row[2] += input_bytes(event, fallback)
    return table


def kernel_table(prof) -> dict[str, list[float]]:
    """GPU kernel name -> [calls, seconds]."""
    table: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for average in prof.key_averages():
        if average.device_type.name == "CUDA" and average.self_device_time_total > 0:
            table[average.key][0] += average.count
            table[average.key][1] += average.self_device_time_total / 1e6
    return table


def per_step(long: dict, short: dict, steps: int) -> dict:
    """(long - short) / steps, key by key: what the decode steps alone did."""
    out = {}
    for key, values in long.items():
        base = short.get(key, [0.0] * len(values))
        diff = [(a - b) / steps for a, b in zip(values, base)]
        if diff[0] > 1e-9 or diff[1] > 0:
            out[key] = diff
    return out


def short_shapes(shapes, lengths: range = range(0)) -> str:
    def size(d) -> str:
        return "L" if d in lengths else str(d)

    parts = ["x".join(size(d) for d in s) if isinstance(s, (list, tuple)) and s else "-" for s in shapes or []]
    text = ", ".join(p for p in parts if p != "-")
    return text if len(text) <= 48 else text[:45] + "..."


# ------------------------------------------------------------------------------------------ attention
def attention_rows(model, device: str, dtype, prompt: int, calls: int = 64) -> list[str]:
    """Which SDPA backend a decode call gets with cuDNN attention on and off, and 64 calls whose key length
    grows by one each (the eager loop: cuDNN builds a graph per new shape)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    query = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
    keys = torch.randn(1, kv_heads, prompt + calls, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    lines = ["| cuDNN attention | backend chosen (key length %d) | %d calls, key length growing | per call |"
             % (prompt, calls), "|---|---|---:|---:|"]
    try:
        for enabled in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(enabled)
            names = {backend.value: name for name, backend in SDPBackend.__members__.items()}
            try:
                choice = torch._fused_sdp_choice(query, keys[:, :, :prompt], values[:, :, :prompt],
                                                 enable_gqa=True)
                name = names.get(choice, str(choice))
            except (RuntimeError, TypeError) as exc:  # a private function: its signature may move
                name = f"unknown ({type(exc).__name__})"
            torch.cuda.synchronize()
            start = time.perf_counter()
            for length in range(prompt + 1, prompt + calls + 1):
                F.scaled_dot_product_attention(query, keys[:, :, :length], values[:, :, :length], enable_gqa=True)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            lines.append(f"| {'on' if enabled else 'off'} | {name} | {seconds * 1000:.1f} ms | "
                         f"{seconds / calls * 1e6:.0f} us |")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    return lines


# ------------------------------------------------------------------------------------------ report
def render_ops(rows: list[OpRow], top: int, unit: str) -> list[str]:
    lines = [f"| op | input shapes | calls / step | {unit} / step | MB read / step | GB/s |",
             "|---|---|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: -r.seconds)[:top]:
        rate = row.rate / 1e9
        lines.append(f"| {row.name} | {row.shapes} | {row.calls:.0f} | {row.seconds * 1e6:.1f} | "
                     f"{row.bytes / 1e6:.2f} | {'-' if rate != rate else f'{rate:.0f}'} |")
    return lines


def summary(rows: list[OpRow], bandwidth: float, wall: float) -> list[str]:
    seconds = sum(r.seconds for r in rows)
    moved = sum(r.bytes for r in rows)
    heavy = [r for r in rows if r.bytes >= 1e6]  # the weight reads
    heavy_s, heavy_b = sum(r.seconds for r in heavy), sum(r.bytes for r in heavy)
    lines = [f"- eager step: {seconds * 1e3:.2f} ms of op time, {moved / 1e9:.3f} GB read: "
             f"{moved / seconds / 1e9 if seconds else float('nan'):.0f} GB/s over the op time; wall "
             f"{wall * 1e3:.2f} ms per step",
             f"- ops reading >= 1 MB (weights, KV cache): {heavy_s * 1e3:.2f} ms, {heavy_b / 1e9:.3f} GB, "
             f"{heavy_b / heavy_s / 1e9 if heavy_s else float('nan'):.0f} GB/s; the other ops: "
             f"{(seconds - heavy_s) * 1e3:.2f} ms"]
    if bandwidth == bandwidth:
        lines.append(f"- device copy bandwidth {bandwidth / 1e9:.0f} GB/s: reading {moved / 1e9:.3f} GB at "
                     f"that rate takes {moved / bandwidth * 1e3:.2f} ms, the bound of a step")
    return lines


def step_wall(model, embeds, steps: int, step: str, device: str) -> float:
    """Wall seconds per decode step: (t(N + 1) - t(1)) / N, medians of 3."""
    import gpu_compare

    core = gpu_compare.load_core()
    first = gpu_compare.median_time(lambda: gpu_compare.ours_generate(core, model.llm, embeds, None, 1, step),
                                    device, 3)
    whole = gpu_compare.median_time(
        lambda: gpu_compare.ours_generate(core, model.llm, embeds, None, steps + 1, step), device, 3)
    return (whole - first) / steps


def run(args) -> list[str]:
    import gpu_compare
    import torch

    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="minicpmo-gpu-profile-") as tmp:
        model, source = build_llm(args, Path(tmp))
    quantized = gpu_compare.quantize_llm(model, args.quantize) if args.quantize != "none" else "none"
    embeds, mask = gpu_compare._prompt(model, args.prompt, args.device, seed=2)
    fallback = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    out = [f"# one decode step, profiled ({source})", "",
           f"- device {name}; torch {torch.__version__}; {args.dtype}; quantization {quantized}; "
           f"{args.prompt}-token prompt; {args.steps} steps averaged", ""]
    with torch.inference_mode():
        long = profile_generate(model, embeds, mask, args.steps + 1, "eager", args.device)
        short = profile_generate(model, embeds, mask, 1, "eager", args.device)
        lengths = range(args.prompt, args.prompt + args.steps + 2)
        ops = per_step(op_table(long, cuda, fallback, lengths), op_table(short, cuda, fallback, lengths), args.steps)
        rows = [OpRow(name, shapes, *values) for (name, shapes), values in ops.items()]
        bandwidth = gpu_compare.copy_bandwidth(args.device, 3) if cuda else float("nan")
        wall = step_wall(model, embeds, args.steps, "eager", args.device)
        out += ["## per op, eager step", ""] + render_ops(rows, args.top, "us" if cuda else "CPU us")
        out += [""] + summary(rows, bandwidth, wall)
        if cuda:
            out += kernels_section(model, embeds, mask, args)
            out += ["", "## attention backend of a decode call", ""]
            out += attention_rows(model, args.device, getattr(torch, args.dtype), args.prompt)
    return out


def kernels_section(model, embeds, mask, args) -> list[str]:
    import gpu_compare

    taken = __import__("inspect").signature(gpu_compare.load_core()[0]).parameters
    step_taken = "step" in taken or "engine" in taken  # the core runs step runners
    if args.step != "eager" and not step_taken:
        return ["", f"(no kernel table for --step {args.step}: this decode core has no step runner; its "
                    "captured step is a torch.compile that takes a long warm-up)"]
    long = profile_generate(model, embeds, mask, args.steps + 1, args.step, args.device)
    short = profile_generate(model, embeds, mask, 1, args.step, args.device)
    kernels = per_step(kernel_table(long), kernel_table(short), args.steps)
    wall = step_wall(model, embeds, args.steps, args.step, args.device)
    total = sum(v[1] for v in kernels.values())
    lines = ["", f"## per GPU kernel, {args.step} step", "",
             f"- kernel time {total * 1e3:.2f} ms per step; wall {wall * 1e3:.2f} ms per step "
             f"({1 / wall if wall > 0 else float('nan'):.0f} tok/s)", "",
             "| kernel | calls / step | us / step | share |", "|---|---:|---:|---:|"]
    for name, (calls, seconds) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]:
        short_name = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| {short_name} | {calls:.0f} | {seconds * 1e6:.1f} | {seconds / total * 100:.1f} % |")
    return lines


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU found: this profile needs one (--cpu-smoke runs it on the tiny config)",
              file=sys.stderr)
        return EXIT_ENVIRONMENT
    print("\n".join(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
