"""Units of the speech the model makes, in one place (no torch: the api layer imports this at start-up)."""

from __future__ import annotations

SAMPLE_RATE = 24000  # Hz: the vocoder's output rate
SAMPLES_PER_FRAME = 512  # one 4-codebook TTS frame decodes to 512 samples (the vocoder's hop x DVAE upsampling)
FRAMES_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_FRAME  # 46.875
MAX_AUDIO_FRAMES = 2048  # the reference's tts_max_new_tokens: ~43.7 s of speech per piece


def frames_for_seconds(seconds: float) -> int:
    """The TTS frames nearest to ``seconds`` of speech (at least one)."""
    return max(1, int(round(seconds * FRAMES_PER_SECOND)))
