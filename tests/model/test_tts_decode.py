"""The TTS frame loop on the decoding core (generation/tts_decode.py) against the loop it replaced: the old
``ConditionalChatTTS.generate`` over a transformers ``DynamicCache`` through ``LlamaModel.forward``, kept
here only as the reference. Seeded codes must be identical (the golden case f test proves the reference
draws; this one proves the new loop makes the same choices for other seeds, lengths and the streaming
continuation), and ``--compile`` must give the same codes as eager."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from minicpmo_cli.generation import tts_decode
from minicpmo_cli.generation.speech import OUTPUT_CHUNK_FRAMES, generate_codes, make_sampler, text_chunk_bounds
from minicpmo_cli.model.tts import AUDIO_EOS_ID
from minicpmo_cli.processing.tts_text import (
    build_streaming_text_mask,
    encode_tts_prompt,
    prepare_tts_text,
)

# ----- the old loop (reference only) -------------------------------------------------------------------


class _GrowingLayer(DynamicLayer):
    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self):
        return self.keys.shape[-2]


def _cache(kv):
    cache = DynamicCache()
    cache.layers = [_GrowingLayer(k, v) for k, v in kv]
    return cache


def old_new_kv(tts):
    cfg = tts.model.config
    shape = (1, cfg.num_attention_heads, tts.condition_length - 1, cfg.hidden_size // cfg.num_attention_heads)
    return [(torch.zeros(shape, dtype=tts.dtype), torch.zeros(shape, dtype=tts.dtype))
            for _ in range(cfg.num_hidden_layers)]


@torch.inference_mode()
def old_prefill_text(tts, input_ids, begin, kv, spk=None):
    end = begin + input_ids.shape[1]
    embeds = tts.merge_inputs_embeds(input_ids, spk)
    cache = _cache([(k[:, :, :begin].clone(), v[:, :, :begin].clone()) for k, v in kv])
    tts.model(inputs_embeds=embeds, position_ids=torch.arange(begin, end)[None], cache=cache, use_cache=True)
    for (keys, values), layer in zip(kv, cache.layers):
        keys[:, :, begin:end] = layer.keys[:, :, begin:end]
        values[:, :, begin:end] = layer.values[:, :, begin:end]
    return kv


@torch.inference_mode()
def old_generate(tts, audio_ids, kv, temps, text_mask, max_new, warpers, processors, sampler, logits_out=None):
    start, progress = tts.condition_length, audio_ids.shape[1]
    buffer = torch.zeros(1, progress + max_new, tts.num_vq, dtype=torch.long)
    buffer[:, :progress] = audio_ids
    cache = _cache(kv)
    heads = [head.weight for head in tts.head_code]
    finished = False
    for step in range(max_new):
        past = cache.get_seq_length()
        embeds = tts.bos_embeds() if progress == start else tts.embed_codes(buffer[:, progress - 1 : progress])
        mask = tts.streaming_mask(embeds, past, text_mask)
        out = tts.model(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.tensor([[past]]),
                        cache=cache, use_cache=True)
        logits = tts.code_logits(out.last_hidden_state[:, -1], heads)
        if logits_out is not None:
            logits_out.append(logits.clone())
        history = buffer[:, start:progress].permute(0, 2, 1).reshape(tts.num_vq, -1)
        logits = logits / temps
        if progress != start:
            for processor in (*processors, *warpers):
                logits = processor(history, logits)
        if step < 10:
            logits[:, AUDIO_EOS_ID] = -torch.inf
        frame = sampler.sample(F.softmax(logits, dim=-1)).view(1, tts.num_vq)
        finished = bool(frame.eq(AUDIO_EOS_ID).any())
        buffer[:, progress] = frame
        if step == 0 and finished:
            break
        progress += 1
        if finished:
            break
    ids = buffer[:, :progress]
    new_ids = ids[:, start:-1] if finished else ids[:, start:]
    return new_ids, ids, [(layer.keys, layer.values) for layer in cache.layers], finished


def old_generate_codes(tts, tokenizer, spk, text, sampler, max_new_tokens=2048):
    prompt, num_tokens = prepare_tts_text(tokenizer, text)
    input_ids = encode_tts_prompt(tokenizer, prompt)
    text_mask = build_streaming_text_mask(num_tokens)
    sampling = tts_decode.FrameSampling.for_tts(tts, sampler=sampler)
    args = (sampling.temperature, text_mask, OUTPUT_CHUNK_FRAMES, sampling.warpers, sampling.processors, sampler)
    kv, audio_ids = old_new_kv(tts), tts.new_audio_input_ids()
    for chunk_idx in range(math.ceil(tts.condition_length / tts.streaming_text_chunk_size)):
        begin, end = text_chunk_bounds(tts, chunk_idx)
        if end > begin:
            kv = old_prefill_text(tts, input_ids[:, begin:end], begin, kv, spk if begin == 0 else None)
        new_ids, audio_ids, kv, finished = old_generate(tts, audio_ids, kv, *args)
        if finished:
            return new_ids
    while True:
        new_ids, audio_ids, kv, finished = old_generate(tts, audio_ids, kv, *args)
        if finished or new_ids.shape[1] > max_new_tokens:
            return new_ids


# ----- fixtures ------------------------------------------------------------------------------------------


class EosAfter:
    """A sampler that draws EOS after ``limit`` frames (api/speech.py's frame budget does the same), so a
    test reaches the end of an utterance, and the first-step-EOS quirk, in a few dozen frames."""

    def __init__(self, sampler, limit):
        self.sampler, self.limit, self.frames = sampler, limit, 0

    def sample(self, probs):
        drawn = self.sampler.sample(probs)
        self.frames += 1
        if self.frames > self.limit:
            drawn[0, 0] = AUDIO_EOS_ID
        return drawn


TEXTS = ("hi.", "hello world, the voice.", "hello world, the voice of the helpful assistant. " * 3)


@pytest.mark.parametrize(("seed", "text", "limit"), [(0, TEXTS[0], 30), (1, TEXTS[1], 25), (7, TEXTS[2], 61),
                                                      (1234, TEXTS[2], 80)])
def test_new_loop_gives_the_old_loops_codes(golden_tts, seed, text, limit):
    """limit 25: EOS forced on the first step of the second call (the reference's dropped-frame quirk)."""
    tts, tokenizer = golden_tts
    spk = torch.randn(1, tts.config.llm_dim, generator=torch.Generator().manual_seed(seed))
    old = old_generate_codes(tts, tokenizer, spk, text, EosAfter(make_sampler(seed), limit))
    new = generate_codes(tts, tokenizer, spk, text, sampler=EosAfter(make_sampler(seed), limit))
    assert new.shape[1] == (limit - 1 if limit % OUTPUT_CHUNK_FRAMES == 0 else limit)
    assert torch.equal(new, old)


def test_step_logits_equal_the_old_loops_bit_for_bit(golden_tts):
    tts, tokenizer = golden_tts
    prompt, num_tokens = prepare_tts_text(tokenizer, TEXTS[1])
    ids = encode_tts_prompt(tokenizer, prompt)
    mask = build_streaming_text_mask(num_tokens)
    spk = torch.randn(1, tts.config.llm_dim, generator=torch.Generator().manual_seed(3))
    sampling = tts_decode.FrameSampling.for_tts(tts, sampler=make_sampler(3))
    old_logits, new_logits = [], []
    kv = old_prefill_text(tts, ids[:, :12], 0, old_new_kv(tts), spk)
    kv = old_prefill_text(tts, ids[:, 12:22], 12, kv, None)
    old_generate(tts, tts.new_audio_input_ids(), kv, sampling.temperature, mask, 12, sampling.warpers,
                 sampling.processors, make_sampler(3), old_logits)
    state = tts_decode.TTSState(tts)
    tts_decode.prefill_text(tts, state, ids[:, :12], 0, spk)
    tts_decode.prefill_text(tts, state, ids[:, 12:22], 12)
    tts_decode.generate_frames(tts, state, sampling, mask, 12, logits_out=new_logits)
    assert state.progress == 303 + 12 and state.cache.length == 302 + 12
    assert all(torch.equal(a, b) for a, b in zip(old_logits, new_logits)) and len(new_logits) == 12
    for (keys, values), k, v in zip(kv, state.cache.keys, state.cache.values):
        assert torch.equal(keys, k[:, :, : keys.shape[2]]) and torch.equal(values, v[:, :, : values.shape[2]])


def test_compiled_step_gives_the_eager_codes(golden_tts, caplog):
    """--step compile on the CPU (Inductor): the same codes as eager over a few frames."""
    from minicpmo_cli.generation import step_runner

    tts, tokenizer = golden_tts
    caplog.set_level("INFO", logger=step_runner.__name__)
    spk = torch.randn(1, tts.config.llm_dim, generator=torch.Generator().manual_seed(5))
    eager = generate_codes(tts, tokenizer, spk, TEXTS[1], sampler=EosAfter(make_sampler(5), 12),
                           runner=step_runner.StepRunner("eager", "TTS"))
    runner = step_runner.StepRunner("compile", "TTS")
    compiled = generate_codes(tts, tokenizer, spk, TEXTS[1], sampler=EosAfter(make_sampler(5), 12), runner=runner)
    assert eager.shape == (1, 12, 4) and torch.equal(compiled, eager)
    assert "compiled the TTS step for batch 1, cache 512" in caplog.text


class RewindableEosAfter(EosAfter):
    """:class:`EosAfter` that the frame loop can rewind (as api/speech.py's frame budget): the loop then reads
    the end of speech every few frames and drops the frames drawn past it."""

    def snapshot(self):
        return self.sampler.snapshot(), self.frames

    def restore(self, state):
        inner, self.frames = state
        self.sampler.restore(inner)


@pytest.mark.parametrize(("seed", "text", "limit"), [(0, TEXTS[0], 30), (1, TEXTS[1], 25), (7, TEXTS[2], 61),
                                                      (3, TEXTS[1], 12), (1234, TEXTS[2], 80)])
def test_checking_eos_every_few_frames_gives_the_per_frame_codes_and_draws(golden_tts, seed, text, limit):
    """EOS read back every 5 frames: the same codes as the old per-frame loop, and the sampler left exactly
    where the per-frame loop leaves it (the next draw equal), whatever step of a block the EOS falls on."""
    tts, tokenizer = golden_tts
    spk = torch.randn(1, tts.config.llm_dim, generator=torch.Generator().manual_seed(seed))
    old_sampler = EosAfter(make_sampler(seed), limit)
    old = old_generate_codes(tts, tokenizer, spk, text, old_sampler)
    sampler = RewindableEosAfter(make_sampler(seed), limit)
    reads = []
    real_stack = torch.stack

    def counting_stack(tensors, *args, **kwargs):
        reads.append(len(tensors))
        return real_stack(tensors, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tts_decode.torch, "stack", counting_stack)
        new = generate_codes(tts, tokenizer, spk, text, sampler=sampler)
    assert torch.equal(new, old)
    assert sampler.frames == old_sampler.frames
    probs = torch.full((4, 626), 1 / 626)
    assert torch.equal(sampler.sample(probs), old_sampler.sample(probs))
    assert reads and max(reads) == tts_decode.CHECK_FRAMES  # blocks of 5 frames, one read each


def test_eos_every_few_frames_with_the_global_rng(golden_tts):
    """seed None: the sampler draws from torch's global generator; the rewind restores that too."""
    tts, tokenizer = golden_tts
    spk = torch.randn(1, tts.config.llm_dim, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(9)
    old = old_generate_codes(tts, tokenizer, spk, TEXTS[1], EosAfter(make_sampler(None), 33))
    after_old = torch.rand(3)
    torch.manual_seed(9)
    new = generate_codes(tts, tokenizer, spk, TEXTS[1], sampler=RewindableEosAfter(make_sampler(None), 33))
    assert torch.equal(new, old) and torch.equal(torch.rand(3), after_old)


def test_graph_runner_reuses_an_utterances_cache_and_graph_for_the_next(golden_tts, monkeypatch):
    """A graph-mode TTS runner hands a finished utterance's cache (zeroed) to the next one, so the graph
    captured over it is replayed, not captured again; the codes are eager's (a CPU stand-in replays)."""
    from tests.model.graph_stand_in import graph_runner_on_cpu

    runner = graph_runner_on_cpu(monkeypatch, "TTS")
    tts, tokenizer = golden_tts
    spk = torch.randn(1, tts.config.llm_dim, generator=torch.Generator().manual_seed(5))
    for seed in (5, 6):
        eager = generate_codes(tts, tokenizer, spk, TEXTS[1], sampler=EosAfter(make_sampler(seed), 12))
        graph = generate_codes(tts, tokenizer, spk, TEXTS[1], sampler=EosAfter(make_sampler(seed), 12), runner=runner)
        assert torch.equal(graph, eager)
        assert runner.captured == 1  # the second utterance replays the first one's graph
