"""System and task prompts: the reference strings, byte for byte (spec vision-llm §7)."""

from __future__ import annotations

import numpy as np
import pytest

from minicpmo_cli.processing.prompts import ASR_EN, ASR_ZH, MIMICK, get_sys_prompt

REF = np.zeros(1600, dtype=np.float32)


def _texts(message):
    return [c if isinstance(c, str) else "<audio>" for c in message["content"]]


def test_default_prompt_is_a_user_message():
    message = get_sys_prompt()
    assert message["role"] == "user"
    assert _texts(message) == ["You are a helpful assistant. You can accept audio and text input and output voice and text."]
    assert get_sys_prompt(REF, mode="something-else")["content"] == message["content"]  # ref ignored


def test_omni_prompts():
    assert _texts(get_sys_prompt(mode="omni", language="en")) == [
        "You are a helpful assistant. You can accept video, audio and text input and output voice and text. "]
    assert _texts(get_sys_prompt(REF, mode="omni", language="en")) == [
        "You are a helpful assistant. You can accept video, audio and text input and output voice and text. "
        "Clone the voice in the provided audio prompt.", "<audio>",
        "As an assistant, you will speak using this voice style."]
    assert _texts(get_sys_prompt(REF, mode="omni", language="zh")) == [
        "你是一个AI助手。你能接受视频，音频和文本输入并输出语音和文本。模仿输入音频中的声音特征。", "<audio>",
        "作为助手，你将使用这种声音风格说话。"]


def test_voice_prompts():
    assert _texts(get_sys_prompt(REF, mode="audio_assistant", language="en")) == [
        "Use the voice in the audio prompt to synthesize new content.", "<audio>",
        "You are a helpful assistant with the above voice style."]
    assert _texts(get_sys_prompt(mode="audio_assistant", language="en")) == [
        "Use the <reserved_53> voice.", "You are a helpful assistant with the above voice style."]
    assert _texts(get_sys_prompt(REF, mode="audio_roleplay", language="en")) == [
        "Clone the voice in the provided audio prompt.", "<audio>",
        "Try to role-play the character based on the audio prompt above."]
    assert _texts(get_sys_prompt(mode="audio_roleplay", language="zh")) == [
        "Use the <reserved_53> voice.", "假装你是上述音频中的人物，与我进行对话。"]
    assert _texts(get_sys_prompt(REF, mode="voice_cloning", language="en")) == [
        "Clone the voice in the provided audio prompt.", "<audio>"]
    assert _texts(get_sys_prompt(REF, mode="voice_cloning", language="zh")) == ["模仿输入音频中的声音特征。", "<audio>"]
    assert get_sys_prompt(REF, mode="voice_cloning")["content"][1] is REF
    with pytest.raises(ValueError, match="voice_cloning"):
        get_sys_prompt(mode="voice_cloning")
    with pytest.raises(TypeError):
        get_sys_prompt(ref_audio=[0.0, 0.1], mode="omni")


def test_task_prompts():
    assert ASR_EN == "Please listen to the audio snippet carefully and transcribe the content."
    assert ASR_ZH == "请仔细听这段音频片段，并将其内容逐字记录。"
    assert MIMICK == "Please repeat each user's speech, including voice style and speech content."
