"""The model calls of `asr` (below the piece run of api/asr_model.py): pieces -> prompt embeddings -> answers.

Two paths give the same answers (tests/model/test_asr_feed.py):
- :func:`generate_batch`, the plain path: one padded batch through the processor and the LLM, waiting for
  the batch's longest row (beam search, and the reference the other path is checked against);
- :func:`start_batch`, the engine-fed path: the prompts of a batch embedded together (log-mel per piece,
  Whisper over groups of equal length, the chat template rendered and tokenized once per instruction and
  audio length), then each piece submitted to the LLM engine (generation/engine.py) as a request of its
  own: a finished row's slot takes the next piece at once, whatever batch it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from minicpmo_cli.api.engine import DecodeOptions, Engine, seed_call
from minicpmo_cli.generation.presets import resolve

# Decoding: the "asr" preset of generation/presets.py (greedy unless --sampling; 512 new tokens; why there).
# A piece that hits the token limit is reported, never silently cut.
ASR_TASK = "asr"
CANCEL_POLL_SECONDS = 0.05  # how often a wait for the engine looks at the cancel event
ANY_POLL_SECONDS = 0.002  # how often a wait for any of several requests looks at the others


@dataclass
class PieceText:
    text: str
    truncated: bool = False  # the answer hit max_new_tokens without an end token


class TranscriptionCancelled(Exception):
    """The caller set the transcription's cancel event: what was left of it was not sent to the model."""


def embed_prompts(model, inputs) -> Any:
    """LLM input embeddings of a batch, the audio of every sample exactly as it is encoded alone.

    Why not ``model.generate`` on the batch: the reference's Whisper mask compares encoder frame indices
    with *mel* lengths, so in a padded batch a clip whose last 1 s chunk is partial lets that chunk attend to
    padding frames and its embeddings change with the longest clip beside it. Samples of one window (a piece
    of <= 30 s, all of asr's) are encoded together by ``model/audio.py`` :func:`get_audio_embedding_rows`,
    which shares the per-position work and runs what looks across positions on each row's own frames; a
    sample of several windows is encoded on its own with its windows together (as alone: trimmed to its
    longest window), grouped with the samples of identical window lengths. Either way each sample gets
    exactly its single-clip embeddings, so batching changes no transcript.
    """
    import torch

    from minicpmo_cli.model.audio import get_audio_embedding_rows, identical_length_groups

    data = dict(inputs)
    chunk_length = model.config.audio_chunk_length
    lens = [[int(v) for v in item.reshape(-1).tolist()] for item in (data.get("audio_feature_lens") or [])]
    with torch.inference_mode():
        embeds, _ = model.get_vllm_embedding(data)
        first_rows = np.cumsum([0] + [len(item) for item in lens])[:-1]
        single = [index for index, item in enumerate(lens) if len(item) == 1]
        if single:
            rows = [int(first_rows[index]) for index in single]
            found = get_audio_embedding_rows(model.apm, model.audio_projection_layer, model.audio_avg_pooler,
                                             data["audio_features"][rows], [lens[index][0] for index in single],
                                             chunk_length, dtype=model.llm.model.embed_tokens.weight.dtype)
            audio = [[] for _ in lens]
            for index, piece in zip(single, found):
                audio[index] = [piece]
            model.insert_audio_embeddings(data, embeds, audio)
        for samples, rows, frames in identical_length_groups(lens):
            if len(lens[samples[0]]) == 1:
                continue  # encoded above
            group = {
                "audio_features": data["audio_features"][rows, :, :frames],
                "audio_feature_lens": [data["audio_feature_lens"][i] for i in samples],
                "audio_bounds": [data["audio_bounds"][i] for i in samples],
            }
            index = torch.tensor(samples, device=embeds.device)
            part = embeds.index_select(0, index)
            model.get_omni_embedding(group, part, chunk_length=chunk_length)  # writes the audio rows into part
            embeds.index_copy_(0, index, part)
    return embeds


