"""The asr library (minicpmo_cli.api.asr): prompts, the guide's message, batching and long audio."""

from __future__ import annotations

import numpy as np
import pytest

GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from minicpmo_cli.api.engine import LoadOptions, load

    return load(LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, audio=True, tts=False)


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def test_task_prompts_are_the_guides():
    from minicpmo_cli.api.asr import task_prompt

    assert task_prompt() == "Please listen to the audio snippet carefully and transcribe the content.\n"
    assert task_prompt(language="en") == task_prompt(language="auto")
    assert task_prompt(language="zh") == "请仔细听这段音频片段，并将其内容逐字记录。\n"
    assert task_prompt("caption") == "Summarize the main content of the audio.\n"
    assert task_prompt("scene", "zh").startswith("Utilize one keyword")
    assert task_prompt("speaker").startswith("Based on the speaker's content")
    assert task_prompt(custom="List the speakers.") == "List the speakers.\n"


def test_bad_task_and_language_are_usage_errors():
    from minicpmo_cli.api.asr import task_prompt
    from minicpmo_cli.errors import UsageError

    with pytest.raises(UsageError, match="--task"):
        task_prompt("summarise")
    with pytest.raises(UsageError, match="--language"):
        task_prompt(language="fr")


def test_message_and_answer_match_golden_case_c(golden_ckpt, golden_case):
    """The guide's ASR message gives the reference's input ids (TTS template on) and its greedy answer."""
    import soundfile

    from minicpmo_cli.api.asr import AsrOptions, generate_batch
    from minicpmo_cli.api.engine import DecodeOptions, LoadOptions, load
    from tests.conftest import GOLDEN_CASES

    meta, _ = golden_case("c_asr")
    audio, rate = soundfile.read(GOLDEN_CASES / "c_audio.wav", dtype="float32")
    assert rate == 16000
    engine = load(LoadOptions(model=str(golden_ckpt), device="cpu"), vision=False, audio=True, tts=False)
    instruction = AsrOptions().instruction
    assert instruction == meta["messages"][0]["content"][0]["text"]
    inputs = engine.processor.apply_chat_template(msgs=[[{"role": "user", "content": [instruction, audio]}]],
                                                  use_tts_template=True)
    assert inputs["input_ids"][0].tolist() == meta["inputs"]["input_ids"]
    [piece] = generate_batch(engine, [audio], instruction, DecodeOptions(max_new_tokens=16))  # greedy default
    assert piece.text == meta["decoding"]["greedy"]["chat_return_text"].strip()
    assert piece.truncated  # 16 tokens without an end token


def test_batched_embeddings_equal_single_ones(engine):
    """In a padded batch each clip's audio rows are exactly its single-clip rows (lengths off the 1 s grid)."""
    import torch

    from minicpmo_cli.api.asr import embed_prompts, task_prompt

    clips = [noise(3.05, 0), noise(7.3, 1), noise(2.0, 2)]
    msgs = [[{"role": "user", "content": [task_prompt(), clip]}] for clip in clips]
    batch = engine.processor.apply_chat_template(msgs=msgs, use_tts_template=True)
    batched = embed_prompts(engine.model, batch)
    for index, sample in enumerate(msgs):
        single = engine.processor.apply_chat_template(msgs=sample, use_tts_template=True)
        with torch.inference_mode():
            reference, _ = engine.model.get_inputs_embeds(dict(single))
        length = reference.shape[1]
        assert torch.equal(batched[index, -length:], reference[0])


def test_batched_transcripts_equal_one_by_one(engine):
    from minicpmo_cli.api.asr import AsrOptions, AudioInput, transcribe_many
    from minicpmo_cli.api.engine import DecodeOptions

    clips = [noise(s, seed) for seed, s in enumerate((3.05, 41.3, 1.5, 6.66, 12.2))]
    inputs = [AudioInput(f"clip{i}", clip) for i, clip in enumerate(clips)]
    decode = DecodeOptions(max_new_tokens=5, **GREEDY)
    # Noise holds no speech for the VAD: --no-vad sends it all, in fixed pieces.
    one_by_one = list(transcribe_many(engine, inputs, AsrOptions(batch_size=1, vad=False), decode))
    batched = list(transcribe_many(engine, inputs, AsrOptions(batch_size=4, vad=False), decode))
    assert [r.to_dict() for r in batched] == [r.to_dict() for r in one_by_one]
    assert [r.path for r in batched] == [f"clip{i}" for i in range(5)]
    assert len(batched[1].segments) == 2  # 41.3 s: two pieces of at most 30 s


