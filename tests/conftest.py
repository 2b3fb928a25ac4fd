"""Shared fixtures: paths to ../shared (skipped with a reason when absent) and a session-wide tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "fixtures" / "golden"
GOLDEN_CKPT = GOLDEN / "checkpoint"
GOLDEN_CASES = GOLDEN / "cases"
REFERENCE = SHARED / "reference"
EXAMPLES = REPO / "examples"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only present in the project's CI and dev checkouts)")
    return path


@pytest.fixture(scope="session")
def golden_ckpt() -> Path:
    return _need(GOLDEN_CKPT)


@pytest.fixture(scope="session")
def golden_case():
    """Load a golden case: returns (json dict, npz mapping) for a case name like 'a_text_chat'."""
    import numpy as np

    def load(name: str):
        meta = json.loads(_need(GOLDEN_CASES / f"{name}.json").read_text())
        arrays = np.load(GOLDEN_CASES / meta.get("npz", f"{name}.npz"))
        return meta, arrays

    return load


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A complete tiny random checkpoint (every tower, tokenizers, Vocos), built once per test session."""
    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    make_tiny_checkpoint(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gptq_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint in the official GPTQ int4 layout (its LLM decoder linears as qweight/qzeros/...)."""
    import shutil

    from minicpmo_cli.model.tiny_gptq import convert_to_gptq

    folder = tmp_path_factory.mktemp("tiny-gptq-checkpoint") / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    convert_to_gptq(folder)
    return folder
