"""Text generation with the reference's decoding semantics (spec vision-llm §8).

- ``sampling=True``: top_p 0.8, top_k 100, temperature 0.7, repetition penalty 1.05.
- ``sampling=False``: **beam search**, 3 beams, repetition penalty 1.2 (not greedy).
- Only keys already in that settings dict may be overridden (as the reference's ``chat()``); other decoding
  keyword arguments are dropped. ``min_new_tokens`` is added only when > 0. That is the guide's keyword API
  (``generate``/``chat``), converted once into a :class:`~minicpmo_cli.generation.decode.DecodeSettings` by
  :func:`guide_decode`; below it, and for callers that resolved their settings already (api/: ``decode=``
  from generation/presets.py, where contradictions are refused instead of dropped), only typed settings flow.
- Stop on ``<|im_end|>`` / ``<|endoftext|>``; pad id 0.
- Decoding drops **every id 0** (the pad, which is also the token ``!``), a leading ``<|im_start|>`` and one
  trailing terminator, then ``<|tts_eos|>`` is removed from the answer (reference quirks, kept for parity).

Greedy and sampled answers run on the decode core (generation/decode.py), which gives transformers
``generate``'s ids; beam search stays on ``generate`` (on ``llm`` with ``inputs_embeds``), which reproduces the
reference's beams. The repetition penalty sees only the generated tokens (as the reference: its ``input_ids``
start empty).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from threading import Event, Thread
from typing import Any, Iterator

import torch

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation.presets import PRESETS, REFERENCE_BEAM, REFERENCE_SAMPLING
from minicpmo_cli.generation.settings import DecodeSettings
from minicpmo_cli.generation.usage import Usage, generated_count
from minicpmo_cli.processing.answer_text import decode_text, terminator_ids
from minicpmo_cli.processing.tts_text import LLM_TERMINATORS, TTS_EOS
from minicpmo_cli.units import OUTPUT_SAMPLE_RATE

logger = logging.getLogger(__name__)

SAMPLING_DEFAULTS = {**REFERENCE_SAMPLING, "do_sample": True}  # as transformers generate() kwargs
BEAM_DEFAULTS = dict(REFERENCE_BEAM)
DECODING_KEYS = set(SAMPLING_DEFAULTS) | set(BEAM_DEFAULTS)
GUIDE_TASK = "guide"  # the preset of what the guide's generate()/chat() calls leave out
# Processor-time options that the usage guide also passes to generate(); they have no effect there.
PROCESSING_ONLY_KEYS = ("use_image_id", "max_slice_nums", "chunk_input", "omni_input", "max_inp_length")
MODEL_INPUT_KEYS = ("pixel_values", "tgt_sizes", "image_bound", "audio_features", "audio_feature_lens",
                    "audio_bounds", "spk_bounds", "vision_hidden_states")


@dataclass
class OmniOutput:
    """Answer text plus (with TTS) the speaker conditioning and the 24 kHz waveform."""

    text: Any = None
    spk_embeds: torch.Tensor | None = None
    audio_wav: Any = None
    sampling_rate: int | None = None


def decoding_settings(sampling: bool, min_new_tokens: int = 0, overrides: dict | None = None) -> dict:
    """The reference's generation kwargs: defaults for the mode, then overrides of existing keys only."""
    settings = dict(SAMPLING_DEFAULTS if sampling else BEAM_DEFAULTS)
    if min_new_tokens > 0:
        settings["min_new_tokens"] = min_new_tokens
    overrides = overrides or {}
    dropped = sorted(set(overrides) - set(settings))
    if dropped:
        logger.debug("decoding options ignored in %s mode (as the reference): %s",
                     "sampling" if sampling else "beam", ", ".join(dropped))
    settings.update((k, overrides[k]) for k in settings.keys() & overrides.keys())
    return settings


def guide_decode(sampling: bool | None = None, max_new_tokens: int | None = None, min_new_tokens: int | None = None,
                 overrides: dict | None = None) -> DecodeSettings:
    """The guide's decoding keyword arguments -> settings, by the reference's rules (see the module docstring);
    what is left out comes from the "guide" preset (sampling, 2048 new tokens)."""
    preset = PRESETS[GUIDE_TASK]
    sampling = preset.sampling if sampling is None else bool(sampling)
    kwargs = decoding_settings(sampling, int(min_new_tokens or 0), overrides)
    limit = preset.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    return DecodeSettings.from_kwargs(kwargs, limit, ())


