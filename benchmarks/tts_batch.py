#!/usr/bin/env python3
"""TTS work for many utterances: N lines batched on the TTS engine against the same lines one by one, in one run.

- one by one: generation/speech.py ``generate_codes`` per line (the frame loop of one utterance);
- batched: generation/tts_engine.py ``TTSEngine`` with every line submitted at once (``--slots`` rows per
  step; a finished line's slot is refilled by the next at once).

``--stream``: the same lines on the streaming schedule (generation/speech.py ``StreamSegment``: text in small
pieces, a 25-frame call per 10 text tokens): one by one through the frame loop against streamed rows of the
TTS engine (generation/tts_stream.py); the codes of every segment compared (the vocoder, the same work on
both paths, is left out).

Every line has its own seed and its own frame budget (EOS drawn after it: random weights rarely stop by
themselves), so rows finish at different steps and the refill is exercised. Sampling is the reference's, so
the codes must be identical line by line: checked. Columns: wall seconds, frames kept, frames per second,
speed-up over one by one.

    python benchmarks/tts_batch.py                                   # CPU: deep-narrow TTS (20 layers, hidden 64)
    python benchmarks/tts_batch.py --device cuda --full-size --step graph   # the official TTS shape, random
    python benchmarks/tts_batch.py --stream                          # streamed speech, CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from minicpmo_cli.generation.speech import (
    OUTPUT_CHUNK_FRAMES,
    StreamingSpeech,
    StreamSegment,
    as_text_rounds,
    generate_codes,
    make_sampler,
)
from minicpmo_cli.generation.step_runner import StepRunner
from minicpmo_cli.generation.tts_decode import FrameSampling, iter_frames
from minicpmo_cli.generation.tts_engine import TTSEngine, TTSPiece, TTSRequest, TTSStreamRequest
from minicpmo_cli.model.config import ConditionalChatTTSConfig
from minicpmo_cli.model.tts import ConditionalChatTTS
from minicpmo_cli.model.tts_sampling import FrameBudget
from minicpmo_cli.processing.tts_text import load_tts_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while we read these lines aloud one after another".split()


def make_tts(full_size: bool, device: str, dtype) -> tuple[ConditionalChatTTS, object]:
    """Random weights; the tiny checkpoint's ChatTTS tokenizer (its ids fit either vocabulary)."""
    from minicpmo_cli.model.tiny import _write_tts_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="minicpmo-tts-batch-")) / "chattts_tokenizer"
    ids = _write_tts_tokenizer(folder)
    special = {"spk_emb_token_id": ids["[spk_emb]"], "audio_bos_token_id": ids["[Ptts]"],
               "text_eos_token_id": ids["[Etts]"]}
    if full_size:
        config = ConditionalChatTTSConfig(**special)
    else:
        config = ConditionalChatTTSConfig(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=20, llm_dim=32,
            num_text_tokens=ids["size"], dvae_idim=32, dvae_hidden=16, dvae_inner=32, dvae_bn_dim=8,
            dvae_num_layers=1, **special)
    torch.manual_seed(0)
    tts = ConditionalChatTTS(config).eval().to(device=device, dtype=dtype)
    return tts, load_tts_tokenizer(folder)


