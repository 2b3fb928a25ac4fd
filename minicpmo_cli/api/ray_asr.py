"""`asr --ray [ADDRESS]`: the batch as a Ray Data pipeline (the optional extra ``[ray]``).

Inputs become a dataset of rows; Ray tasks read and decode the audio (``map``); an actor pool transcribes it
(``map_batches`` with a callable class: one engine per actor, one actor per GPU, or ``--workers`` actors on
CPUs); the records stream back to the driver, where the command writes them with its usual writers (atomic,
skip-existing). Nothing here writes a file.

Failures. A dead actor is restarted by Ray and its batch retried (``max_restarts``/``max_task_retries``),
and the driver keeps the first record of each input, so nothing is lost and nothing is written twice. A bad
input is a record with ``error`` set, as in one process; an error that stops a worker (the model does not
load) comes back as a row with ``fatal`` set and stops the job with its own message and exit code.
Rows carry pickled objects (binary columns): records and samples come back exactly as they went in.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from typing import Any, Callable, Iterator

from minicpmo_cli.api.parallel import PID_DIR_ENV, WorkerError, describe_failure
from minicpmo_cli.errors import EnvironmentProblem
from minicpmo_cli.units import INPUT_SAMPLE_RATE

RETRIES = 3  # restarts of a dead actor, and retries of the batch it had, before the job fails
DECODE_CPUS = 0.5  # decoding is light; leaves room for the actors on a small local Ray
CPU_ACTOR_CPUS = 0.5  # a scheduling share: an actor's torch threads are what it really uses


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise EnvironmentProblem("--ray needs Ray Data: pip install 'minicpmo-cli[ray]' "
                                 "(or pip install 'ray[data]')") from None
    return ray


# ----------------------------------------------------------------------------------------------- on Ray
def decode_row(row: dict) -> dict:
    """A Ray task: the input's audio decoded to 16 kHz samples, or the reason it cannot be."""
    from minicpmo_cli.api.asr import AudioInput, _reason
    from minicpmo_cli.errors import InputError
    from minicpmo_cli.media.audio import load_audio

    item: AudioInput = pickle.loads(row["payload"])
    try:
        decoded: Any = AudioInput(item.path, load_audio(item.source, INPUT_SAMPLE_RATE))
    except InputError as exc:  # as api/asr.py's _start_job words it
        decoded = _reason(exc)
    return {"index": row["index"], "path": item.path, "decoded": pickle.dumps(decoded)}


class Transcriber:
    """The actor: one engine (loaded on first use), ``transcribe_many`` over each batch of decoded inputs."""

    def __init__(self, job: Any, pid_dir: str | None) -> None:
        import ray

        if pid_dir:
            with open(os.path.join(pid_dir, str(os.getpid())), "w", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()}\n")
        self.job = job
        self.warnings: list[str] = []
        self.run = job.start("cuda" if ray.get_gpu_ids() else "cpu", self.warnings.append)

    def __call__(self, batch: dict) -> dict:
        from minicpmo_cli.outputs import TranscriptRecord

        decoded = [pickle.loads(blob) for blob in batch["decoded"]]
        rows: dict[str, list] = {"index": list(batch["index"]), "record": [], "warnings": [], "fatal": []}
        try:
            audio = iter(self.run([d for d in decoded if not isinstance(d, str)]))
            for path, item in zip(batch["path"], decoded):
                record = TranscriptRecord(path=path, error=item) if isinstance(item, str) else next(audio)
                rows["record"].append(pickle.dumps(record))
                rows["warnings"].append(pickle.dumps(self.warnings))
                rows["fatal"].append(b"")
                self.warnings = []
        except Exception as exc:  # noqa: BLE001 - the driver stops the job with this message and code
            failure = pickle.dumps(describe_failure(exc))
            count = len(rows["index"])
            rows = {"index": rows["index"], "record": [b""] * count, "warnings": [pickle.dumps([])] * count,
                    "fatal": [failure] * count}
        return rows


# ----------------------------------------------------------------------------------------------- driver
class RayRun:
    """Connects to (or starts) Ray, runs the pipeline, yields ``(index, record)``; shuts down what it started."""

    def __init__(self, address: str, actors: int | None = None, *, warn: Callable[[str], None] | None = None,
                 debug: Callable[[str], None] | None = None, verbose: bool = False) -> None:
        self.address, self.actors = address, actors
        self.log_level = logging.WARNING if verbose else logging.ERROR  # Ray's own chatter only with -v
        self.warn, self.debug = warn or (lambda m: None), debug or (lambda m: None)

    def run(self, job: Any, payloads: list, batch_size: int, ordered: bool = False) -> Iterator[tuple[int, Any]]:
        ray = import_ray()
        started = self._connect(ray)
        try:
            yield from self._stream(ray, job, payloads, batch_size, ordered)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray) -> bool:
        """True when this run started Ray (and so shuts it down)."""
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(self.log_level)
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # no uv runtime env for a local Ray
        settings = {"include_dashboard": False, "log_to_driver": False, "logging_level": self.log_level}
        if self.address == "local":
            ray.init(num_cpus=os.cpu_count() or 1, **settings)
        else:
            ray.init(address=self.address, **settings)
        self.debug(f"ray: {ray.cluster_resources()}")
        return True

    def _stream(self, ray, job, payloads: list, batch_size: int, ordered: bool) -> Iterator[tuple[int, Any]]:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = self.actors or max(1, gpus)
        resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": CPU_ACTOR_CPUS}
        self.debug(f"ray: {actors} actor(s), each {resources}")
        rows = [{"index": i, "payload": pickle.dumps(p)} for i, p in enumerate(payloads)]
        with warnings.catch_warnings():
            # Ray 2.5x deprecates extra remote arguments (ray_remote_args), but they are still the only way
            # to set an actor pool's restarts and retries (its own code says so): the warning is noise here.
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = (ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * actors)))
                       .map(decode_row, num_cpus=DECODE_CPUS)
                       .map_batches(Transcriber, fn_constructor_args=(job, os.environ.get(PID_DIR_ENV)),
                                    batch_size=batch_size,
                                    compute=ray.data.ActorPoolStrategy(size=actors), batch_format="numpy",
                                    max_restarts=RETRIES, max_task_retries=RETRIES,
                                    **resources))
        seen: set[int] = set()
        held: dict[int, Any] = {}  # ordered: records waiting for those before them
        next_index = 0
        for row in dataset.iter_rows():
            if row["fatal"]:
                message, code = pickle.loads(row["fatal"])
                raise WorkerError(message, code)
            index = int(row["index"])
            if index in seen:
                continue  # a retried batch: the first record counts
            seen.add(index)
            for message in pickle.loads(row["warnings"]):
                self.warn(message)
            held[index] = pickle.loads(row["record"])
            if not ordered:
                yield index, held.pop(index)
            while ordered and next_index in held:
                yield next_index, held.pop(next_index)
                next_index += 1
        for index in range(len(payloads)):  # never expected: what Ray did not hand back counts as failed
            if index not in seen:
                held[index] = job.failure(payloads[index], "Ray returned no result for it")
        yield from sorted(held.items())
