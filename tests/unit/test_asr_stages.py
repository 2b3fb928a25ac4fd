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


class _Part:
    def __init__(self, index: int, last: bool) -> None:
        self.index, self.last, self.empty = index, last, index % 3 == 1


def _streamed_run(made: list[int], count: int, ahead_parts: int):
    from minicpmo_cli.api.asr_pipeline import Part, Streamed

    part_type = type("StreamedPart", (_Part, Part), {})

    def parts(vad):
        for index in range(count):
            made.append(index)
            yield part_type(index, index == count - 1)

    def decode(item):
        return (item, Streamed(parts)) if item == "long" else (item, None)

    return staged_groups(["a", "long", "b"], decode, lambda group, vad: None,
                         Stages(vad_files=4, ahead_files=6, ahead_parts=ahead_parts))


def test_a_streamed_input_is_handed_on_in_parts_in_order():
    made: list[int] = []
    entries = [(item, getattr(part, "index", None)) for group in _streamed_run(made, 30, 2) for item, part in group]
    parts = [index for item, index in entries if item == "long"]
    assert [item for item, _ in entries] == ["a"] + ["long"] * len(parts) + ["b"]
    assert parts == [index for index in range(30) if index % 3 != 1]  # the empty ones are not handed on
    assert made == list(range(30))


def test_a_streamed_input_stops_being_decoded_when_the_consumer_leaves():
    made: list[int] = []
    groups = _streamed_run(made, 100_000, 1)
    next(groups)
    next(groups)
    groups.close()
    assert not any(t.name == "minicpmo-asr-front" and t.is_alive() for t in threading.enumerate())
    assert len(made) < 100_000
