"""The TTS's audio-frame decode on the decoding core's pieces: a preallocated :class:`StaticKV` and the
per-layer forward of generation/forward.py (the TTS decoder is a transformers ``LlamaModel``, the same shape
as the LLM's Qwen2 decoder), eager or through a step runner (generation/step_runner.py: CUDA graphs or
torch.compile).

Sequence layout (spec audio-tts §3.4): ``[Stts] [spk_emb] <300 text slots> [Ptts]`` (``condition_length``,
303), then one position per audio frame (4 codebook ids). The cache starts as the 302 condition positions but
``[Ptts]``, all zero; text chunks are written into it in place (:func:`prefill_text`) while audio frames are
appended after it (:func:`iter_frames`). Zero positions not yet prefilled are hidden by the streaming mask.

Sampling is the reference's (``ReferenceSampler``: bit-exact draws), in the reference's order. The end of
speech is read back every few frames (:func:`iter_frames`), the frames drawn past it dropped and the sampler
rewound, so the draws consumed are the reference's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.static_cache import StaticKV
from minicpmo_cli.model.tts import AUDIO_EOS_ID, DEFAULT_TEMPERATURES, visible_text_slots
from minicpmo_cli.model.tts_sampling import ReferenceSampler, make_logits_processors

logger = logging.getLogger(__name__)

MIN_NEW_FRAMES = 10  # the reference bans EOS for the first 10 steps of every generate call
CHECK_FRAMES = 5  # frames between two reads of the end of speech (25-frame calls: after steps 14, 19, 24)


@dataclass
class FrameSampling:
    """How audio frames are drawn (shared by every generate call of one utterance): raw logits / per-codebook
    temperature, then the processors and warpers (skipped on the BOS step), the EOS ban, one draw per codebook.
    ``sampler``: ``sample(probs [rows, n]) -> [rows, 1]``."""

    temperature: torch.Tensor  # [num_vq, 1] float32 on the TTS's device
    warpers: Sequence = ()
    processors: Sequence = ()
    sampler: object = field(default_factory=ReferenceSampler)
    eos: int = AUDIO_EOS_ID
    min_new_frames: int = MIN_NEW_FRAMES

    @classmethod
    def for_tts(cls, tts, temperature=DEFAULT_TEMPERATURES, sampler=None) -> FrameSampling:
        """The reference's settings: the TTS config's top-p / top-k / repetition penalty (``gen_logits``)."""
        temps = [float(temperature)] * tts.num_vq if isinstance(temperature, (int, float)) else list(temperature)
        warpers, processors = make_logits_processors(tts.top_p, tts.top_k, tts.repetition_penalty,
                                                     tts.num_audio_tokens)
        return cls(torch.tensor(temps, dtype=torch.float, device=tts.device).reshape(-1, 1), warpers, processors,
                   sampler if sampler is not None else ReferenceSampler())


class TTSState:
    """One segment's decode state: the KV cache, the id buffer (condition slots then frames) and progress.

    ``ids[:, :progress]`` is the sequence so far; the cache holds ``progress - 1`` positions (the last frame
    is the next step's input). ``finished``: the last generate call drew EOS.
    """

    def __init__(self, tts, frames: int = 0, runner=None, cache=None) -> None:
        self.start = tts.condition_length
        capacity = _pow2(self.start + frames)
        recycler = getattr(runner, "recycler", None) if runner is not None and runner.static_shapes else None
        if cache is not None:  # a slot of the TTS engine's pool (generation/tts_engine.py), zeroed, length 0
            self.cache = cache
        elif recycler is not None:  # a cache whose graphs are captured already
            self.cache = recycler.take(tts.model.config, capacity, tts.dtype, tts.device, self)
        else:
            self.cache = StaticKV.empty(tts.model.config, 1, capacity, tts.dtype, tts.device)
        self.cache.advance(self.start - 1)  # the zero condition slots, [Ptts] excluded
        self.ids = torch.zeros(1, capacity, tts.num_vq, dtype=torch.long, device=tts.device)
        self.progress = self.start
        self.finished = False

    @property
    def audio_input_ids(self) -> torch.Tensor:
        return self.ids[:, : self.progress]

    @property
    def new_ids(self) -> torch.Tensor:
        """Every frame after the condition (minus a final EOS frame), ``[1, n, num_vq]``."""
        return self.ids[:, self.start : self.progress - 1] if self.finished else self.ids[:, self.start : self.progress]

    def reserve(self, frames: int) -> None:
        """Room for ``frames`` more steps (capacities are powers of two: few captured shapes)."""
        needed = _pow2(self.progress + frames)
        self.cache.ensure_capacity(needed)
        if needed > self.ids.shape[1]:
            grown = self.ids.new_zeros((1, needed, self.ids.shape[2]))
            grown[:, : self.progress] = self.ids[:, : self.progress]
            self.ids = grown

    def append_ids(self, codes: torch.Tensor) -> None:
        """Append frames ``[1, n, num_vq]`` to the id buffer (a continued segment's primer)."""
        self.reserve(codes.shape[1])
        self.ids[:, self.progress : self.progress + codes.shape[1]] = codes.to(self.ids.device)
        self.progress += codes.shape[1]


def text_chunk_bounds(tts, chunk_idx: int) -> tuple[int, int]:
    """Positions of text chunk ``chunk_idx``: ``[0, 12)`` then ``[10k + 2, min(10k + 12, 302))``."""
    size, prefix = tts.streaming_text_chunk_size, 1 + tts.num_spk_embs
    if chunk_idx == 0:
        return 0, size + prefix
    return chunk_idx * size + prefix, min((chunk_idx + 1) * size + prefix, tts.condition_length - 1)


def _pow2(needed: int) -> int:
    return 1 << max(int(needed) - 1, 255).bit_length()


@torch.inference_mode()
def prefill_text(tts, state: TTSState, input_ids: torch.Tensor, begin: int,
                 spk_embeds: torch.Tensor | None = None) -> None:
    """Run text tokens ``[1, n]`` at positions ``[begin, begin + n)`` with plain causal attention over
    ``[0, begin + n)`` and write their K/V into the cache in place (the audio positions are left as they are)."""
    embeds = tts.merge_inputs_embeds(input_ids.to(tts.device), spk_embeds)
    count = embeds.shape[1]
    positions = torch.arange(begin, begin + count, device=tts.device)[None]
    # As transformers: no mask for the first chunk (sdpa's is_causal) or a single token; else causal over the past.
    mask = None
    if begin > 0 and count > 1:
        keys = torch.arange(begin + count, device=tts.device)
        mask = (keys[None, :] <= positions[0, :, None])[None, None]
    window = StaticKV(state.cache.keys, state.cache.values, begin)  # the same buffers, filled up to begin
    fwd.forward(tts, embeds, positions, window, mask)


@torch.inference_mode()
def prefill_audio(tts, state: TTSState, codes: torch.Tensor, text_mask: torch.Tensor) -> None:
    """Append ``[Ptts]`` + frames ``[1, n, num_vq]`` to the cache (a streaming segment continued). Reference
    quirk, reproduced: one mask row is broadcast to all new rows, so these frames attend to each other."""
    embeds = torch.cat([tts.bos_embeds(), tts.embed_codes(codes.to(tts.device))], dim=1)
    past = state.cache.length
    state.cache.ensure_capacity(_pow2(past + embeds.shape[1] + 1))
    positions = torch.arange(past, past + embeds.shape[1], device=tts.device)[None]
    mask = tts.streaming_mask(embeds, past, text_mask)
    fwd.forward(tts, embeds, positions, state.cache, mask)


class StepMask:
    """The streaming mask of audio steps over the whole cache ``[1, 1, 1, capacity]``: rebuilt only when the
    visible text grows (every 50 frames) or the cache does; otherwise one slot is opened per step."""

    def __init__(self, tts, text_mask: torch.Tensor) -> None:
        self.tts, self.text_mask = tts, text_mask.to(tts.device)
        self.full: torch.Tensor | None = None
        self.key: tuple[int, int] | None = None

    def at(self, past: int, capacity: int, embeds: torch.Tensor) -> torch.Tensor:
        key = (visible_text_slots(self.tts, past), capacity)
        if self.full is None or key != self.key:
            row = self.tts.streaming_mask(embeds, past, self.text_mask)  # [1, 1, 1, past + 1]
            self.full = torch.full((1, 1, 1, capacity), torch.finfo(row.dtype).min, dtype=row.dtype,
                                   device=row.device)
            self.full[..., : past + 1] = row
            self.key = key
        else:
            self.full[..., past] = 0
        return self.full


@dataclass
class DrawnFrame:
    """A frame drawn but not yet known to be kept: the step, the progress before it, whether it holds EOS (a
    device bool) and the sampler's state after its draw (to rewind to)."""

    step: int
    progress: int
    eos: torch.Tensor
    sampler_state: object = None
    logits_count: int = 0


def iter_frames(tts, state: TTSState, sampling: FrameSampling, text_mask: torch.Tensor, max_frames: int, *,
                force_no_stop: bool = False, runner=None, logits_out: list | None = None,
                check_every: int = CHECK_FRAMES) -> Iterator[int]:
    """Sample up to ``max_frames`` audio frames (one reference ``generate`` call); yields the number of frames
    kept so far after each new frame (not after a final EOS). ``state.finished`` says whether EOS ended it.

    Per step: raw logits / temperature; processors and warpers skipped on the BOS step; EOS banned for the
    first ``min_new_frames`` steps of this call; one draw per codebook; EOS in any codebook ends the call.
    ``logits_out`` (a list) receives the raw logits of every step.

    End of speech is read back every ``check_every`` frames, not per frame: frames drawn past an EOS are
    dropped and the sampler is rewound to its state right after the EOS draw (samplers with ``snapshot`` /
    ``restore``; others are checked every frame), so the codes and the draws consumed are the per-frame
    loop's.
    """
    if state.progress != state.cache.length + 1:
        raise ValueError(f"audio ids length {state.progress} != KV-cache length + 1 ({state.cache.length + 1})")
    state.reserve(max_frames)
    state.finished = False
    mask = StepMask(tts, text_mask)
    with torch.inference_mode():
        heads = [head.weight for head in tts.head_code]  # the weight norm once per call, not per frame
    sampler = sampling.sampler
    rewinds = hasattr(sampler, "snapshot") and hasattr(sampler, "restore")
    every = max(int(check_every), 1) if rewinds else 1
    drawn: list[DrawnFrame] = []
    for step in range(max_frames):
        banned = step < sampling.min_new_frames or force_no_stop
        with torch.inference_mode():
            eos = _draw_frame(tts, state, sampling, mask, heads, runner, logits_out, banned)
        # even a banned EOS is checked: a wrapping sampler (a frame budget) may force one
        drawn.append(DrawnFrame(step, state.progress, eos, sampler.snapshot() if rewinds else None,
                            len(logits_out) if logits_out is not None else 0))
        state.progress += 1
        if len(drawn) >= every or step == max_frames - 1:
            yield from settle_frames(state, drawn, sampler, logits_out)
            drawn = []
            if state.finished:
                return


def _draw_frame(tts, state: TTSState, sampling: FrameSampling, mask: StepMask, heads, runner, logits_out,
                banned: bool) -> torch.Tensor:
    """One step and one frame written at ``state.progress``; a device bool: the frame holds EOS."""
    is_bos = state.progress == state.start
    logits = _step_logits(tts, state, mask, heads, None if is_bos else runner)
    if logits_out is not None:
        logits_out.append(logits.clone())
    return pick_frame(tts, state, sampling, logits, banned)


def pick_frame(tts, state: TTSState, sampling: FrameSampling, logits: torch.Tensor, banned: bool) -> torch.Tensor:
    """Draw the frame of one step from its raw logits ``[num_vq, num_audio_tokens]`` and write it at
    ``state.progress``; a device bool: the frame holds EOS. (The frame loop's draw; the TTS engine's rows draw
    through it too, so a row batched draws what it draws alone.)"""
    is_bos = state.progress == state.start
    # the frames so far, [num_vq, n], for the repetition penalty (the warpers do not read them)
    history = (state.ids[:, state.start : state.progress].permute(0, 2, 1).reshape(tts.num_vq, -1)
               if sampling.processors else None)
    processors = () if is_bos else (*sampling.processors, *sampling.warpers)
    frame = _sample_frame(logits, sampling, history, processors, sampling.eos if banned else None)
    state.ids[:, state.progress] = frame
    return frame.eq(sampling.eos).any()


def settle_frames(state: TTSState, drawn: list[DrawnFrame], sampler, logits_out,
                  hits: list | None = None) -> Iterator[int]:
    """Read the EOS flags of ``drawn`` at once (one host read; ``hits``: read already, by a caller that reads
    several rows at once); yield each kept frame's count (with ``state.progress`` at that frame, as the
    per-frame loop had it); at the first EOS rewind to just after it."""
    if hits is None:
        hits = torch.stack([d.eos for d in drawn]).tolist()
    final = state.progress
    for index, frame in enumerate(drawn):
        if hits[index]:
            # Reference quirk, reproduced: an EOS on the first step of a call stops before the frame counts,
            # so the EOS is not kept and new_ids drops one real frame.
            state.progress = frame.progress if frame.step == 0 else frame.progress + 1
            state.cache.length = frame.progress  # the steps of the dropped frames are forgotten
            if index + 1 < len(drawn):
                sampler.restore(frame.sampler_state)
                if logits_out is not None:
                    del logits_out[frame.logits_count:]
            state.finished = True
            return
        state.progress = frame.progress + 1
        yield state.progress - state.start
    state.progress = final


def generate_frames(tts, state: TTSState, sampling: FrameSampling, text_mask: torch.Tensor, max_frames: int,
                    **kwargs) -> bool:
    """:func:`iter_frames` run to its end; returns ``state.finished``."""
    for _ in iter_frames(tts, state, sampling, text_mask, max_frames, **kwargs):
        pass
    return state.finished


def _sample_frame(logits, sampling: FrameSampling, history, processors, banned: int | None) -> torch.Tensor:
    logits = logits / sampling.temperature
    for processor in processors:
        logits = processor(history, logits)
    if banned is not None:
        logits[:, banned] = -torch.inf
    probs = F.softmax(logits, dim=-1)
    return sampling.sampler.sample(probs).view(1, -1)


def _step_logits(tts, state: TTSState, mask: StepMask, heads: list[torch.Tensor], runner) -> torch.Tensor:
    """One step: input ``[Ptts]`` at the BOS step, else the previous frame's code sum; raw float32 logits
    ``[num_vq, num_audio_tokens]``. ``runner``: a graph/compile step runner runs the fixed-shape step."""
    cache = state.cache
    past = cache.length
    last = state.ids[:, state.progress - 1 : state.progress]
    if runner is not None and runner.static_shapes:
        index = torch.full((1,), past, dtype=torch.long, device=last.device)
        full = mask.at(past, cache.capacity, dtype_probe(tts))
        if runner.mode == "compile" and last.device.type == "cuda":
            cache.mark_static()
        key = (1, cache.capacity, cache.generation)
        # the heads are inputs (copied at each replay): they are made anew by every iter_frames call
        logits = runner.run(key, _runner_step, (last, index[None], index, full, *heads),
                            (tts, cache.keys, cache.values))
        cache.advance(1)
        return logits
    embeds = tts.bos_embeds() if state.progress == state.start else tts.embed_codes(last)
    positions = torch.full((1, 1), past, dtype=torch.long, device=last.device)
    hidden = fwd.forward(tts, embeds, positions, cache, mask.at(past, cache.capacity, embeds)[..., : past + 1])
    return tts.code_logits(hidden[:, -1], heads)


def dtype_probe(tts) -> torch.Tensor:
    return tts.emb_text.weight[:1, None]  # [1, 1, hidden]: the streaming mask only reads its dtype and device


# ----- the captured step -------------------------------------------------------------------------------


def static_step(tts, codes: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, mask: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor], heads: list[torch.Tensor]) -> torch.Tensor:
    """One audio step over the whole bucket: the code sum of ``codes`` ``[1, 1, num_vq]`` at ``positions``
    ``[1, 1]``, written at cache slot ``index`` ``[1]``, attending with the additive ``mask`` ``[1, 1, 1, S]``.
    Returns raw float32 logits ``[num_vq, num_audio_tokens]``. Shapes are fixed by S: one capture per bucket."""
    decoder = tts.model
    embeds = tts.embed_codes(codes)
    cos, sin = decoder.rotary_emb(embeds, positions)
    hidden = embeds
    for number, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        residual = hidden
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys[number].index_copy_(2, index, k)
        values[number].index_copy_(2, index, v)
        hidden = residual + attn.o_proj(fwd.attend(attn, q, keys[number], values[number], mask))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = decoder.norm(hidden)[:, -1]
    logits = torch.stack([F.linear(hidden, w.to(hidden.dtype)) for w in heads], dim=1)
    return logits.float().reshape(-1, heads[0].shape[0])


def _runner_step(codes, positions, index, mask, *rest):
    """:func:`static_step` with the step runner's argument order: the inputs (``codes``, ``positions``,
    ``index``, ``mask``, then the code heads), then what a key pins (``tts``, ``keys``, ``values``)."""
    heads, (tts, keys, values) = list(rest[:-3]), rest[-3:]
    return static_step(tts, codes, positions, index, mask, keys, values, heads)
