"""Task presets and resolve(): one frozen settings object per call; contradictions refused, nothing dropped."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation.presets import PRESETS, DecodeOptions, TaskSettings, resolve


def test_every_task_preset_resolves_to_the_guides_numbers():
    expected = {  # task: (sampling, max_new_tokens, temperature, repetition_penalty, num_beams)
        "chat": (True, 1024, 0.7, 1.05, 1), "describe-video": (True, 1024, 0.7, 1.05, 1),
        "asr": (False, 512, 1.0, 1.0, 1), "speech": (True, 128, 0.3, 1.05, 1),
        "speaker-state": (False, 1, 1.0, 1.2, 1), "omni": (True, 4096, 0.5, 1.2, 1),
        "omni-stream": (True, 512, 0.7, 1.05, 1), "guide": (True, 2048, 0.7, 1.05, 1),
    }
    assert set(PRESETS) == set(expected)
    for task, (sampling, max_new, temperature, penalty, beams) in expected.items():
        decode = resolve(task).decode
        got = (decode.sampling, decode.max_new_tokens, decode.temperature if sampling else 1.0,
               decode.repetition_penalty, decode.num_beams)
        assert got == (sampling, max_new, temperature, penalty, beams), task
        if sampling:
            assert (decode.top_p, decode.top_k) == (0.8, 100), task  # the reference's sampling values


def test_resolved_settings_are_frozen_and_carry_the_seed():
    settings = resolve("chat", DecodeOptions(seed=7, max_new_tokens=9))
    assert isinstance(settings, TaskSettings) and settings.seed == 7 and settings.max_new_tokens == 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.decode.max_new_tokens = 3


def test_the_mode_follows_the_caller():
    # --no-sampling in chat: the reference's beam search (3 beams, penalty 1.2), user values on top
    beam = resolve("chat", DecodeOptions(sampling=False, repetition_penalty=1.1)).decode
    assert (beam.sampling, beam.num_beams, beam.repetition_penalty) == (False, 3, 1.1)
    # num_beams > 1 alone asks for beam search, in a task that samples by default
    assert resolve("chat", DecodeOptions(num_beams=4)).decode.num_beams == 4
    # asr: greedy by default; --sampling: the guide's temperature 0.3
    assert resolve("asr", DecodeOptions(sampling=True)).decode.temperature == 0.3
    assert resolve("asr", DecodeOptions(num_beams=3)).decode.num_beams == 3


@pytest.mark.parametrize(("task", "options", "named"), [
    ("chat", dict(sampling=True, num_beams=4), ("sampling", "num_beams")),
    ("chat", dict(sampling=False, top_p=0.5), ("sampling", "top_p")),
    ("chat", dict(num_beams=2, temperature=0.3), ("sampling", "temperature")),
    ("asr", dict(top_k=5), ("sampling", "top_k")),
    ("asr", dict(temperature=0.5, top_p=0.9), ("sampling", "temperature", "top_p")),
])
def test_contradictions_and_misfits_are_usage_errors_naming_the_parameters(task, options, named):
    with pytest.raises(UsageError) as caught:
        resolve(task, DecodeOptions(**options))
    assert caught.value.exit_code == 2
    assert caught.value.parameters == named
    message = str(caught.value)
    assert all(name in message for name in named) and "--" not in message  # library words, not flags


def test_out_of_range_values_are_refused():
    for options in (DecodeOptions(max_new_tokens=0), DecodeOptions(top_p=1.5), DecodeOptions(temperature=0.0)):
        with pytest.raises(UsageError):
            resolve("chat", options)


def test_max_new_tokens_defaults_live_in_the_presets_table_only():
    """No literal max_new_tokens default outside generation/presets.py, but the settings dataclass's own field
    default (generation/settings.py; importing the table there would make a cycle: presets builds it)."""
    import re

    root = Path(__file__).resolve().parents[2] / "minicpmo_cli"
    literal = re.compile(r"max_new_tokens[\"']?: *(int *= *)?[0-9]|max_new_tokens *= *[0-9]|MAX_NEW_TOKENS *= *[0-9]")
    found = [f"{path.relative_to(root)}:{number}" for path in root.rglob("*.py")
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if literal.search(line.split("#")[0]) and path.name not in ("presets.py", "settings.py")]
    assert found == []


def test_presets_import_no_torch():
    code = "import sys, minicpmo_cli.generation.presets as p; p.DecodeOptions(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_library_errors_name_parameters_and_the_cli_says_flags():
    from minicpmo_cli.cli.common import in_flag_words
    from minicpmo_cli.model.devices import check_dtype_name, resolve_device

    with pytest.raises(UsageError) as caught:
        check_dtype_name("float8")
    assert str(caught.value).startswith("dtype must be one of") and "--dtype" not in str(caught.value)
    assert in_flag_words(caught.value, str(caught.value)).startswith("--dtype must be one of")
    with pytest.raises(UsageError) as caught:
        resolve_device("tpu")
    assert str(caught.value).startswith("device must be") and "--device" not in str(caught.value)
    assert in_flag_words(caught.value, str(caught.value)).startswith("--device must be")
    with pytest.raises(UsageError) as caught:
        resolve("chat", DecodeOptions(sampling=False, top_p=0.5))
    said = in_flag_words(caught.value, str(caught.value))
    assert "--top-p" in said and "--sampling" in said and "top_p" not in said
    # plain words the error does not name stay words
    assert in_flag_words(UsageError("the device is busy"), "the device is busy") == "the device is busy"


def test_one_meaning_of_auto():
    import torch

    from minicpmo_cli.model.devices import resolve_device, resolve_dtype

    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("torch.bfloat16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16, "cpu") == torch.float16
