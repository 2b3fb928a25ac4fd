"""The model stage of `asr`: pieces (16 kHz clips with their instruction) -> answers (:class:`PieceText`).

api/asr.py runs the front stages (decode, VAD: api/asr_pipeline.py) and the records; this module turns the
pieces they find into answers: log-mel and Whisper per batch, the prompt embeddings, the LLM.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from minicpmo_cli.api.engine import DecodeOptions, Engine, seed_call
from minicpmo_cli.generation.presets import resolve

# Decoding: the "asr" preset of generation/presets.py (greedy unless --sampling; 512 new tokens; why there).
# A piece that hits the token limit is reported, never silently cut.
ASR_TASK = "asr"
SORT_WINDOW_BATCHES = 4  # pieces of up to this many batches are sorted by length before batching


@dataclass
class PieceText:
    text: str
    truncated: bool = False  # the answer hit max_new_tokens without an end token



def embed_prompts(model, inputs) -> Any:
    """LLM input embeddings of a batch, with the audio of each group of identical-length samples encoded together.

    Why not ``model.generate`` on the batch: the reference's Whisper mask compares encoder frame indices
    with *mel* lengths, so in a batch a clip whose last 1 s chunk is partial lets that chunk attend to
    padding frames and its embeddings change with the longest clip beside it. Samples whose pieces have the
    same lengths share one Whisper call (no padding between them); every other sample is encoded on its own
    (trimmed to its own frames). Either way each sample gets exactly its single-clip embeddings, so batching
    changes no transcript.
    """
    import torch

    from minicpmo_cli.model.audio import identical_length_groups

    data = dict(inputs)
    chunk_length = model.config.audio_chunk_length
    with torch.inference_mode():
        embeds, _ = model.get_vllm_embedding(data)
        for samples, rows, frames in identical_length_groups(data.get("audio_feature_lens") or []):
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


CPU_BATCH_SIZE = 4  # pieces per pass on the CPU: more only adds padding work
MAX_AUTO_BATCH_SIZE = 128
# GPU memory one 30 s piece may need, with margin: its KV cache (~800 prompt + 512 new positions x 28 layers
# x 4 KV heads x 128 x (key, value) x 2 bytes = 56 KiB a position, ~75 MiB), the prefill activations of
# ~800 positions (~60 MiB in the 18,944-wide MLP) and its Whisper pass (16 heads x 1500^2 attention scores).
PIECE_BYTES = 256 * 2**20
FREE_MEMORY_SHARE = 0.8  # leave the rest to the allocator's fragmentation and other processes


def default_batch_size(device_type: str, free_bytes: int | None) -> int:
    """Pieces per pass when --batch-size is not given: CPU_BATCH_SIZE on the CPU, else from free GPU memory.

    ``free_bytes`` is what the GPU has free with the model loaded; the batch takes FREE_MEMORY_SHARE of it
    at PIECE_BYTES a piece, between 1 and MAX_AUTO_BATCH_SIZE.
    """
    if device_type != "cuda" or free_bytes is None:
        return CPU_BATCH_SIZE
    return max(1, min(MAX_AUTO_BATCH_SIZE, int(free_bytes * FREE_MEMORY_SHARE) // PIECE_BYTES))


def engine_batch_size(engine: Engine) -> int:
    """:func:`default_batch_size` for the engine's device (asks CUDA how much memory is free)."""
    import torch

    device = torch.device(engine.device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return default_batch_size(device.type, free)


def loaded_once(engine: Engine | Callable[[], Engine]) -> Callable[[], Engine]:
    """``engine``, or a function that loads it the first time it is called and returns it after."""
    loaded: list[Engine] = [] if callable(engine) else [engine]  # an Engine, or any api.protocol.Engine

    def model() -> Engine:
        if not loaded:
            loaded.append(engine())
        return loaded[0]
    return model


def run_batch(batch: list[tuple[Any, int, np.ndarray]], model: Callable[[], Engine],
               decode: DecodeOptions) -> None:
    """Answer each piece of ``batch`` into its job (slivers without audio tokens get "" without the model)."""
    for job, index, clip in batch:
        if not has_audio_tokens(clip):
            job.texts[index] = PieceText("")
    todo = [(job, index, clip) for job, index, clip in batch if job.texts[index] is None]
    if todo:
        results = generate_batch(model(), [clip for _, _, clip in todo], [job.instruction for job, _, _ in todo],
                                 decode)
        for (job, index, _), result in zip(todo, results):
            job.texts[index] = result


class PieceRun:
    """The pieces of a transcribe_many run between the VAD and the records: the inputs still open (in input
    order), the pieces not yet sent to the model, the batch size (found once the model is loaded) and the
    progress counts."""

    def __init__(self, model: Callable[[], Engine], batch_size: int | None, decode: DecodeOptions,
                 finish: Callable[[Any], Any], tell: Callable[[Any], None] | None,
                 progress: Callable[[int, int], None] | None, cancel: Any = None) -> None:
        self.model, self.decode, self.finish, self.tell = model, decode, finish, tell
        self.progress, self.cancel = progress, cancel
        self.open_jobs: deque = deque()  # api/asr.py _Job: .done, .texts
        self.waiting: list[tuple[Any, int, np.ndarray]] = []  # pieces not yet sent to the model
        self.sizes: list[int] = [] if batch_size is None else [batch_size]
        self.counts = [0, 0]  # pieces done, pieces known: for ``progress``

    def advance(self, done: int = 0, found: int = 0) -> None:
        self.counts[:] = self.counts[0] + done, self.counts[1] + found
        if self.progress is not None:
            self.progress(*self.counts)

    def batch_size(self) -> int:
        if not self.sizes:
            self.sizes.append(engine_batch_size(self.model()))
        return self.sizes[0]

    def window(self) -> int:  # one batch at a time when batches are single pieces: sorting would gain nothing
        return self.batch_size() * (SORT_WINDOW_BATCHES if self.batch_size() > 1 else 1)

    def answer(self, clips: list[np.ndarray], instruction: str) -> list[PieceText]:
        """The answers to ``[instruction, clip]`` for each clip, ``batch_size`` clips a pass."""
        size = self.batch_size() if clips else 1
        answers: list[PieceText] = []
        for start in range(0, len(clips), size):
            answers += generate_batch(self.model(), clips[start:start + size], instruction, self.decode)
        return answers

    def finished(self) -> Iterator[Any]:
        if self.tell is not None:
            for job in self.open_jobs:
                self.tell(job)
        while self.open_jobs and self.open_jobs[0].done:
            yield self.finish(self.open_jobs.popleft())

    def run_waiting(self) -> Iterator[Any]:
        pieces = sorted(self.waiting, key=lambda piece: len(piece[2]))  # stable: equal lengths keep input order
        self.waiting.clear()
        size = self.batch_size()
        for start in range(0, len(pieces), size):
            if self.cancel is not None and self.cancel.is_set():
                raise TranscriptionCancelled("the transcription was cancelled")
            run_batch(pieces[start:start + size], self.model, self.decode)
            self.advance(done=min(size, len(pieces) - start))
            yield from self.finished()


class TranscriptionCancelled(Exception):
    """The caller set the transcription's cancel event: what was left of it was not sent to the model."""
