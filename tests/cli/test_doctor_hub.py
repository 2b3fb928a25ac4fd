"""doctor reads versions without importing torch; hub and --model errors give the right advice and exit code."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.cli.ttyrun import noise_wav

# Runs the CLI in a fresh interpreter and reports which heavy modules it imported (stdout's last line).
PROBE = (
    "import sys\n"
    "from minicpmo_cli.cli.app import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
    "print(f'EXIT={code} HEAVY=' + ','.join(heavy))\n"
)


def probe(*args, cwd=None, env=None):
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                            timeout=300, cwd=cwd, env=full_env)
    *out, last = result.stdout.strip().splitlines() or [""]
    return last, "\n".join(out), result.stderr


def test_doctor_does_not_import_torch_or_transformers(tmp_path):
    last, out, _ = probe("doctor", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert last == "EXIT=0 HEAVY=", last
    import torch
    import transformers

    assert f"torch         {torch.__version__}" in out or torch.__version__ in out
    assert transformers.__version__ in out
    assert "CUDA" in out


def test_doctor_recommends_hf_not_huggingface_cli(tmp_path):
    _, out, _ = probe("doctor", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert "huggingface-cli" not in out
    assert "hf download openbmb/MiniCPM-o-2_6" in out
    assert "minicpmo models pull openbmb/MiniCPM-o-2_6" in out


def test_a_missing_local_model_path_is_not_a_hub_id(tmp_path):
    (tmp_path / "models").mkdir()
    _, out, _ = probe("--model", "models/tiny", "doctor", cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "h")})
    assert "models/tiny: no such checkpoint folder" in out and "Hugging Face cache" not in out.split("model ")[-1]


def test_a_bad_model_path_fails_before_the_heavy_imports(tmp_path):
    clip = noise_wav(tmp_path / "a.wav", 0.5)
    (tmp_path / "models").mkdir()
    for model in ("models/tiny", "./nowhere", str(tmp_path / "missing")):
        last, _, err = probe("--model", model, "asr", clip, cwd=tmp_path)
        assert last == "EXIT=1 HEAVY=", (model, last, err)
        assert err.count("\n") == 1 and "no such checkpoint folder" in err and model in err


def test_no_network_is_exit_4_with_the_way_around_it(tmp_path):
    clip = noise_wav(tmp_path / "a.wav", 0.5)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    env.pop("HF_HUB_OFFLINE", None)
    last, _, err = probe("asr", clip, "--no-vad", env=env)
    assert last.startswith("EXIT=4"), (last, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("downloading openbmb/MiniCPM-o-2_6 (about 16 GB) into " + str(tmp_path / "hub"))
    assert len(lines) == 2 and "--model DIR" in lines[1] and "--offline" in lines[1]
    last, _, err = probe("-q", "asr", clip, "--no-vad", env=env)
    assert last.startswith("EXIT=4") and len(err.strip().splitlines()) == 1  # -q: only the error