def _typed_or_guide(decode: DecodeSettings | None, sampling, max_new_tokens, min_new_tokens,
                    overrides: dict) -> DecodeSettings:
    """``decode`` when the caller resolved it, else the guide's keywords converted; never both."""
    if decode is None:
        return guide_decode(sampling, max_new_tokens, min_new_tokens, overrides)
    refuse_guide_keywords(sampling, max_new_tokens, min_new_tokens, overrides)
    return decode


def refuse_guide_keywords(sampling, max_new_tokens, min_new_tokens, overrides: dict) -> None:
    """With ``decode=`` the guide's decoding keywords would be a second, contradicting source: refused."""
    given = [name for name, value in (("sampling", sampling), ("max_new_tokens", max_new_tokens),
                                      ("min_new_tokens", min_new_tokens)) if value is not None]
    given += sorted(set(overrides) & DECODING_KEYS)
    if given:
        raise UsageError(f"decode= holds the decoding settings; drop {', '.join(given)} (or drop decode=)",
                         parameters=("decode", *given))


def spk_embeds_from_hidden(hidden: torch.Tensor, spk_bounds) -> torch.Tensor:
    """[n, D] rows of sample 0 at its last speaker bound (reference: batch 1, ``spk_bounds[0][-1]``)."""
    bounds = spk_bounds[0] if spk_bounds is not None and len(spk_bounds) else []
    if len(bounds) == 0:
        raise UsageError(
            "speech output needs the TTS prompt: build the inputs with "
            "processor.apply_chat_template(msgs, use_tts_template=True) (audio input turns it on by itself)"
        )
    start, end = (int(v) for v in bounds[-1])
    return hidden[0, start:end]


def _model_inputs(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in MODEL_INPUT_KEYS if k in kwargs}


def generate(
    model,
    input_ids=None,
    attention_mask=None,
    processor=None,
    tokenizer=None,
    sampling: bool | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    stream: bool = False,
    use_tts_template: bool = False,
    generate_audio: bool = False,
    output_audio_path=None,
    return_spk_embed: bool = False,
    return_dict: bool = False,
    engine=None,
    tts_runner=None,
    seed: int | None = None,
    decode: DecodeSettings | None = None,
    usage: Usage | None = None,
    cancel: Event | None = None,
    **kwargs: Any,
):
    """``MiniCPMO.generate(**processor_outputs, processor=..., ...)``: answer text (list for a batch).

    ``stream=True`` returns an iterator of text pieces (sampling only, as the reference). With
    ``generate_audio=True`` the spoken answer is synthesised (and written to ``output_audio_path``).
    ``engine``: the LLMEngine to decode on (None: a short-lived one); ``tts_runner``: the TTS frame loop's
    step runner (None: eager). ``seed``: each row samples from a private generator seeded with it (None:
    torch's global generator, as the reference). Decoding: the guide's keywords (``sampling`` True,
    ``max_new_tokens`` 2048, ...), or ``decode``: settings resolved already (generation/presets.py).
    ``usage``: a :class:`Usage` for this call's token counts. ``cancel``: an Event that stops the decode.
    """
    if input_ids is None:
        raise UsageError("generate() needs the processor outputs (input_ids, ...)")
    tokenizer = _answer_tokenizer(model, processor, tokenizer)
    want_speech = generate_audio or return_spk_embed
    data, attention_mask = _prepare_inputs(input_ids, attention_mask, tokenizer, kwargs,
                                           tts_template=use_tts_template and want_speech)
    decode = _typed_or_guide(decode, sampling, max_new_tokens, min_new_tokens, kwargs)
    usage = usage if usage is not None else Usage()
    usage.prompt_tokens = int(data["input_ids"].shape[-1])
    if stream and decode.beam_search:
        raise UsageError("beam search cannot stream (sample, or num_beams=1)", parameters=("stream", "num_beams"))
    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(data)
    mask = None if attention_mask is None else attention_mask.to(embeds.device)
    if stream:
        return _stream_text(model, embeds, tokenizer, decode, engine, usage, seed)
    sequences, prompt_hidden = run_llm_generate(model, embeds, mask, tokenizer, decode,
                                                capture_prompt_hidden=want_speech, engine=engine, seed=seed,
                                                cancel=cancel)
    usage.completion_tokens = generated_count(sequences, terminator_ids(tokenizer))
    texts = decode_text(sequences, tokenizer)
    # No prompt pass to read the speaker from when a cancel came before the prompt was prefilled.
    cancelled_early = prompt_hidden is None and cancel is not None and cancel.is_set()
    spk_embeds = (spk_embeds_from_hidden(prompt_hidden, data.get("spk_bounds"))
                  if want_speech and not cancelled_early else None)
    speech = (model, output_audio_path, tts_runner) if generate_audio else None
    return _answer(texts, spk_embeds, speech, as_dict=return_dict or return_spk_embed)


