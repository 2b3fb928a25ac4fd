"""Every snippet of the MiniCPM-o 2.6 usage guide (../shared/seeds/minicpm-o-2.6-usage-guide.md), run as close to
verbatim as possible against this package on the tiny random checkpoint (conftest ``tiny_ckpt``).

Changes to the guide's code, and only these:
- ``import minicpmo_cli`` before the transformers imports (and ``AutoProcessor`` imported: the guide's
  initialisation snippet uses it without importing it);
- the hub id -> the tiny checkpoint folder; no ``.cuda()``; ``dtype=torch.float32`` (one test tries bfloat16);
- file paths -> media made here (espeak-ng speech, PIL images, ffmpeg mp4s); tests skip when a tool is absent;
- ``max_new_tokens`` small, and speech capped at SPEECH_FRAMES audio frames (a random TTS rarely stops by itself;
  the streaming call passes ``tts_max_new_tokens``, the others go through the ``short_speech`` fixture);
- decord / moviepy loaders -> ``minicpmo_cli.media.video`` (``sample_frames``, ``video_units``).

The omni snippets themselves (normal generate with a reference voice; streaming with the default omni prompt)
are in test_session_guide.py; here: the default-prompt variant of normal generate, the inputs it builds, and the
streaming flow the guide actually runs (the system prompt *with* the reference voice).
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageDraw

# API.md: the BatchFeature of processor.apply_chat_template carries these keys.
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "tgt_sizes", "image_bound", "audio_features",
              "audio_feature_lens", "audio_bounds", "spk_bounds")
SMALL = 6  # max_new_tokens for every snippet (the guide uses 128..4096)
SPEECH_FRAMES = 25  # audio frames (46.875 per second) a spoken answer may take here (the package default: 2048)
GREEDY = {"top_k": 1, "repetition_penalty": 1.0}  # sampling=True made deterministic: same ids on any path

AUDIO_TASK_PROMPTS = {  # the guide's "Available prompts" of the audio understanding section
    "asr_zh": "请仔细听这段音频片段，并将其内容逐字记录。",
    "asr_en": "Please listen to the audio snippet carefully and transcribe the content.",
    "speaker": "Based on the speaker's content, speculate on their gender, condition, age range, and health status.",
    "caption": "Summarize the main content of the audio.",
    "scene": "Utilize one keyword to convey the audio's content or the associated scene.",
}


# ---------------------------------------------------------------------------------------------- fixtures
def _init_snippet(folder: Path, dtype: torch.dtype):
    """The guide's "Model initialization" snippet (imports changed, CPU, the given dtype)."""
    # The added import. Plain `import minicpmo_cli` is what the promise names, but in this process the
    # tiny_ckpt fixture already imported package modules (and transformers through them), which leaves the
    # Auto classes unregistered (bug: see test_import_registers_after_package_modules_loaded_transformers);
    # touching a lazy attribute registers them.
    from minicpmo_cli import MiniCPMO  # noqa: F401
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(
        str(folder),
        attn_implementation='sdpa',  # sdpa or flash_attention_2, no eager
        dtype=dtype,
    )
    model = model.eval()
    model.init_tts()

    processor = AutoProcessor.from_pretrained(str(folder))
    return model, processor


@pytest.fixture(scope="module")
def guide(tiny_ckpt):
    return _init_snippet(tiny_ckpt, torch.float32)


@pytest.fixture
def short_speech(monkeypatch):
    """Keep non-streaming speech short: generate() offers no cap, and the reference schedule first runs one
    25-frame tts.generate call per 10-token text chunk (~30 chunks) before any frame cap applies, so a random
    TTS that never samples its EOS makes ~750 frames. Here: 1 frame per chunk call, then SPEECH_FRAMES."""
    from minicpmo_cli.generation import speech

    monkeypatch.setattr(speech, "OUTPUT_CHUNK_FRAMES", 1)
    monkeypatch.setattr(speech, "generate_speech", partial(speech.generate_speech, max_new_tokens=SPEECH_FRAMES))


