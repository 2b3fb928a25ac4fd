"""api/asr_pipeline.py's front stages without a model: order, bounded work ahead, errors, early stop."""

from __future__ import annotations

import threading

import pytest

from minicpmo_cli.api.asr_pipeline import Stages, staged_groups


def run(inputs, stages=Stages(vad_files=4, ahead_files=6), segment=None):
    decoded: list[int] = []

    def decode(item):
        decoded.append(item)
        if item == "bad":
            raise ValueError("cannot decode")
        return item, None

    def default_segment(group, vad):
        pass

    return staged_groups(inputs, decode, segment or default_segment, stages), decoded


def test_groups_keep_the_input_order_and_work_ahead_is_bounded():
    taken: list[int] = []

    def inputs():
        for index in range(50):
            taken.append(index)
            yield index

    groups, _ = run(inputs())
    seen = []
    for group in groups:
        assert len(taken) - len(seen) <= 6 + len(group)  # never more than ahead_files inputs taken ahead
        seen.extend(item for item, _ in group)
    assert seen == list(range(50))


def test_an_error_in_a_stage_reaches_the_consumer():
    def segment(group, vad):
        if any(item == 3 for item, _ in group):
            raise RuntimeError("segmentation failed")

    groups, _ = run(range(10), segment=segment)
    with pytest.raises(RuntimeError, match="segmentation failed"):
        list(groups)


def test_an_error_reading_the_inputs_is_raised_on_the_callers_thread():
    def inputs():
        yield 1
        raise OSError("claim failed")

    groups, _ = run(inputs())
    with pytest.raises(OSError, match="claim failed"):
        list(groups)


def test_stopping_early_ends_the_front_thread_and_no_inputs():
    groups, _ = run(range(1000))
    next(groups)
    groups.close()
    assert not any(t.name == "minicpmo-asr-front" and t.is_alive() for t in threading.enumerate())


def test_no_inputs_is_no_groups():
    groups, decoded = run([])
    assert list(groups) == [] and decoded == []
