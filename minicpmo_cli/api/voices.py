"""Voice profiles: reference clips saved under a name, for `--voice NAME` in tts, clone, chat --speak and omni.

A profile is two files in the voices folder: ``NAME.wav`` (the reference clip as the model hears it: 16 kHz
mono PCM16, so later loads need no decoding or resampling) and ``NAME.json`` (name, duration, creation time,
where the clip came from). The folder is ``$MINICPMO_HOME/voices`` when ``MINICPMO_HOME`` is set, else the
user's data folder (``$XDG_DATA_HOME/minicpmo/voices``, ``~/.local/share/minicpmo/voices``; on Windows
``%LOCALAPPDATA%\\minicpmo\\voices``): the places platformdirs would choose, without depending on it.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Union

import numpy as np

from minicpmo_cli.errors import InputError, OutputError, UsageError
from minicpmo_cli.units import INPUT_SAMPLE_RATE

# Letters, digits, '-', '_' and '.', not starting with '.' or '-': safe as a file name on every system.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
# The maintainers recommend 5-15 s reference clips (spec audio-tts §6): shorter ones give the model little of
# the voice to copy; much longer ones only cost time (and room in the prompt).
RECOMMENDED_SECONDS = (5.0, 15.0)

VoiceSource = Union[str, os.PathLike, np.ndarray]


@dataclass
class VoiceProfile:
    name: str
    path: Path  # the wav file
    duration: float  # seconds
    created: str  # ISO 8601, UTC
    source: str | None = None  # the file the clip was saved from

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def voices_dir() -> Path:
    """The folder voice profiles live in (not created here)."""
    home = os.environ.get("MINICPMO_HOME")
    if home:
        return Path(home).expanduser() / "voices"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "minicpmo" / "voices"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "minicpmo" / "voices"


def check_voice_name(name: str) -> str:
    if not _NAME_PATTERN.match(name or ""):
        raise UsageError(f"voice name {name!r} is not usable: use letters, digits, '-', '_' or '.' "
                         "(up to 64 characters, not starting with '.' or '-')")
    return name


def _wav_path(name: str) -> Path:
    return voices_dir() / f"{name}.wav"


def _meta_path(name: str) -> Path:
    return voices_dir() / f"{name}.json"


def voice_exists(name: str) -> bool:
    return bool(_NAME_PATTERN.match(name or "")) and _wav_path(name).is_file()


def save_voice(name: str, source: VoiceSource, *, overwrite: bool = False) -> VoiceProfile:
    """Store a reference clip (a file of any audio format, or 16 kHz mono samples) as profile ``name``."""
    from minicpmo_cli.media.audio import load_audio
    from minicpmo_cli.outputs import ensure_output_dir, write_text_atomic, write_wav

    check_voice_name(name)
    if voice_exists(name) and not overwrite:
        raise OutputError(f"a voice named {name!r} already exists (remove it first: minicpmo voices remove {name})",
                          _wav_path(name))
    samples = np.asarray(source, dtype=np.float32) if isinstance(source, np.ndarray) else load_audio(source)
    check_reference(samples, str(source) if not isinstance(source, np.ndarray) else name)
    ensure_output_dir(voices_dir())
    wav = write_wav(_wav_path(name), samples, INPUT_SAMPLE_RATE)
    profile = VoiceProfile(
        name=name, path=wav, duration=round(len(samples) / INPUT_SAMPLE_RATE, 3),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=None if isinstance(source, np.ndarray) else str(Path(source).resolve()),
    )
    write_text_atomic(_meta_path(name), json.dumps(profile.to_json(), ensure_ascii=False, indent=2) + "\n")
    return profile


def length_advice(duration: float) -> str | None:
    """A one-line warning for a reference clip outside the recommended length, None for a good one."""
    low, high = RECOMMENDED_SECONDS
    if duration < low:
        return f"the clip is {duration:.1f} s: {low:g}-{high:g} s of clean speech works best, a shorter one " \
               "gives the model little of the voice to copy"
    if duration > high:
        return f"the clip is {duration:.1f} s: {low:g}-{high:g} s of clean speech works best, a longer one " \
               "only makes each answer slower"
    return None


def check_reference(samples: np.ndarray, name: str) -> None:
    """A reference clip must hold some sound: an empty or silent clip gives the model no voice to copy."""
    if samples.size == 0:
        raise InputError("the reference clip has no samples", name)
    if float(np.max(np.abs(samples))) < 1e-4:
        raise InputError("the reference clip is silent", name)


def get_voice(name: str) -> VoiceProfile:
    check_voice_name(name)
    wav = _wav_path(name)
    if not wav.is_file():
        raise InputError(f"no voice profile named {name!r} (see: minicpmo voices)", name)
    return _profile(name, wav)


def _profile(name: str, wav: Path) -> VoiceProfile:
    meta: dict = {}
    try:
        meta = json.loads(_meta_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # a wav without its json (copied in by hand) is still a usable profile
    duration = meta.get("duration")
    if duration is None:
        duration = _wav_duration(wav)
    created = meta.get("created") or datetime.fromtimestamp(wav.stat().st_mtime, timezone.utc).isoformat(
        timespec="seconds")
    return VoiceProfile(name=name, path=wav, duration=float(duration), created=created, source=meta.get("source"))


def _wav_duration(wav: Path) -> float:
    import soundfile

    try:
        info = soundfile.info(str(wav))
    except Exception:  # noqa: BLE001 - a broken file shows as 0 s in the list; loading it names the problem
        return 0.0
    return round(info.frames / float(info.samplerate), 3)


def list_voices() -> list[VoiceProfile]:
    """Every saved profile, sorted by name."""
    folder = voices_dir()
    if not folder.is_dir():
        return []
    return [_profile(wav.stem, wav) for wav in sorted(folder.glob("*.wav")) if _NAME_PATTERN.match(wav.stem)]


def remove_voice(name: str) -> Path:
    """Delete profile ``name``; returns the removed wav's path."""
    profile = get_voice(name)
    for path in (profile.path, _meta_path(name)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"cannot remove ({exc.strerror or exc})", path) from None
    return profile.path


def resolve_voice(name_or_path: VoiceSource) -> np.ndarray:
    """A voice given as a profile name, an audio file, or samples -> 16 kHz mono float32 reference samples.

    A saved profile wins over a file of the same name in the current folder: ``--voice`` is for names.
    Raises InputError naming the voice when it is neither, or when the file is missing or corrupt.
    """
    from minicpmo_cli.media.audio import load_audio

    if isinstance(name_or_path, np.ndarray):
        samples = np.asarray(name_or_path, dtype=np.float32)
        check_reference(samples, "<reference samples>")
        return samples
    text = os.fspath(name_or_path)
    if voice_exists(text):
        samples = load_audio(_wav_path(text))
        check_reference(samples, text)
        return samples
    path = Path(text).expanduser()
    if not os.path.lexists(path) and _NAME_PATTERN.match(text) and not path.suffix:  # lexists: never raises
        raise InputError("no voice profile or audio file by this name (saved voices: minicpmo voices)", text)
    samples = load_audio(path)
    check_reference(samples, text)
    return samples
