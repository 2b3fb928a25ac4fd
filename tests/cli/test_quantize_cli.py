"""`--quantize none|int8|int4` and the official GPTQ int4 layout through the commands that load the LLM
(chat, asr, tts), on the tiny checkpoints: the CLI gives the library's answer for the same quantized model,
-v says what was loaded, and bad values or checkpoints end in one line with the documented exit code."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minicpmo_cli.cli.app import main

GREEDY = ["--no-sampling", "--num-beams", "1", "--repetition-penalty", "1.0", "--max-new-tokens", "5"]
QUESTION = "What is the capital of France?"


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MINICPMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # chat reads a piped stdin: give it an empty one

    def run(*args):
        code = 0
        try:
            main(["--device", "cpu", *map(str, args)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def engine_for(folder, quantize, **towers):
    from minicpmo_cli.api.engine import LoadOptions, load

    return load(LoadOptions(model=str(folder), device="cpu", quantize=quantize), **towers)


def library_answer(engine):
    from minicpmo_cli.api.engine import DecodeOptions

    options = DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=5)
    return engine.generate([{"role": "user", "content": [QUESTION]}], options)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import soundfile

    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)
    path = tmp_path_factory.mktemp("clip") / "tone.wav"
    soundfile.write(path, wave.astype(np.float32), 16000)
    return path


CASES = [("tiny_ckpt", "int8", "int8 (--quantize)"), ("tiny_ckpt", "int4", "int4 (--quantize)"),
         ("tiny_gptq_ckpt", None, "int4 (GPTQ checkpoint)")]


@pytest.mark.parametrize("ckpt,mode,said", CASES)
def test_chat_answers_as_the_library_with_the_same_quantized_model(request, cli, ckpt, mode, said):
    folder = request.getfixturevalue(ckpt)
    flags = [] if mode is None else ["--quantize", mode]
    code, out, err = cli("--model", folder, "-v", *flags, "chat", QUESTION, *GREEDY)
    assert code == 0, err
    assert f"quantization {said} on 14 LLM linears" in err
    engine = engine_for(folder, mode, vision=False, audio=False)
    assert out == library_answer(engine) + "\n"


@pytest.mark.parametrize("ckpt,mode,said", CASES)
def test_asr_transcribes_as_the_library(request, cli, clip, tmp_path, ckpt, mode, said):
    from minicpmo_cli.api.asr import transcribe
    from minicpmo_cli.api.engine import DecodeOptions

    folder = request.getfixturevalue(ckpt)
    flags = [] if mode is None else ["--quantize", mode]
    code, out, err = cli("--model", folder, "-v", *flags, "asr", clip, "-o", tmp_path, "-f", "json",
                         "--max-new-tokens", "4")
    assert code == 0, err
    assert f"quantization {said}" in err
    record = json.loads((tmp_path / "tone.json").read_text())
    engine = engine_for(folder, mode, vision=False, audio=True)
    assert record["text"] == transcribe(engine, str(clip), decode=DecodeOptions(max_new_tokens=4)).text


@pytest.mark.parametrize("ckpt,mode,said", CASES)
def test_tts_writes_speech(request, cli, tmp_path, ckpt, mode, said):
    import soundfile

    folder = request.getfixturevalue(ckpt)
    flags = [] if mode is None else ["--quantize", mode]
    target = tmp_path / "out.wav"
    code, _, err = cli("--model", folder, "-v", *flags, "tts", "Hello world.", "-o", target,
                       "--max-audio-seconds", "0.2", "--seed", "3")
    assert code == 0, err
    assert f"quantization {said}" in err
    info = soundfile.info(str(target))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16") and 0 < info.frames <= 5120


def test_environment_variable_and_bad_values(tiny_ckpt, tiny_gptq_ckpt):
    env = {**os.environ, "NO_COLOR": "1", "MINICPMO_QUANTIZE": "int8"}
    command = [sys.executable, "-m", "minicpmo_cli", "--model", str(tiny_ckpt), "--device", "cpu", "-v",
               "chat", QUESTION, *GREEDY]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "quantization int8 (--quantize)" in result.stderr

    bad = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**env, "MINICPMO_QUANTIZE": "int3"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "--quantize must be none, int8 or int4" in bad.stderr


def test_gptq_checkpoint_with_another_mode_is_a_usage_error(cli, tiny_gptq_ckpt):
    code, out, err = cli("--model", tiny_gptq_ckpt, "--quantize", "int8", "chat", QUESTION, *GREEDY)
    assert code == 2 and out == ""
    assert "is a GPTQ int4 checkpoint" in err and len(err.strip().splitlines()) == 1


def test_malformed_gptq_checkpoint_names_the_tensor(tiny_gptq_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_gptq_ckpt, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["llm.model.layers.1.mlp.down_proj.qzeros"]
    save_file(state, str(folder / "model.safetensors"))
    result = subprocess.run([sys.executable, "-m", "minicpmo_cli", "--model", str(folder), "--device", "cpu",
                             "chat", QUESTION, *GREEDY], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "llm.model.layers.1.mlp.down_proj.qzeros" in lines[0] and "missing" in lines[0]


@pytest.mark.parametrize("ckpt,flags,said", [
    ("tiny_gptq_ckpt", [], "int4 (GPTQ checkpoint), kernel int4pack-cpu: torch's CPU int4 kernel, bfloat16 inputs; weights about"),
    ("tiny_ckpt", ["--quantize", "int8"], "int8 (--quantize), kernel int8pack-cpu"),
    ("tiny_ckpt", [], "none (full precision); weights about 0.01 GiB in float32"),
])
def test_doctor_says_the_quantization_kernel_and_memory(request, cli, ckpt, flags, said):
    code, out, _ = cli("-v", "--model", request.getfixturevalue(ckpt), *flags, "doctor")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("quantization"))
    assert said in row
