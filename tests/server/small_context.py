"""A tiny checkpoint whose LLM has only a few hundred positions: a live conversation outgrows it in two turns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CONTEXT = 320  # positions: the system prompt takes 46, a 3 s turn about 90, an answer of 20 tokens 28


def small_context_checkpoint(tiny_ckpt: Path, folder: Path, positions: int = CONTEXT) -> Path:
    """A copy of the tiny checkpoint in ``folder`` with an LLM of ``positions`` positions."""
    target = folder / "ckpt"
    shutil.copytree(tiny_ckpt, target)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (target / "config.json").write_text(json.dumps(config))
    return target