def lines(count: int, frames: int) -> list[tuple[str, int, int]]:
    """(text, seed, frame budget): lengths and budgets vary (from half to one and a half times ``frames``)."""
    out = []
    for index in range(count):
        words = [WORDS[(index * 7 + k) % len(WORDS)] for k in range(4 + (index * 5) % 17)]
        out.append((" ".join(words) + ".", index, frames // 2 + (index * 37) % (frames + 1)))
    return out


def speaker(tts, seed: int) -> torch.Tensor:
    spk = torch.randn(1, tts.config.llm_dim, generator=torch.Generator().manual_seed(seed))
    return spk.to(tts.device, tts.dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_by_one(tts, tokenizer, items, runner) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [generate_codes(tts, tokenizer, speaker(tts, seed), text, sampler=FrameBudget(make_sampler(seed), limit),
                               runner=runner).cpu() for text, seed, limit in items]


def batched(engine: TTSEngine, tts, items) -> list[torch.Tensor]:
    handles = [engine.submit(TTSRequest(speaker(tts, seed), [TTSPiece(text, FrameBudget(make_sampler(seed), limit))]))
               for text, seed, limit in items]
    return [handle.result()[0].cpu() for handle in handles]


def stream_alone(tts, tokenizer, items, runner) -> list[list[torch.Tensor]]:
    """Each line on the streaming schedule, its calls run by the frame loop: every segment's final codes."""
    out = []
    with torch.inference_mode():
        for text, seed, limit in items:
            sampling = FrameSampling.for_tts(tts, sampler=FrameBudget(make_sampler(seed), limit))
            speech = StreamingSpeech(tts, None, tokenizer, speaker(tts, seed), sampling, 2 * limit + 100, runner)
            pieces, previous, codes = iter(as_text_rounds(text)), None, []
            while True:
                segment = StreamSegment(speech, previous)
                for _ in segment.schedule(pieces):
                    for _ in iter_frames(tts, segment.state, sampling, segment.text_mask(), OUTPUT_CHUNK_FRAMES,
                                         runner=runner):
                        pass
                codes.append(segment.state.new_ids.cpu())
                if segment.next_segment is None:
                    break
                previous = segment.next_segment
            out.append(codes)
    return out


def stream_batched(engine: TTSEngine, tts, items) -> list[list[torch.Tensor]]:
    handles = [engine.submit(TTSStreamRequest(speaker(tts, seed), as_text_rounds(text),
                                              FrameBudget(make_sampler(seed), limit), max_new_tokens=2 * limit + 100))
               for text, seed, limit in items]
    return [[event.new_ids.cpu() for event in handle.pieces() if type(event).__name__ == "SegmentEnd"]
            for handle in handles]


def timed(run, device: str):
    sync(device)
    started = time.perf_counter()
    out = run()
    sync(device)
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=8, help="utterances (N)")
    parser.add_argument("--slots", type=int, default=8, help="rows of the TTS engine decoded together")
    parser.add_argument("--frames", type=int, default=60, help="typical frames per line (budgets vary around it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="the official TTS shape (768 wide, 20 layers)")
    parser.add_argument("--step", default="eager", choices=("eager", "graph", "compile"),
                        help="how steps run, for both paths (graph: CUDA only)")
    parser.add_argument("--stream", action="store_true", help="streamed speech (the streaming schedule)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tts, tokenizer = make_tts(args.full_size, args.device, dtype)
    items = lines(args.lines, args.frames)
    alone_runner = StepRunner(args.step, "TTS") if args.step != "eager" else None
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=args.slots, runner=StepRunner(args.step, "TTS batch"))
    alone, together = (stream_alone, stream_batched) if args.stream else (one_by_one, batched)
    alone(tts, tokenizer, items[:1], alone_runner)  # warm-up (captures, first kernels)
    together(engine, tts, items[: args.slots])
    alone_s, alone_codes = timed(lambda: alone(tts, tokenizer, items, alone_runner), args.device)
    engine.stats.peak_rows = 0
    batch_s, batch_codes = timed(lambda: together(engine, tts, items), args.device)
    if args.stream:  # one list of segments per line: flattened, segment by segment
        same = [len(a) for a in alone_codes] == [len(b) for b in batch_codes]
        alone_codes, batch_codes = sum(alone_codes, []), sum(batch_codes, [])
    else:
        same = True
    frames = sum(codes.shape[1] for codes in alone_codes)
    same = same and all(torch.equal(a, b) for a, b in zip(alone_codes, batch_codes))
    shape = "official shape (768 wide, 20 layers)" if args.full_size else "deep-narrow (20 layers, hidden 64)"
    kind = "streamed " if args.stream else ""
    precision = str(dtype).removeprefix("torch.")
    print(f"{kind}TTS {shape}, {args.device} {precision}, step {args.step}: {args.lines} lines, "
          f"{frames} frames in all, {args.slots} slots (peak rows per step {engine.stats.peak_rows})")
    print("| path | wall s | frames / s | vs one by one | codes identical |")
    print("|---|---:|---:|---:|---|")
    loop = "the streaming loop" if args.stream else "generate_codes"
    print(f"| one by one ({loop} per line) | {alone_s:.2f} | {frames / alone_s:.0f} | 1.00x | - |")
    print(f"| batched on the TTS engine | {batch_s:.2f} | {frames / batch_s:.0f} | {alone_s / batch_s:.2f}x | "
          f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