def _answer(texts: list[str], spk_embeds, speech: tuple | None, as_dict: bool):
    """generate()'s result: the text (a list for a batch), spoken when ``speech`` = (model, output path, TTS
    runner) is given and there is one row; an OmniOutput when ``as_dict``."""
    batched = len(texts) > 1
    answer, wav, rate = texts if batched else texts[0], None, None
    if speech is not None and not batched:
        model, output_audio_path, tts_runner = speech
        wav, rate = synthesize(model, spk_embeds, answer, output_audio_path, runner=tts_runner)
    answer = [t.replace(TTS_EOS, "") for t in answer] if batched else answer.replace(TTS_EOS, "")
    if as_dict:
        return OmniOutput(text=answer, spk_embeds=spk_embeds, audio_wav=wav, sampling_rate=rate)
    return answer


def _answer_tokenizer(model, processor, tokenizer):
    tokenizer = tokenizer or getattr(processor, "tokenizer", None) or getattr(model.processor, "tokenizer", None)
    if tokenizer is None:
        raise UsageError("generate() needs processor= (or tokenizer=) to decode the answer")
    return tokenizer


def _prepare_inputs(input_ids, attention_mask, tokenizer, kwargs: dict, tts_template: bool):
    """(model inputs, attention mask) from generate()'s arguments. Takes the model inputs and the options that
    belong to the processor out of ``kwargs`` (what stays there is decoding options), and rewrites a plain
    prompt into the TTS template when ``tts_template``."""
    data = _model_inputs(kwargs)
    data["input_ids"] = input_ids
    late = [key for key in PROCESSING_ONLY_KEYS if kwargs.pop(key, None) is not None]
    if late:
        logger.warning("%s only take effect in processor.apply_chat_template(); ignored by generate()",
                       ", ".join(late))
    for key in ("image_sizes", "decode_text"):
        kwargs.pop(key, None)
    if tts_template:
        from minicpmo_cli.processing.tts_prompt import apply_tts_template, needs_tts_prompt

        if needs_tts_prompt(data):
            data, attention_mask = apply_tts_template(data, attention_mask, tokenizer)
    return data, attention_mask


