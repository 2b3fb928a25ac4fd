#!/usr/bin/env python3
"""Decode speed: our decode core against transformers ``generate`` on the same weights, in one run.

The checkpoint is deep and narrow: the full model's 28 LLM layers (and its 28/4 query/KV head split) at tiny
widths, so a token costs the full model's number of operations but almost no arithmetic. What is left is the
per-token host overhead that bounds batch-1 decode on a GPU: Python, op dispatch, kernel launches, host syncs.

Rows, in pairs: transformers ``generate`` (greedy, eager) and the core eager; with ``--compile``
``generate``'s own compiled path (static cache + CompileConfig) and the core's captured step (step mode graph
on CUDA, compile on the CPU). Every row's first call is timed (the compile, for compiled rows) and its ids checked
against eager ``generate``; then the rows are timed in turn inside each repeat. Columns: median ms per new
token (prefill excluded: the time for N tokens minus the time for 1, over N - 1), host reads of tensor data
per token (``.item()``, ``.tolist()``, ``bool(tensor)``...: each one a device sync on CUDA), aten ops per
token (TorchDispatchMode; eager rows only) and the first call's seconds.

    python benchmarks/decode.py                    # CPU, eager rows only (about a minute)
    python benchmarks/decode.py --compile          # adds the compiled rows (minutes of compiling on a CPU)
    python benchmarks/decode.py --device cuda --compile
    python benchmarks/decode.py --requests 8       # adds 8 requests at once (KV slots) vs one after another
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minicpmo_cli.generation.decode import DecodeSettings, generate_ids
from minicpmo_cli.generation.engine import LLMEngine, Request
from minicpmo_cli.generation.step_runner import StepRunner

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__")  # each reads a tensor's data on the host


class SyncCounter:
    """Counts host reads of tensor data (the calls in SYNC_METHODS: on CUDA each one is a device sync)."""

    def __init__(self) -> None:
        self.syncs = 0
        self._saved: dict = {}

    def __enter__(self):
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                self.syncs += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the dispatcher (eager only: torch.compile refuses to run under a
    dispatch mode, so compiled rows show none)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


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


def generate_row(llm, embeds, compile: bool):
    """transformers ``generate``, greedy; compiled: its own static-cache path (``cache_implementation=
    "static"`` + a CompileConfig, which generate honours on the CPU only with ``_compile_all_devices``)."""
    kwargs = {}
    if compile:
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=True, dynamic=False,
                               mode="reduce-overhead" if embeds.device.type == "cuda" else "default")
        config._compile_all_devices = True
        kwargs = {"cache_implementation": "static", "compile_config": config}

    def run(tokens: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = llm.generate(inputs_embeds=embeds, max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=False, pad_token_id=0, eos_token_id=STOPS, **kwargs)
        return out.tolist()
    return run


def core_row(llm, embeds, mode: str):
    """The core on an engine of its own in step mode ``mode`` (its graphs / compiled steps kept across calls)."""
    engine = LLMEngine(llm, runner=StepRunner(mode), threaded=False, max_batch=1)

    def run(tokens: int):
        settings = DecodeSettings(max_new_tokens=tokens, min_new_tokens=tokens, stop_ids=tuple(STOPS))
        return generate_ids(llm, embeds, None, settings, engine=engine)
    return run


def timed(fn, tokens: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn(tokens)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def count(fn, tokens: int, ops: bool) -> dict:
    """Host reads and (``ops``) aten ops per new token: the counts for N tokens minus those for 1, over N - 1."""
    syncs, dispatched = [], []
    for n in (1, tokens):
        with SyncCounter() as sync_counter, (OpCounter() if ops else contextlib.nullcontext()) as op_counter:
            fn(n)
        syncs.append(sync_counter.syncs)
        dispatched.append(op_counter.ops if ops else 0)
    return {"syncs": (syncs[1] - syncs[0]) / (tokens - 1),
            "ops": (dispatched[1] - dispatched[0]) / (tokens - 1) if ops else None}


def measure(rows: list, tokens: int, repeats: int, device: str) -> list[dict]:
    """Every row timed in turn inside each repeat (ours and the baseline alternate, so a burst of load on a
    shared machine hits both), ms per new token = (t(N) - t(1)) / (N - 1), median over the repeats."""
    per_token = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            per_token[name].append((timed(fn, tokens, device) - timed(fn, 1, device)) / (tokens - 1))
    return [{"ms": 1000 * statistics.median(per_token[name]), **count(fn, tokens, "compiled" not in name)}
            for name, fn in rows]


def warm_up(name: str, fn, tokens: int, reference: list[int]) -> float:
    """First call (compiles, for the compiled rows), timed; its ids must equal eager ``generate``'s."""
    started = time.perf_counter()
    ids = fn(tokens)[0]
    seconds = time.perf_counter() - started
    assert ids == reference, f"{name}: ids differ from transformers generate (eager)"
    print(f"warm-up {name}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per timed run")
    parser.add_argument("--prompt", type=int, default=32, help="prompt positions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="add the compiled rows: generate's static-cache compile and the core's captured step")
    parser.add_argument("--requests", type=int, default=1,
                        help="also time N requests decoded at once on one engine against one after another")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        llm = deep_narrow_llm(args.layers, args.device)
        embeds = 0.05 * torch.randn(1, args.prompt, llm.config.hidden_size, device=args.device)
        reference = generate_row(llm, embeds, False)(args.tokens)[0]
        modes = (False, True) if args.compile else (False,)
        rows = []
        captured = "graph" if args.device.startswith("cuda") else "compile"
        for compile in modes:
            kind = "compiled" if compile else "eager"
            mode = captured if compile else "eager"
            rows += [(f"transformers generate ({kind})", generate_row(llm, embeds, compile)),
                     (f"decode core ({kind}: step {mode})", core_row(llm, embeds, mode))]
        warm = [warm_up(name, fn, args.tokens, reference) for name, fn in rows]
        results = measure(rows, args.tokens, args.repeats, args.device)

    print(f"\ndeep-narrow LLM: {args.layers} layers, hidden {llm.config.hidden_size}, {args.device}, "
          f"{torch.get_num_threads()} thread(s), batch 1, prompt {args.prompt}, {args.tokens} new tokens, "
          f"median of {args.repeats} (rows alternating); ids identical to eager generate in every row\n")
    print("| decode | ms/token | vs generate (same mode) | host reads/token | aten ops/token | first call s |")
    print("|---|---:|---:|---:|---:|---:|")
    for index, ((name, _), r, seconds) in enumerate(zip(rows, results, warm)):
        base = results[index - index % 2]["ms"]
        ops = "n/a (compiled)" if r["ops"] is None else f"{r['ops']:.0f}"
        print(f"| {name} | {r['ms']:.2f} | {base / r['ms']:.2f}x | {r['syncs']:.2f} | {ops} "
              f"| {seconds:.1f} |")
    if args.requests > 1:
        with torch.inference_mode():
            concurrent_table(llm, args)


def concurrent_table(llm, args) -> None:
    """``--requests N``: N prompts (different lengths) decoded on one engine at once (KV slots, one step for
    all rows) against the same N one after another on the same engine; ids must be identical."""
    torch.manual_seed(1)
    prompts = [0.05 * torch.randn(args.prompt + 3 * i, llm.config.hidden_size, device=args.device)
               for i in range(args.requests)]
    settings = DecodeSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens, stop_ids=tuple(STOPS))
    engine = LLMEngine(llm, runner=StepRunner("eager"), threaded=False, max_batch=args.requests)

    def one_by_one():
        return [engine.submit(Request(p, settings)).result() for p in prompts]

    def together():
        handles = [engine.submit(Request(p, settings)) for p in prompts]
        return [h.result() for h in handles]

    alone_ids, batched_ids = one_by_one(), together()  # warm-up; the pool is sized once
    assert alone_ids == batched_ids, "batched ids differ from one-by-one ids"
    times = {"one after another": [], "at once (KV slots)": []}
    for _ in range(args.repeats):
        for name, fn in (("one after another", one_by_one), ("at once (KV slots)", together)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    total = args.requests * args.tokens
    base = statistics.median(times["one after another"])
    print(f"\n{args.requests} requests x {args.tokens} new tokens on one engine (eager), median of {args.repeats}; "
          "ids identical\n")
    print("| requests | s | tokens/s | vs one after another |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds:.2f} | {total / seconds:.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