def test_long_audio_without_vad_is_split_into_timed_pieces(engine):
    from minicpmo_cli.api.asr import AsrOptions, join_pieces, transcribe
    from minicpmo_cli.api.engine import DecodeOptions

    audio = np.concatenate([noise(27, 1), np.zeros(8000, np.float32), noise(27, 2), np.zeros(8000, np.float32),
                            noise(10, 3)])
    record = transcribe(engine, audio, AsrOptions(vad=False), DecodeOptions(max_new_tokens=3), path="long")
    assert record.duration == pytest.approx(len(audio) / 16000, abs=1e-3)
    segments = record.segments
    assert len(segments) == 3
    assert segments[0].start == 0.0 and segments[-1].end == record.duration
    for before, after in zip(segments, segments[1:]):
        assert before.end == after.start
    assert all(0 < s.end - s.start <= 30.0 for s in segments)
    # The cuts fall in the silences (27.0-27.5 s and 54.5-55.0 s), the quietest places.
    assert 27.0 <= segments[0].end <= 27.5 and 54.5 <= segments[1].end <= 55.0
    assert record.text == join_pieces(s.text for s in segments)


def test_bad_input_is_a_record_and_the_rest_go_on(engine, tmp_path):
    from minicpmo_cli.api.asr import AsrOptions, AudioInput, transcribe, transcribe_many
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.errors import InputError

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    inputs = [AudioInput.from_path(empty), AudioInput("good", noise(2.0, 5)), AudioInput.from_path(tmp_path / "x")]
    records = list(transcribe_many(engine, inputs, AsrOptions(batch_size=2, vad=False),
                                   DecodeOptions(max_new_tokens=2)))
    assert [r.error is None for r in records] == [False, True, False]
    assert records[0].error == "file is empty (0 bytes)" and records[2].error == "file not found"
    assert records[1].segments and records[1].duration == 2.0
    with pytest.raises(InputError, match="empty"):
        transcribe(engine, str(empty))


def test_join_and_language_guess():
    from minicpmo_cli.api.asr import detect_language, join_pieces

    assert join_pieces([" hello", "", "world "]) == "hello world"
    assert join_pieces(["你好", "世界", "ok"]) == "你好世界 ok"
    assert detect_language("你好 world") == "zh"
    assert detect_language("hello") == "en"
    assert detect_language("  ") is None


def test_decoding_defaults_greedy_or_the_guides_sampling(engine, monkeypatch):
    """Greedy without repetition penalty by default; --sampling gives the guide's ASR call (temperature 0.3)."""
    from minicpmo_cli.api.asr import generate_batch, task_prompt
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.generation import text

    seen = []
    real = text.run_llm_generate

    def spy(model, embeds, mask, tokenizer, settings, **kwargs):
        seen.append((settings.max_new_tokens, settings))  # the resolved DecodeSettings (generation/presets.py)
        return real(model, embeds, mask, tokenizer, settings.with_(max_new_tokens=2), **kwargs)

    monkeypatch.setattr(text, "run_llm_generate", spy)
    clip = noise(1.0, 9)
    generate_batch(engine, [clip], task_prompt(), DecodeOptions())
    generate_batch(engine, [clip], task_prompt(), DecodeOptions(sampling=True))
    generate_batch(engine, [clip], task_prompt(), DecodeOptions(num_beams=3, max_new_tokens=7))
    def chosen(settings):
        names = ("sampling", "num_beams", "repetition_penalty") + (("top_p", "top_k", "temperature")
                                                                   if settings.sampling else ())
        return {name: getattr(settings, name) for name in names}

    assert [max_new for max_new, _ in seen] == [512, 512, 7]
    assert chosen(seen[0][1]) == {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}
    assert chosen(seen[1][1]) == {"sampling": True, "num_beams": 1, "top_p": 0.8, "top_k": 100,
                                  "temperature": 0.3, "repetition_penalty": 1.05}
    assert chosen(seen[2][1]) == {"sampling": False, "num_beams": 3, "repetition_penalty": 1.0}


def test_default_batch_size_from_free_memory():
    from minicpmo_cli.api.asr import MAX_AUTO_BATCH_SIZE, PIECE_BYTES, default_batch_size

    assert default_batch_size("cpu", None) == 4
    assert default_batch_size("cpu", 10**12) == 4  # the CPU never asks for memory
    assert default_batch_size("cuda", 0) == 1
    assert default_batch_size("cuda", 10 * PIECE_BYTES) == 8  # 80 % of the free memory
    assert default_batch_size("cuda", 120 * 2**30) == MAX_AUTO_BATCH_SIZE  # an H200 with the model loaded
    assert default_batch_size("cuda", 16 * 2**30) == 51  # a 40 GB card with the model loaded


