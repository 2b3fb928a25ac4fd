"""Streaming omni sessions: ``reset_session`` / ``streaming_prefill`` / ``streaming_generate`` (spec audio-tts §2).

A session is an :class:`OmniSession`: it owns its turn state and its caches (the LLM's :class:`StaticKV`,
the streaming Whisper cache; the TTS cache lives in each speech stream), so one loaded model serves several
conversations, one after another or interleaved. ``model.new_session()`` makes one; the guide's
``model.reset_session()`` / ``streaming_prefill`` / ``streaming_generate`` use the model's default session,
whose state the model also shows under the reference's attribute names (``session_id``, ``new_user_msg``,
``llm_generated``, ``llm_generate_completed``, ``llm_past_key_values``, ``audio_past_key_values``). The LLM
runs on the decode core (generation/decode.py, generation/forward.py). Batch size 1.

- ``streaming_prefill`` renders one message, encodes its images and audio (audio through the streaming
  Whisper path with its own key/value cache) and runs the LLM over the new positions only, appending them to
  the session's KV cache: earlier calls are never recomputed.
- ``streaming_generate`` appends ``<|im_end|>\\n<|im_start|>assistant\\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>``
  and decodes in rounds of three tokens, as the reference's ``llm_generate_chunk``. With TTS the rounds' text
  feeds the streaming speech schedule (generation/speech.py ``stream_speech``).

Where this agrees with the non-streaming path (``model.generate`` on ``processor.apply_chat_template(...,
omni_input=True, use_tts_template=True, max_slice_nums=1, use_image_id=False)``): the token ids of all
prefills plus the generation prompt equal the one-shot prompt's; image embeddings, and audio embeddings of a
prompt whose only user audio is one piece of at most 1 s, are identical, so the KV cache, the logits, the
``<|spk|>`` speaker state and (for equal decoding settings, see below) the generated tokens are the same.

Where it legitimately differs (as in the reference):
- audio: each prefill's audio is normalised and encoded on its own, attending to the cached audio of the
  same user turn without a mask, instead of globally in 1 s chunks (spec §2.4); the system prompt's reference
  audio is encoded in one piece without the 1 s chunk mask;
- repetition penalty: it sees only the ids of the current round (the first round: the generation prompt plus
  its new tokens; later rounds: the previous round's last token plus the new ones), not the whole answer;
- decoding text by rounds holds back ids that end in an incomplete UTF-8 character and drops them if the
  answer ends there (the one-shot path decodes them as U+FFFD).

Where it deliberately differs from the reference's streaming code:
- ``max_new_tokens`` is exact (the reference checks it after each 3-token round, so it may overshoot by 2);
- ``min_new_tokens`` counts over the whole answer (the reference applies it per 3-token round, which with a
  value >= 3 keeps the answer from ever ending);
- ``sampling=False`` decodes greedily (with the beam settings' repetition penalty): beam search cannot run
  round by round on one shared cache;
- ``use_tts=False`` turns speech off (the reference only reads ``generate_audio``; both are honoured), and
  ``<|tts_eos|>`` is removed from the text items; audio items carry ``numpy.float32`` arrays;
- with speech, when the TTS ends before the LLM, the rest of the answer is still generated and yielded as
  text items with empty audio (the reference stops the LLM there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from itertools import chain
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation.decode import decode_one_token
from minicpmo_cli.generation.sampling import next_tokens
from minicpmo_cli.generation.session_log import SessionLog, closer_rows
from minicpmo_cli.generation.session_log import llm_step as _llm_step
from minicpmo_cli.generation.settings import DecodeSettings
from minicpmo_cli.generation.static_cache import StaticKV
from minicpmo_cli.processing.tts_text import TTS_EOS
from minicpmo_cli.units import INPUT_SAMPLE_RATE, MAX_AUDIO_FRAMES, OUTPUT_SAMPLE_RATE, STREAM_TTS_CHUNK_FRAMES

logger = logging.getLogger(__name__)

GENERATION_PROMPT = "<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
ROUND_TOKENS = 3  # tokens per LLM round (reference llm_generate_chunk: max_new_tokens=3 per call)
ROLES = ("system", "user", "assistant")


@dataclass
class StreamingOutput:
    """One item of ``streaming_generate`` with speech: text since the last item and its audio.

    Attribute access (``r.text``, ``r.audio_wav``) and item access (``r["audio_wav"]``, as the reference's
    ``ModelOutput`` allows) both work. ``spk_embeds`` is set on the first item only.
    """

    text: str = ""
    audio_wav: np.ndarray | None = None
    sampling_rate: int | None = None
    spk_embeds: torch.Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]


# ---------------------------------------------------------------------------------------------- state
class OmniSession:
    """One streaming conversation on ``model``: turn state and caches, nothing stored on the model."""

    def __init__(self, model, keep_log: bool = False) -> None:
        self.model = model
        # A live conversation keeps each call's input to forget old turns (generation/session_log.py's
        # forget()); before_append(count, turn_start), called before a prefill, may forget or raise.
        self.keep_log = keep_log
        self.before_append = None
        self.reset()

    def reset(self) -> None:
        """Forget the session: KV caches and turn state (the reference's ``reset_session``)."""
        self.session_id = None
        self.new_user_msg = True
        self.llm_generated = False
        self.llm_generate_completed = False
        self.llm_cache: StaticKV | None = None
        self.audio_cache = None
        self.log: SessionLog | None = SessionLog() if self.keep_log else None

    def prefill(self, session_id, msgs, processor=None, tokenizer=None, **kwargs: Any) -> None:
        """Append one message (see :func:`streaming_prefill`)."""
        return _prefill(self.model, self, session_id, msgs, processor, tokenizer, **kwargs)

    def generate(self, processor=None, tokenizer=None, **kwargs: Any) -> Iterator:
        """Answer what the session holds (see :func:`streaming_generate`)."""
        return _generate(self.model, self, processor, tokenizer, **kwargs)


def _state(owner) -> OmniSession:
    """The session of ``owner``: itself, or a model's default session."""
    return owner if isinstance(owner, OmniSession) else owner._session


def reset_session(model) -> None:
    """Forget the model's default session (the reference's ``reset_session``)."""
    model.reset_session()


def session_length(owner) -> int:
    """Positions in the session's LLM cache (0 before the first prefill); a session or a model."""
    cache = _state(owner).llm_cache
    return 0 if cache is None else int(cache.get_seq_length())


def turn_prefix(llm_generated: bool, llm_generate_completed: bool) -> str:
    """Text put before the first user chunk of a turn: closes an answer (``<|tts_eos|>`` first when it
    was cut short) or, right after the system prompt, just opens the user turn."""
    if not llm_generated:
        return "<|im_start|>user\n"
    if llm_generate_completed:
        return "<|im_end|>\n<|im_start|>user\n"
    return "<|tts_eos|><|im_end|>\n<|im_start|>user\n"


def _resolve_processor(model, processor, tokenizer):
    """The guide passes ``processor=``; the reference's signature says ``tokenizer`` (and uses
    ``model.processor``). Either works; a tokenizer alone needs ``model.processor`` for media."""
    if processor is not None and hasattr(processor, "tokenizer"):
        return processor, processor.tokenizer
    if tokenizer is None and processor is not None:
        tokenizer = processor  # a tokenizer passed positionally in the reference's slot
    main = getattr(model, "processor", None)
    if main is None:
        raise UsageError("streaming needs processor= (this model was loaded without its processor files)")
    return main, tokenizer or main.tokenizer


def _split_content(content) -> tuple[list[str], list, list]:
    """Message content -> (text parts with media tags, images, audios), as the reference's prefill."""
    from PIL import Image

    from minicpmo_cli.processing.processor import AUDIO_TAG, IMAGE_TAG

    parts, images, audios = [], [], []
    for item in [content] if isinstance(content, str) else content:
        if isinstance(item, Image.Image):
            images.append(item)
            parts.append(IMAGE_TAG)
        elif isinstance(item, np.ndarray):
            audios.append(item)
            parts.append(AUDIO_TAG)
        elif isinstance(item, str):
            parts.append(item)
        else:
            raise UsageError(f"unsupported message content of type {type(item).__name__}")
    return parts, images, audios


# ---------------------------------------------------------------------------------------------- prefill
def streaming_prefill(model, session_id, msgs, processor=None, tokenizer=None, **kwargs: Any) -> None:
    """Append one message to the model's default session (see :func:`_prefill`)."""
    return _prefill(model, _state(model), session_id, msgs, processor, tokenizer, **kwargs)


@torch.inference_mode()
def _prefill(model, state: OmniSession, session_id, msgs, processor=None, tokenizer=None, omni_input: bool = True,
             max_slice_nums: int | None = None, ls_temperature: float = 1.0, log_tag: Any = None,
             **kwargs: Any) -> None:
    """Append one message (``msgs`` holds exactly one) to the session ``session_id``.

    A new ``session_id`` starts a new session (the caches are reset). The first message is rendered as a
    whole turn (``<|im_start|>{role}\\n...<|im_end|>\\n``); later user messages are appended raw, the first
    of each user turn after the prefix of :func:`turn_prefix`. Images use one slice unless
    ``max_slice_nums`` says otherwise and no image ids; audio goes through the streaming encoder.
    ``ls_temperature`` is accepted for compatibility and unused (as in the reference). ``log_tag`` labels
    the call in the session's log (when it keeps one). Returns None.
    """
    if session_id is None:
        raise UsageError("streaming_prefill needs a session_id")
    if not isinstance(msgs, (list, tuple)) or len(msgs) != 1:
        raise UsageError("streaming_prefill takes exactly one message per call: "
                         "msgs=[{'role': ..., 'content': ...}]")
    processor, tokenizer = _resolve_processor(model, processor, tokenizer)
    role = msgs[0].get("role")
    if role not in ROLES:
        raise UsageError(f"message role must be system, user or assistant, got {role!r}")
    is_first = state.session_id is None or session_id != state.session_id
    parts, images, audios = _split_content(msgs[0].get("content", []))
    contents = ("" if omni_input else "\n").join(parts)
    turn_start = not is_first and state.new_user_msg and role == "user"
    prompt, closer = _render(state, tokenizer, role, contents, is_first, turn_start)
    inputs = processor(
        [prompt], [images], [audios], max_slice_nums=1 if max_slice_nums is None else max_slice_nums,
        use_image_id=False, chunk_input=True, return_tensors="pt", max_length=None,
        sampling_rate=INPUT_SAMPLE_RATE, add_special_tokens=is_first,
    ).to(model.device)
    if not is_first and state.before_append is not None:
        state.before_append(int(inputs["input_ids"].shape[1]), turn_start)  # may forget old turns, or refuse
    if turn_start:
        state.new_user_msg = False
    if role in ("system", "assistant"):
        state.new_user_msg = True
        state.audio_cache = None  # the next user audio starts a fresh encoder context
    if is_first:
        state.reset()
        state.session_id = session_id
    embeds, _ = model.get_vllm_embedding(inputs)
    audio_embeds, state.audio_cache = model.streaming_audio_embedding(inputs, state.audio_cache)
    embeds = model.insert_audio_embeddings(inputs, embeds, audio_embeds)
    if is_first:
        # The first message's audio (a reference voice) must not become context for the user's audio.
        state.audio_cache = None
    _append_prefill(model, state, embeds, is_first, log_tag, closer, turn_start)
    return None


def _render(state: OmniSession, tokenizer, role: str, contents: str, is_first: bool,
            turn_start: bool) -> tuple[str, int]:
    """(the prompt text of one message, its rows that close the previous answer)."""
    if is_first:
        from minicpmo_cli.processing.processor import TTS_CHAT_TEMPLATE

        return tokenizer.apply_chat_template([{"role": role, "content": contents}], tokenize=False,
                                             add_generation_prompt=False, chat_template=TTS_CHAT_TEMPLATE), 0
    if not turn_start:
        return contents, 0
    prefix = turn_prefix(state.llm_generated, state.llm_generate_completed)
    return prefix + contents, closer_rows(prefix, tokenizer)


def _append_prefill(model, state: OmniSession, embeds: torch.Tensor, is_first: bool, tag: Any, closer: int,
                    turn_start: bool) -> None:
    """Run the LLM over a prefill's rows and log them (right after the system prompt without the closing rows
    of a forgotten answer)."""
    log = state.log
    if log is not None and closer and not log.entries and state.llm_cache.length == log.system_end:
        embeds, closer = embeds[:, closer:], 0
    start = 0 if state.llm_cache is None else state.llm_cache.length
    _, state.llm_cache = _llm_step(model, embeds, state.llm_cache)
    if log is None:
        return
    if is_first:
        log.system_end = state.llm_cache.length
    else:
        log.record_prefill(start, embeds, tag, closer, turn_start)


# ---------------------------------------------------------------------------------------------- generate
def streaming_generate(model, session_id=None, processor=None, tokenizer=None, **kwargs: Any) -> Iterator:
    """Answer the model's default session (see :func:`_generate`); ``session_id`` is not checked (as the
    reference)."""
    return _generate(model, _state(model), processor, tokenizer, **kwargs)


def _generate(model, state: OmniSession, processor=None, tokenizer=None, max_new_tokens: int | None = None,
              min_new_tokens: int | None = None, sampling: bool | None = None, use_tts: bool = True,
              generate_audio: bool = True, tts_output_chunk_size: int = STREAM_TTS_CHUNK_FRAMES,
              enable_regenerate: bool = False, tts_max_new_tokens: int = MAX_AUDIO_FRAMES,
              decode: DecodeSettings | None = None, **kwargs: Any) -> Iterator:
    """Answer what the session holds; returns an iterator that decodes as it is consumed.

    With speech (``use_tts`` and ``generate_audio``, both default True) items are :class:`StreamingOutput`
    (``.text``, ``.audio_wav`` float32 at ``.sampling_rate`` 24000, about 0.53 s each); without, dicts
    ``{"text": ...}``. Decoding: ``sampling=True`` -> top_p 0.8, top_k 100, temperature 0.7, repetition
    penalty 1.05; ``sampling=False`` -> greedy with repetition penalty 1.2; ``temperature``, ``top_p``,
    ``top_k``, ``repetition_penalty`` override those (other keyword arguments are ignored, as the reference
    does). ``tts_max_new_tokens``: audio frames (46.875/s) the speech may add after the answer text has all
    been read (the reference's cap, 2048). ``seed``: a private RNG for the speech sampling (default: torch's
    global RNG). ``runner``: the engine's step runner (generation/step_runner.py; default eager;
    ``compile=True`` still means a compile runner).
    ``decode``: settings resolved already (generation/presets.py) instead of the decoding keywords; the
    defaults otherwise are the "omni-stream" preset's (sampling, 512 new tokens). See the module docstring
    for differences.
    """
    runner = kwargs.pop("runner", None)
    if kwargs.pop("compile", None) and runner is None:
        from minicpmo_cli.generation.step_runner import StepRunner

        runner = StepRunner("compile")
    seed = kwargs.pop("seed", None)
    log_tag = kwargs.pop("log_tag", None)
    decode = _stream_settings(decode, sampling, max_new_tokens, min_new_tokens, kwargs)
    _, tokenizer = _resolve_processor(model, processor, tokenizer)
    if state.llm_cache is None:
        raise UsageError("nothing to answer: call streaming_prefill() before streaming_generate()")
    if tts_output_chunk_size != STREAM_TTS_CHUNK_FRAMES:
        logger.warning("tts_output_chunk_size=%s is not supported; using %d", tts_output_chunk_size,
                       STREAM_TTS_CHUNK_FRAMES)
    if enable_regenerate:
        logger.warning("enable_regenerate is not supported; ignored")
    speak = bool(use_tts and generate_audio)
    if speak:
        _ensure_tts(model)
    # Turn state changes at once (as the reference), the decoding itself happens as the iterator is consumed.
    state.new_user_msg = True
    state.llm_generated = True
    state.llm_generate_completed = False
    state.audio_cache = None
    if state.log is not None:
        state.log.start_answer(state.llm_cache.length, log_tag, closer_rows(GENERATION_PROMPT, tokenizer))
    prompt_ids = tokenizer(GENERATION_PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    spk_bound = _speaker_bound(prompt_ids[0], tokenizer)
    rounds = _llm_rounds(state, tokenizer, prompt_ids.to(model.device), decode, runner=runner)
    if speak:
        return _speech_items(model, rounds, spk_bound, seed, int(tts_max_new_tokens))
    return _text_items(rounds)


def _stream_settings(decode: DecodeSettings | None, sampling, max_new_tokens, min_new_tokens,
                     overrides: dict) -> DecodeSettings:
    """``decode``, or the guide's keywords converted once (the reference's mode values, the "omni-stream"
    preset for what is left out). Without sampling the session decodes greedily: beam search cannot stream."""
    from minicpmo_cli.generation.presets import PRESETS
    from minicpmo_cli.generation.text import decoding_settings, refuse_guide_keywords

    if decode is not None:
        refuse_guide_keywords(sampling, max_new_tokens, min_new_tokens, overrides)
        if decode.beam_search:
            raise UsageError(f"num_beams={decode.num_beams}: a streaming answer is decoded greedily or by "
                             "sampling, beam search cannot stream", parameters=("num_beams",))
        return decode
    preset = PRESETS["omni-stream"]
    sampling = preset.sampling if sampling is None else bool(sampling)
    kwargs = decoding_settings(sampling, 0, overrides)
    kwargs.pop("num_beams", None)
    limit = preset.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    # max_new_tokens=0 decodes one token, as the reference's 3-token rounds do
    return DecodeSettings.from_kwargs(kwargs, max(limit, 1), ()).with_(min_new_tokens=int(min_new_tokens or 0))


def _ensure_tts(model) -> None:
    if getattr(model, "tts", None) is None:
        raise UsageError("speech output needs the TTS tower: load the model with init_tts=True (or use_tts=False)")
    if getattr(model, "vocos", None) is None or getattr(model, "tts_processor", None) is None:
        model.init_tts()


def _speaker_bound(ids: torch.Tensor, tokenizer) -> tuple[int, int]:
    """[start, end) of the ``<|spk|>`` position(s) between ``<|spk_bos|>`` and ``<|spk_eos|>``."""
    start = (ids == tokenizer.convert_tokens_to_ids("<|spk_bos|>")).nonzero().flatten()
    end = (ids == tokenizer.convert_tokens_to_ids("<|spk_eos|>")).nonzero().flatten()
    return int(start[-1]) + 1, int(end[-1])


def _pick_token(logits: torch.Tensor, window: list[int], settings: DecodeSettings, banned: torch.Tensor | None) -> int:
    """Next id from float32 logits ``[1, V]`` by the decode core's sampling (transformers' order: repetition
    penalty over ``window``, the min-length ban, temperature, top-k, top-p, one multinomial draw)."""
    seen = None
    if settings.repetition_penalty != 1.0:
        ids = torch.tensor([window], dtype=torch.long, device=logits.device)
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, ids, True)
    return int(next_tokens(logits, settings, seen, banned, None)[0])


def _complete_prefix(ids: list[int], tokenizer) -> int:
    """How many leading ids decode without a trailing incomplete character (reference
    ``check_uncompleted_token``): the rest waits for the next round."""
    end = len(ids)
    while end > 0 and tokenizer.decode(ids[:end]).endswith("\ufffd"):
        end -= 1
    return end


class _Round(NamedTuple):
    text: str  # decoded text of the round (minus ids held back for an incomplete character)
    prompt_hidden: torch.Tensor | None  # first round only: final-norm states over the generation prompt
    ids: list[int]  # the ids sampled in this round (a terminator included)


def _next_logits(state: OmniSession, feed: torch.Tensor, runner, feed_ids: list[int]):
    """(float32 logits of the next token, final-norm hidden of ``feed`` or None) after appending ``feed``
    ``[1, n]`` (``feed_ids`` on the host, for the log) to the session's cache: the prompt pass, or one decode
    step of the core."""
    llm = state.model.llm
    cache = state.llm_cache
    if state.log is not None:
        state.log.extend_answer(feed_ids)
    if feed.shape[1] == 1:
        cache.ensure_capacity(cache.length + 1)
        positions = torch.full((1,), cache.length, dtype=torch.long, device=feed.device)
        return decode_one_token(llm, feed[:, 0], positions, cache, None, runner), None
    hidden, state.llm_cache = _llm_step(state.model, llm.model.embed_tokens(feed), cache)
    return llm.lm_head(hidden[:, -1:]).float()[:, -1], hidden


@torch.inference_mode()
def _llm_rounds(owner, tokenizer, prompt_ids: torch.Tensor, settings: DecodeSettings,
                runner=None) -> Iterator[_Round]:
    """Decode in rounds of 3 tokens; yields a :class:`_Round` per round (``owner``: a session or a model).

    Each round's last token is fed at the start of the next round, so a terminator (and the very last
    token) never enters the cache, as in the reference.
    """
    from minicpmo_cli.processing.answer_text import decode_text, terminator_ids

    state = _state(owner)
    terminators = terminator_ids(tokenizer)
    decode = settings.with_(stop_ids=tuple(terminators))
    max_new_tokens, min_new_tokens = decode.max_new_tokens, decode.min_new_tokens
    vocab = state.model.llm.lm_head.out_features
    stops = torch.tensor(terminators, device=prompt_ids.device)
    ban = torch.isin(torch.arange(vocab, device=prompt_ids.device), stops)
    feed, window = prompt_ids, prompt_ids[0].tolist()
    pending: list[int] = []
    produced, prompt_hidden = 0, None
    while True:
        round_ids, finished, first_round = [], False, prompt_hidden is None
        for _ in range(ROUND_TOKENS):
            logits, hidden = _next_logits(state, feed, runner, window[-feed.shape[1]:])
            if prompt_hidden is None:
                prompt_hidden = hidden  # the pass over the generation prompt: holds the <|spk|> state
            token = _pick_token(logits, window, decode, ban if produced < min_new_tokens else None)
            produced += 1
            round_ids.append(token)
            window.append(token)
            feed = torch.tensor([[token]], dtype=torch.long, device=prompt_ids.device)
            finished = token in terminators
            if finished or produced >= max_new_tokens:
                break
        ids = pending + round_ids
        end = _complete_prefix(ids, tokenizer)
        pending = ids[end:]
        text = decode_text([torch.tensor(ids[:end], dtype=torch.long)], tokenizer, terminators)[0] if end else ""
        yield _Round(text, prompt_hidden if first_round else None, round_ids)
        if finished:
            state.llm_generate_completed = True
            if state.log is not None:
                state.log.entries[-1].completed = True
            return
        if produced >= max_new_tokens:
            logger.debug("streaming answer reached max_new_tokens=%d", max_new_tokens)
            return
        window = [round_ids[-1]]  # the next round's input: the last token, not yet in the cache


def _text_items(rounds) -> Iterator[dict]:
    for item in rounds:
        text = item.text.replace(TTS_EOS, "")
        if text:
            yield {"text": text}


@torch.inference_mode()
def _speech_items(model, rounds, spk_bound: tuple[int, int], seed: int | None,
                  max_frames: int) -> Iterator[StreamingOutput]:
    """Feed the rounds' text to the streaming TTS; yield its chunks, then any text it did not wait for."""
    from minicpmo_cli.generation.speech import stream_speech

    try:
        opening = next(rounds)
    except StopIteration:
        return
    spk_embeds = opening.prompt_hidden[0, spk_bound[0]:spk_bound[1]]
    pieces = chain([opening.text], (item.text for item in rounds))
    chunks = stream_speech(model.tts, model.vocos, model.tts_processor, spk_embeds.to(model.tts.device), pieces,
                           seed=seed, max_new_tokens=max_frames)
    first = True
    for chunk in chunks:
        yield StreamingOutput(text=chunk.text.replace(TTS_EOS, ""), audio_wav=np.asarray(chunk.wav, np.float32),
                              sampling_rate=chunk.sample_rate, spk_embeds=spk_embeds if first else None)
        first = False
    rest = "".join(pieces).replace(TTS_EOS, "")  # the speech ended before the answer did
    if rest or first:
        yield StreamingOutput(text=rest, audio_wav=np.zeros(0, dtype=np.float32), sampling_rate=OUTPUT_SAMPLE_RATE,
                              spk_embeds=spk_embeds if first else None)
