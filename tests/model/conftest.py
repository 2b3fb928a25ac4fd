"""Setup shared by the model tests.

- ``audio_tower``: the golden checkpoint's audio tower (test_audio_golden.py, test_audio_streaming.py).
- ``golden_tts``: the golden checkpoint's TTS and its tokenizer (test_tts_decode.py, the TTS engine tests).
- The usage guide's snippets (test_guide_snippets_vision.py, test_guide_snippets_speech.py,
  test_session_guide.py) on the tiny random checkpoint (tests/conftest.py ``tiny_ckpt``): the guide's model
  initialisation (``init_guide_model``, ``guide``), its input files (``assets``), its video helper
  (``get_video_chunk_content``), its omni streaming snippet (``run_omni_streaming_snippet``) and
  ``check_inputs``. Helpers are fixtures that return functions, since tests/ is not a package.

Changes to the guide's code in those tests, and only these:
- ``import minicpmo_cli`` before the transformers imports (and ``AutoProcessor`` imported: the guide's
  initialisation snippet uses it without importing it);
- the hub id -> the tiny checkpoint folder; no ``.cuda()``; ``dtype=torch.float32`` (one test tries bfloat16);
- file paths -> media made here (espeak-ng speech, PIL images, ffmpeg mp4s); tests skip when a tool is absent;
- ``max_new_tokens`` small, and speech capped (a random TTS rarely stops by itself; the streaming call passes
  ``tts_max_new_tokens``, the others go through test_guide_snippets_speech.py's ``short_speech`` fixture);
- decord / moviepy loaders -> ``minicpmo_cli.media.video`` (``sample_frames``, ``video_units``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageDraw

# API.md: the BatchFeature of processor.apply_chat_template carries these keys.
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "tgt_sizes", "image_bound", "audio_features",
              "audio_feature_lens", "audio_bounds", "spk_bounds")


# ---------------------------------------------------------------------------------------------- golden TTS
@pytest.fixture(scope="module")
def golden_tts(golden_ckpt):
    """(ConditionalChatTTS in float32, its ChatTTS tokenizer) loaded from the golden checkpoint's ``tts.*``."""
    from safetensors.torch import load_file

    from minicpmo_cli.model.config import MiniCPMOConfig
    from minicpmo_cli.model.tts import ConditionalChatTTS
    from minicpmo_cli.processing.tts_text import load_tts_tokenizer

    config = MiniCPMOConfig(**json.loads((golden_ckpt / "config.json").read_text())).tts_config
    tts = ConditionalChatTTS(config)
    state = {k[4:]: v for k, v in load_file(golden_ckpt / "model.safetensors").items() if k.startswith("tts.")}
    tts.load_state_dict(state, strict=True)
    return tts.float().eval(), load_tts_tokenizer(golden_ckpt / "assets" / "chattts_tokenizer")


# ---------------------------------------------------------------------------------------------- golden audio tower
@pytest.fixture(scope="module")
def audio_tower(golden_ckpt):
    """(apm, projector, pooler, config) loaded from the golden checkpoint's ``apm.*``/``audio_projection_layer.*``."""
    from safetensors.torch import load_file

    from minicpmo_cli.model.audio import MiniCPMWhisperEncoder
    from minicpmo_cli.model.config import MiniCPMOConfig
    from minicpmo_cli.model.layers import MultiModalProjector

    config = MiniCPMOConfig(**json.loads((golden_ckpt / "config.json").read_text()))
    tensors = load_file(str(golden_ckpt / "model.safetensors"))

    def sub(prefix):
        return {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}

    apm = MiniCPMWhisperEncoder(config.audio_config)
    apm.load_state_dict(sub("apm."), strict=True)
    projector = MultiModalProjector(in_dim=config.audio_config.encoder_ffn_dim // 4, out_dim=config.hidden_size)
    projector.load_state_dict(sub("audio_projection_layer."), strict=True)
    pooler = torch.nn.AvgPool1d(config.audio_pool_step, stride=config.audio_pool_step)
    for module in (apm, projector):
        module.eval().requires_grad_(False)
    return apm, projector, pooler, config


# ---------------------------------------------------------------------------------------------- the guide's model
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


@pytest.fixture(scope="session")
def init_guide_model():
    """``init_guide_model(folder, dtype) -> (model, processor)``: the guide's initialisation snippet."""
    return _init_snippet


@pytest.fixture(scope="module")
def guide(tiny_ckpt):
    """(model, processor) as the guide initialises them, float32, one pair per test module."""
    return _init_snippet(tiny_ckpt, torch.float32)


# ---------------------------------------------------------------------------------------------- the guide's files
def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


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


# ---------------------------------------------------------------------------------------------- the guide's code
def _get_video_chunk_content(video_path, flatten=True):
    """The guide's helper, with moviepy replaced by media.video.video_units (1 frame + 1 s of 16 kHz audio)."""
    from minicpmo_cli.media.video import video_units

    contents = []
    for image, audio in video_units(video_path):
        if flatten:
            contents.extend(["<unit>", image, audio])
        else:
            contents.append(["<unit>", image, audio])
    return contents


@pytest.fixture(scope="session")
def get_video_chunk_content():
    """The guide's ``get_video_chunk_content(video_path, flatten=True)``."""
    return _get_video_chunk_content


def _omni_streaming_snippet(model, processor, sys_msg, video_path, use_tts: bool, max_new_tokens: int, wav_path):
    """The guide's omni streaming snippet, verbatim but for the caps. Returns (text, the text of each piece,
    the answer's audio or None, its sampling rate or None); with ``use_tts`` the audio is written to
    ``wav_path`` (sf.write, as the guide)."""
    model.reset_session()
    contents = _get_video_chunk_content(video_path, flatten=False)
    session_id = '123'
    res = model.streaming_prefill(session_id=session_id, msgs=[sys_msg], processor=processor)
    for content in contents:
        msgs = [{"role": "user", "content": content}]
        res = model.streaming_prefill(session_id=session_id, msgs=msgs, processor=processor)
    res = model.streaming_generate(session_id=session_id, processor=processor, use_tts=use_tts,
                                   tts_output_chunk_size=25, max_new_tokens=max_new_tokens, tts_max_new_tokens=25)
    audios = []
    pieces = []
    text = ""
    sampling_rate = None
    if use_tts:
        for r in res:
            audio_wav = r.audio_wav
            sampling_rate = r.sampling_rate
            txt = r.text
            pieces.append(txt)
            audios.append(audio_wav)
            text += txt
        res = np.concatenate(audios)
        sf.write(wav_path, res, samplerate=sampling_rate)
        return text, pieces, res, sampling_rate
    for r in res:
        pieces.append(r['text'])
        text += r['text']
    return text, pieces, None, sampling_rate


@pytest.fixture(scope="session")
def run_omni_streaming_snippet():
    """``run_omni_streaming_snippet(model, processor, sys_msg, video_path, use_tts, max_new_tokens, wav_path)
    -> (text, pieces, audio | None, sampling_rate | None)``: the guide's omni streaming snippet."""
    return _omni_streaming_snippet


# ---------------------------------------------------------------------------------------------- checks
def _check_inputs(inputs, n_images: int = 0, has_audio: bool = False, tts: bool = False) -> None:
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


@pytest.fixture(scope="session")
def check_inputs():
    """``check_inputs(inputs, n_images=0, has_audio=False, tts=False)``: asserts on the processor's outputs."""
    return _check_inputs
