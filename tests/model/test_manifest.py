"""The full-size module tree, built on the meta device from the official config.json, has exactly the
reference's parameter names and shapes (../shared/reference/real_param_manifest.json: 1599 tensors)."""

from __future__ import annotations

import json

import pytest
import torch


def _build(reference_dir, **flags):
    from minicpmo_cli.generation.guide import MiniCPMO
    from minicpmo_cli.model.config import MiniCPMOConfig

    config = MiniCPMOConfig.from_pretrained(reference_dir)
    for key, value in flags.items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return MiniCPMO(config)


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "real_param_manifest.json").read_text())


def test_state_dict_equals_manifest(reference_dir, manifest):
    model = _build(reference_dir)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    theirs = {name: entry["shape"] for name, entry in manifest["parameters"].items()}
    assert len(theirs) == 1599
    assert sorted(set(ours) - set(theirs)) == []
    assert sorted(set(theirs) - set(ours)) == []
    assert {k for k in ours if ours[k] != theirs[k]} == set()
    assert set(manifest["state_dict_keys"]) == set(ours)  # no persistent buffers on either side


def test_parameter_counts_by_prefix(reference_dir, manifest):
    model = _build(reference_dir)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + param.numel()
    assert sum(counts.values()) == manifest["num_parameters"]
    assert counts == manifest["num_parameters_by_prefix"]


def test_towers_can_be_left_out(reference_dir, manifest):
    model = _build(reference_dir, init_audio=False, init_tts=False)
    names = set(model.state_dict())
    expected = {n for n in manifest["parameters"] if n.split(".")[0] in ("llm", "vpm", "resampler")}
    assert names == expected
