"""The units of the model's audio, in one place: rates, frames, chunks (no imports: every layer may use it).

Two sample rates meet in this model and must never be confused: everything that goes *in* (Whisper, the VAD,
stored voice clips, video sound) is 16 kHz; the speech that comes *out* of the vocoder is 24 kHz.
"""

from __future__ import annotations

INPUT_SAMPLE_RATE = 16_000  # Hz: Whisper's input rate; the VAD, voice clips and video sound are kept at it
OUTPUT_SAMPLE_RATE = 24_000  # Hz: the vocoder's output rate, the default of every wav we write

MEL_HOP_SAMPLES = 160  # input samples per log-mel frame (Whisper's hop): 100 mel frames per second
WHISPER_WINDOW_SECONDS = 30  # Whisper's fixed window; the reference pads every clip to it
OMNI_UNIT_SECONDS = 1.0  # one "<unit>" of omni / video input: one frame plus this much sound

SAMPLES_PER_FRAME = 512  # one 4-codebook TTS frame decodes to 512 output samples (vocoder hop x DVAE upsampling)
FRAMES_PER_SECOND = OUTPUT_SAMPLE_RATE / SAMPLES_PER_FRAME  # 46.875 TTS frames per second of speech
MAX_AUDIO_FRAMES = 2048  # the reference's tts_max_new_tokens: ~43.7 s of speech per piece
STREAM_TTS_CHUNK_FRAMES = 25  # the streaming session's speech chunk (~0.53 s), the reference's schedule


def frames_for_seconds(seconds: float) -> int:
    """The TTS frames nearest to ``seconds`` of speech (at least one)."""
    return max(1, int(round(seconds * FRAMES_PER_SECOND)))


def input_samples(seconds: float) -> int:
    """Samples of 16 kHz input audio in ``seconds``."""
    return int(round(seconds * INPUT_SAMPLE_RATE))


def output_samples(seconds: float) -> int:
    """Samples of 24 kHz output speech in ``seconds``."""
    return int(round(seconds * OUTPUT_SAMPLE_RATE))
