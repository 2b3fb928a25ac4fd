"""The usage guide's initialisation and vision snippets (single image, multiple images, in-context few-shot,
chat with video), run as close to verbatim as possible against this package on the tiny random checkpoint.
The changes made to the guide's code are listed in tests/model/conftest.py (which holds the shared setup);
the speech and omni snippets are in test_guide_snippets_speech.py and test_session_guide.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import torch
from PIL import Image

SMALL = 6  # max_new_tokens for every snippet (the guide uses 128..4096)
GREEDY = {"top_k": 1, "repetition_penalty": 1.0}  # sampling=True made deterministic: same ids on any path


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


# ---------------------------------------------------------------------------------------------- vision only
def _vision_generate(model, processor, inputs, **kwargs):
    return model.generate(**inputs, processor=processor, sampling=True, max_new_tokens=SMALL, **kwargs)


def test_single_image_normal_and_stream(guide, assets, check_inputs):
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


def test_multiple_images(guide, assets, check_inputs):
    model, processor = guide
    image1 = Image.open(assets.image('image1.jpg', seed=1)).convert('RGB')
    image2 = Image.open(assets.image('image2.jpg', size=(120, 160), seed=2)).convert('RGB')
    question = 'Compare image 1 and image 2, tell me about the differences between image 1 and image 2.'
    msgs = [{'role': 'user', 'content': [image1, image2, question]}]
    inputs = processor.apply_chat_template(msgs=msgs).to(model.device)
    check_inputs(inputs, n_images=2)
    res = _vision_generate(model, processor, inputs)
    assert isinstance(res, str)


def test_in_context_few_shot(guide, assets, check_inputs):
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


def test_chat_with_video(guide, assets, caplog, check_inputs):
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
