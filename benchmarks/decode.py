#!/usr/bin/env python3
"""Decode speed: our decode core against transformers ``generate`` on the same weights, in one run.

The checkpoint is deep and narrow: the full model's 28 LLM layers (and its 28/4 query/KV head split) at tiny
widths, so a token costs the full model's number of operations but almost no arithmetic. What is left is the
per-token host overhead that bounds batch-1 decode on a GPU: Python, op dispatch, kernel launches, host syncs.

Rows: transformers ``generate`` (greedy, eager), the core eager, and with ``--compile`` the core's captured
step (torch.compile; CUDA graphs on CUDA). Columns: median ms per new token (prefill excluded: the time for
N tokens minus the time for 1, over N - 1), host reads of tensor data per token (``.item()``, ``.tolist()``,
``bool(tensor)``...: each one a device sync on CUDA) and aten ops per token (TorchDispatchMode).

    python benchmarks/decode.py                    # CPU, eager rows only
    python benchmarks/decode.py --compile          # adds the compiled row (minutes of compiling on a CPU)
    python benchmarks/decode.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minicpmo_cli.generation.decode import DecodeSettings, generate_ids

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__")  # each reads a tensor's data on the host


class OpCounter(TorchDispatchMode):
    """Counts aten ops, and host reads of tensor data (the calls in SYNC_METHODS: on CUDA each is a sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self._saved: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                self.syncs += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def deep_narrow_llm(layers: int, device: str):
    """The LLM of model/tiny.py's config with ``layers`` layers and 28 query / 4 KV heads of width 8."""
    from minicpmo_cli.generation.guide import MiniCPMO
    from minicpmo_cli.model.config import MiniCPMOConfig
    from minicpmo_cli.model.tiny import _redraw_parameters, tiny_config_dict

    values = tiny_config_dict(1058, {"size": 146, "[spk_emb]": 141, "[Ptts]": 139, "[Etts]": 140})
    values.update(num_hidden_layers=layers, max_window_layers=layers, hidden_size=224, num_attention_heads=28,
                  num_key_value_heads=4, intermediate_size=448, init_vision=False, init_audio=False,
                  init_tts=False)
    config = MiniCPMOConfig(**{k: v for k, v in values.items() if k not in ("auto_map", "architectures")})
    config._attn_implementation = "sdpa"
    model = MiniCPMO(config)
    _redraw_parameters(model, seed=0)
    llm = model.llm.to(device).eval()
    return llm


STOPS = [1002, 1000]  # real stop ids, banned by min_new_tokens = N: both loops check stops, none ends early


def run_generate(llm, embeds, tokens: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = llm.generate(inputs_embeds=embeds, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=STOPS)
    return out.tolist()


def run_core(llm, embeds, tokens: int, compile: bool):
    settings = DecodeSettings(max_new_tokens=tokens, min_new_tokens=tokens, stop_ids=tuple(STOPS))
    return generate_ids(llm, embeds, None, settings, compile=compile)


def timed(fn, tokens: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn(tokens)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(fn, tokens: int, repeats: int, device: str) -> dict:
    fn(tokens)  # warm-up (and compilation)
    per_token = []
    for _ in range(repeats):
        per_token.append((timed(fn, tokens, device) - timed(fn, 1, device)) / (tokens - 1))
    counts = []
    for n in (1, tokens):
        with OpCounter() as counter:
            fn(n)
        counts.append(counter)
    return {"ms": 1000 * statistics.median(per_token),
            "syncs": (counts[1].syncs - counts[0].syncs) / (tokens - 1),
            "ops": (counts[1].ops - counts[0].ops) / (tokens - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per timed run")
    parser.add_argument("--prompt", type=int, default=32, help="prompt positions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add the compiled core row")
    args = parser.parse_args()

    torch.manual_seed(0)
    with torch.inference_mode():
        llm = deep_narrow_llm(args.layers, args.device)
        embeds = 0.05 * torch.randn(1, args.prompt, llm.config.hidden_size, device=args.device)
        reference = run_generate(llm, embeds, args.tokens)[0]
        assert run_core(llm, embeds, args.tokens, False)[0] == reference, "core ids differ from generate"
        rows = [("transformers generate (eager)", lambda n: run_generate(llm, embeds, n)),
                ("decode core (eager)", lambda n: run_core(llm, embeds, n, False))]
        if args.compile:
            assert run_core(llm, embeds, args.tokens, True)[0] == reference, "compiled ids differ from generate"
            rows.append(("decode core (compiled)", lambda n: run_core(llm, embeds, n, True)))
        results = [(name, measure(fn, args.tokens, args.repeats, args.device)) for name, fn in rows]

    base = results[0][1]["ms"]
    print(f"deep-narrow LLM: {args.layers} layers, hidden {llm.config.hidden_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, batch 1, prompt {args.prompt}, {args.tokens} new tokens, "
          f"median of {args.repeats}; ids identical to generate\n")
    print("| decode | ms/token | vs generate | host reads/token | aten ops/token |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results:
        print(f"| {name} | {r['ms']:.2f} | {base / r['ms']:.2f}x | {r['syncs']:.2f} | {r['ops']:.0f} |")


if __name__ == "__main__":
    main()
