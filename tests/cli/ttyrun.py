"""Run the CLI with stderr (and optionally stdin/stdout) on a pseudo-terminal, as a user in a terminal would."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TtyRun:
    returncode: int
    stdout: bytes  # what went to the redirected stdout (a file)
    terminal: str  # everything drawn on the terminal (stderr)


REPO = Path(__file__).resolve().parents[2]


def run_on_terminal(*args, stdout_file: Path, cwd: Path | None = None, env: dict | None = None,
                    timeout: float = 300, fake_engine: bool = False) -> TtyRun:
    """`python -m minicpmo_cli ARGS > stdout_file` with stderr on a pty (stdin empty, not a terminal).

    ``fake_engine``: the same entry point with tests/fake_engine.py's engine instead of the model (what is drawn
    on the terminal is the CLI's, whatever the model says)."""
    master, slave = pty.openpty()
    environment = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", **(env or {})}
    environment.pop("NO_COLOR", None)
    module = "minicpmo_cli"
    if fake_engine:
        module = "tests.fake_engine"
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    with open(stdout_file, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=slave, env=environment, cwd=cwd)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    proc.wait(timeout=timeout)
    return TtyRun(proc.returncode, Path(stdout_file).read_bytes(), b"".join(chunks).decode("utf-8", "replace"))


def noise_wav(path: Path, seconds: float, seed: int = 0) -> Path:
    """A clip of quiet noise (not silence: the model is asked about it)."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(seed)
    soundfile.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype("float32"), 16000)
    return path