class Assets:
    """The guide's input files, made on first use in a temporary folder (skips when a tool is missing)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "assets" / "input_examples").mkdir(parents=True)

    def speech(self, name: str, text: str) -> str:
        path = self.folder / name
        if not path.exists():
            _need("espeak-ng")
            wav = path.with_suffix(".espeak.wav")
            subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
            if path.suffix == ".wav":
                wav.rename(path)
            else:  # e.g. the guide's .mp3 inputs
                _need("ffmpeg")
                subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(path)], check=True)
        return str(path)

    def image(self, name: str, size=(200, 150), seed: int = 0) -> str:
        path = self.folder / name
        if not path.exists():
            rng = np.random.default_rng(seed)
            image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
            ImageDraw.Draw(image).text((10, 10), f"2023.08.0{seed}", fill=(255, 255, 255))
            image.save(path)
        return str(path)

    def video(self, name: str, seconds: int, with_sound: bool, size="96x64") -> str:
        path = self.folder / name
        if not path.exists():
            _need("ffmpeg")
            command = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}:rate=5"]
            if with_sound:
                command += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000", "-c:a", "aac"]
            command += ["-t", str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
            subprocess.run(command, check=True)
        return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return Assets(tmp_path_factory.mktemp("guide_assets"))


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


# ---------------------------------------------------------------------------------------------- checks
def check_wav(path) -> np.ndarray:
    """A written answer: 24 kHz mono with samples, all finite."""
    info = sf.info(str(path))
    assert (info.samplerate, info.channels) == (24000, 1)
    assert info.frames > 0
    data, _ = sf.read(str(path), dtype="float32")
    assert np.isfinite(data).all()
    return data


def check_inputs(inputs, n_images: int = 0, has_audio: bool = False, tts: bool = False) -> None:
    """The processor's BatchFeature: API.md's keys, one sample, bounds that match the media given."""
    for key in INPUT_KEYS:
        assert key in inputs, key
    assert inputs["input_ids"].ndim == 2 and inputs["input_ids"].shape[0] == 1
    assert inputs["attention_mask"].shape == inputs["input_ids"].shape
    assert len(inputs["pixel_values"]) == 1 and len(inputs["pixel_values"][0]) >= n_images
    assert len(inputs["image_bound"][0]) == len(inputs["pixel_values"][0])  # one bound per slice/source image
    assert len(inputs["tgt_sizes"][0]) == len(inputs["pixel_values"][0])
    assert (len(inputs["audio_bounds"][0]) > 0) == has_audio
    assert (len(inputs["audio_feature_lens"][0]) > 0) == has_audio
    if has_audio:
        assert inputs["audio_features"].ndim == 3 and inputs["audio_features"].shape[1] == 80
    assert len(inputs["spk_bounds"][0]) == (1 if tts else 0)  # the TTS template's <|spk|>


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


# ---------------------------------------------------------------------------------------------- initialisation
def test_model_initialization(guide, tiny_ckpt):
    from transformers import AutoTokenizer

    from minicpmo_cli import MiniCPMO, MiniCPMOProcessor

    model, processor = guide
    assert isinstance(model, MiniCPMO) and isinstance(processor, MiniCPMOProcessor)
    assert not model.training and model.llm.dtype == torch.float32
    assert model.vocos is not None and model.tts_processor is not None  # init_tts loaded the assets
    model.tts.float()  # the guide's fix for old torch: must be harmless here
    assert next(model.tts.parameters()).dtype == torch.float32
    # API.md: AutoTokenizer on the official files must not ask for remote code either.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    assert type(tokenizer).__name__ == "MiniCPMOTokenizerFast"


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter (stdin closed, so a remote-code prompt fails at once, not after 15 s)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def test_initialization_snippet_in_a_fresh_process(tiny_ckpt):
    """The promise exactly: `import minicpmo_cli` added before the transformers imports, nothing else."""
    result = _run_fresh(f"""
        import minicpmo_cli
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoTokenizer, AutoProcessor

        model = AutoModel.from_pretrained(
            {str(tiny_ckpt)!r},
            attn_implementation='sdpa', # sdpa or flash_attention_2, no eager
            dtype=torch.float32
        )
        model = model.eval()
        model.init_tts()

        processor = AutoProcessor.from_pretrained({str(tiny_ckpt)!r})
        model.tts.float()
        print(type(model).__name__, type(processor).__name__, type(processor.tokenizer).__name__)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["MiniCPMO", "MiniCPMOProcessor", "MiniCPMOTokenizerFast"]