def generate_batch(engine: Engine, clips: list[np.ndarray], instruction: str | list[str],
                   decode: DecodeOptions) -> list[PieceText]:
    """One forward pass over several clips (left-padded); the answer to ``[instruction, clip]`` for each
    (``instruction``: one for all, or one per clip)."""
    from minicpmo_cli.api.protocol import own_steps

    steps = own_steps(engine)
    if steps is not None:  # an engine not backed by a model answers itself (api/protocol.py)
        return steps.transcribe_clips(clips, instruction, decode)
    from minicpmo_cli.generation.text import TTS_EOS, run_llm_generate
    from minicpmo_cli.processing.answer_text import decode_text, terminator_ids

    settings = resolve(ASR_TASK, decode)
    instructions = [instruction] * len(clips) if isinstance(instruction, str) else list(instruction)
    msgs = [[{"role": "user", "content": [text, clip]}] for text, clip in zip(instructions, clips)]
    inputs = engine.processor.apply_chat_template(msgs=msgs, use_tts_template=True,
                                                  audio_device=engine.device).to(engine.device)
    embeds = embed_prompts(engine.model, inputs)
    tokenizer = engine.processor.tokenizer
    seed_call(settings.seed)
    sequences, _ = run_llm_generate(engine.model, embeds, inputs["attention_mask"], tokenizer, settings.decode,
                                    engine=getattr(engine, "llm_engine", None), seed=settings.seed)
    stops = set(terminator_ids(tokenizer))
    texts = decode_text(sequences, tokenizer)
    return [PieceText(text.replace(TTS_EOS, "").strip(), truncated=not stops.intersection(row.tolist()))
            for text, row in zip(texts, sequences)]


def has_audio_tokens(clip: np.ndarray) -> bool:
    """False for a sliver too short to give the LLM a single audio embedding (answered with "")."""
    from minicpmo_cli.processing.audio import audio_token_count

    return len(clip) > 0 and audio_token_count(len(clip)) > 0


def piece_text(ids: list[int], tokenizer, stops) -> PieceText:
    """A piece's answer from its new ids (the stop id included when it stopped), as :func:`generate_batch`."""
    from minicpmo_cli.processing.answer_text import decode_text
    from minicpmo_cli.processing.tts_text import TTS_EOS

    [text] = decode_text([ids], tokenizer)
    return PieceText(text.replace(TTS_EOS, "").strip(), truncated=not set(stops).intersection(ids))


# ------------------------------------------------------------------------------------------ engine-fed
class PromptCache:
    """The prompt ids of ``[instruction, audio]`` per (instruction, audio token count): the chat template is
    rendered and tokenized once for each, not once per piece (the ids depend on nothing else)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.rows: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def row(self, instruction: str, samples: int):
        """(input_ids [L], audio_bounds [k, 2], spk_bounds) of one piece of ``samples`` samples."""
        from minicpmo_cli.processing.audio import audio_token_count

        key = (instruction, audio_token_count(samples))
        if key not in self.rows:
            msgs = [{"role": "user", "content": [instruction, np.zeros(samples, np.float32)]}]
            data = self.processor.prompt_inputs(msgs, use_tts_template=True)
            self.rows[key] = (data["input_ids"][0], data["audio_bounds"][0], data["spk_bounds"][0])
        return self.rows[key]

    def inputs(self, clips: list[np.ndarray], instructions: list[str], device) -> dict:
        """What ``processor.apply_chat_template`` gives for ``[[instruction, clip]]`` messages (left-padded
        ids, mask, bounds, log-mel features), the features of all clips in one STFT on ``device``."""
        import torch

        from minicpmo_cli.processing.audio import WINDOW_SAMPLES, extract_audio_features, log_mel_batch
        from minicpmo_cli.processing.processor import bool_dtype, left_pad

        rows = [self.row(text, len(clip)) for text, clip in zip(instructions, clips)]
        ids, pads = left_pad([ids for ids, _, _ in rows], padding_value=0)
        mask = ids.new_ones(ids.shape, dtype=bool_dtype())
        for index, pad in enumerate(pads):
            mask[index, :pad] = False
        clips = [np.asarray(clip, np.float32).reshape(-1) for clip in clips]
        if max(clip.size for clip in clips) > WINDOW_SAMPLES:  # pieces over 30 s: several windows each
            features, lens = extract_audio_features([[clip] for clip in clips], device=device)
        else:
            features, valid = log_mel_batch(clips, device)
            lens = [torch.tensor([frames], dtype=torch.int64) for frames in valid]
        empty = [torch.zeros((0, 2), dtype=torch.long) for _ in clips]
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "image_bound": empty,
                "pixel_values": [[] for _ in clips], "tgt_sizes": empty,
                "audio_bounds": [bounds + pad for (_, bounds, _), pad in zip(rows, pads)],
                "spk_bounds": [spk + pad for (_, _, spk), pad in zip(rows, pads)],
                "audio_features": features, "audio_feature_lens": lens}


@dataclass
class Pending:
    """A piece's answer on its way: an engine request (``handle``), or an answer known already."""

    handle: Any = None  # generation/requests.py Handle
    answer: PieceText | None = None
    tokenizer: Any = None
    stops: tuple = ()

    @property
    def done(self) -> bool:
        return self.answer is not None or self.handle.done

    def wait(self, cancel: Any = None) -> PieceText:
        """The answer, once the engine has it; TranscriptionCancelled when ``cancel`` is set first."""
        if self.answer is None:
            handle = self.handle
            while cancel is not None and not handle.done:
                if cancel.is_set():
                    raise TranscriptionCancelled("the transcription was cancelled")
                if handle.engine.threaded:
                    handle._done.wait(CANCEL_POLL_SECONDS)  # as generate_ids's cancellable wait
                else:
                    handle.engine.step()
            self.answer = piece_text(handle.result(), self.tokenizer, self.stops)
        return self.answer

    def wait_briefly(self, seconds: float = ANY_POLL_SECONDS) -> None:
        """Wait a moment for this answer (a short-lived engine is stepped once instead)."""
        if self.answer is not None or self.handle.done:
            return
        if self.handle.engine.threaded:
            self.handle._done.wait(seconds)
        else:
            self.handle.engine.step()

    def abort(self) -> None:
        if self.answer is None and not self.handle.done:
            self.handle.engine.abort(self.handle)


