"""Batch work on more than one process: job-array shards, the worker list, and a pool of worker processes.

**Shards** (``--shard I/N``) split an input list into N parts that every machine computes the same way: an
input belongs to shard ``sha1(key) mod N``, where the key is the input's path *relative to the argument it
came from* (the name its output gets under -o), never an absolute path or Python's salted ``hash()``. So a
shard does not change when other files are added, or when the share is mounted elsewhere, and the N shards'
outputs are exactly one run's.

**Workers** (``--workers N``, ``--devices 0,1|all``): each worker is a process of its own (the spawn start
method: torch after fork is unsafe) that loads its own engine once, then takes chunks of inputs from the
parent. Only the parent writes outputs, so skip-existing, atomic writes and exit codes stay the
single-process ones. A worker that dies hands its unfinished inputs back to the queue and a replacement is
started; an input that a worker died on twice is reported as failed (a poison input must not kill every
worker in turn). The pool is generic: a picklable *job* says how a worker starts (``job.start(device,
warn)`` returns a function from a list of payloads to their results, in order) and what a failed payload's
result is (``job.failure(payload, reason)``).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import re
import signal
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import connection
from pathlib import PurePath
from typing import Any, Callable, Iterator

from minicpmo_cli.errors import EXIT_ENVIRONMENT, EXIT_RUNTIME, EnvironmentProblem, MiniCPMOError, UsageError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
# Debugging and tests: every worker process writes a file named after its pid into this folder.
PID_DIR_ENV = "MINICPMO_WORKER_PID_DIR"


# ----------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    index: int  # 0-based, as SLURM_ARRAY_TASK_ID with --array=0-(N-1) and Kubernetes' JOB_COMPLETION_INDEX
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` with 0 <= I < N -> Shard; anything else is a usage error."""
    match = _SHARD.match(text or "")
    if match is None or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise UsageError(f"--shard must be I/N with 0 <= I < N (0/4 1/4 2/4 3/4 for four parts), not {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def shard_key(path: str, relative_dir: str | os.PathLike[str] = ".") -> str:
    """An input's name as its argument gave it: ``sub/two.wav`` for ``inbox/sub/two.wav`` from ``inbox/``."""
    if path == "-":
        return "-"
    return PurePath(relative_dir, PurePath(path).name).as_posix()


def shard_of(key: str, count: int) -> int:
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def in_shard(key: str, shard: Shard | None) -> bool:
    return shard is None or shard_of(key, shard.count) == shard.index


# ----------------------------------------------------------------------------------------------- devices
def parse_devices(text: str, gpu_count: int | None = None) -> list[str]:
    """``"0,1"``, ``"cuda:0,cuda:2"`` or ``"all"`` -> ``["cuda:0", "cuda:1"]``, checked against the GPUs here."""
    if gpu_count is None:
        gpu_count = _gpu_count()
    spec = (text or "").strip().lower()
    if spec == "all":
        indices = list(range(gpu_count))
    else:
        indices = []
        for part in spec.split(","):
            part = part.strip().removeprefix("cuda:")
            if not part.isdigit():
                raise UsageError(f"--devices takes GPU indices like 0,1,2 or all, not {text!r}")
            indices.append(int(part))
        if len(set(indices)) != len(indices):
            raise UsageError(f"--devices {text}: a GPU is listed twice")
    if gpu_count == 0:
        raise EnvironmentProblem(f"--devices {text}: no CUDA GPU is usable here (use --workers N on the CPU)")
    missing = [i for i in indices if i >= gpu_count]
    if missing:
        raise EnvironmentProblem(f"--devices {text}: GPU {missing[0]} does not exist (this machine has "
                                 f"{gpu_count}: 0-{gpu_count - 1})")
    return [f"cuda:{i}" for i in indices]


def _gpu_count() -> int:
    import torch  # device_count() asks NVML/the driver; it does not start CUDA in this process

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_devices(devices: str | None, workers: int | None, device: str) -> list[str]:
    """One entry per worker process: ``workers`` on each of ``--devices``, else ``workers`` on ``device``."""
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    if devices is None:
        return [device] * (workers or 1)
    return [gpu for gpu in parse_devices(devices) for _ in range(workers or 1)]


# ----------------------------------------------------------------------------------------------- the pool
class WorkerError(MiniCPMOError):
    """A worker could not do its job (the model did not load, out of memory, or every worker died)."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Worker:
    number: int
    device: str
    process: Any
    tasks: Any  # multiprocessing Queue: the parent is its one writer, this worker its one reader
    results: Any  # the parent's end of a one-way pipe: a worker killed mid-write breaks only its own
    chunks: deque = field(default_factory=deque)  # chunks of input indices sent, oldest (in work) first
    stopping: bool = False


class WorkerPool:
    """Runs ``job`` on one worker process per entry of ``devices``; results come back to this process."""

    def __init__(self, job: Any, devices: list[str], chunk_size: int = 1, *,
                 warn: Callable[[str], None] | None = None, debug: Callable[[str], None] | None = None,
                 tracebacks: bool = False, max_restarts: int | None = None, deaths_per_input: int = 2) -> None:
        self.job, self.devices, self.chunk_size = job, list(devices), max(1, chunk_size)
        self.warn, self.debug = warn or (lambda message: None), debug or (lambda message: None)
        self.tracebacks = tracebacks
        self.max_restarts = 2 * len(self.devices) if max_restarts is None else max_restarts
        self.deaths_per_input = deaths_per_input
        self.workers: list[_Worker] = []
        self._context = multiprocessing.get_context("spawn")  # torch is not fork-safe
        self._started = 0
        self._restarts = 0
        self._warned: set[str] = set()

    # -- public
    def run(self, payloads: list, ordered: bool = False) -> Iterator[tuple[int, Any]]:
        """(index, result) for every payload, in input order when ``ordered``, else as they complete."""
        self._payloads = payloads
        self._pending: deque[int] = deque(range(len(payloads)))
        self._results: dict[int, Any] = {}
        self._deaths: dict[int, int] = {}
        self._done: set[int] = set()
        self._order: deque[int] = deque()  # completed, not yet yielded
        next_index = 0
        try:
            for device in self.devices[:len(payloads)]:  # never more workers than inputs
                self._start(device)
            while next_index < len(payloads):
                self._dispatch()
                self._wait()
                if ordered:
                    while next_index in self._results:
                        yield next_index, self._results.pop(next_index)
                        next_index += 1
                else:
                    while self._order:
                        index = self._order.popleft()
                        next_index += 1
                        yield index, self._results.pop(index)
        except BaseException:  # Ctrl-C, a fatal worker error, or the caller stopped reading: stop at once
            self._stop(graceful=False)
            raise
        self._stop(graceful=True)

    # -- workers
    def _start(self, device: str) -> _Worker:
        self._started += 1
        threads = _threads_per_worker(self.devices) if device == "cpu" else None
        tasks = self._context.Queue()
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_worker_main, name=f"minicpmo-worker-{self._started}",
                                        args=(self.job, device, tasks, send, threads, self.tracebacks),
                                        daemon=True)
        process.start()
        send.close()  # the child holds the write end: its exit gives EOF here
        worker = _Worker(self._started, device, process, tasks, receive)
        self.workers.append(worker)
        self.debug(f"worker {worker.number} started on {device} (pid {process.pid})")
        return worker

    def _dispatch(self) -> None:
        """Keep every worker busy: one chunk in work and, while there is plenty left, one queued behind it."""
        for worker in self.workers:
            while not worker.stopping and len(worker.chunks) < 2:
                if worker.chunks and len(self._pending) < self.chunk_size * len(self.workers):
                    break  # near the end: leave what is left to idle workers
                chunk = self._take_chunk()
                if not chunk:
                    break
                worker.chunks.append(chunk)
                worker.tasks.put([(index, self._payloads[index]) for index in chunk])

    def _take_chunk(self) -> list[int]:
        chunk: list[int] = []
        while self._pending and len(chunk) < self.chunk_size:
            index = self._pending.popleft()
            if index not in self._done:
                chunk.append(index)
        return chunk

    def _wait(self) -> None:
        by_pipe = {worker.results: worker for worker in self.workers}
        by_sentinel = {worker.process.sentinel: worker for worker in self.workers}
        for ready in connection.wait(list(by_pipe) + list(by_sentinel)):
            if ready in by_pipe:
                self._receive(by_pipe[ready])
            elif by_sentinel[ready] in self.workers:
                self._bury(by_sentinel[ready])

    def _receive(self, worker: _Worker) -> bool:
        """Handle one message from ``worker``; False when its pipe is closed (it exited or died)."""
        try:
            message = worker.results.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            return False
        kind = message[0]
        if kind == "done":
            self._complete(message[1], message[2])
            for chunk in worker.chunks:
                if message[1] in chunk:
                    chunk.remove(message[1])
            while worker.chunks and not worker.chunks[0]:
                worker.chunks.popleft()
        elif kind == "warn":
            if message[1] not in self._warned:
                self._warned.add(message[1])
                self.warn(message[1])
        elif kind == "fatal":
            raise WorkerError(message[1], message[2])
        return True

    def _complete(self, index: int, result: Any) -> None:
        if index in self._done:
            return  # done twice (a worker died after sending it): the first result counts, once
        self._done.add(index)
        self._results[index] = result
        self._order.append(index)

    def _bury(self, worker: _Worker) -> None:
        """A worker exited: take its last messages, give its unfinished inputs back, start a replacement."""
        while worker.results.poll() and self._receive(worker):
            pass
        worker.process.join()
        self.workers.remove(worker)
        worker.tasks.cancel_join_thread()  # chunks it never read must not block this process's exit
        worker.results.close()
        unfinished = [i for chunk in worker.chunks for i in chunk if i not in self._done]
        if unfinished:
            for index in worker.chunks[0]:  # the chunk it was working on when it died
                self._deaths[index] = self._deaths.get(index, 0) + 1
            poison = [i for i in unfinished if self._deaths.get(i, 0) >= self.deaths_per_input]
            for index in poison:
                self._complete(index, self.job.failure(self._payloads[index], "a worker process died on this "
                                                                              "input twice; it was not done"))
            requeued = [i for i in unfinished if i not in poison]
            self._pending.extendleft(reversed(requeued))
            self.warn(f"worker {worker.number} (pid {worker.process.pid}, {worker.device}) died "
                      f"({_exit_reason(worker.process.exitcode)}); {len(requeued)} input(s) back to the queue")
        if len(self._done) == len(self._payloads):
            return
        if self._restarts < self.max_restarts:
            self._restarts += 1
            self._start(worker.device)
        elif not self.workers:
            left = len(self._payloads) - len(self._done)
            raise WorkerError(f"every worker process died; {left} input(s) were not done "
                              f"(finished outputs were kept)")

    def _stop(self, graceful: bool) -> None:
        """Idle workers exit when told; busy ones (an interrupted run) are killed: only the parent writes."""
        for worker in self.workers:
            worker.stopping = True
            try:
                worker.tasks.put(None)
            except (OSError, ValueError):
                pass
        for worker in self.workers:
            worker.process.join(timeout=10 if graceful else 0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.tasks.cancel_join_thread()
            worker.tasks.close()
            worker.results.close()
        self.workers = []


def _threads_per_worker(devices: list[str]) -> int | None:
    """CPU workers share the cores: each gets its part, unless the user set the thread count himself."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cpu_workers = sum(1 for device in devices if device == "cpu")
    return max(1, (os.cpu_count() or 1) // max(1, cpu_workers))


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


# ----------------------------------------------------------------------------------------------- in a worker
def _worker_main(job: Any, device: str, tasks: Any, results: Any, threads: int | None, tracebacks: bool) -> None:
    """A worker process: start the job once, then run the chunks the parent sends until it sends None."""
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    sys.stdout = sys.stderr  # stdout belongs to the parent (it may be the jsonl stream)
    _note_pid()
    try:
        if threads is not None:  # read by torch when the job first imports it
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        run = job.start(device, lambda message: results.send(("warn", message)))
        while (chunk := tasks.get()) is not None:
            indices = [index for index, _ in chunk]
            for index, result in zip(indices, run([payload for _, payload in chunk])):
                results.send(("done", index, result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which exits with its code
        if tracebacks:
            import traceback

            traceback.print_exc()
        results.send(("fatal", *describe_failure(exc)))


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code the CLI gives ``exc`` (as cli/app.py does in one process)."""
    from minicpmo_cli.errors import describe_error

    if isinstance(exc, MiniCPMOError):
        return describe_error(exc), exc.exit_code
    code = EXIT_ENVIRONMENT if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
        else EXIT_RUNTIME
    return describe_error(exc), code


def _note_pid() -> None:
    folder = os.environ.get(PID_DIR_ENV)
    if folder:
        with open(os.path.join(folder, str(os.getpid())), "w", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
