"""A damaged checkpoint (truncated or garbage weights, a broken shard or index) ends in one line that names
the file and says what to do, exit 1, whatever the command; never a SafetensorError or a traceback."""

from __future__ import annotations

import json
import os
import shutil

import pytest

QUESTION = ["chat", "Hello?", "--max-new-tokens", "2", "--no-sampling", "--num-beams", "1"]


@pytest.fixture
def cli(cli):
    """The in-process CLI on the CPU (the real loader: what it says about a damaged file is the point)."""
    return cli.with_args("--device", "cpu")


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "SafetensorError" not in lines[0] and "Traceback" not in stderr
    assert lines[0].startswith("minicpmo: error: ")
    return lines[0]


@pytest.fixture
def copy(tiny_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    return folder


def test_truncated_weights(cli, copy):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, out, err = cli("--model", copy, *QUESTION)
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert f"{weights}: damaged or incomplete weights file (truncated: tensor" in line
    assert f"copy or convert it again into {copy}" in line


def test_garbage_weights_for_asr_too(cli, copy, tmp_path):
    import numpy as np
    import soundfile

    (copy / "model.safetensors").write_bytes(os.urandom(4096))
    clip = tmp_path / "a.wav"
    soundfile.write(clip, np.zeros(16000, dtype=np.float32) + 0.1, 16000)
    code, _, err = cli("--model", copy, "asr", clip, "--no-vad")
    assert code == 1
    line = one_error_line(err)
    assert "model.safetensors: damaged or incomplete weights file (no valid safetensors header" in line


def test_header_that_is_not_json(cli, copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12
    weights.write_bytes(bytes(data))
    code, out, err = cli("--model", copy, *QUESTION)
    assert code == 1 and out == ""
    assert "its header is not valid JSON" in one_error_line(err)


def shard(folder):
    """Split model.safetensors into two shards with an index, as the official checkpoint is stored."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / "model-00002-of-00002.safetensors"


def test_sharded_checkpoint_loads_and_a_broken_shard_is_named(cli, copy):
    second = shard(copy)
    code, out, err = cli("--model", copy, *QUESTION)
    assert code == 0, err
    second.write_bytes(second.read_bytes()[:-100])
    code, out, err = cli("--model", copy, *QUESTION)
    assert code == 1 and out == ""
    assert f"{second}: damaged or incomplete weights file (truncated" in one_error_line(err)


def test_broken_index_is_named(cli, copy):
    shard(copy)
    (copy / "model.safetensors.index.json").write_text("{not json")
    code, _, err = cli("--model", copy, *QUESTION)
    assert code == 1
    assert "model.safetensors.index.json: damaged or incomplete weights file (not a valid weights index" in \
        one_error_line(err)


def test_hub_file_says_how_to_download_it_again(cli, tiny_ckpt, tmp_path, monkeypatch):
    """A damaged file in the Hugging Face cache: delete it and its blob, rerun with the hub id and revision."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_ckpt, snapshot)
    blob = repo / "blobs" / "feedbeef"
    blob.parent.mkdir()
    (snapshot / "model.safetensors").rename(blob)
    blob.write_bytes(blob.read_bytes()[:5000])
    (snapshot / "model.safetensors").symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    code, _, err = cli("--model", "someone/tiny", "--offline", *QUESTION)
    assert code == 1
    line = one_error_line(err)
    assert "model.safetensors: damaged or incomplete weights file" in line
    assert f"delete it and {blob}" in line and "--model someone/tiny --revision 0123456789ab" in line
