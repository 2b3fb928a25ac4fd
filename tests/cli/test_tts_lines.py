"""`minicpmo tts --lines` on the TTS engine, end to end on the tiny checkpoint: every line is submitted to the
engine (their frames decoded in shared steps), each wav is written as its line finishes, and every wav is the
one `minicpmo tts LINE` writes for that line alone (same seed); a rerun skips what exists. The library's
``speak_lines`` gives ``speak``'s audio for each text while the rows really share steps."""

from __future__ import annotations

import numpy as np

LINES = ["Hello there.", "A second line, a little longer than the first one.",
         "Third.", " ".join(["This line is long enough to be read in two sentence groups, one after the other."] * 3)]
SHORT = ["--max-audio-seconds", "0.3", "--seed", "5"]


from tts_support import cli, read_pcm16, speech_commands  # noqa: F401 - fixtures shared with the other tts tests


def test_lines_on_the_engine_equal_each_line_alone(cli, tmp_path):
    text_file = tmp_path / "lines.txt"
    text_file.write_text("\n".join(LINES[:2]) + "\n\n" + "\n".join(LINES[2:]) + "\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    code, _, err = cli("tts", "--text-file", text_file, "--lines", "-o", out_dir, *SHORT)
    assert code == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["0001.wav", "0002.wav", "0003.wav", "0004.wav"]
    lengths = []
    for number, line in enumerate(LINES, start=1):
        batched = read_pcm16(out_dir / f"{number:04d}.wav")
        code, _, err = cli("tts", line, "-o", tmp_path / f"alone{number}.wav", *SHORT)
        assert code == 0, err
        alone = read_pcm16(tmp_path / f"alone{number}.wav")
        assert len(batched) > 0 and len(batched) % 512 == 0  # whole 512-sample frames
        assert np.array_equal(batched, alone), number
        lengths.append(len(batched))
    assert lengths[3] > lengths[2]  # the long line is two capped groups
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    (out_dir / "0002.wav").unlink()
    code, _, err = cli("tts", "--text-file", text_file, "--lines", "-o", out_dir, *SHORT)
    assert code == 0 and "skipping 3 line(s)" in err, err
    after = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert {k: v for k, v in after.items() if k != "0002.wav"} == {k: v for k, v in before.items() if k != "0002.wav"}
    assert np.array_equal(read_pcm16(out_dir / "0002.wav"), read_pcm16(tmp_path / "alone2.wav"))


def test_speak_lines_shares_steps_and_gives_each_texts_speech(tiny_ckpt):
    from minicpmo_cli import api
    from minicpmo_cli.api.speech import DecodeOptions, speak, speak_lines

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu", max_batch=4), vision=False, tts=True)
    decode = DecodeOptions(seed=9)
    got = dict(speak_lines(engine, LINES, decode=decode, max_frames=20))
    assert sorted(got) == list(range(len(LINES)))
    assert engine.frame_engine().stats.peak_rows >= 2  # the lines were decoded together
    for index, text in enumerate(LINES):
        alone = speak(engine, text, decode=decode, max_frames=20)
        assert np.array_equal(got[index].wav, alone.wav), index
        assert [p.samples for p in got[index].pieces] == [p.samples for p in alone.pieces]
        assert got[index].capped == alone.capped
    frames = engine.frame_engine()
    frames.stats.peak_rows = 0
    bounded = dict(speak_lines(engine, LINES, decode=decode, max_frames=20, in_flight=2))
    assert frames.stats.peak_rows <= 2  # never more than in_flight lines submitted at once
    assert all(np.array_equal(bounded[index].wav, got[index].wav) for index in got)


def test_cancel_aborts_the_row_and_frees_its_slot(tiny_ckpt):
    """speak(cancel=...) set as the speech starts (the progress call made right after the submit): the request
    is aborted at the TTS engine's next step, far before its 400-frame budget, and no slot stays taken."""
    import threading

    from minicpmo_cli import api
    from minicpmo_cli.api.speech import DecodeOptions, speak

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, tts=True)
    cancel = threading.Event()
    result = speak(engine, LINES[3], decode=DecodeOptions(seed=2), max_frames=400, cancel=cancel,
                   progress=lambda done, total: cancel.set())
    assert len(result.pieces) <= 1 and len(result.wav) < 400 * 512
    frames = engine.frame_engine()
    # aborted in the queue or in its slot (the engine's tests stop a row mid-decode): nothing holds a slot
    assert not frames.running and (frames.pool is None or frames.pool.free_slots == frames.pool.slots)
    again = speak(engine, LINES[0], decode=DecodeOptions(seed=2), max_frames=20)  # the engine goes on
    assert 0 < len(again.wav) <= 20 * 512
