"""The usage guide's omni snippets (normal generate and streaming), run against this package on a tiny
checkpoint. Changes to the guide's code: the imports, the video loader (moviepy -> our media.video, same units),
paths, and a small max_new_tokens (plus a speech cap in the streaming call) to keep the test fast."""

from __future__ import annotations

import shutil
import subprocess
import wave

import numpy as np
import pytest
import soundfile as sf
import torch

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """The guide's model initialisation, on a tiny checkpoint, plus a 3 s video with sound and a ref voice."""
    from minicpmo_cli import MiniCPMO  # noqa: F401 - registers the classes with the Auto factories
    from transformers import AutoModel, AutoProcessor

    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    work = tmp_path_factory.mktemp("guide")
    folder = make_tiny_checkpoint(work / "ckpt")
    video = work / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=4",
                    "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=16000", "-t", "3",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(video)], check=True)
    ref = work / "ref.wav"
    sf.write(ref, (0.1 * np.sin(np.arange(24000) / 7)).astype(np.float32), 16000)
    model = AutoModel.from_pretrained(str(folder), attn_implementation="sdpa", dtype=torch.float32)
    model = model.eval()
    model.init_tts()
    processor = AutoProcessor.from_pretrained(str(folder))
    return model, processor, video, ref, work


def get_video_chunk_content(video_path, flatten=True):
    """The guide's helper with moviepy replaced by our decoder: 1 frame + 1 s of 16 kHz audio per unit."""
    from minicpmo_cli.media.video import iter_video_units

    contents = []
    for image, audio in iter_video_units(video_path):
        if flatten:
            contents.extend(["<unit>", image, audio])
        else:
            contents.append(["<unit>", image, audio])
    return contents


def test_guide_omni_normal_generate(guide):
    import librosa

    model, processor, video_path, ref_audio_path, work = guide
    ref_audio, _ = librosa.load(ref_audio_path, sr=16000, mono=True)
    sys_msg = processor.get_sys_prompt(ref_audio=ref_audio, mode="omni", language="en")
    contents = get_video_chunk_content(video_path)
    msg = {"role": "user", "content": contents}
    msgs = [sys_msg, msg]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)

    generate_audio = True
    output_audio_path = str(work / "output.wav")
    res = model.generate(
        **inputs, processor=processor, sampling=True, temperature=0.5, max_new_tokens=6,
        use_tts_template=True, generate_audio=generate_audio, output_audio_path=output_audio_path,
        repetition_penalty=1.2,
    )
    assert isinstance(res.text if hasattr(res, "text") else res, str)
    assert len(contents) == 3 * 3  # three 1 s units
    with wave.open(output_audio_path) as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (24000, 1)
        assert wav.getnframes() > 0


def test_guide_omni_streaming(guide):
    model, processor, video_path, _, work = guide
    sys_msg = model.get_sys_prompt(mode="omni", language="en")
    for use_tts in (True, False):
        model.reset_session()
        contents = get_video_chunk_content(video_path, flatten=False)
        session_id = "123"
        res = model.streaming_prefill(session_id=session_id, msgs=[sys_msg], processor=processor)
        for content in contents:
            msgs = [{"role": "user", "content": content}]
            res = model.streaming_prefill(session_id=session_id, msgs=msgs, processor=processor)
        res = model.streaming_generate(session_id=session_id, processor=processor, use_tts=use_tts,
                                       tts_output_chunk_size=25, max_new_tokens=6, tts_max_new_tokens=25)
        audios = []
        text = ""
        if use_tts:
            for r in res:
                audio_wav = r.audio_wav
                sampling_rate = r.sampling_rate
                txt = r.text
                audios.append(audio_wav)
                text += txt
            res = np.concatenate(audios)
            sf.write(work / "output_stream.wav", res, samplerate=sampling_rate)
            assert sampling_rate == 24000 and res.dtype == np.float32 and len(res) > 0
            assert sf.info(work / "output_stream.wav").frames == len(res)
        else:
            for r in res:
                text += r["text"]
        assert isinstance(text, str)
