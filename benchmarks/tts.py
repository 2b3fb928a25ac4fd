#!/usr/bin/env python3
"""TTS frame speed: the TTS step on our decoding core against the transformers loop it replaced, in one run.

The TTS is deep and narrow: the official 20 Llama layers at tiny widths (hidden 64, 4 heads), so a frame costs
the full TTS's number of operations but almost no arithmetic; what is left is the per-frame host overhead
that bounds the TTS on a GPU. The same prompt, speaker state and seed go through:

- transformers: ``LlamaModel.forward`` over a ``DynamicCache`` per frame (the old loop in model/tts.py);
- ours, eager: generation/tts_decode.py (a ``StaticKV`` and generation/forward.py's per-layer forward);
- ours, compiled (``--compile``): its captured step (a StepRunner in mode compile).

Sampling is the reference's (the same draws, so the codes must be identical: checked). Columns: median ms per
frame and aten ops per frame. First audio and real-time factor on the full-size TTS are rows of
benchmarks/gpu_full_size.py.

    python benchmarks/tts.py                 # CPU, eager rows
    python benchmarks/tts.py --compile       # adds the compiled row (a minute or so of compiling on a CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from decode import OpCounter  # benchmarks/decode.py: the same aten-op count

from minicpmo_cli.generation import tts_decode
from minicpmo_cli.generation.step_runner import StepRunner
from minicpmo_cli.model.config import ConditionalChatTTSConfig
from minicpmo_cli.model.tts import AUDIO_EOS_ID, ConditionalChatTTS
from minicpmo_cli.model.tts_sampling import ReferenceSampler


def deep_narrow_tts(layers: int) -> ConditionalChatTTS:
    config = ConditionalChatTTSConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=layers, llm_dim=32,
        num_text_tokens=200, spk_emb_token_id=141, audio_bos_token_id=142, text_eos_token_id=143,
        dvae_idim=32, dvae_hidden=16, dvae_inner=32, dvae_bn_dim=8, dvae_num_layers=1,
    )
    torch.manual_seed(0)
    return ConditionalChatTTS(config).eval()


def primed_state(tts):
    """A state after the first text chunk ([Stts] [spk_emb] 10 text ids), and its text mask."""
    ids = torch.tensor([[140, 141] + list(range(10, 20))])
    state = tts_decode.TTSState(tts)
    tts_decode.prefill_text(tts, state, ids, 0, torch.randn(1, 32, generator=torch.Generator().manual_seed(1)))
    mask = torch.zeros(tts.condition_length, dtype=torch.int8)
    mask[:13] = 1
    mask[-1] = 1
    return state, mask


def sampling_for(tts) -> tts_decode.FrameSampling:
    sampling = tts_decode.FrameSampling.for_tts(tts, sampler=ReferenceSampler(seed=3))
    sampling.min_new_frames = 10**9  # never stop early: every run makes the same number of frames
    return sampling


@torch.inference_mode()
def transformers_frames(tts, frames: int) -> torch.Tensor:
    """The old loop: LlamaModel.forward over a DynamicCache, one frame per call."""
    state, text_mask = primed_state(tts)
    cache = DynamicCache()
    cache.layers = [DynamicLayer() for _ in range(tts.model.config.num_hidden_layers)]
    for layer, k, v in zip(cache.layers, state.cache.keys, state.cache.values):
        layer.update(k[:, :, : state.cache.length].clone(), v[:, :, : state.cache.length].clone())
    sampling = sampling_for(tts)
    heads = [head.weight for head in tts.head_code]
    codes = [torch.zeros(1, 1, tts.num_vq, dtype=torch.long)]
    for step in range(frames):
        past = cache.get_seq_length()
        embeds = tts.bos_embeds() if step == 0 else tts.embed_codes(codes[-1])
        mask = tts.streaming_mask(embeds, past, text_mask)
        out = tts.model(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.tensor([[past]]),
                        cache=cache, use_cache=True)
        logits = tts.code_logits(out.last_hidden_state[:, -1], heads) / sampling.temperature
        if step:
            for processor in (*sampling.processors, *sampling.warpers):
                logits = processor(None, logits)
        logits[:, AUDIO_EOS_ID] = -torch.inf
        frame = sampling.sampler.sample(F.softmax(logits, dim=-1)).view(1, 1, tts.num_vq)
        bool(frame.eq(AUDIO_EOS_ID).any())  # the same per-frame host read as ours
        codes.append(frame)
    return torch.cat(codes[1:], dim=1)


def core_frames(tts, frames: int, runner: StepRunner | None) -> torch.Tensor:
    state, text_mask = primed_state(tts)
    tts_decode.generate_frames(tts, state, sampling_for(tts), text_mask, frames, runner=runner)
    return state.new_ids


def measure(run, frames: int, repeats: int, count_ops: bool = True) -> tuple[float, int | str, torch.Tensor]:
    """(median ms per frame beyond the first, aten ops per frame, codes). A captured step is not counted: a
    dispatch mode turns torch.compile off."""
    codes = run(frames)  # warm-up (and, compiled, the capture)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(1)
        one = time.perf_counter() - started
        started = time.perf_counter()
        run(frames)
        times.append((time.perf_counter() - started - one) / (frames - 1))
    if not count_ops:
        return 1000 * statistics.median(times), "-", codes
    with OpCounter() as counter:
        run(1)
    single = counter.ops
    with OpCounter() as counter:
        run(frames)
    return 1000 * statistics.median(times), round((counter.ops - single) / (frames - 1)), codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=20, help="TTS decoder layers (official: 20)")
    parser.add_argument("--frames", type=int, default=40, help="frames per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add the captured step's row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tts = deep_narrow_tts(args.layers)
    rows = [("transformers LlamaModel.forward + DynamicCache (old loop)", lambda n: transformers_frames(tts, n), True),
            ("ours: StaticKV + forward.forward, eager", lambda n: core_frames(tts, n, None), True)]
    if args.compile:
        runner = StepRunner("compile", "TTS")  # one runner: its compiled step is reused by every run
        rows.append(("ours: captured step (step mode compile)", lambda n: core_frames(tts, n, runner), False))
    results = [(name, *measure(run, args.frames, args.repeats, count)) for name, run, count in rows]
    base_ms, _, base_codes = results[0][1:]
    print(f"TTS deep-narrow ({args.layers} layers, hidden 64), CPU, 1 thread, {args.frames} frames, "
          f"median of {args.repeats}")
    print("| path | ms / frame | vs transformers | aten ops / frame | codes identical |")
    print("|---|---:|---:|---:|---|")
    for name, ms, ops, codes in results:
        same = "yes" if torch.equal(codes, base_codes) else "NO"
        print(f"| {name} | {ms:.2f} | {base_ms / ms:.2f}x | {ops} | {same} |")


if __name__ == "__main__":
    main()
