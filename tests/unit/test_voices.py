"""Voice profiles: where they live, save/list/remove, names, and resolve_voice's name-or-file lookup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minicpmo_cli.api import voices
from minicpmo_cli.errors import InputError, OutputError, UsageError


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MINICPMO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def clip(tmp_path) -> Path:
    import soundfile

    path = tmp_path / "clip.wav"
    soundfile.write(str(path), tone(1.5, 22050), 22050)  # another rate: saving resamples to 16 kHz
    return path


def test_voices_dir_follows_minicpmo_home_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPMO_HOME", str(tmp_path / "mh"))
    assert voices.voices_dir() == tmp_path / "mh" / "voices"
    monkeypatch.delenv("MINICPMO_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert voices.voices_dir() == tmp_path / "xdg" / "minicpmo" / "voices"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert voices.voices_dir() == tmp_path / "user" / ".local" / "share" / "minicpmo" / "voices"


def test_save_list_resolve_remove(home, clip):
    import soundfile

    assert voices.list_voices() == []
    profile = voices.save_voice("alice", clip)
    assert profile.path == home / "voices" / "alice.wav"
    info = soundfile.info(str(profile.path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert profile.duration == pytest.approx(1.5, abs=0.01)
    meta = json.loads((home / "voices" / "alice.json").read_text())
    assert meta["name"] == "alice" and meta["source"] == str(clip.resolve()) and meta["created"]

    listed = voices.list_voices()
    assert [p.name for p in listed] == ["alice"]
    assert listed[0].duration == pytest.approx(1.5, abs=0.01)

    samples = voices.resolve_voice("alice")
    assert samples.dtype == np.float32 and len(samples) == pytest.approx(24000, abs=2)
    np.testing.assert_allclose(samples, voices.resolve_voice(clip), atol=2e-4)  # PCM16 rounding only

    assert voices.remove_voice("alice") == profile.path
    assert not profile.path.exists() and not (home / "voices" / "alice.json").exists()
    assert voices.list_voices() == []
    with pytest.raises(InputError, match="alice"):
        voices.remove_voice("alice")


def test_saving_over_an_existing_voice_needs_overwrite(home, clip):
    voices.save_voice("bob", clip)
    with pytest.raises(OutputError, match="already exists"):
        voices.save_voice("bob", tone(2.0))
    profile = voices.save_voice("bob", tone(2.0), overwrite=True)
    assert profile.duration == pytest.approx(2.0) and profile.source is None


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-dash", "x" * 65, "sp ace"])
def test_unusable_names_are_refused(home, clip, name):
    with pytest.raises(UsageError):
        voices.save_voice(name, clip)


def test_resolve_voice_errors_name_the_voice(home, tmp_path):
    with pytest.raises(InputError, match="^nobody: no voice profile"):
        voices.resolve_voice("nobody")
    with pytest.raises(InputError, match="missing.wav"):
        voices.resolve_voice(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(InputError, match="corrupt.wav"):
        voices.resolve_voice(corrupt)
    with pytest.raises(InputError, match="silent"):
        voices.resolve_voice(np.zeros(16000, dtype=np.float32))


def test_a_hand_copied_wav_without_json_is_listed(home):
    import soundfile

    (home / "voices").mkdir(parents=True)
    soundfile.write(str(home / "voices" / "carol.wav"), tone(0.5), 16000, subtype="PCM_16")
    (home / "voices" / "not a voice.wav").write_bytes(b"")  # a name --voice could not use: not listed
    [profile] = voices.list_voices()
    assert profile.name == "carol" and profile.duration == pytest.approx(0.5) and profile.created
