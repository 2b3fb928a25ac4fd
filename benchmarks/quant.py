"""Quantization on the CPU: load time, peak memory while loading, weights' memory and decode ms/token for
``--quantize none``, ``int8`` and ``int4`` (and the GPTQ int4 layout), on a deep-narrow checkpoint.

    python benchmarks/quant.py                      # 28 LLM layers, hidden 512 (about 1-2 minutes)
    python benchmarks/quant.py --layers 8 --hidden 1024 --intermediate 2816 --new-tokens 64 --threads 2

The checkpoint is the tiny one with the LLM resized (random weights; model/tiny_resized.py), written to a
temp folder; its GPTQ twin comes from model/tiny_gptq.py. Each mode runs in a fresh process, so its peak RSS
(VmHWM, reset just before loading) is its own. Decode: greedy steps of one token through the LLM with a KV
cache after a short prefill, each timed; the median is shown. "same tokens" = share of the greedy tokens
equal to the unquantized model's (random weights: a rough agreement measure, not quality).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("none", "int8", "int4", "gptq")


def child(folder: str, mode: str, new_tokens: int, threads: int) -> dict:
    import torch

    from minicpmo_cli.generation.guide import MiniCPMO
    from minicpmo_cli.model import quant

    torch.set_num_threads(threads)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _status("VmRSS")
    start = time.perf_counter()
    model = MiniCPMO.from_pretrained(folder, device_map="cpu", dtype=torch.float32, init_vision=False,
                                     init_audio=False, init_tts=False, load_processor=False,
                                     quantize=None if mode == "gptq" else mode)
    load_s = time.perf_counter() - start
    peak = _status("VmHWM") - base
    ids, steps = _greedy(model.llm, new_tokens)
    return {"mode": mode, "load_s": load_s, "peak_mib": peak / 2**20,
            "weights_mib": quant.model_bytes(model) / 2**20, "kernel": model.quantization.kernel or "-",
            "ms_per_token": 1000 * statistics.median(steps), "ids": ids}


def _greedy(llm, new_tokens: int) -> tuple[list[int], list[float]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, llm.config.vocab_size - 100, (1, 32), generator=generator)
    steps, ids = [], []
    with torch.inference_mode():
        out = llm(input_ids=prompt, use_cache=True)
        for _ in range(new_tokens):
            token = out.logits[:, -1:].argmax(-1)
            ids.append(int(token))
            start = time.perf_counter()
            out = llm(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            steps.append(time.perf_counter() - start)
    return ids, steps


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def make_checkpoints(folder: Path, args) -> tuple[Path, Path]:
    import shutil

    from minicpmo_cli.model.tiny_gptq import convert_to_gptq
    from minicpmo_cli.model.tiny_resized import make_resized_checkpoint

    plain = make_resized_checkpoint(folder / "plain", hidden_size=args.hidden, intermediate_size=args.intermediate,
                                    num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                    num_key_value_heads=max(1, args.hidden // 256))
    gptq = folder / "gptq"
    shutil.copytree(plain, gptq)
    convert_to_gptq(gptq)
    return plain, gptq


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.new_tokens, args.threads)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        plain, gptq = make_checkpoints(Path(tmp), args)
        disk = (plain / "model.safetensors").stat().st_size / 2**20
        rows = []
        for mode in args.modes.split(","):
            folder = gptq if mode == "gptq" else plain
            command = [sys.executable, __file__, "--child", str(folder), mode, "--new-tokens", str(args.new_tokens),
                       "--threads", str(args.threads)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print_table(rows, args, disk)
    return 0


def print_table(rows: list[dict], args, disk_mib: float) -> None:
    base = next((r for r in rows if r["mode"] == "none"), rows[0])
    print(f"LLM: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}; float32 activations; "
          f"{args.threads} thread(s); checkpoint {disk_mib:.0f} MiB (float32, every tower)\n")
    print("| mode | kernel | load s | peak RSS while loading MiB | weights MiB | decode ms/token (median) "
          "| vs none | same tokens as none |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        same = sum(a == b for a, b in zip(r["ids"], base["ids"])) / max(1, len(base["ids"]))
        label = "int4 (GPTQ layout)" if r["mode"] == "gptq" else r["mode"]
        print(f"| {label} | {r['kernel']} | {r['load_s']:.2f} | {r['peak_mib']:.0f} | {r['weights_mib']:.0f} "
              f"| {r['ms_per_token']:.2f} | {r['ms_per_token'] / base['ms_per_token']:.2f}x | {same:.0%} |")


if __name__ == "__main__":
    raise SystemExit(main())
