"""Where a command's start-up time goes: a clock that names each phase as it ends.

The CLI creates one :class:`StartupClock` per command (kept with the command's global options, never a module
global) and hands it down to the code that does the work: ``api.load`` marks imports and the processor,
``model/loading.py`` the device start, the model's construction, the weights read from disk and their move to
the device; the command marks its first output (first answer text, first audio, first transcript). With
``-v`` each phase is one line on stderr as it ends::

    startup: python + cli start 0.41 s (at 0.41 s)
    startup: imports 2.30 s (at 2.75 s)
    startup: device start 0.90 s (at 3.65 s)

Nothing here imports torch: the clock exists before anything heavy is loaded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

PREFIX = "startup:"


@dataclass
class Phase:
    name: str
    seconds: float
    detail: str = ""
    at: float = 0.0  # seconds since the process started, when the phase ended


@dataclass
class StartupClock:
    """Phases in the order they ended. ``emit``: called with each phase's line as it is recorded (None: silent).

    ``mark(name)`` ends a phase that began at the previous mark; ``record(name, seconds)`` adds one measured
    elsewhere (a part of a larger span, timed piece by piece); ``once(name)`` marks only the first time (the
    first token of a stream). The first phase is the time the process ran before the clock existed
    (interpreter start, CLI imports), where the operating system says when the process started.
    """

    emit: Callable[[str], None] | None = None
    phases: list[Phase] = field(default_factory=list)

    def __post_init__(self) -> None:
        now = time.perf_counter()
        before = process_age()
        self._origin = now - (before or 0.0)
        self._last = now
        self._marked: set[str] = set()
        if before is not None:
            self._add(Phase("python + cli start", before))

    def mark(self, name: str, detail: str = "", parts: dict[str, float] | None = None) -> None:
        """End the phase ``name`` now. ``parts``: sub-phases timed inside this span (name -> seconds), recorded
        first; ``name`` then gets what is left of the span."""
        now = time.perf_counter()
        spent, at = now - self._last, self._last - self._origin
        for part, seconds in (parts or {}).items():  # interleaved in fact: shown one after the other
            at = min(at + seconds, now - self._origin)
            self._add(Phase(part, seconds, at=at))
            spent -= seconds
        self._last = now
        self._add(Phase(name, max(spent, 0.0), detail, at=now - self._origin))

    def once(self, name: str, detail: str = "") -> None:
        """:meth:`mark`, the first time this name is given only."""
        if name not in self._marked:
            self._marked.add(name)
            self.mark(name, detail)

    def start_printing(self, emit: Callable[[str], None] | None) -> None:
        """Print through ``emit`` from now on, starting with the phases already recorded (None: stay silent)."""
        if self.emit is None and emit is not None:
            for phase in self.phases:
                emit(self.line(phase))
        self.emit = emit

    @property
    def printing(self) -> bool:
        return self.emit is not None

    def skip(self) -> None:
        """Start the next phase now: what ran since the last mark belongs to no phase (waiting for input)."""
        self._last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the process started (or since the clock was made, where that is unknown)."""
        return time.perf_counter() - self._origin

    def _add(self, phase: Phase) -> None:
        phase.at = phase.at or self.elapsed
        self.phases.append(phase)
        if self.emit is not None:
            self.emit(self.line(phase))

    def line(self, phase: Phase) -> str:
        detail = f"; {phase.detail}" if phase.detail else ""
        return f"{PREFIX} {phase.name} {phase.seconds:.2f} s (at {phase.at:.2f} s){detail}"


def process_age() -> float | None:
    """Seconds since this process started, from /proc (Linux); None where that cannot be read."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as handle:
            uptime = float(handle.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time, in ticks after boot
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    age = uptime - started
    return age if 0.0 <= age < 86400 * 365 else None


def mark(clock: StartupClock | None, name: str, detail: str = "", parts: dict[str, float] | None = None) -> None:
    """``clock.mark(...)`` where a clock was given (library calls pass none)."""
    if clock is not None:
        clock.mark(name, detail, parts)