def run_llm_generate(model, embeds, attention_mask, tokenizer, settings: DecodeSettings,
                     capture_prompt_hidden: bool = False, streamer=None, stop_event: Event | None = None,
                     engine=None, seed: int | None = None, cancel: Event | None = None):
    """Decode on the merged embeddings; returns (new token ids [B, T] padded with 0, prompt final hidden or None).

    ``settings``: resolved decoding settings; the stop ids are the tokenizer's chat terminators.

    Greedy and sampling run on the decode core (generation/decode.py); beam search (``num_beams > 1``) on
    transformers ``generate``, the only implementation that reproduces the reference's beams. ``streamer``
    (``put``/``end``, as transformers' streamers) receives the ids as they are chosen; ``stop_event`` set from
    another thread ends the decode at the next token. ``engine``: the LLMEngine (None: a short-lived one);
    ``seed``: a private generator per row (None: torch's global one).
    """
    from minicpmo_cli.generation.decode import generate_ids

    decode = settings.with_(stop_ids=tuple(terminator_ids(tokenizer)))
    if decode.beam_search:
        if streamer is not None:
            raise UsageError("beam search cannot stream", parameters=("num_beams",))
        return _beam_generate(model, embeds, attention_mask, decode, capture_prompt_hidden)
    captured: list[torch.Tensor] = []

    def on_token(ids: list[int]) -> bool:
        if streamer is not None:
            streamer.put(torch.tensor(ids))
        return stop_event is not None and stop_event.is_set()

    watched = streamer is not None or stop_event is not None
    rows = generate_ids(model.llm, embeds, attention_mask, decode, on_token=on_token if watched else None,
                        engine=engine, seed=seed, on_prefill=captured.append if capture_prompt_hidden else None,
                        cancel=cancel)
    if streamer is not None:
        streamer.end()
    width = max((len(row) for row in rows), default=0)
    sequences = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        sequences[index, :len(row)] = torch.tensor(row, dtype=torch.long)
    return sequences, (captured[0] if captured else None)


def _beam_generate(model, embeds, attention_mask, decode: DecodeSettings, capture_prompt_hidden: bool):
    """transformers beam search (as the reference); the prompt's hidden states come from one extra prompt pass
    when asked for (no hook on the shared model)."""
    hidden = None
    if capture_prompt_hidden:
        from minicpmo_cli.generation.decode import prefill

        hidden, _, _ = prefill(model.llm, embeds, attention_mask, embeds.shape[1])
    with torch.inference_mode(), warnings.catch_warnings():
        # Penalising only the new tokens is exactly the reference behaviour; the warning is noise.
        warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds.*")
        sequences = model.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                       **decode.generate_kwargs())
    return sequences, hidden


def _stream_text(model, embeds, tokenizer, decode: DecodeSettings, engine=None,
                 usage: Usage | None = None, seed: int | None = None) -> Iterator[str]:
    """Text pieces as they are generated, with the chat terminators removed (reference stream mode); each
    generated id counts in ``usage.completion_tokens`` as it comes.

    Closing the iterator early (the caller stopped reading, e.g. Ctrl-C in the REPL) stops the generation
    thread at its next token instead of letting it run on to ``max_new_tokens`` in the background.
    """
    from transformers import TextIteratorStreamer

    if embeds.shape[0] != 1:
        raise UsageError("stream=True supports one conversation at a time")
    if engine is not None and engine.threaded:
        from minicpmo_cli.generation.text_stream import stream_on_engine

        # read straight off the engine's request in the caller's thread (no decode thread, no per-id handoff)
        return stream_on_engine(engine, embeds, tokenizer, decode, usage if usage is not None else Usage(), seed)
    streamer = TextIteratorStreamer(tokenizer)
    counted = _CountedStreamer(streamer, usage if usage is not None else Usage())
    failure: list[BaseException] = []
    stop = Event()

    def work() -> None:
        try:
            run_llm_generate(model, embeds, None, tokenizer, decode, streamer=counted, stop_event=stop,
                             engine=engine, seed=seed)
        except BaseException as exc:  # surfaced in the consumer thread below
            failure.append(exc)
            streamer.end()

    def pieces() -> Iterator[str]:
        # Started here, not before: an iterator dropped before its first item then never starts a thread.
        thread = Thread(target=work, daemon=True)
        try:
            # start() inside the try: a Ctrl-C that lands while the thread starts still stops it (finally).
            thread.start()
            for text in streamer:
                for term in LLM_TERMINATORS:
                    text = text.replace(term, "")
                yield text
        finally:
            stop.set()
            try:
                thread.join()
            except RuntimeError:  # Ctrl-C inside start(), before the thread ran: it stops at its first token
                pass
        if failure:
            raise failure[0]

    return pieces()


class _CountedStreamer:
    """A streamer's ``put``/``end`` that also counts the ids put through it in ``usage``."""

    def __init__(self, streamer, usage: Usage) -> None:
        self.streamer, self.usage = streamer, usage

    def put(self, value: torch.Tensor) -> None:
        self.usage.completion_tokens += int(value.numel())
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


