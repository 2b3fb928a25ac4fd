"""A CPU stand-in for a captured CUDA graph (step_runner._Graph), for the graph runners' key and reuse logic."""

from __future__ import annotations


class ReplayOnCpu:
    """A stand-in for a captured CUDA graph on the CPU: it keeps what the capture pinned (the model, the pool
    of the key's generation) and replays with the static inputs, as a real graph replays over the memory it
    was captured on. Replaying over a pool that was replaced would decode over stale slots."""

    def __init__(self, fn, inputs, fixed, pool):
        self.fn, self.fixed = fn, fixed
        self.inputs = tuple(x.clone() for x in inputs)

    def replay(self, inputs):
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        return self.fn(*self.inputs, *self.fixed).clone()


def graph_runner_on_cpu(monkeypatch, name: str = "decode"):
    """A graph-mode StepRunner whose captures are :class:`ReplayOnCpu` (no CUDA needed)."""
    from minicpmo_cli.generation import step_runner

    monkeypatch.setattr(step_runner, "_Graph", ReplayOnCpu)
    monkeypatch.setattr(step_runner.torch.cuda, "graph_pool_handle", lambda: None)
    return step_runner.StepRunner("graph", name)
