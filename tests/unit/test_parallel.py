"""The worker pool (api/parallel.py) with a job that needs no model: order, deaths, poison inputs, failures.

The job's workers are real spawned processes; the job is defined here, so they import this module (spawn
pickles it by reference), and it imports no torch: each worker starts in a fraction of a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from minicpmo_cli.api.parallel import WorkerError, WorkerPool


@dataclass(frozen=True)
class SquareJob:
    """Squares numbers; a payload of -1 kills its worker (SIGKILL), one of -2 fails the job's start."""

    fail_start: bool = False

    def start(self, device, warn):
        if self.fail_start:
            from minicpmo_cli.errors import EnvironmentProblem

            raise EnvironmentProblem(f"no memory on {device}")
        warn(f"started on {device}")  # the same line from every worker: shown once

        def run(payloads):
            for payload in payloads:
                if payload == -1:
                    os.kill(os.getpid(), 9)
                yield payload * payload

        return run

    def failure(self, payload, reason):
        return f"failed: {reason}"


def test_results_in_input_order_or_as_done():
    warnings = []
    pool = WorkerPool(SquareJob(), ["cpu", "cpu"], chunk_size=3, warn=warnings.append)
    ordered = list(pool.run(list(range(20)), ordered=True))
    assert ordered == [(i, i * i) for i in range(20)]
    assert warnings == ["started on cpu"]
    unordered = list(WorkerPool(SquareJob(), ["cpu", "cpu"], chunk_size=2).run(list(range(20))))
    assert sorted(unordered) == ordered


def test_a_poison_input_is_failed_after_two_deaths_and_the_rest_is_done():
    warnings = []
    pool = WorkerPool(SquareJob(), ["cpu", "cpu"], chunk_size=1, warn=warnings.append)
    results = dict(pool.run([1, 2, -1, 3, 4, 5], ordered=True))
    assert results == {0: 1, 1: 4, 2: "failed: a worker process died on this input twice; it was not done",
                       3: 9, 4: 16, 5: 25}
    died = [w for w in warnings if "died (killed by SIGKILL)" in w]
    assert len(died) == 2 and "back to the queue" in died[0]


def test_a_job_that_cannot_start_is_its_error_and_exit_code():
    with pytest.raises(WorkerError) as failure:
        list(WorkerPool(SquareJob(fail_start=True), ["cpu"]).run([1, 2]))
    assert str(failure.value) == "no memory on cpu" and failure.value.exit_code == 4


def test_when_every_worker_dies_the_pool_says_so():
    pool = WorkerPool(SquareJob(), ["cpu"], chunk_size=1, max_restarts=0, deaths_per_input=5)
    with pytest.raises(WorkerError, match="every worker process died; 2 input"):
        list(pool.run([1, -1, 2]))
