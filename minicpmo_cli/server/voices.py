"""Voices by name: saved voice profiles (`minicpmo voices`), and OpenAI's voice names for the built-in voice.

Stock clients send ``voice="alloy"`` and the like; the model has one built-in voice (its default speaker
state), so every OpenAI name maps onto it. A saved profile of the same name wins.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from minicpmo_cli.errors import MiniCPMOError
from minicpmo_cli.server.errors import APIError

OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
DEFAULT_VOICE = "alloy"

router = APIRouter()


def resolve_voice(name: str):
    """16 kHz reference samples of a saved profile, or None for the built-in voice; 400 when unknown."""
    from minicpmo_cli.api import voices

    if voices.voice_exists(name):
        try:
            return voices.resolve_voice(name)
        except MiniCPMOError as exc:
            raise APIError(400, f"voice {name!r}: {exc}", param="voice") from None
    if name.lower() in OPENAI_VOICES or name == "default":
        return None
    known = ", ".join(p.name for p in voices.list_voices()) or "none saved"
    raise APIError(400, f"unknown voice {name!r}: use a saved voice ({known}) or one of OpenAI's names "
                        f"({', '.join(OPENAI_VOICES)}), which are the model's built-in voice", param="voice",
                   code="unknown_voice")


@router.get("/v1/audio/voices")
async def list_audio_voices(request: Request):
    from minicpmo_cli.api import voices

    saved = [{"id": p.name, "name": p.name, "type": "profile", "duration": p.duration, "created": p.created}
             for p in voices.list_voices()]
    builtin = [{"id": name, "name": name, "type": "builtin"} for name in OPENAI_VOICES]
    return {"object": "list", "data": saved + builtin}
