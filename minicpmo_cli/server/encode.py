"""Speech as bytes: wav, raw pcm (16-bit little-endian), flac, and mp3/opus/aac where PyAV can encode them."""

from __future__ import annotations

import io

import numpy as np

from minicpmo_cli.outputs import _to_pcm16, wav_bytes
from minicpmo_cli.server.errors import APIError

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "pcm16": "audio/pcm", "flac": "audio/flac",
               "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac"}
# format -> (PyAV container, codec)
AV_CODECS = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac")}


def pcm16_bytes(samples: np.ndarray) -> bytes:
    return _to_pcm16(samples).tobytes()


def streaming_wav_header(rate: int = 24000) -> bytes:
    """The 44-byte header of a mono PCM16 wav whose length is not known yet (streamed): the RIFF and data sizes
    say 0xFFFFFFFF, as streamed wav from OpenAI's speech route; readers take the data to the end."""
    import struct

    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
            rate * 2, 2, 16) + b"data" + struct.pack("<I", unknown))


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    if fmt == "wav":
        return wav_bytes(samples, rate)
    if fmt in ("pcm", "pcm16"):
        return pcm16_bytes(samples)
    if fmt == "flac":
        import soundfile

        buffer = io.BytesIO()
        soundfile.write(buffer, _to_pcm16(samples), rate, format="FLAC", subtype="PCM_16")
        return buffer.getvalue()
    if fmt in AV_CODECS:
        return _encode_av(samples, rate, fmt)
    raise APIError(400, f"response_format {fmt!r} is not supported: use wav, pcm, flac, mp3, opus or aac",
                   param="response_format")


def _encode_av(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    import av

    container_name, codec = AV_CODECS[fmt]
    buffer = io.BytesIO()
    try:
        with av.open(buffer, "w", format=container_name) as container:
            out_rate = 48000 if fmt == "opus" else rate  # opus encodes 48 kHz (and 8/12/16/24)
            stream = container.add_stream(codec, rate=out_rate)
            stream.layout = "mono"
            frame = av.AudioFrame.from_ndarray(_to_pcm16(samples).reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = rate
            resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=out_rate)
            for resampled in resampler.resample(frame) + resampler.resample(None):
                for packet in stream.encode(resampled):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    except (av.error.FFmpegError, ValueError) as exc:
        raise APIError(400, f"response_format {fmt!r}: this server's PyAV cannot encode it ({exc})",
                       param="response_format") from None
    return buffer.getvalue()


def change_speed(samples: np.ndarray, speed: float) -> np.ndarray:
    """Faster or slower speech at the same pitch (phase-vocoder time stretch)."""
    if abs(speed - 1.0) < 1e-6 or samples.size == 0:
        return samples
    import librosa

    return librosa.effects.time_stretch(np.asarray(samples, dtype=np.float32), rate=float(speed)).astype(np.float32)