def test_identical_length_groups():
    import torch

    from minicpmo_cli.model.audio import identical_length_groups

    lens = [torch.tensor([300]), [], torch.tensor([250]), torch.tensor([300]), torch.tensor([3000, 250]),
            torch.tensor([3000, 250]), torch.tensor([250])]
    assert identical_length_groups(lens) == [([0, 3], [0, 2], 300), ([2, 6], [1, 7], 250),
                                             ([4, 5], [3, 4, 5, 6], 3000)]
    assert identical_length_groups([]) == []


def test_pieces_of_any_lengths_share_one_whisper_pass(engine, monkeypatch):
    """Clips of different lengths share the per-position work of one Whisper pass (one MLP call over all the
    one-window clips) and get exactly their single-clip embeddings; a clip over 30 s (two windows) is encoded
    with its windows together, as alone."""
    import torch

    from minicpmo_cli.api.asr import embed_prompts, task_prompt

    clips = [noise(2.5, 0), noise(3.05, 1), noise(2.5, 2), noise(31.0, 5), noise(7.3, 3), noise(0.07, 4)]
    msgs = [[{"role": "user", "content": [task_prompt(), clip]}] for clip in clips]
    batch = engine.processor.apply_chat_template(msgs=msgs, use_tts_template=True)
    rows = []
    fc1 = engine.model.apm.layers[0].fc1
    real = fc1.forward

    def spy(hidden):
        rows.append(hidden.shape[0])
        return real(hidden)

    monkeypatch.setattr(fc1, "forward", spy)
    batched = embed_prompts(engine.model, batch)
    assert rows == [5, 2]  # the five one-window clips together, then the two windows of the 31 s clip
    monkeypatch.undo()
    for index, sample in enumerate(msgs):
        single = engine.processor.apply_chat_template(msgs=sample, use_tts_template=True)
        with torch.inference_mode():
            reference, _ = engine.model.get_inputs_embeds(dict(single))
        assert torch.equal(batched[index, -reference.shape[1]:], reference[0])


def test_pieces_are_sorted_by_length_and_audio_decoded_ahead_in_threads(engine, monkeypatch):
    import threading

    from minicpmo_cli.api import asr, asr_model_calls
    from minicpmo_cli.api.engine import DecodeOptions

    decoded_in, batches = [], []
    real_start, real_generate = asr._start_job, asr_model_calls.start_batch

    def start(item, options):
        decoded_in.append(threading.current_thread().name)
        return real_start(item, options)

    def generate(model, clips, instructions):
        batches.append([len(c) for c in clips])
        return real_generate(model, clips, instructions)

    monkeypatch.setattr(asr, "_start_job", start)
    monkeypatch.setattr(asr_model_calls, "start_batch", generate)
    seconds = (3.0, 1.0, 2.0, 1.5, 2.5)
    inputs = [asr.AudioInput(f"clip{i}", noise(s, i)) for i, s in enumerate(seconds)]
    # noise: the VAD would send nothing; a given language: no per-input language probe
    options = asr.AsrOptions(batch_size=2, vad=False, language="en")
    records = list(asr.transcribe_many(engine, inputs, options, DecodeOptions(max_new_tokens=2)))
    assert [r.path for r in records] == [f"clip{i}" for i in range(5)]  # input order
    assert batches == [[16000, 24000], [32000, 40000], [48000]]  # shortest first, two at a time
    assert all(name.startswith("minicpmo-audio") for name in decoded_in)


def test_noise_sends_nothing_to_the_model(monkeypatch):
    """With the VAD, noise and silence give an empty record and the model is never even loaded."""
    from minicpmo_cli.api import asr as asr_api
    from minicpmo_cli.api import asr_model_calls

    def no_model():
        raise AssertionError("the model was loaded for audio without speech")

    monkeypatch.setattr(asr_model_calls, "start_batch", lambda *a, **k: pytest.fail("a piece was sent to the model"))
    inputs = [asr_api.AudioInput("noise", noise(12.0, 4)), asr_api.AudioInput("silence", np.zeros(16000 * 5))]
    records = list(asr_api.transcribe_many(no_model, inputs, asr_api.AsrOptions(batch_size=2)))
    assert [(r.text, r.segments, r.error) for r in records] == [("", [], None), ("", [], None)]
    assert [r.duration for r in records] == [12.0, 5.0]


