"""Small building blocks shared by several towers."""

from __future__ import annotations

from torch import nn


class MultiModalProjector(nn.Module):
    """Linear -> ReLU -> Linear, as the reference's ``MultiModalProjector`` (names ``linear1``/``linear2``).

    Used for ``audio_projection_layer`` (Whisper -> LLM) and ``tts.projector`` (LLM -> TTS).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim, bias=True)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(out_dim, out_dim, bias=True)

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(x)))
