"""What a worker process (api/parallel.py) or a Ray actor (api/ray_asr.py) runs: picklable job descriptions.

A job is sent to each worker once. ``start(device, warn)`` loads the engine there (lazily, once: a worker
that only meets unreadable files loads nothing, as one process does) and returns the function the worker
calls on each chunk of payloads; ``failure(payload, reason)`` is the result of a payload no worker could do.
The functions are the single-process ones (``transcribe_many``, ``speak``), so results are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from minicpmo_cli.api.asr import AsrOptions, AudioInput
from minicpmo_cli.api.engine import DecodeOptions, Engine, LoadOptions

Warn = Callable[[str], None]


def _engine_once(options: LoadOptions, warn: Warn, **towers: bool) -> Callable[[], Engine]:
    loaded: list[Engine] = []

    def engine() -> Engine:
        if not loaded:
            from minicpmo_cli.api.engine import load

            loaded.append(load(options, warn=warn, **towers))
        return loaded[0]

    return engine


@dataclass(frozen=True)
class AsrJob:
    """``asr``: payloads are AudioInputs, results TranscriptRecords (errors in the record, as in one process)."""

    load: LoadOptions
    options: AsrOptions
    decode: DecodeOptions

    def start(self, device: str, warn: Warn) -> Callable[[list[AudioInput]], Iterator[Any]]:
        from minicpmo_cli.api.asr import transcribe_many

        engine = _engine_once(replace(self.load, device=device), warn, vision=False, audio=True, tts=False)
        return lambda inputs: transcribe_many(engine, inputs, self.options, self.decode, warn=warn)

    def failure(self, payload: AudioInput, reason: str):
        from minicpmo_cli.outputs import TranscriptRecord

        return TranscriptRecord(path=payload.path, error=reason)


@dataclass(frozen=True)
class TtsJob:
    """``tts --lines``: payloads are lines of text, results SpeechResults (a failed line: its reason, a str)."""

    load: LoadOptions
    voice: Any  # api.speech.Voice, its reference clip already loaded
    decode: DecodeOptions
    verbatim: bool
    max_frames: int

    def start(self, device: str, warn: Warn) -> Callable[[list[str]], Iterator[Any]]:
        from minicpmo_cli.api.speech import speak

        engine = _engine_once(replace(self.load, device=device), warn, vision=False,
                              audio=self.voice.reference is not None, tts=True)

        def run(lines: list[str]) -> Iterator[Any]:
            for line in lines:
                yield speak(engine(), line, self.voice, decode=self.decode, verbatim=self.verbatim,
                            max_frames=self.max_frames)

        return run

    def failure(self, payload: str, reason: str) -> str:
        return reason
