"""The engine-fed model stage of asr (api/asr_model.py, api/asr_model_calls.py): the same answers as the plain
padded batch, features of a whole batch equal to the processor's, and a run that refills the model as pieces
finish instead of waiting for a batch's longest row."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}
SENTENCES = ("Speech recognition turns spoken words into text.", "A second voice reads a longer sentence aloud "
             "for the model.", "Short one.")


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from minicpmo_cli.api.engine import LoadOptions, load

    return load(LoadOptions(model=str(tiny_ckpt), device="cpu", max_batch=2), vision=False, audio=True, tts=False)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[np.ndarray]:
    from minicpmo_cli.media.audio import load_audio

    folder = tmp_path_factory.mktemp("speech")
    found = []
    for index, text in enumerate(SENTENCES):
        path = folder / f"{index}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        found.append(load_audio(path))
    noise = (0.05 * np.random.default_rng(1).standard_normal(16000 * 31)).astype(np.float32)
    return [*found, found[0].copy(), noise[:480000], noise[:479900], noise[:1601]]


def test_whole_batch_log_mel_equals_each_piece_alone(clips):
    """One STFT over the batch == log_mel_window of each piece (bit for bit on the CPU), 0.0 past each piece."""
    import torch

    from minicpmo_cli.processing.audio import log_mel_batch, log_mel_window

    features, valid = log_mel_batch(clips)
    assert features.shape == (len(clips), 80, max(valid))
    for row, clip, frames in zip(features, clips, valid):
        alone, alone_frames = log_mel_window(clip)
        assert frames == alone_frames and torch.equal(row[:, :frames], alone)
        assert not row[:, frames:].any()
    with pytest.raises(ValueError, match="1 to 480000 samples"):
        log_mel_batch([np.zeros(480001, np.float32)])


def test_prompt_cache_gives_the_processors_inputs(engine, clips):
    """Ids, mask, bounds and features equal processor.apply_chat_template's, the template rendered once per
    (instruction, audio length)."""
    import torch

    from minicpmo_cli.api.asr import task_prompt
    from minicpmo_cli.api.asr_model_calls import PromptCache
    from minicpmo_cli.processing.audio import audio_token_count

    instructions = [task_prompt(language="zh" if i in (1, 4) else "en") for i in range(len(clips))]
    cache = PromptCache(engine.processor)
    ours = cache.inputs(clips, instructions, "cpu")
    msgs = [[{"role": "user", "content": [text, clip]}] for text, clip in zip(instructions, clips)]
    theirs = engine.processor.apply_chat_template(msgs=msgs, use_tts_template=True)
    for key in ("input_ids", "attention_mask", "audio_features"):
        assert torch.equal(ours[key], theirs[key]), key
    for key in ("audio_bounds", "spk_bounds", "audio_feature_lens"):
        assert all(torch.equal(a, b) for a, b in zip(ours[key], theirs[key])), key
    assert set(cache.rows) == {(text, audio_token_count(len(clip))) for text, clip in zip(instructions, clips)}


@pytest.mark.parametrize("decoding", [GREEDY, {"sampling": True, "seed": 7}])
def test_engine_fed_answers_equal_the_padded_batch(engine, clips, decoding):
    """Each piece its own engine request (batched with whatever else runs) == the plain padded batch, ids and
    texts; an engine of 2 slots runs 7 pieces, so rows are refilled from its queue."""
    from minicpmo_cli.api.asr import task_prompt
    from minicpmo_cli.api.asr_model_calls import PieceModel, generate_batch, start_batch
    from minicpmo_cli.api.engine import DecodeOptions

    decode = DecodeOptions(max_new_tokens=6, **decoding)
    instructions = [task_prompt()] * len(clips)
    plain = generate_batch(engine, clips, instructions, decode)
    pending = start_batch(PieceModel(engine, decode), clips, instructions)
    fed = [p.wait() for p in pending]
    assert fed == plain
    alone = [generate_batch(engine, [clip], task_prompt(), decode)[0] for clip in clips]
    assert fed == alone
    assert all(p.handle.finish_reason in ("stop", "length") for p in pending)


class _Job:
    """What the piece run needs of api/asr.py's job: texts per piece and an instruction."""

    def __init__(self, name: str, pieces: int) -> None:
        self.name, self.instruction, self.texts = name, "say it\n", [None] * pieces

    @property
    def done(self) -> bool:
        return all(text is not None for text in self.texts)