def synthesize(model, spk_embeds: torch.Tensor, answer: str, output_audio_path=None, runner=None):
    """Answer text -> (24 kHz float32 wav, 24000) with the model's TTS; writes a wav file if a path is given.
    ``runner``: the TTS frame loop's step runner (None: eager)."""
    from minicpmo_cli.generation.speech import generate_speech

    if getattr(model, "vocos", None) is None or getattr(model, "tts_processor", None) is None:
        model.init_tts()
    wav = generate_speech(model.tts, model.vocos, model.tts_processor, spk_embeds.to(model.tts.device), answer,
                          runner=runner)
    if output_audio_path is not None:
        import soundfile

        soundfile.write(str(output_audio_path), wav, OUTPUT_SAMPLE_RATE)
    return wav, OUTPUT_SAMPLE_RATE


def _contains_audio(msgs_list) -> bool:
    import numpy as np

    for msgs in msgs_list:
        for msg in msgs if not isinstance(msgs, str) else []:
            content = msg.get("content")
            if isinstance(content, list) and any(isinstance(c, np.ndarray) for c in content):
                return True
    return False


def _check_processor(model, processor) -> None:
    """The reference asserts that config.json and preprocessor_config.json agree."""
    image = getattr(processor, "image_processor", None)
    if image is None:
        return
    config = model.config
    pairs = (("query_num", config.query_num, image.image_feature_size), ("patch_size", config.patch_size,
             image.patch_size), ("use_image_id", config.use_image_id, image.use_image_id),
             ("max_slice_nums", config.max_slice_nums, image.max_slice_nums),
             ("slice_mode", config.slice_mode, image.slice_mode))
    for name, ours, theirs in pairs:
        if ours != theirs:
            raise UsageError(f"config.json and preprocessor_config.json disagree on {name}: {ours} vs {theirs}")


def chat(
    model,
    msgs=None,
    image=None,
    tokenizer=None,
    processor=None,
    vision_hidden_states=None,
    max_new_tokens: int | None = None,  # None: the "guide" preset's (generation/presets.py)
    min_new_tokens: int | None = None,
    sampling: bool | None = None,  # None: True, as the reference
    max_inp_length: int = 32768,
    stream: bool = False,
    chunk_input: bool = True,
    omni_input: bool = False,
    max_slice_nums: int | None = None,
    use_image_id: bool | None = None,
    use_tts_template: bool = False,
    generate_audio: bool = False,
    return_spk_embed: bool = False,
    return_dict: bool = False,
    output_audio_path=None,
    **kwargs: Any,
):
    """The reference ``chat()``: messages (or a batch of message lists) in, answer text out."""
    from copy import copy

    processor = processor or model.processor
    if processor is None:
        raise UsageError("chat() needs processor= (the model was loaded without processor files)")
    _check_processor(model, processor)
    batched = isinstance(msgs[0], list)
    if image is not None:
        if batched:
            raise UsageError("Please integrate image to msgs when using batch inference.")
        msgs = [dict(m) for m in msgs]
        if isinstance(msgs[0]["content"], str):
            msgs[0]["content"] = [image, msgs[0]["content"]]
    if stream and sampling is False:
        raise UsageError("if use stream mode, make sure sampling=True")
    use_tts_template = use_tts_template or _contains_audio(msgs if batched else [msgs])
    inputs = processor.apply_chat_template(
        msgs=copy(msgs), chunk_input=chunk_input, max_slice_nums=max_slice_nums, max_length=max_inp_length,
        omni_input=omni_input, use_image_id=use_image_id, use_tts_template=use_tts_template,
    ).to(model.device)
    inputs.pop("image_sizes", None)
    if vision_hidden_states is not None:
        inputs["vision_hidden_states"] = vision_hidden_states
    result = generate(
        model, **inputs, processor=processor, tokenizer=tokenizer or processor.tokenizer, sampling=sampling,
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stream=stream,
        generate_audio=bool(generate_audio and use_tts_template and not batched), output_audio_path=output_audio_path,
        return_spk_embed=return_spk_embed, return_dict=return_dict or generate_audio, **kwargs,
    )
    if stream and (return_dict or generate_audio):
        return OmniOutput(text=result)
    return result
