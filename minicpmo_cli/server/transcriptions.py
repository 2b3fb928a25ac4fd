"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart)."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse

from minicpmo_cli.server import generation, limits, media
from minicpmo_cli.server.errors import APIError

router = APIRouter()
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
# The model's guide has no translation prompt; this one follows the wording of its ASR prompt.
TRANSLATE_EN = "Please listen to the audio snippet carefully and translate the content into English."


def _asr_decode(temperature: float, extra: dict):
    """temperature 0 (OpenAI's default) is asr's greedy decoding; above 0, sampling at that temperature."""
    from minicpmo_cli.api.engine import DecodeOptions

    sampling = extra.pop("sampling", None)
    if sampling is None:
        sampling = temperature > 0
    return DecodeOptions(sampling=sampling, temperature=temperature if temperature > 0 else None,
                         **{k: v for k, v in extra.items() if v is not None})


def _asr_options(language: Optional[str], prompt: Optional[str], task: str):
    from minicpmo_cli.api.asr import AsrOptions

    if language not in (None, "", "auto", "en", "zh"):
        raise APIError(400, f"language {language!r} is not supported: MiniCPM-o's prompts are en and zh "
                            "(omit it to let the model follow the audio)", param="language")
    options = AsrOptions(task=task, language=language or "auto", prompt=prompt or None)
    _ = options.instruction  # a bad task or an empty prompt is a 400 before any work
    return options


def _record_response(record, response_format: str, task: str):
    from minicpmo_cli.outputs import SrtWriter, VttWriter

    if response_format == "text":
        return PlainTextResponse(record.text + "\n")
    if response_format in ("srt", "vtt"):
        spoken = [s for s in record.segments if s.text.strip()]
        record.segments, record.text = spoken, record.text if spoken else ""
        writer = SrtWriter() if response_format == "srt" else VttWriter()
        return PlainTextResponse(writer.format(record), media_type="text/vtt" if response_format == "vtt"
                                 else "application/x-subrip")
    if response_format == "json":
        return {"text": record.text}
    segments = [{"id": i, "start": s.start, "end": s.end, "text": s.text} for i, s in enumerate(record.segments)]
    return {"task": task, "language": record.language, "duration": record.duration, "text": record.text,
            "segments": segments}


async def _transcribe(request: Request, file: UploadFile, model: str, options, decode, response_format: str,
                      task_name: str):
    from minicpmo_cli.api.asr import transcribe

    state = request.app.state.minicpmo
    state.check_model(model, "transcription")
    limits.check_answer_tokens(decode.max_new_tokens, "max_new_tokens", state.engine)
    if response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", param="response_format")
    data = await file.read()
    if len(data) > state.settings.max_upload_bytes:
        raise APIError(413, f"the file is over this server's limit of {state.settings.max_upload_bytes} bytes")
    if not data:
        raise APIError(400, f"file {file.filename or ''}: the upload is empty".replace("file : ", "file: "),
                       param="file")
    name = file.filename or "upload"
    # The audio's length from its header, before the worker decodes it whole (off the loop: it may decode)
    await asyncio.to_thread(media.check_audio_length, data, "file", state.settings.fetch.max_transcription_seconds)
    decode = generation.with_default_seed(decode, state.settings.seed)

    def job(engine, cancel):
        return transcribe(engine, data, options, decode, path=name)

    record = await state.worker.run(job, disconnected=request.is_disconnected)
    return _record_response(record, response_format, task_name)


def decoding_form(temperature: float = Form(0.0, ge=0.0, le=1.0),
                  max_new_tokens: Optional[int] = Form(None, ge=1, le=1_000_000),
                  top_p: Optional[float] = Form(None, gt=0.0, le=1.0),
                  top_k: Optional[int] = Form(None, ge=0, le=1_000_000),
                  repetition_penalty: Optional[float] = Form(None, ge=0.01, le=100.0),
                  num_beams: Optional[int] = Form(None, ge=1, le=16), sampling: Optional[bool] = Form(None)):
    """OpenAI's temperature, plus the CLI's decoding options (extensions)."""
    extra = {"max_new_tokens": max_new_tokens, "top_p": top_p, "top_k": top_k,
             "repetition_penalty": repetition_penalty, "num_beams": num_beams, "sampling": sampling}
    return _asr_decode(temperature, extra)


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(...),
                         language: Optional[str] = Form(None), prompt: Optional[str] = Form(None),
                         response_format: str = Form("json"), task: str = Form("transcribe"),
                         decode=Depends(decoding_form)):
    """OpenAI's fields, plus ``task`` (transcribe, caption, speaker, scene) and decoding extensions.
    ``prompt`` is the instruction sent with the audio (the model follows instructions; it has no
    Whisper-style context prompt)."""
    options = _asr_options(language, prompt, task)
    return await _transcribe(request, file, model, options, decode, response_format, "transcribe")


@router.post("/v1/audio/translations")
async def translations(request: Request, file: UploadFile = File(...), model: str = Form(...),
                       prompt: Optional[str] = Form(None), response_format: str = Form("json"),
                       decode=Depends(decoding_form)):
    """Speech in any language -> English text, through the model's instruction following."""
    from dataclasses import replace

    options = replace(_asr_options("en", prompt or TRANSLATE_EN, "transcribe"), language="en")
    response = await _transcribe(request, file, model, options, decode, response_format, "translate")
    if isinstance(response, dict) and "language" in response:
        response["language"] = "english"
    return response
