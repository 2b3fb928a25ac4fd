"""The CLI frame: help, version, doctor, global options anywhere, exit codes, no heavy imports.

In-process through the shared ``cli`` fixture, except where a fresh interpreter is the point (no torch on
--help, the hub cache's location read at import, the real `python -m minicpmo_cli`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minicpmo_cli import __version__
from minicpmo_cli.cli.common import hoist_global_options
from tests.conftest import run_cli_process as run_cli


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys\n"
        "from minicpmo_cli.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Examples:" in out.stdout
    assert out.stdout.strip().endswith("HEAVY=")


def test_version_and_short_help():
    result = run_cli("--version")  # the real `python -m minicpmo_cli`
    assert result.code == 0
    assert result.stdout.strip() == f"minicpmo {__version__}"
    short = run_cli("-h")
    assert short.code == 0 and "Usage: minicpmo" in short.stdout


def test_every_command_help_opens_with_examples(cli):
    listing = cli("--help").stdout
    commands = [line.split()[0] for line in listing.split("Commands:")[1].splitlines() if line.strip()]
    assert "doctor" in commands
    for command in commands:
        code, text, _ = cli(command, "--help")
        assert code == 0, command
        assert "Examples:" in text and "$ minicpmo" in text, command


def test_doctor_runs_without_gpu_and_reports_missing_model(cli, tmp_path):
    code, text, _ = cli("--model", str(tmp_path), "doctor")
    assert code == 0
    for key in ("Python", "torch", "transformers", "CUDA", "av", "model", "free disk"):
        assert key in text
    assert "has no config.json" in text and "To fix:" in text


def test_doctor_finds_a_cached_hub_model(tmp_path):
    repo = tmp_path / "hub" / "models--openbmb--MiniCPM-o-2_6"
    snapshot = repo / "snapshots" / "abc123def4567890"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "minicpmo"}))
    (snapshot / "model-00001-of-00001.safetensors").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123def4567890")
    result = run_cli("doctor", env={"HF_HUB_CACHE": str(tmp_path / "hub")})  # read when the hub is imported
    assert result.code == 0
    assert "in the cache at revision abc123def456 (complete)" in result.stdout


def test_usage_error_exits_2(cli):
    code, _, err = cli("no-such-command")
    assert code == 2
    assert "Traceback" not in err and err.startswith("minicpmo: error:")


def test_global_options_are_accepted_after_the_command(cli, tmp_path):
    code, out, _ = cli("doctor", "--model", str(tmp_path), "-q")
    assert code == 0
    assert str(tmp_path) in out


@pytest.mark.parametrize("argv, expected", [
    (["asr", "x.wav", "--device", "cpu"], ["--device", "cpu", "asr", "x.wav"]),
    (["--model=m", "chat", "-q", "hi"], ["--model=m", "-q", "chat", "hi"]),
    (["chat", "--", "--device"], ["chat", "--", "--device"]),
])
def test_hoist_global_options(argv, expected):
    assert hoist_global_options(argv) == expected


def test_env_var_sets_model(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPMO_MODEL", str(tmp_path))
    code, out, _ = cli("doctor")
    assert code == 0
    assert str(tmp_path) in out


def test_global_options_live_in_the_command_context_only(cli, fake_engine, tiny_ckpt, monkeypatch):
    """Each run's global options (flags and MINICPMO_* variables) reach the engine it loads, and nothing of
    one run is left for the next or for library code running outside a command."""
    from minicpmo_cli.cli import common

    monkeypatch.setenv("MINICPMO_SEED", "11")
    code, _, err = cli("--model", tiny_ckpt, "chat", "Hi.", "--quantize", "int8", "--no-compile", "-q")
    assert code == 0, err
    load = fake_engine.loads[-1].options
    assert (load.quantize, load.compile, load.device, load.dtype) == ("int8", False, "auto", "auto")
    assert fake_engine.last.seed == 11  # the seed is the call's, not the loaded engine's
    assert err == ""  # -q: not even the CPU warning
    monkeypatch.delenv("MINICPMO_SEED")
    code, _, err = cli("--model", tiny_ckpt, "--device", "cpu", "--dtype", "float32", "chat", "Hi.")
    assert code == 0, err
    load = fake_engine.loads[-1].options
    assert (load.quantize, load.compile, load.device, load.dtype) == (None, None, "cpu", "float32")
    assert fake_engine.last.seed is None
    assert common.options() == common.GlobalOptions()  # outside a command: the defaults


def test_offline_without_a_cached_model_names_it(tmp_path):
    speech = str(Path(__file__).resolve().parents[2] / "examples" / "speech_en.wav")
    result = run_cli("--offline", "--device", "cpu", "asr", speech,
                     env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")})
    assert result.code == 4  # the environment (no network / offline), as documented
    err = result.stderr
    assert "openbmb/MiniCPM-o-2_6" in err and "downloading is off" in err and "Traceback" not in err


def test_device_cuda_without_a_gpu_is_an_environment_error(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = cli("--device", "cuda", "--model", str(tmp_path), "chat", "hi")
    assert code == 4
    assert "no CUDA GPU" in err


def test_quiet_silences_library_warnings(cli, capsys):
    import logging

    cli("-q", "doctor")
    logging.getLogger("minicpmo_cli.processing.prompts").warning("should not be shown")
    assert "should not be shown" not in capsys.readouterr().err
    cli("doctor")
    logging.getLogger("minicpmo_cli.processing.prompts").warning("shown once")
    assert capsys.readouterr().err.count("warning: shown once") == 1


def test_no_arguments_prints_the_help(cli):
    code, out, _ = cli()
    assert code == 2 and "Usage: minicpmo" in out and "Commands:" in out
