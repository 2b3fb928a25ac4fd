"""POST /v1/audio/speech (JSON): text to speech, whole or streamed as it is synthesised (raw audio chunks, or
server-sent speech.audio.delta / speech.audio.done events). A client that leaves stops the synthesis."""

from __future__ import annotations

import asyncio
import base64
import json
from contextlib import closing

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from minicpmo_cli.server import encode, generation, media
from minicpmo_cli.server.errors import APIError
from minicpmo_cli.server.schemas import SpeechRequest
from minicpmo_cli.server.voices import resolve_voice

router = APIRouter()
SSE_CHUNK = 32768  # bytes of encoded audio per speech.audio.delta event
MAX_INPUT_CHARS = 4096  # OpenAI's limit on `input`
STREAMED_FORMATS = ("pcm", "pcm16", "wav")  # formats whose bytes can be sent as the samples are made


def _speech_voice(body: SpeechRequest):
    from minicpmo_cli.api.speech import Voice

    if body.reference_audio is not None:
        reference = media.decode_audio(media.b64decode(body.reference_audio, "reference_audio"), "reference_audio",
                                       media.MAX_REFERENCE_SECONDS)
    else:
        reference = resolve_voice(body.voice)
    return Voice(reference=reference, mode=body.mode, instruction=body.instructions or None, language=body.language)


def _speech_decode(body: SpeechRequest):
    from minicpmo_cli.api.engine import DecodeOptions

    return DecodeOptions(max_new_tokens=body.max_new_tokens, sampling=body.sampling, temperature=body.temperature,
                         top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                         seed=body.seed)


def _usage(input_tokens: int, samples: int) -> dict:
    frames = samples // 512  # one TTS frame per 512 samples at 24 kHz
    return {"input_tokens": input_tokens, "output_tokens": frames, "total_tokens": input_tokens + frames}


async def _whole_sse(audio: bytes, usage: dict):
    for start in range(0, len(audio), SSE_CHUNK):
        chunk = base64.b64encode(audio[start:start + SSE_CHUNK]).decode("ascii")
        yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': chunk})}\n\n"
    yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n"


async def _items(first: list, rest):
    """The items already taken (``first``), then the rest of the job's stream; closing it stops the job."""
    try:
        for item in first:
            yield item
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def _streamed_sse(first: list, rest):
    """speech.audio.delta events as the pieces are made, then speech.audio.done with the usage."""
    items = _items(first, rest)
    try:
        async for kind, value in items:
            if kind == "bytes":
                data = base64.b64encode(value).decode("ascii")
                yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': data})}\n\n"
            else:
                yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': value})}\n\n"
    finally:
        await items.aclose()  # at once, not when the event loop finalizes it: the job stops with its client


async def _streamed_audio(first: list, rest):
    """The audio bytes as the pieces are made."""
    items = _items(first, rest)
    try:
        async for kind, value in items:
            if kind == "bytes":
                yield value
    finally:
        await items.aclose()


def _streamed_job(body: SpeechRequest, voice, frames: int, seed, timer):
    """A job yielding ("bytes", encoded piece) as the speech is synthesised, then ("done", usage)."""
    from minicpmo_cli.api.speech import speak_stream

    def run(engine, cancel):
        samples, finish = 0, "abort"
        try:
            pieces = speak_stream(engine, body.input, voice, max_frames=frames, seed=seed)
            if body.response_format == "wav":
                yield ("bytes", encode.streaming_wav_header())
            with closing(pieces):
                for piece in pieces:
                    timer.first_audio()
                    samples += len(piece)
                    yield ("bytes", encode.pcm16_bytes(piece))
                    if cancel.is_set():
                        return
            finish = "stop"
            yield ("done", _usage(generation.count_tokens(engine, body.input), samples))
        finally:
            timer.finish(finish)

    return run


def _streams(body: SpeechRequest) -> bool:
    """Streamed as made: SSE, or stream_format "audio" asked for explicitly, for pcm and wav at speed 1 (the
    streaming schedule of `minicpmo tts --stream`). Otherwise the whole file as `minicpmo tts` makes it
    (what a request that leaves stream_format out gets: same bytes as the CLI, X-Speech-Capped header)."""
    asked = body.stream_format == "sse" or "stream_format" in body.model_fields_set
    return asked and body.response_format in STREAMED_FORMATS and abs(body.speed - 1.0) < 1e-6 and body.verbatim


@router.post("/v1/audio/speech")
async def speech(body: SpeechRequest, request: Request):
    from minicpmo_cli.api.speech import MAX_AUDIO_FRAMES, frames_for_seconds, speak

    state = request.app.state.minicpmo
    timer = state.metrics.timer()
    state.check_model(body.model, "speech")
    if not state.settings.tts:
        raise APIError(400, "this server was started without the speech tower (--no-tts)")
    if not body.input.strip():
        raise APIError(400, "input is empty: nothing to say", param="input")
    if len(body.input) > MAX_INPUT_CHARS:
        raise APIError(400, f"input is {len(body.input)} characters, over the limit of {MAX_INPUT_CHARS} "
                            "(as OpenAI's): split the text into several requests", param="input",
                       code="string_above_max_length")
    voice = await asyncio.to_thread(_speech_voice, body)  # decoding a reference voice: off the loop
    voice.check()
    frames = MAX_AUDIO_FRAMES if body.max_audio_seconds is None else frames_for_seconds(body.max_audio_seconds)
    decode = generation.with_default_seed(_speech_decode(body), state.settings.seed)
    pool = state.worker
    if _streams(body):
        items = pool.stream(_streamed_job(body, voice, frames, decode.seed, timer))
        first = [await pool.first(items, request.is_disconnected)]
        if body.stream_format == "sse":
            return StreamingResponse(_streamed_sse(first, items), media_type="text/event-stream")
        return StreamingResponse(_streamed_audio(first, items), media_type=encode.MEDIA_TYPES[body.response_format])

    def job(engine, cancel):
        try:
            result = speak(engine, body.input, voice, decode=decode, verbatim=body.verbatim, max_frames=frames,
                           cancel=cancel)
        finally:
            timer.finish("abort" if cancel.is_set() else "stop")
        return result, generation.count_tokens(engine, body.input)

    # Verbatim reading draws from a private generator; a model re-writing the text samples from the global one.
    alone = not body.verbatim and decode.seed is not None
    result, input_tokens = await pool.run(job, disconnected=request.is_disconnected, exclusive=alone)
    wav = await asyncio.to_thread(encode.change_speed, result.wav, body.speed)
    audio = await asyncio.to_thread(encode.encode, wav, result.sample_rate, body.response_format)
    headers = {"X-Speech-Capped": "1"} if result.capped else {}
    if body.stream_format == "sse":
        return StreamingResponse(_whole_sse(audio, _usage(input_tokens, len(result.wav))),
                                 media_type="text/event-stream", headers=headers)
    return Response(audio, media_type=encode.MEDIA_TYPES[body.response_format], headers=headers)
