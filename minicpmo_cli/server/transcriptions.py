"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart)."""

from __future__ import annotations

import asyncio
import json
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse

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
                      task_name: str, stream: bool = False):
    from minicpmo_cli.api.asr import transcribe

    state = request.app.state.minicpmo
    state.check_model(model, "transcription")
    limits.check_answer_tokens(decode.max_new_tokens, "max_new_tokens", state.engine)
    if response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", param="response_format")
    if stream and response_format not in ("json", "text"):
        raise APIError(400, "stream=true sends text events: use response_format json or text", param="stream")
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
    if stream:
        def events(engine, cancel):  # a generator function: the worker hands on what it yields
            yield from transcription_events(engine, data, options, decode, name, cancel)

        return StreamingResponse(_sse(state.worker.stream(events)), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    def job(engine, cancel):
        return transcribe(engine, data, options, decode, path=name, cancel=cancel)

    record = await state.worker.run(job, disconnected=request.is_disconnected)
    return _record_response(record, response_format, task_name)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def transcription_events(engine, data: bytes, options, decode, name: str, cancel=None):
    """OpenAI's streamed transcription events: ``transcript.text.delta`` as each piece is done (in order), then
    ``transcript.text.done`` with the whole text (the deltas joined). Runs on the server's worker thread; the
    transcription itself runs on a thread of its own so that pieces can be handed on while it goes."""
    import queue
    import threading

    from minicpmo_cli.api.asr import AudioInput, input_name, transcribe_many
    from minicpmo_cli.errors import InputError
    from minicpmo_cli.processing.segments import join_texts

    pieces: queue.Queue = queue.Queue()
    done = object()

    def run() -> None:
        try:
            records = transcribe_many(engine, [AudioInput(name, data)], options, decode,
                                      on_piece=lambda path, text: pieces.put(text), cancel=cancel)
            pieces.put(next(records))
        except BaseException as exc:  # noqa: BLE001 - raised on the worker thread below
            pieces.put(exc)
        pieces.put(done)

    threading.Thread(target=run, name="minicpmo-asr-stream", daemon=True).start()
    said: list[str] = []
    while (item := pieces.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, str):
            before = join_texts(said)
            said.append(item)
            delta = join_texts(said)[len(before):]
            if delta:
                yield {"type": "transcript.text.delta", "delta": delta}
        elif item.error is not None:
            raise InputError(item.error, input_name(item.path))
        else:
            yield {"type": "transcript.text.done", "text": item.text}


async def _sse(events):
    """The events as server-sent events; a failure after the response began is an ``error`` event (the
    official client raises it as an APIError), not a cut connection."""
    from minicpmo_cli.errors import MiniCPMOError
    from minicpmo_cli.server.errors import error_body, from_library

    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except (APIError, MiniCPMOError) as exc:
        error = exc if isinstance(exc, APIError) else from_library(exc)
        yield f"data: {json.dumps(error_body(error.status, error.message, error.param, error.code))}\n\n"


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


def chunking_form(strategy: Optional[str] = Form(None, alias="chunking_strategy"),
                  kind: Optional[str] = Form(None, alias="chunking_strategy[type]"),
                  threshold: Optional[float] = Form(None, alias="chunking_strategy[threshold]"),
                  prefix_padding_ms: Optional[int] = Form(None, alias="chunking_strategy[prefix_padding_ms]"),
                  silence_duration_ms: Optional[int] = Form(None, alias="chunking_strategy[silence_duration_ms]")):
    """OpenAI's ``chunking_strategy``: "auto" (our VAD defaults) or a server_vad object, sent by the official
    client as ``chunking_strategy[type]`` etc. (also accepted as one JSON string). The VAD options it maps to:
    threshold -> the speech probability threshold, silence_duration_ms -> the pause that ends a region,
    prefix_padding_ms -> the audio kept around the speech of a piece."""
    if strategy is not None and strategy.strip().startswith("{"):
        try:
            given = json.loads(strategy)
        except ValueError:
            raise APIError(400, "chunking_strategy is not valid JSON", param="chunking_strategy") from None
        if not isinstance(given, dict):
            raise APIError(400, "chunking_strategy must be \"auto\" or an object", param="chunking_strategy")
        kind, strategy = given.get("type"), None
        threshold = given.get("threshold", threshold)
        prefix_padding_ms = given.get("prefix_padding_ms", prefix_padding_ms)
        silence_duration_ms = given.get("silence_duration_ms", silence_duration_ms)
    if strategy not in (None, "auto"):
        raise APIError(400, f"chunking_strategy {strategy!r}: use \"auto\" or {{\"type\": \"server_vad\", ...}}",
                       param="chunking_strategy")
    if kind is None:
        return {}
    if kind != "server_vad":
        raise APIError(400, f"chunking_strategy type {kind!r}: only server_vad is supported",
                       param="chunking_strategy")
    vad: dict = {}
    for value, field_name, option in ((threshold, "threshold", "vad_threshold"),
                                      (silence_duration_ms, "silence_duration_ms", "min_silence_ms"),
                                      (prefix_padding_ms, "prefix_padding_ms", "piece_pad_ms")):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"chunking_strategy.{field_name} must be a number", param="chunking_strategy")
        vad[option] = value if option == "vad_threshold" else int(value)
    return vad


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(...),
                         language: Optional[str] = Form(None), prompt: Optional[str] = Form(None),
                         response_format: str = Form("json"), task: str = Form("transcribe"),
                         stream: bool = Form(False),
                         granularities: Optional[list[str]] = Form(None, alias="timestamp_granularities[]"),
                         chunking=Depends(chunking_form), decode=Depends(decoding_form)):
    """OpenAI's fields, plus ``task`` (transcribe, caption, speaker, scene) and decoding extensions.
    ``prompt`` is the instruction sent with the audio (the model follows instructions; it has no
    Whisper-style context prompt). ``stream``: transcript.text.delta events as pieces are done.
    ``timestamp_granularities[]``: segment (verbose_json has segments); the model gives no word times."""
    from dataclasses import replace

    from minicpmo_cli.errors import UsageError

    for granularity in granularities or []:
        if granularity != "segment":
            raise APIError(400, f"timestamp_granularities {granularity!r}: only segment is supported (the model "
                                "gives no word times)", param="timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format verbose_json",
                       param="timestamp_granularities")
    options = replace(_asr_options(language, prompt, task), **chunking)
    try:
        options.validate()
    except UsageError as exc:
        raise APIError(400, f"chunking_strategy: {exc}", param="chunking_strategy") from None
    return await _transcribe(request, file, model, options, decode, response_format, "transcribe", stream)


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
