"""The tiny random checkpoint: complete, loadable by every tower and by the Auto classes, usable end to end."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from minicpmo_cli.model import tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert tiny.main([str(folder)]) == 0  # the `python -m minicpmo_cli.model.tiny OUT_DIR` entry point
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from minicpmo_cli import MiniCPMO

    return MiniCPMO.from_pretrained(tiny_dir, dtype=torch.float32)


def test_files_and_layout(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                 "merges.txt", "preprocessor_config.json", "assets/Vocos.pt",
                 "assets/chattts_tokenizer/tokenizer_config.json", "assets/chattts_tokenizer/vocab.txt"):
        assert (tiny_dir / name).is_file(), name
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "minicpmo" and config["architectures"] == ["MiniCPMO"]
    tok_config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "MiniCPMOTokenizerFast"
    assert tok_config["chat_template"] == tiny.QWEN_CHAT_TEMPLATE


def test_never_reads_the_shared_folder():
    source = inspect.getsource(tiny)
    assert "../shared" not in source and "fixtures/golden" not in source and "conftest" not in source


def test_special_tokens_in_official_order(tiny_dir):
    from minicpmo_cli.processing.tokenizer import MiniCPMOTokenizerFast

    tok = MiniCPMOTokenizerFast.from_pretrained(str(tiny_dir))
    specials = [t for t, _ in tiny.QWEN_SPECIALS] + tiny.MINICPM_SPECIALS + ["<unk>"]
    first = tok.convert_tokens_to_ids("<|endoftext|>")
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(range(first, first + len(specials)))
    assert len(tok) == first + len(specials)
    assert tok.bos_id == first + 1 and tok.eos_id == first + 2 and tok.unk_id == first + len(specials) - 1
    assert tok.encode("<|im_start|>user\n<image><unk></image>")[-3:] == [tok.im_start_id, tok.unk_id, tok.im_end_id]


def test_chat_template_is_the_official_one(reference_dir):
    official = json.loads((reference_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert tiny.QWEN_CHAT_TEMPLATE == official


def test_auto_classes_and_towers(tiny_dir):
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    from minicpmo_cli import registration

    registration.register()
    assert type(AutoTokenizer.from_pretrained(tiny_dir)).__name__ == "MiniCPMOTokenizerFast"
    assert type(AutoProcessor.from_pretrained(tiny_dir)).__name__ == "MiniCPMOProcessor"
    model = AutoModel.from_pretrained(tiny_dir, dtype=torch.float32)
    for tower in ("llm", "vpm", "resampler", "apm", "audio_projection_layer", "tts"):
        assert hasattr(model, tower), tower
    model.init_tts()
    assert model.vocos is not None and model.tts_processor.convert_tokens_to_ids("[spk_emb]") == \
        model.config.tts_config.spk_emb_token_id


def test_end_to_end_chat(tiny_model):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((400, 600, 3)) * 255).astype("uint8"))
    audio = (rng.standard_normal(24000) * 0.1).astype(np.float32)
    msgs = [{"role": "user", "content": [image, "What is in the image?", audio]}]
    inputs = tiny_model.processor.apply_chat_template(msgs=msgs)
    assert len(inputs["image_bound"][0]) == 3 and len(inputs["audio_bounds"][0]) == 2
    logits = tiny_model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], tiny_model.config.vocab_size)
    assert torch.isfinite(logits).all()
    first = tiny_model.chat(msgs=msgs, sampling=False, max_new_tokens=5, num_beams=1, repetition_penalty=1.0)
    again = tiny_model.generate(**inputs, processor=tiny_model.processor, sampling=False, max_new_tokens=5,
                                num_beams=1, repetition_penalty=1.0)
    assert isinstance(first, str) and first == again


def test_speech_output_is_written(tiny_model, tmp_path, monkeypatch):
    import soundfile

    from minicpmo_cli.generation import speech

    real = speech.generate_speech
    # A random TTS rarely emits EOS: cap the frames to keep the test short.
    monkeypatch.setattr(speech, "generate_speech", lambda *a, **k: real(*a, **{**k, "max_new_tokens": 30}))
    out_path = tmp_path / "answer.wav"
    torch.manual_seed(0)
    text = tiny_model.chat(msgs=[{"role": "user", "content": ["read this"]}], sampling=False, max_new_tokens=4,
                           use_tts_template=True, generate_audio=True, output_audio_path=out_path)
    assert isinstance(text.text, str) and text.sampling_rate == 24000
    wav, rate = soundfile.read(out_path, dtype="float32")
    assert rate == 24000 and len(wav) == len(text.audio_wav) > 0


def test_redraw_is_deterministic():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    tiny._redraw_parameters(a, 5)
    tiny._redraw_parameters(b, 5)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_processor_save_and_reload(tiny_model, tmp_path):
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    tiny_model.processor.save_pretrained(tmp_path / "proc")
    again = MiniCPMOProcessor.from_pretrained(tmp_path / "proc")
    msgs = [{"role": "user", "content": ["hello there", np.zeros(8000, dtype=np.float32)]}]
    first = tiny_model.processor.apply_chat_template(msgs=msgs)
    second = again.apply_chat_template(msgs=msgs)
    assert first["input_ids"].tolist() == second["input_ids"].tolist()
    assert again.image_processor.use_image_id is True and again.image_processor.max_slice_nums == 9


def test_unavailable_attention_is_an_environment_problem(tiny_dir):
    from minicpmo_cli import MiniCPMO
    from minicpmo_cli.errors import EnvironmentProblem

    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(EnvironmentProblem, match="flash_attention_2"):
            MiniCPMO.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="flash_attention_2")
    eager = MiniCPMO.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager")
    assert eager.llm.config._attn_implementation == "eager"
