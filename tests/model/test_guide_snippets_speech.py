"""The usage guide's speech snippets (mimick, configurable voices, instruction-to-speech, voice cloning, audio
understanding), its bfloat16 initialisation through a spoken answer, and omni variants, run as close to verbatim
as possible against this package on the tiny random checkpoint. The changes made to the guide's code are listed
in tests/model/conftest.py (which holds the shared setup).

The omni snippets themselves (normal generate with a reference voice; streaming with the default omni prompt)
are in test_session_guide.py; here: the default-prompt variant of normal generate, the inputs it builds, and the
streaming flow the guide actually runs (the system prompt *with* the reference voice).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import soundfile as sf
import torch

SMALL = 6  # max_new_tokens for every snippet (the guide uses 128..4096)
SPEECH_FRAMES = 25  # audio frames (46.875 per second) a spoken answer may take here (the package default: 2048)

AUDIO_TASK_PROMPTS = {  # the guide's "Available prompts" of the audio understanding section
    "asr_zh": "请仔细听这段音频片段，并将其内容逐字记录。",
    "asr_en": "Please listen to the audio snippet carefully and transcribe the content.",
    "speaker": "Based on the speaker's content, speculate on their gender, condition, age range, and health status.",
    "caption": "Summarize the main content of the audio.",
    "scene": "Utilize one keyword to convey the audio's content or the associated scene.",
}


@pytest.fixture
def short_speech(monkeypatch):
    """Keep non-streaming speech short: generate() offers no cap, and the reference schedule first runs one
    25-frame tts.generate call per 10-token text chunk (~30 chunks) before any frame cap applies, so a random
    TTS that never samples its EOS makes ~750 frames. Here: 1 frame per chunk call, then SPEECH_FRAMES."""
    from minicpmo_cli.generation import speech

    monkeypatch.setattr(speech, "OUTPUT_CHUNK_FRAMES", 1)
    monkeypatch.setattr(speech, "generate_speech", partial(speech.generate_speech, max_new_tokens=SPEECH_FRAMES))


# ---------------------------------------------------------------------------------------------- checks
def check_wav(path) -> np.ndarray:
    """A written answer: 24 kHz mono with samples, all finite."""
    info = sf.info(str(path))
    assert (info.samplerate, info.channels) == (24000, 1)
    assert info.frames > 0
    data, _ = sf.read(str(path), dtype="float32")
    assert np.isfinite(data).all()
    return data


def check_sys_prompt(sys_msg, ref_audio=None) -> None:
    assert isinstance(sys_msg, dict) and set(sys_msg) == {"role", "content"}
    assert sys_msg["role"] in ("system", "user")
    assert all(isinstance(c, (str, np.ndarray)) for c in sys_msg["content"])
    if ref_audio is not None:
        assert any(c is ref_audio for c in sys_msg["content"])


def load16k(path) -> np.ndarray:
    import librosa

    audio, _ = librosa.load(path, sr=16000, mono=True)
    return audio


# ---------------------------------------------------------------------------------------------- bfloat16
def test_bfloat16_initialization_then_speech(init_guide_model, tiny_ckpt, tmp_path, short_speech):
    """The guide's dtype=torch.bfloat16 on CPU, with its `model.tts.float()` note, through a spoken answer."""
    model, processor = init_guide_model(tiny_ckpt, torch.bfloat16)
    model.tts.float()
    assert model.llm.dtype == torch.bfloat16
    msgs = [{'role': 'user', 'content': ['Speak like a male charming superstar.']}]
    # use_tts_template at the processor: the guide's place for it does not work (see test_instruction_to_speech)
    inputs = processor.apply_chat_template(msgs=msgs, use_tts_template=True).to(model.device)
    res = model.generate(**inputs, processor=processor, sampling=True, max_new_tokens=SMALL,
                         use_tts_template=True, generate_audio=True, temperature=0.3,
                         output_audio_path=str(tmp_path / 'bf16.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'bf16.wav')


# ---------------------------------------------------------------------------------------------- omni
def test_omni_normal_generate_default_prompt(guide, assets, tmp_path, check_inputs, get_video_chunk_content):
    """The guide's "# or use default prompt" variant; checks the inputs the omni snippet builds."""
    model, processor = guide
    video_path = assets.video("Skiing.mp4", seconds=2, with_sound=True)
    sys_msg = model.get_sys_prompt(mode='omni', language='en')
    check_sys_prompt(sys_msg)
    contents = get_video_chunk_content(video_path)
    assert len(contents) == 3 * math.ceil(2.0)
    msg = {"role": "user", "content": contents}
    msgs = [sys_msg, msg]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, n_images=2, has_audio=True, tts=True)  # audio input switches the TTS template on

    res = model.generate(**inputs, processor=processor, sampling=True, temperature=0.5, max_new_tokens=SMALL,
                         use_tts_template=True, generate_audio=False, output_audio_path=None,
                         repetition_penalty=1.2)
    assert isinstance(res, str)


@pytest.mark.parametrize("use_tts", [True, False])
def test_omni_streaming_with_reference_voice(guide, assets, tmp_path, run_omni_streaming_snippet, use_tts):
    """The streaming snippet as the guide chains it: sys_msg is the one built with ref_audio."""
    model, processor = guide
    video_path = assets.video("Skiing.mp4", seconds=2, with_sound=True)
    ref_audio = load16k(assets.speech("demo.wav", "hello world"))
    sys_msg = processor.get_sys_prompt(ref_audio=ref_audio, mode='omni', language='en')
    check_sys_prompt(sys_msg, ref_audio)

    text, pieces, res, _ = run_omni_streaming_snippet(model, processor, sys_msg, video_path, use_tts, SMALL,
                                                      tmp_path / "output.wav")
    assert all(isinstance(txt, str) for txt in pieces)
    if use_tts:
        assert res.dtype == np.float32 and len(res) > 0
        assert len(check_wav(tmp_path / "output.wav")) == len(res)
    assert isinstance(text, str)


# ---------------------------------------------------------------------------------------------- speech tasks
def _speech_generate(model, processor, inputs, output_audio_path):
    """The generate call shared by the guide's speech snippets (mimick ... audio understanding)."""
    return model.generate(
        **inputs,
        processor=processor,
        sampling=True,
        max_new_tokens=SMALL,
        use_tts_template=True,
        generate_audio=True,
        temperature=0.3,
        output_audio_path=output_audio_path,
    )


def test_mimick(guide, assets, tmp_path, short_speech, check_inputs):
    model, processor = guide
    mimick_prompt = "Please repeat each user's speech, including voice style and speech content."
    audio_input = load16k(assets.speech('assets/input_examples/Trump_WEF_2018_10s.mp3', "the quick brown fox"))
    msgs = [{'role': 'user', 'content': [mimick_prompt, audio_input]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, has_audio=True, tts=True)
    res = _speech_generate(model, processor, inputs, str(tmp_path / 'output_mimick.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'output_mimick.wav')


@pytest.mark.parametrize("mode,voice_file", [("audio_roleplay", "icl_20.wav"),
                                             ("audio_assistant", "assistant_female_voice.wav")])
def test_configurable_voice_conversation(guide, assets, tmp_path, short_speech, check_inputs, mode, voice_file):
    """The roleplay and AI-assistant snippets (they differ only in the voice file and the mode)."""
    model, processor = guide
    ref_audio = load16k(assets.speech(f'assets/input_examples/{voice_file}', "I am the voice to copy"))
    sys_prompt = processor.get_sys_prompt(ref_audio=ref_audio, mode=mode, language='en')
    check_sys_prompt(sys_prompt, ref_audio)
    user_audio = load16k(assets.speech('user_question.wav', "what is the capital of France"))
    user_question = {'role': 'user', 'content': [user_audio]}
    msgs = [sys_prompt, user_question]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, has_audio=True, tts=True)
    res = _speech_generate(model, processor, inputs, str(tmp_path / f'result_{mode}.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / f'result_{mode}.wav')


def test_instruction_to_speech(guide, tmp_path, short_speech, check_inputs):
    model, processor = guide
    instruction = 'Speak like a male charming superstar, radiating confidence and style in every word.'
    msgs = [{'role': 'user', 'content': [instruction]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    # No audio in the prompt and no use_tts_template at the processor: the guide's inputs have no <|spk|>.
    check_inputs(inputs, has_audio=False, tts=False)
    res = _speech_generate(model, processor, inputs, str(tmp_path / 'result_voice_creation.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'result_voice_creation.wav')


def test_instruction_to_speech_with_tts_template_at_the_processor(guide, tmp_path, short_speech,
                                                                  check_inputs):
    """The working variant of the snippet above: use_tts_template=True moved to apply_chat_template."""
    model, processor = guide
    instruction = 'Speak like a male charming superstar, radiating confidence and style in every word.'
    msgs = [{'role': 'user', 'content': [instruction]}]
    inputs = processor.apply_chat_template(msgs=msgs, use_tts_template=True).to(model.device)
    check_inputs(inputs, has_audio=False, tts=True)
    res = _speech_generate(model, processor, inputs, str(tmp_path / 'result_voice_creation.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'result_voice_creation.wav')


def test_voice_cloning(guide, assets, tmp_path, short_speech, check_inputs):
    model, processor = guide
    ref_audio = load16k(assets.speech('assets/input_examples/icl_20.wav', "I am the voice to copy"))
    sys_prompt = processor.get_sys_prompt(ref_audio=ref_audio, mode='voice_cloning', language='en')
    check_sys_prompt(sys_prompt, ref_audio)
    text_prompt = "Please read the text below."
    user_question = {'role': 'user', 'content': [text_prompt, "content that you want to read"]}
    msgs = [sys_prompt, user_question]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, has_audio=True, tts=True)
    res = _speech_generate(model, processor, inputs, str(tmp_path / 'result_voice_cloning.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'result_voice_cloning.wav')


@pytest.mark.parametrize("task", sorted(AUDIO_TASK_PROMPTS))
def test_audio_understanding(guide, assets, tmp_path, short_speech, check_inputs, task):
    model, processor = guide
    task_prompt = AUDIO_TASK_PROMPTS[task] + "\n"  # the guide's example appends "\n"
    audio_input = load16k(assets.speech('assets/input_examples/audio_understanding.mp3', "a dog barks twice"))
    msgs = [{'role': 'user', 'content': [task_prompt, audio_input]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, has_audio=True, tts=True)
    res = _speech_generate(model, processor, inputs, str(tmp_path / 'result_audio_understanding.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'result_audio_understanding.wav')
