"""README.md's Python snippet runs as printed on a machine without a GPU (on the tiny checkpoint)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_snippet_runs_on_a_cpu_machine(tiny_ckpt):
    code = readme_snippet().replace('"openbmb/MiniCPM-o-2_6"', repr(str(tiny_ckpt)))
    assert str(tiny_ckpt) in code  # the snippet still loads the model it names
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even where there is one
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()  # the answer was printed