class PieceModel:
    """The loaded model as the piece run uses it: its decoding settings, and (made on first use) the prompt
    cache, the stop ids and the LLM engine."""

    def __init__(self, engine: Engine, decode: DecodeOptions) -> None:
        self.engine, self.decode = engine, decode
        self.settings = resolve(ASR_TASK, decode)

    @property
    def engine_fed(self) -> bool:
        """False where answers come synchronously: an engine answering itself, or beam search."""
        from minicpmo_cli.api.protocol import own_steps

        return own_steps(self.engine) is None and not self.settings.decode.beam_search

    @cached_property
    def prompts(self) -> PromptCache:
        return PromptCache(self.engine.processor)

    @cached_property
    def stops(self) -> tuple:
        from minicpmo_cli.processing.answer_text import terminator_ids

        return tuple(terminator_ids(self.engine.processor.tokenizer))

    @cached_property
    def llm_engine(self):
        """The engine's LLMEngine, or one for this run (an Engine made without it)."""
        from minicpmo_cli.generation.decode import short_lived_engine

        return getattr(self.engine, "llm_engine", None) or short_lived_engine(self.engine.model.llm, 16)


def start_batch(model: PieceModel, clips: list[np.ndarray], instructions: list[str]) -> list[Pending]:
    """The answers to ``[instruction, clip]`` for each clip, on their way: the prompts embedded together,
    each submitted to the LLM engine as a request of its own (answered at once where the path is
    synchronous: see :attr:`PieceModel.engine_fed`)."""
    if not model.engine_fed:
        return [Pending(answer=answer) for answer in generate_batch(model.engine, clips, instructions, model.decode)]
    import torch

    from minicpmo_cli.generation.decode import split_rows
    from minicpmo_cli.generation.engine import Request

    engine, settings = model.engine, model.settings
    inputs = model.prompts.inputs(clips, instructions, engine.device)
    embeds = embed_prompts(engine.model, inputs)
    decode = settings.decode.with_(stop_ids=model.stops)
    seed_call(settings.seed)
    tokenizer = engine.processor.tokenizer
    pending: list[Pending] = []
    try:
        with torch.inference_mode():
            for row in split_rows(embeds, inputs["attention_mask"]):
                handle = model.llm_engine.submit(Request(row.contiguous(), decode, seed=settings.seed))
                pending.append(Pending(handle, tokenizer=tokenizer, stops=model.stops))
    except BaseException:  # a refused submit (the engine's queue is full): none of this batch stays on it
        for submitted in pending:
            submitted.abort()
        raise
    return pending