def test_segmentation_options_are_checked():
    from minicpmo_cli.api.asr import AsrOptions
    from minicpmo_cli.errors import UsageError

    for bad, match in [({"vad_threshold": 1.0}, "--vad-threshold"), ({"vad_threshold": 0}, "--vad-threshold"),
                       ({"min_silence_ms": -5}, "--min-silence-ms"), ({"batch_size": 0}, "--batch-size")]:
        with pytest.raises(UsageError, match=match):
            AsrOptions(**bad).validate()


def fake_model(monkeypatch, answer: str) -> list[tuple[str, int]]:
    """The model calls replaced by one answering ``answer`` to everything; returns the (prompt, clip length) sent."""
    from minicpmo_cli.api import asr_model_calls as calls

    sent: list[tuple[str, int]] = []

    def fake(model, clips, instructions):
        sent.extend((text, len(clip)) for text, clip in zip(instructions, clips))
        return [calls.Pending(answer=calls.PieceText(answer)) for _ in clips]

    monkeypatch.setattr(calls, "start_batch", fake)
    return sent


@pytest.mark.parametrize("answer, language", [("hello there", "en"), ("你好，世界", "zh")])
def test_auto_language_decides_the_prompt_per_input(monkeypatch, answer, language):
    """The first piece goes out with the English prompt; the script of its answer picks every piece's prompt."""
    from minicpmo_cli.api.asr import AsrOptions, AudioInput, task_prompt, transcribe_many

    sent = fake_model(monkeypatch, answer)
    audio = noise(41.3, 1)  # --no-vad: two fixed pieces
    [record] = transcribe_many(lambda: object(), [AudioInput("x", audio)], AsrOptions(vad=False, batch_size=2))
    assert record.language == language
    english, chosen = task_prompt("transcribe", "en"), task_prompt("transcribe", language)
    if language == "en":  # the probe is the first piece's transcript: two pieces, two model answers
        assert [p for p, _ in sent] == [english, english]
    else:  # the probe, then both pieces again with the Chinese prompt
        assert [p for p, _ in sent] == [english, chosen, chosen]
    assert sum(n for _, n in sent[-2:]) == len(audio)
    assert record.text == (answer + " " + answer if language == "en" else answer + answer)


def test_given_language_is_recorded_and_not_probed(monkeypatch):
    from minicpmo_cli.api.asr import AsrOptions, AudioInput, task_prompt, transcribe_many

    sent = fake_model(monkeypatch, "hello")
    [record] = transcribe_many(lambda: object(), [AudioInput("x", noise(3.0, 2))], AsrOptions(language="zh",
                                                                                              vad=False))
    assert record.language == "zh" and [p for p, _ in sent] == [task_prompt("transcribe", "zh")]


@pytest.mark.parametrize("language, answer, expected", [
    ("zh", "Hello world", ["TRANSLATE"]),
    ("en", "Hello world", ["ASR_EN"]),  # English speech: its transcript is its English translation
    ("auto", "你好", ["ASR_EN", "TRANSLATE"]),  # probe (Chinese), then the translation
    ("auto", "hello", ["ASR_EN"]),  # probe (English) is the answer
])
def test_translate_prompts(monkeypatch, language, answer, expected):
    from minicpmo_cli.api.asr import TRANSLATE_PROMPT, AsrOptions, AudioInput, task_prompt, transcribe_many

    names = {"TRANSLATE": TRANSLATE_PROMPT + "\n", "ASR_EN": task_prompt("transcribe", "en")}
    sent = fake_model(monkeypatch, answer)
    options = AsrOptions(task="translate", language=language, vad=False)
    [record] = transcribe_many(lambda: object(), [AudioInput("x", noise(3.0, 2))], options)
    assert [p for p, _ in sent] == [names[e] for e in expected]
    assert record.language == (language if language != "auto" else ("zh" if answer == "你好" else "en"))
    assert task_prompt("translate", "zh") == TRANSLATE_PROMPT + "\n"


def test_unsupported_language_is_one_clear_usage_error():
    from minicpmo_cli.api.asr import AsrOptions
    from minicpmo_cli.errors import UsageError

    with pytest.raises(UsageError, match="'fr' is not supported: the model transcribes en") as info:
        AsrOptions(language="fr").validate()
    assert "\n" not in str(info.value)
