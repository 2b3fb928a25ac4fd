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

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


@pytest.fixture(scope="module")
def omni_media(tmp_path_factory):
    """A 3 s video with sound and a reference voice, in a work folder: (video, ref, work). The model is
    conftest's ``guide`` (the guide's initialisation on the tiny checkpoint)."""
    work = tmp_path_factory.mktemp("guide")
    video = work / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=4",
                    "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=16000", "-t", "3",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(video)], check=True)
    ref = work / "ref.wav"
    sf.write(ref, (0.1 * np.sin(np.arange(24000) / 7)).astype(np.float32), 16000)
    return video, ref, work


def test_guide_omni_normal_generate(guide, omni_media, get_video_chunk_content):
    import librosa

    model, processor = guide
    video_path, ref_audio_path, work = omni_media
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


def test_guide_omni_streaming(guide, omni_media, run_omni_streaming_snippet):
    model, processor = guide
    video_path, _, work = omni_media
    sys_msg = model.get_sys_prompt(mode="omni", language="en")
    for use_tts in (True, False):
        text, _, res, sampling_rate = run_omni_streaming_snippet(model, processor, sys_msg, video_path, use_tts, 6,
                                                                 work / "output_stream.wav")
        if use_tts:
            assert sampling_rate == 24000 and res.dtype == np.float32 and len(res) > 0
            assert sf.info(work / "output_stream.wav").frames == len(res)
        assert isinstance(text, str)
