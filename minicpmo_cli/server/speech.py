"""POST /v1/audio/speech (JSON): text to speech, whole or as server-sent events."""

from __future__ import annotations

import base64
import json

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from minicpmo_cli.server import encode, generation, media
from minicpmo_cli.server.errors import APIError
from minicpmo_cli.server.schemas import SpeechRequest
from minicpmo_cli.server.voices import resolve_voice

router = APIRouter()
SSE_CHUNK = 32768  # bytes of encoded audio per speech.audio.delta event


def _speech_voice(body: SpeechRequest):
    from minicpmo_cli.api.speech import Voice

    if body.reference_audio is not None:
        reference = media.decode_audio(media.b64decode(body.reference_audio, "reference_audio"), "reference_audio")
    else:
        reference = resolve_voice(body.voice)
    return Voice(reference=reference, mode=body.mode, instruction=body.instructions or None, language=body.language)


def _speech_decode(body: SpeechRequest):
    from minicpmo_cli.api.engine import DecodeOptions

    return DecodeOptions(max_new_tokens=body.max_new_tokens, sampling=body.sampling, temperature=body.temperature,
                         top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                         seed=body.seed)


async def _speech_sse(audio: bytes, usage: dict):
    for start in range(0, len(audio), SSE_CHUNK):
        chunk = base64.b64encode(audio[start:start + SSE_CHUNK]).decode("ascii")
        yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': chunk})}\n\n"
    yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n"


@router.post("/v1/audio/speech")
async def speech(body: SpeechRequest, request: Request):
    from minicpmo_cli.api.speech import MAX_AUDIO_FRAMES, frames_for_seconds, speak

    state = request.app.state.minicpmo
    state.check_model(body.model, "speech")
    if not state.settings.tts:
        raise APIError(400, "this server was started without the speech tower (--no-tts)")
    if not body.input.strip():
        raise APIError(400, "input is empty: nothing to say", param="input")
    voice = _speech_voice(body)
    voice.check()
    frames = MAX_AUDIO_FRAMES if body.max_audio_seconds is None else frames_for_seconds(body.max_audio_seconds)
    decode = generation.with_default_seed(_speech_decode(body), state.settings.seed)

    def job(engine, cancel):
        result = speak(engine, body.input, voice, decode=decode, verbatim=body.verbatim, max_frames=frames)
        return result, generation.count_tokens(engine, body.input)

    result, input_tokens = await state.worker.run(job, disconnected=request.is_disconnected)
    wav = encode.change_speed(result.wav, body.speed)
    audio = encode.encode(wav, result.sample_rate, body.response_format)
    headers = {"X-Speech-Capped": "1"} if result.capped else {}
    if body.stream_format == "sse":
        frames_out = len(result.wav) // 512  # one TTS frame per 512 samples at 24 kHz
        usage = {"input_tokens": input_tokens, "output_tokens": frames_out, "total_tokens": input_tokens + frames_out}
        return StreamingResponse(_speech_sse(audio, usage), media_type="text/event-stream", headers=headers)
    return Response(audio, media_type=encode.MEDIA_TYPES[body.response_format], headers=headers)
