"""System prompts (``get_sys_prompt``) and the task prompts of the MiniCPM-o 2.6 model card.

The strings are the reference's, byte for byte (spec vision-llm §7): a different space or full stop changes
the token ids and so the model's answer. ``get_sys_prompt`` returns a message whose role is ``"user"``, as
the reference does; that is why the default Qwen system turn still appears under the plain chat template.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# --- task prompts (model card / usage guide) -------------------------------------------------------------
ASR_ZH = "请仔细听这段音频片段，并将其内容逐字记录。"
ASR_EN = "Please listen to the audio snippet carefully and transcribe the content."
SPEAKER_ANALYSIS = (
    "Based on the speaker's content, speculate on their gender, condition, age range, and health status."
)
AUDIO_CAPTION = "Summarize the main content of the audio."
SCENE_TAGGING = "Utilize one keyword to convey the audio's content or the associated scene."
MIMICK = "Please repeat each user's speech, including voice style and speech content."
VOICE_CLONING_READ = "Please read the text below."
VOICE_CREATION_EXAMPLE = "Speak like a male charming superstar, radiating confidence and style in every word."

TASK_PROMPTS: dict[str, str] = {
    "asr_zh": ASR_ZH,
    "asr_en": ASR_EN,
    "speaker": SPEAKER_ANALYSIS,
    "caption": AUDIO_CAPTION,
    "scene": SCENE_TAGGING,
    "mimick": MIMICK,
    "read": VOICE_CLONING_READ,
}

# --- system prompt pieces (reference get_sys_prompt, latest HF revision) -----------------------------------
_OMNI_ZH = "你是一个AI助手。你能接受视频，音频和文本输入并输出语音和文本。"
# The trailing space is in the reference string.
_OMNI_EN = "You are a helpful assistant. You can accept video, audio and text input and output voice and text. "
_MIMIC_VOICE_ZH = "模仿输入音频中的声音特征。"
_CLONE_VOICE_EN = "Clone the voice in the provided audio prompt."
_SPEAK_LIKE_THIS_ZH = "作为助手，你将使用这种声音风格说话。"
_SPEAK_LIKE_THIS_EN = "As an assistant, you will speak using this voice style."
_DEFAULT_VOICE = "Use the <reserved_53> voice."
_DEFAULT_SYSTEM = "You are a helpful assistant. You can accept audio and text input and output voice and text."

# (prefix, suffix) per (mode, is_zh). Any language other than "zh" selects English, as in the reference.
_VOICE_PROMPTS: dict[tuple[str, bool], tuple[str, str | None]] = {
    ("omni", True): (_OMNI_ZH + _MIMIC_VOICE_ZH, _SPEAK_LIKE_THIS_ZH),
    ("omni", False): (_OMNI_EN + _CLONE_VOICE_EN, _SPEAK_LIKE_THIS_EN),
    ("audio_assistant", True): (_MIMIC_VOICE_ZH, _SPEAK_LIKE_THIS_ZH),
    # Latest revision's English strings (earlier revisions used the voice-cloning pair; spec §7.1, §10.13).
    ("audio_assistant", False): (
        "Use the voice in the audio prompt to synthesize new content.",
        "You are a helpful assistant with the above voice style.",
    ),
    ("audio_roleplay", True): (_MIMIC_VOICE_ZH, "假装你是上述音频中的人物，与我进行对话。"),
    ("audio_roleplay", False): (_CLONE_VOICE_EN, "Try to role-play the character based on the audio prompt above."),
    ("voice_cloning", True): (_MIMIC_VOICE_ZH, None),
    ("voice_cloning", False): (_CLONE_VOICE_EN, None),
}

SYS_PROMPT_MODES = ("default", "omni", "audio_assistant", "audio_roleplay", "voice_cloning")


def get_sys_prompt(ref_audio: Any = None, mode: str = "default", language: str = "zh") -> dict[str, Any]:
    """The system message of the reference for ``mode``: ``{"role": "user", "content": [...]}``.

    ``ref_audio`` (16 kHz mono float32 numpy array) is placed between the prefix and suffix strings, where the
    processor turns it into an audio placeholder. Unknown modes fall back to the default prompt, as in the
    reference.
    """
    if ref_audio is not None:
        import numpy as np

        if not isinstance(ref_audio, np.ndarray):
            raise TypeError("ref_audio must be a numpy array of 16 kHz mono samples")
    is_zh = language == "zh"
    if mode == "omni" and ref_audio is None:
        return {"role": "user", "content": [_OMNI_ZH if is_zh else _OMNI_EN]}
    if mode not in SYS_PROMPT_MODES or mode == "default":
        return {"role": "user", "content": [_DEFAULT_SYSTEM]}
    prefix, suffix = _VOICE_PROMPTS[(mode, is_zh)]
    if ref_audio is not None:
        content = [prefix, ref_audio] + ([suffix] if suffix is not None else [])
        return {"role": "user", "content": content}
    if mode == "voice_cloning":
        # Message (with its typo) as in the reference.
        raise ValueError("ref_audio con't be None in voice_cloning mode.")
    logger.warning("ref_audio is None, speech generation will be performed based on the default voice.")
    return {"role": "user", "content": [_DEFAULT_VOICE, suffix]}