def test_import_registers_after_package_modules_loaded_transformers(tiny_ckpt):
    result = _run_fresh(f"""
        import minicpmo_cli
        import minicpmo_cli.model.config  # any package module that imports transformers first
        from transformers import AutoConfig
        print(type(AutoConfig.from_pretrained({str(tiny_ckpt)!r})).__name__)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "MiniCPMOConfig"


def test_bfloat16_initialization_then_speech(tiny_ckpt, tmp_path, short_speech):
    """The guide's dtype=torch.bfloat16 on CPU, with its `model.tts.float()` note, through a spoken answer."""
    model, processor = _init_snippet(tiny_ckpt, torch.bfloat16)
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
def get_video_chunk_content(video_path, flatten=True):
    """The guide's helper, with moviepy replaced by media.video.video_units (1 frame + 1 s of audio)."""
    from minicpmo_cli.media.video import video_units

    contents = []
    for image, audio in video_units(video_path):
        if flatten:
            contents.extend(["<unit>", image, audio])
        else:
            contents.append(["<unit>", image, audio])
    return contents


def test_omni_normal_generate_default_prompt(guide, assets, tmp_path):
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
def test_omni_streaming_with_reference_voice(guide, assets, tmp_path, use_tts):
    """The streaming snippet as the guide chains it: sys_msg is the one built with ref_audio."""
    model, processor = guide
    video_path = assets.video("Skiing.mp4", seconds=2, with_sound=True)
    ref_audio = load16k(assets.speech("demo.wav", "hello world"))
    sys_msg = processor.get_sys_prompt(ref_audio=ref_audio, mode='omni', language='en')
    check_sys_prompt(sys_msg, ref_audio)

    model.reset_session()
    contents = get_video_chunk_content(video_path, flatten=False)
    session_id = '123'
    res = model.streaming_prefill(session_id=session_id, msgs=[sys_msg], processor=processor)
    for content in contents:
        msgs = [{"role": "user", "content": content}]
        res = model.streaming_prefill(session_id=session_id, msgs=msgs, processor=processor)
    res = model.streaming_generate(session_id=session_id, processor=processor, use_tts=use_tts,
                                   tts_output_chunk_size=25, max_new_tokens=SMALL, tts_max_new_tokens=25)
    audios = []
    text = ""
    if use_tts:
        for r in res:
            audio_wav = r.audio_wav
            sampling_rate = r.sampling_rate
            txt = r.text
            assert isinstance(txt, str)
            audios.append(audio_wav)
            text += txt
        res = np.concatenate(audios)
        sf.write(tmp_path / "output.wav", res, samplerate=sampling_rate)
        assert res.dtype == np.float32 and len(res) > 0
        assert len(check_wav(tmp_path / "output.wav")) == len(res)
    else:
        for r in res:
            assert isinstance(r['text'], str)
            text += r['text']
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


def test_mimick(guide, assets, tmp_path, short_speech):
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
def test_configurable_voice_conversation(guide, assets, tmp_path, short_speech, mode, voice_file):
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


def test_instruction_to_speech(guide, tmp_path, short_speech):
    model, processor = guide
    instruction = 'Speak like a male charming superstar, radiating confidence and style in every word.'
    msgs = [{'role': 'user', 'content': [instruction]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    # No audio in the prompt and no use_tts_template at the processor: the guide's inputs have no <|spk|>.
    check_inputs(inputs, has_audio=False, tts=False)
    res = _speech_generate(model, processor, inputs, str(tmp_path / 'result_voice_creation.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'result_voice_creation.wav')


def test_instruction_to_speech_with_tts_template_at_the_processor(guide, tmp_path, short_speech):
    """The working variant of the snippet above: use_tts_template=True moved to apply_chat_template."""
    model, processor = guide
    instruction = 'Speak like a male charming superstar, radiating confidence and style in every word.'
    msgs = [{'role': 'user', 'content': [instruction]}]
    inputs = processor.apply_chat_template(msgs=msgs, use_tts_template=True).to(model.device)
    check_inputs(inputs, has_audio=False, tts=True)
    res = _speech_generate(model, processor, inputs, str(tmp_path / 'result_voice_creation.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'result_voice_creation.wav')


def test_voice_cloning(guide, assets, tmp_path, short_speech):
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
def test_audio_understanding(guide, assets, tmp_path, short_speech, task):
    model, processor = guide
    task_prompt = AUDIO_TASK_PROMPTS[task] + "\n"  # the guide's example appends "\n"
    audio_input = load16k(assets.speech('assets/input_examples/audio_understanding.mp3', "a dog barks twice"))
    msgs = [{'role': 'user', 'content': [task_prompt, audio_input]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, has_audio=True, tts=True)
    res = _speech_generate(model, processor, inputs, str(tmp_path / 'result_audio_understanding.wav'))
    assert isinstance(res, str)
    check_wav(tmp_path / 'result_audio_understanding.wav')


# ---------------------------------------------------------------------------------------------- vision only
def _vision_generate(model, processor, inputs, **kwargs):
    return model.generate(**inputs, processor=processor, sampling=True, max_new_tokens=SMALL, **kwargs)


def test_single_image_normal_and_stream(guide, assets):
    model, processor = guide
    image = Image.open(assets.image('xx.jpg')).convert('RGB')
    question = 'What is in the image?'
    msgs = [{'role': 'user', 'content': [image, question]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, n_images=1)

    res = _vision_generate(model, processor, inputs)
    assert isinstance(res, str)

    ## for streaming generation
    res = _vision_generate(model, processor, inputs, stream=True)
    generated_text = ""
    for new_text in res:
        assert isinstance(new_text, str)
        generated_text += new_text

    # Deterministic decoding (top_k 1): the stream's pieces add up to the one-shot answer.
    one_shot = _vision_generate(model, processor, inputs, **GREEDY)
    streamed = "".join(_vision_generate(model, processor, inputs, stream=True, **GREEDY))
    assert streamed == one_shot


def test_multiple_images(guide, assets):
    model, processor = guide
    image1 = Image.open(assets.image('image1.jpg', seed=1)).convert('RGB')
    image2 = Image.open(assets.image('image2.jpg', size=(120, 160), seed=2)).convert('RGB')
    question = 'Compare image 1 and image 2, tell me about the differences between image 1 and image 2.'
    msgs = [{'role': 'user', 'content': [image1, image2, question]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, n_images=2)
    res = _vision_generate(model, processor, inputs)
    assert isinstance(res, str)


def test_in_context_few_shot(guide, assets):
    model, processor = guide
    question = "production date"
    image1 = Image.open(assets.image('example1.jpg', seed=4)).convert('RGB')
    answer1 = "2023.08.04"
    image2 = Image.open(assets.image('example2.jpg', seed=5)).convert('RGB')
    answer2 = "2007.04.24"
    image_test = Image.open(assets.image('test.jpg', seed=6)).convert('RGB')
    msgs = [
        {'role': 'user', 'content': [image1, question]}, {'role': 'assistant', 'content': [answer1]},
        {'role': 'user', 'content': [image2, question]}, {'role': 'assistant', 'content': [answer2]},
        {'role': 'user', 'content': [image_test, question]}
    ]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, n_images=3)
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert answer1 in text and answer2 in text and text.count("<|im_start|>assistant") == 3
    res = _vision_generate(model, processor, inputs)
    assert isinstance(res, str)


def test_chat_with_video(guide, assets, caplog):
    """decord's encode_video -> media.video.sample_frames (1 frame per second, at most 64)."""
    from minicpmo_cli.media.video import MAX_NUM_FRAMES, sample_frames

    model, processor = guide
    video_path = assets.video("video_test.mp4", seconds=3, with_sound=False)
    frames = sample_frames(video_path, fps=1, max_frames=MAX_NUM_FRAMES)
    assert len(frames) == 3 and all(isinstance(f, Image.Image) and f.mode == "RGB" for f in frames)
    question = "Describe the video"
    msgs = [{'role': 'user', 'content': frames + [question]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, n_images=3)

    # Set decode params for video
    with caplog.at_level(logging.WARNING):
        res = model.generate(
            **inputs,
            processor=processor,
            sampling=True,
            max_new_tokens=SMALL,
            use_image_id=False,
            max_slice_nums=2,
        )
    assert isinstance(res, str)
    # The guide passes processing options to generate(), after the prompt was built: the package says that
    # they take effect only in apply_chat_template (they are accepted, not silently lost).
    assert any("use_image_id" in r.getMessage() for r in caplog.records)
