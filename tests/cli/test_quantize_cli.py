"""`--quantize none|int8|int4` and the official GPTQ int4 layout through the commands that load the LLM
(chat, asr, tts), on the tiny checkpoints: the CLI gives the library's answer for the same quantized model,
-v says what was loaded, and bad values or checkpoints end in one line with the documented exit code."""

from __future__ import annotations

import json

import numpy as np
import pytest

GREEDY = ["--no-sampling", "--num-beams", "1", "--repetition-penalty", "1.0", "--max-new-tokens", "5"]
QUESTION = "What is the capital of France?"


@pytest.fixture
def cli(cli):
    """The in-process CLI on the CPU, on the real model (the quantized linears are the point)."""
    return cli.with_args("--device", "cpu")


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


def test_environment_variable_and_bad_values(cli, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("MINICPMO_QUANTIZE", "int8")
    code, _, err = cli("--model", tiny_ckpt, "-v", "chat", QUESTION, *GREEDY)
    assert code == 0, err
    assert "quantization int8 (--quantize)" in err

    monkeypatch.setenv("MINICPMO_QUANTIZE", "int3")
    code, out, err = cli("--model", tiny_ckpt, "-v", "chat", QUESTION, *GREEDY)
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "--quantize must be none, int8 or int4" in err


def test_gptq_checkpoint_with_another_mode_is_a_usage_error(cli, tiny_gptq_ckpt):
    code, out, err = cli("--model", tiny_gptq_ckpt, "--quantize", "int8", "chat", QUESTION, *GREEDY)
    assert code == 2 and out == ""
    assert "is a GPTQ int4 checkpoint" in err and len(err.strip().splitlines()) == 1


def test_malformed_gptq_checkpoint_names_the_tensor(cli, tiny_gptq_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_gptq_ckpt, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["llm.model.layers.1.mlp.down_proj.qzeros"]
    save_file(state, str(folder / "model.safetensors"))
    code, out, err = cli("--model", folder, "chat", QUESTION, *GREEDY)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
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
