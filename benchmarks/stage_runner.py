"""Run a benchmark's stages in child processes, each stage under its own time limit, rows printed as they come.

A GPU lease is short: one stage that hangs or runs long must cost only its own rows. The parent starts a
child (the same script with ``--worker --stages a,b,c``) that builds the model once and runs the stages in
order, writing to its stdout:

    @@start STAGE        a stage (or the model build, "build") begins: its time limit starts now
    @@row {json}         one measured row, printed by the parent at once
    @@done STAGE         the stage ended (its rows are in)

When a stage outlives its limit the parent kills the child's whole process group, prints a "timeout" row
for that stage and starts a new child for the stages still to run (the model is built again). A child that
dies inside a stage (a crash, out of memory) costs that stage the same way. Everything else the child
prints goes to stderr unchanged.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

START, ROW, DONE = "@@start ", "@@row ", "@@done "
BUILD = "build"


class Reporter:
    """The child's side: protocol lines on the real stdout (flushed), anything else printed goes to stderr."""

    def __init__(self) -> None:
        self.out = sys.stdout
        sys.stdout = sys.stderr  # libraries' prints must not be read as protocol lines
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()

    def start(self, stage: str) -> None:
        self._write(START + stage)

    def row(self, row: dict) -> None:
        self._write(ROW + json.dumps(row))

    def done(self, stage: str) -> None:
        self._write(DONE + stage)

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


def _exit_with_parent(parent: int) -> None:
    """The child runs in a session of its own (killed whole on a timeout), so a parent killed from outside
    (the lease's own time limit) would leave it holding the GPU: it ends itself when its parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


@dataclass
class Outcome:
    """What happened to each stage: "done", "timeout", "failed" or "not run" (the overall limit was reached)."""

    status: dict[str, str] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


@dataclass
class Limits:
    stage: Callable[[str], float]  # seconds allowed to one stage (BUILD included)
    total: float | None = None  # seconds for the whole run; stages not started by then are "not run"


def run_groups(command: Callable[[list[str]], list[str]], groups: list[list[str]], limits: Limits,
               on_row: Callable[[dict], None], on_stage: Callable[[str, str, float], None]) -> Outcome:
    """Run each group of stages (one child per group; a group is restarted without a stage it lost).

    ``command(stages)``: the child's argv for those stages. ``on_row(row)``: each measured row as it comes;
    ``on_stage(stage, status, seconds)``: each stage's end ("done", "timeout: ...", "failed: ...").
    """
    outcome = Outcome()
    started = time.monotonic()
    for group in groups:
        remaining = list(group)
        while remaining:
            if limits.total is not None and time.monotonic() - started >= limits.total:
                for stage in remaining:
                    outcome.status[stage] = "not run"
                    on_stage(stage, "not run: the run's time limit was reached", 0.0)
                remaining = []
                break
            lost = _run_child(command(remaining), limits, started, outcome, on_row, on_stage)
            remaining = [s for s in remaining if s not in outcome.status]
            if lost == BUILD:  # the model could not be built: nothing of this group can run
                for stage in remaining:
                    outcome.status[stage] = "failed"
                    on_stage(stage, "not run: the model build failed", 0.0)
                remaining = []
    return outcome


def _run_child(argv: list[str], limits: Limits, run_started: float, outcome: Outcome, on_row, on_stage):
    """One child until it exits or a stage outlives its limit; returns the stage lost (None: none)."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1,
                             start_new_session=True)  # its own process group: killed whole, compile workers too
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
    current, since = None, time.monotonic()
    try:
        while True:
            deadline = _deadline(current, since, limits, run_started)
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.0) if deadline else None)
            except queue.Empty:
                seconds = time.monotonic() - since
                _kill(child)
                reason = ("timeout: the run's time limit was reached" if _over_total(limits, run_started)
                          else f"timeout after {seconds:.0f} s")
                _lose(current or BUILD, reason, seconds, outcome, on_stage)
                return current or BUILD
            if line is None:  # the child's stdout closed: it exited
                code = child.wait()
                if current is not None:
                    _lose(current, f"failed: the process exited with code {code}", time.monotonic() - since,
                          outcome, on_stage)
                    return current
                return None
            current, since = _handle(line, current, since, outcome, on_row, on_stage)
    finally:
        if child.poll() is None:
            _kill(child)


def _handle(line: str, current, since, outcome: Outcome, on_row, on_stage):
    if line.startswith(START):
        return line[len(START):].strip(), time.monotonic()
    if line.startswith(ROW):
        row = json.loads(line[len(ROW):])
        outcome.rows.append(row)
        on_row(row)
    elif line.startswith(DONE):
        stage = line[len(DONE):].strip()
        if stage != BUILD:
            outcome.status[stage] = "done"
        on_stage(stage, "done", time.monotonic() - since)
        return None, time.monotonic()
    else:
        sys.stderr.write(line)
        sys.stderr.flush()
    return current, since


def _deadline(current, since: float, limits: Limits, run_started: float) -> float | None:
    ends = []
    if current is not None:
        ends.append(since + limits.stage(current))
    if limits.total is not None:
        ends.append(run_started + limits.total)
    return min(ends) if ends else None


def _over_total(limits: Limits, run_started: float) -> bool:
    return limits.total is not None and time.monotonic() - run_started >= limits.total - 0.5


def _lose(stage: str, reason: str, seconds: float, outcome: Outcome, on_stage) -> None:
    if stage != BUILD:
        outcome.status[stage] = reason.split(":")[0]
    on_stage(stage, reason, seconds)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _kill(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        child.kill()
    child.wait()


def parse_timeouts(text: str) -> dict[str, float]:
    """``decode=120,tts=90`` -> {"decode": 120.0, "tts": 90.0} (ValueError naming the bad item)."""
    limits = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if not name or not value:
            raise ValueError(f"{item!r}: expected STAGE=SECONDS")
        limits[name.strip()] = float(value)
    return limits
