"""The CLI frame: help, version, doctor, global options anywhere, exit codes, no heavy imports."""

from __future__ import annotations

import json
from pathlib import Path
import os
import subprocess
import sys

import pytest

from minicpmo_cli import __version__
from minicpmo_cli.cli.app import main
from minicpmo_cli.cli.common import hoist_global_options


def run_cli(*args: str, env: dict | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minicpmo_cli", *args], capture_output=True,
                          env=full_env, input=stdin, timeout=300)


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
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"minicpmo {__version__}"
    short = run_cli("-h")
    assert short.returncode == 0 and b"Usage: minicpmo" in short.stdout


def test_every_command_help_opens_with_examples():
    listing = run_cli("--help").stdout.decode()
    commands = [line.split()[0] for line in listing.split("Commands:")[1].splitlines() if line.strip()]
    assert "doctor" in commands
    for command in commands:
        result = run_cli(command, "--help")
        assert result.returncode == 0, command
        text = result.stdout.decode()
        assert "Examples:" in text and "$ minicpmo" in text, command


def test_doctor_runs_without_gpu_and_reports_missing_model(tmp_path):
    result = run_cli("--model", str(tmp_path), "doctor", env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0
    text = result.stdout.decode()
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
    result = run_cli("doctor", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0
    assert "in the cache at revision abc123def456 (complete)" in result.stdout.decode()


def test_usage_error_exits_2():
    result = run_cli("no-such-command")
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr


def test_global_options_are_accepted_after_the_command(tmp_path):
    result = run_cli("doctor", "--model", str(tmp_path), "-q")
    assert result.returncode == 0
    assert str(tmp_path) in result.stdout.decode()


@pytest.mark.parametrize("argv, expected", [
    (["asr", "x.wav", "--device", "cpu"], ["--device", "cpu", "asr", "x.wav"]),
    (["--model=m", "chat", "-q", "hi"], ["--model=m", "-q", "chat", "hi"]),
    (["chat", "--", "--device"], ["chat", "--", "--device"]),
])
def test_hoist_global_options(argv, expected):
    assert hoist_global_options(argv) == expected


def test_env_var_sets_model(tmp_path, capsys):
    os.environ["MINICPMO_MODEL"] = str(tmp_path)
    try:
        main(["doctor"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        del os.environ["MINICPMO_MODEL"]
    assert str(tmp_path) in capsys.readouterr().out


def test_offline_without_a_cached_model_names_it(tmp_path):
    speech = str(Path(__file__).resolve().parents[2] / "examples" / "speech_en.wav")
    result = run_cli("--offline", "--device", "cpu", "asr", speech,
                     env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 4  # the environment (no network / offline), as documented
    err = result.stderr.decode()
    assert "openbmb/MiniCPM-o-2_6" in err and "downloading is off" in err and "Traceback" not in err


def test_device_cuda_without_a_gpu_is_an_environment_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("--device", "cuda", "--model", str(tmp_path), "chat", "hi")
    assert result.returncode == 4
    assert "no CUDA GPU" in result.stderr.decode()


def test_quiet_silences_library_warnings(capsys):
    import logging

    try:
        main(["-q", "doctor"])
    except SystemExit:
        pass
    logging.getLogger("minicpmo_cli.processing.prompts").warning("should not be shown")
    assert "should not be shown" not in capsys.readouterr().err
    try:
        main(["doctor"])
    except SystemExit:
        pass
    logging.getLogger("minicpmo_cli.processing.prompts").warning("shown once")
    assert capsys.readouterr().err.count("warning: shown once") == 1


def test_no_arguments_prints_the_help():
    result = run_cli()
    assert result.returncode == 2 and b"Usage: minicpmo" in result.stdout and b"Commands:" in result.stdout
