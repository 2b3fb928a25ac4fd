"""Core: tokenizer, Auto-class registration, processor batching, decoding rules and strict loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from minicpmo_cli.errors import ModelLoadError, UsageError
from minicpmo_cli.generation.text import BEAM_DEFAULTS, SAMPLING_DEFAULTS, decoding_settings
from minicpmo_cli.processing.answer_text import decode_text


@pytest.fixture(scope="module")
def model(golden_ckpt):
    from minicpmo_cli import MiniCPMO

    return MiniCPMO.from_pretrained(golden_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(model):
    return model.processor.tokenizer


def test_tokenizer_special_ids(tokenizer, golden_ckpt):
    ids = json.loads((golden_ckpt / "added_tokens.json").read_text())
    assert type(tokenizer).__name__ == "MiniCPMOTokenizerFast"
    assert tokenizer.im_start_id == ids["<image>"] and tokenizer.im_end_id == ids["</image>"]
    assert tokenizer.slice_start_id == ids["<slice>"] and tokenizer.slice_end_id == ids["</slice>"]
    assert tokenizer.im_id_start_id == ids["<image_id>"] and tokenizer.im_id_end_id == ids["</image_id>"]
    assert tokenizer.audio_start_id == ids["<|audio_start|>"] and tokenizer.audio_end_id == ids["<|audio_end|>"]
    assert tokenizer.spk_start_id == ids["<|spk_bos|>"] and tokenizer.spk_end_id == ids["<|spk_eos|>"]
    assert tokenizer.tts_start_id == ids["<|tts_bos|>"] and tokenizer.tts_end_id == ids["<|tts_eos|>"]
    assert tokenizer.bos_id == ids["<|im_start|>"] and tokenizer.eos_id == ids["<|im_end|>"]
    assert tokenizer.unk_id == ids["<unk>"] and tokenizer.pad_token_id == ids["<|endoftext|>"]
    assert tokenizer.convert_ids_to_tokens([0]) == ["!"]


def test_auto_classes_load_official_files_without_remote_code(golden_ckpt):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    from minicpmo_cli import registration

    registration.register()
    registration.register()  # idempotent
    assert type(AutoConfig.from_pretrained(golden_ckpt)).__name__ == "MiniCPMOConfig"
    assert type(AutoTokenizer.from_pretrained(golden_ckpt)).__name__ == "MiniCPMOTokenizerFast"
    assert type(AutoProcessor.from_pretrained(golden_ckpt)).__name__ == "MiniCPMOProcessor"
    model = AutoModel.from_pretrained(golden_ckpt, dtype=torch.float32, init_vision=False, init_audio=False,
                                      init_tts=False)
    assert type(model).__name__ == "MiniCPMO" and not hasattr(model, "vpm") and not hasattr(model, "tts")
    assert type(AutoModelForCausalLM.from_pretrained(golden_ckpt, dtype=torch.float32)).__name__ == "MiniCPMO"


def test_model_structure(model):
    assert model.llm.lm_head.weight.data_ptr() != model.llm.model.embed_tokens.weight.data_ptr()
    assert isinstance(model.audio_avg_pooler, torch.nn.AvgPool1d)
    assert model.config.drop_vision_last_layer is False
    assert len(model.vpm.encoder.layers) == model.config.vision_config.num_hidden_layers
    assert model.dtype == torch.float32 and not model.training


def test_processor_left_pads_batches_and_shifts_bounds(model):
    processor = model.processor
    short = [{"role": "user", "content": ["hi"]}]
    long = [{"role": "user", "content": ["a much longer question about the capital of France?"]}]
    single = processor.apply_chat_template(msgs=short, use_tts_template=True)
    batch = processor.apply_chat_template(msgs=[short, long], use_tts_template=True)
    pad = batch["input_ids"].shape[1] - single["input_ids"].shape[1]
    assert pad > 0
    assert batch["input_ids"][0, :pad].tolist() == [0] * pad  # left padding with id 0, as the reference
    assert batch["input_ids"][0, pad:].tolist() == single["input_ids"][0].tolist()
    assert batch["attention_mask"][0].tolist() == [False] * pad + [True] * single["input_ids"].shape[1]
    assert batch["spk_bounds"][0].tolist() == (single["spk_bounds"][0] + pad).tolist()


def test_batched_greedy_matches_single(model, golden_case):
    """Left-padded batches decode like single prompts (positions from the mask, pads masked)."""
    meta, _ = golden_case("a_text_chat")
    question = meta["messages"][0]["content"][0]["text"]
    msgs = [[{"role": "user", "content": [question]}], [{"role": "user", "content": ["hi"]}]]
    answers = model.chat(msgs=msgs, sampling=False, max_new_tokens=16, num_beams=1, repetition_penalty=1.0)
    assert answers[0] == meta["decoding"]["greedy"]["chat_return_text"]
    alone = model.chat(msgs=msgs[1], sampling=False, max_new_tokens=16, num_beams=1, repetition_penalty=1.0)
    assert answers[1] == alone


def test_processor_templates_and_joins(model):
    processor = model.processor
    audio = np.zeros(16000, dtype=np.float32)
    prompts, _, audios, parts = processor.render_prompts([{"role": "user", "content": ["a", audio, "b"]}])
    assert prompts[0].startswith("<|im_start|>user\na\n(<audio>./</audio>)\nb<|im_end|>")  # TTS: no system turn
    assert prompts[0].endswith("<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>")
    assert len(audios[0]) == 1 and parts == [[0]]
    omni, _, _, _ = processor.render_prompts([{"role": "user", "content": ["<unit>", "x"]}], omni_input=True)
    assert "<|im_start|>user\n<unit>x<|im_end|>" in omni[0] and "You are Qwen" in omni[0]
    with pytest.raises(ValueError):
        processor.render_prompts([{"role": "assistant", "content": "first turn cannot be the assistant"}])


def test_processor_rejects_tag_media_mismatch(model):
    with pytest.raises(ValueError, match="image tags"):
        model.processor("(<image>./</image>) what?", images=[[]])


def test_decode_text_reference_quirks(tokenizer):
    bos, end, eot = tokenizer.bos_id, tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    word = tokenizer.encode("Paris")
    row = torch.tensor([bos, 0] + word + [0, end])
    assert decode_text([row], tokenizer) == ["Paris"]  # every id 0 ('!') dropped, bos and one terminator cut
    assert decode_text([torch.tensor(word + [eot])], tokenizer) == ["Paris"]
    assert decode_text([torch.tensor(word + [end, end])], tokenizer) == ["Paris<|im_end|>"]


def test_decoding_settings_follow_reference():
    assert decoding_settings(True) == SAMPLING_DEFAULTS
    assert decoding_settings(False) == BEAM_DEFAULTS
    beam = decoding_settings(False, 0, {"num_beams": 1, "top_k": 5, "no_repeat_ngram_size": 3})
    assert beam == {"num_beams": 1, "repetition_penalty": 1.2}  # keys not in the defaults are dropped
    sampled = decoding_settings(True, 4, {"temperature": 0.3, "num_beams": 2})
    assert sampled["temperature"] == 0.3 and sampled["min_new_tokens"] == 4 and "num_beams" not in sampled


def test_stream_needs_sampling(model):
    with pytest.raises(UsageError):
        model.chat(msgs=[{"role": "user", "content": "hi"}], sampling=False, stream=True)


def test_stream_yields_pieces_without_terminators(model):
    torch.manual_seed(0)
    pieces = list(model.chat(msgs=[{"role": "user", "content": "hi"}], sampling=True, stream=True,
                             max_new_tokens=6))
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert not any("<|im_end|>" in p or "<|endoftext|>" in p for p in pieces)


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("Vocos.pt"))
    return dst


def test_loading_is_strict(golden_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from minicpmo_cli import MiniCPMO

    folder = _copy_checkpoint(golden_ckpt, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    extra = dict(state, **{"llm.model.extra.weight": torch.zeros(2)})
    save_file(extra, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected"):
        MiniCPMO.from_pretrained(folder, dtype=torch.float32)
    missing = {k: v for k, v in state.items() if k != "llm.lm_head.weight"}
    save_file(missing, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing"):
        MiniCPMO.from_pretrained(folder, dtype=torch.float32)


def test_loading_accepts_old_weight_norm_names_and_skips_unbuilt_towers(golden_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from minicpmo_cli import MiniCPMO

    folder = _copy_checkpoint(golden_ckpt, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    assert any(k.endswith("weight_g") for k in renamed)
    # Two shards plus an index, as the official checkpoint.
    keys = sorted(renamed)
    half = len(keys) // 2
    save_file({k: renamed[k] for k in keys[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: renamed[k] for k in keys[half:]}, str(folder / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    model = MiniCPMO.from_pretrained(folder, dtype=torch.float32)
    g = model.tts.head_code[0].parametrizations["weight"].original0
    assert torch.equal(g, state["tts.head_code.0.parametrizations.weight.original0"].float())
    vision_only = MiniCPMO.from_pretrained(folder, dtype=torch.bfloat16, init_audio=False, init_tts=False)
    assert not hasattr(vision_only, "apm") and not hasattr(vision_only, "tts") and hasattr(vision_only, "vpm")
    assert vision_only.llm.model.embed_tokens.weight.dtype == torch.bfloat16


def test_hub_id_offline_without_cache_is_a_clean_error(tmp_path):
    from minicpmo_cli.model.checkpoint_files import resolve_checkpoint_dir

    with pytest.raises(ModelLoadError, match="cache"):
        resolve_checkpoint_dir("openbmb/not-a-cached-model", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(ModelLoadError):
        resolve_checkpoint_dir(tmp_path / "absent-folder")


def test_folder_without_config_is_a_clean_error(tmp_path):
    from minicpmo_cli import MiniCPMO

    with pytest.raises(ModelLoadError, match="config.json"):
        MiniCPMO.from_pretrained(tmp_path)