def test_a_finished_piece_is_replaced_at_once_not_after_its_batch(monkeypatch):
    """The run keeps pieces on the model as they finish: once one piece of the first batch is answered the next
    batch goes out while its neighbour still runs; records come in input order, cancel aborts what flies."""
    import threading

    from minicpmo_cli.api import asr_model_calls as calls
    from minicpmo_cli.api.asr_model import PieceRun, TranscriptionCancelled
    from minicpmo_cli.api.engine import DecodeOptions

    sent: list[tuple[int, calls.Pending]] = []

    def start(model, clips, instructions):
        batch = [(len(clip), _pending_type()(handle=_Handle())) for clip in clips]
        sent.extend(batch)
        return [pending for _, pending in batch]

    monkeypatch.setattr(calls, "start_batch", start)
    jobs = [_Job("a", 4), _Job("b", 4)]
    run = PieceRun(lambda: object(), 2, DecodeOptions(), lambda job: job.name, None, None, threading.Event())
    run.open_jobs.extend(jobs)
    for job in jobs:
        run.add(job, [(index, np.ones(16000 + 1000 * index, np.float32)) for index in range(4)])
    assert list(run.pump()) == [] and len(sent) == 4  # a window of 8 sorted; 4 in flight (2 + a batch ahead)
    assert [length for length, _ in sent] == [16000, 16000, 17000, 17000]
    sent[0][1].handle.finish([5])
    assert list(run.pump()) == [] and len(sent) == 6  # one answer in: the next batch goes out at once
    assert not sent[1][1].done  # while the first batch's other row still runs
    for _, pending in sent:
        pending.handle.finish([6])
    records = list(run.pump(final=True))  # the last batch, answered once the run waits for the engine
    assert records == ["a", "b"] and len(sent) == 8
    assert [text.text for job in jobs for text in job.texts] == ["[5]", "[6]", "[6]", "[7]", "[6]", "[6]", "[6]", "[7]"]
    late = _Job("c", 2)
    run.open_jobs.append(late)
    run.add(late, [(0, np.ones(16000, np.float32)), (1, np.ones(16000, np.float32))])
    assert list(run.pump()) == [] and len(sent) == 8  # under a window: gathering
    run.probe(late, np.ones(8000, np.float32), "probe\n", lambda job, answer: None, [])
    assert list(run.pump()) == [] and len(sent) == 9  # a probe goes at once
    run.cancel.set()
    with pytest.raises(TranscriptionCancelled):  # nothing more is sent
        list(run.pump(final=True))
    assert len(sent) == 9
    run.close()  # what was in flight is aborted on the engine
    assert sent[-1][1].handle.aborted and not run.flying


def _pending_type():
    from minicpmo_cli.api import asr_model_calls as calls

    class Pending(calls.Pending):
        """Answered with its ids as text."""

        def wait(self, cancel=None):
            assert self.handle.done
            return calls.PieceText(str(self.handle.ids))
    return Pending


class _Engine:
    """Stepped by a wait that finds nothing answered: answers every request still open ([7])."""

    threaded = False
    handles: list = []

    def abort(self, handle) -> None:
        handle.aborted = True

    def step(self) -> bool:
        for handle in self.handles:
            if not handle.done:
                handle.finish([7])
        return True


class _Handle:
    """An engine request whose answer the test hands in."""

    def __init__(self) -> None:
        self.done, self.ids, self.engine, self.aborted = False, [], _Engine(), False
        _Engine.handles.append(self)

    def finish(self, ids: list[int]) -> None:
        self.done, self.ids = True, ids

    def result(self) -> list[int]:
        return self.ids


def test_whole_batch_log_mel_matches_the_golden_features(golden_case, golden_ckpt):
    """Cases c and d in one batch: each row within the golden README's feature tolerance (1e-5)."""
    import soundfile

    from minicpmo_cli.processing.audio import log_mel_batch

    audios, expected = [], []
    for name in ("c_asr", "d_forward"):
        meta, arrays = golden_case(name)
        item = next(c for m in meta["messages"] for c in m["content"] if c["type"] == "audio")
        audio, _ = soundfile.read(golden_ckpt.parent / "cases" / item["file"], dtype="float32")
        audios.append(audio)
        expected.append(arrays["audio_features"][0])
    features, valid = log_mel_batch(audios)
    for row, frames, golden in zip(features, valid, expected):
        assert frames == golden.shape[-1]
        assert np.abs(row[:, :frames].numpy() - golden).max() <= 1e-5
