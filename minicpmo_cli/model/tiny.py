"""A complete tiny random MiniCPM-o 2.6 checkpoint, laid out like the official one, for tests and demos.

``make_tiny_checkpoint(out_dir)`` writes config.json, model.safetensors (every tower, official names),
a small byte-level BPE tokenizer with all Qwen/MiniCPM-o special tokens in the official order,
tokenizer_config.json with the official Qwen2.5 chat template, preprocessor_config.json,
``assets/chattts_tokenizer/`` and ``assets/Vocos.pt``. It never reads the shared golden folder, so the
test suite can use it anywhere. Also ``python -m minicpmo_cli.model.tiny OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from minicpmo_cli.temp_files import default_file_mode
from minicpmo_cli.units import INPUT_SAMPLE_RATE

QWEN_SPECIALS = [  # ids 151643.. in the official tokenizer; (token, special)
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
MINICPM_SPECIALS = [  # the 35 additional_special_tokens, in id order
    "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
    "<slice>", "</slice>", "<image_id>", "</image_id>", "<unit>", "</unit>", "<asr>", "</asr>", "<query>",
    "</query>", "<|audio_start|>", "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>", "<|spk_eos|>",
    "<|tts_bos|>", "<|tts_eos|>", "<|listen|>", "<|speak|>", "<|interrupt|>", "<|vad_start|>", "<|vad_end|>",
    "<reserved_43>", "<reserved_53>",
]
# The official tokenizer_config.json chat template (Qwen2.5, with the default system turn), verbatim.
QWEN_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "What is the capital of France? Answer briefly. Paris is the capital of France.",
    "What is in the image? Describe the image and transcribe the audio.",
    "Please listen to the audio snippet carefully and transcribe the content.",
    "Please read the following text aloud: hello world. Please read the text below.",
    "Summarize the main content of the audio. Utilize one keyword to convey the audio's content.",
    "Based on the speaker's content, speculate on their gender, condition, age range, and health status.",
    "Clone the voice in the provided audio prompt. As an assistant, you will speak using this voice style.",
    "The quick brown fox jumps over the lazy dog 0123456789 times; a cat, a bird and a tree.",
    "你是一个AI助手。你能接受视频，音频和文本输入并输出语音和文本。请仔细听这段音频片段。",
]
TTS_VOCAB_WORDS = ["the", "and", "you", "are", "hello", "world", "image", "audio", "text", "voice", "assistant"]
TTS_SPECIALS = ["[Stts]", "[Ptts]", "[Etts]", "[spk_emb]", "[empty_spk]", "[music]", "[laugh]", "[break_0]"]


def _train_text_tokenizer(vocab_size: int = 600):
    """Byte-level BPE with the Qwen2 pre-tokenizer and NFC, then the 58 special tokens in official order."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    specials = [(t, s) for t, s in QWEN_SPECIALS] + [(t, True) for t in MINICPM_SPECIALS] + [("<unk>", True)]
    for token, special in specials:
        added = AddedToken(token, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([added])
    return tokenizer, specials


def _write_text_tokenizer(folder: Path) -> int:
    tokenizer, specials = _train_text_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    ids = {token: tokenizer.token_to_id(token) for token, _ in specials}
    decoder = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": s}
        for t, s in specials
    }
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": MINICPM_SPECIALS,
        "auto_map": {"AutoTokenizer": ["tokenization_minicpmo_fast.MiniCPMOTokenizerFast", None]},
        "bos_token": "<|im_start|>", "chat_template": QWEN_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "MiniCPMOTokenizerFast", "unk_token": "<unk>",
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "added_tokens.json", {t: ids[t] for t, _ in sorted(specials)})
    _write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": MINICPM_SPECIALS, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>",
    })
    return tokenizer.get_vocab_size(with_added_tokens=True)


def _write_tts_tokenizer(folder: Path) -> dict[str, int]:
    """A tiny BERT WordPiece tokenizer with the ChatTTS special tokens (layout of openbmb/chattts_tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127) if not "A" <= chr(c) <= "Z"] + list("你好世界这是一个测试请描述张图片。，")
    subwords = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    basic = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = basic + chars + TTS_VOCAB_WORDS + subwords + TTS_SPECIALS
    ids = {token: index for index, token in enumerate(vocab)}
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in basic + TTS_SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    special_map = {"additional_special_tokens": TTS_SPECIALS, "cls_token": "[CLS]", "mask_token": "[MASK]",
                   "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"}
    _write_json(folder / "special_tokens_map.json", special_map)
    _write_json(folder / "tokenizer_config.json", {
        **special_map, "clean_up_tokenization_spaces": True, "do_basic_tokenize": True, "do_lower_case": True,
        "never_split": None, "strip_accents": None, "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer",
    })
    return {token: ids[token] for token in TTS_SPECIALS} | {"size": len(vocab)}


def tiny_config_dict(vocab_size: int, tts_ids: dict[str, int]) -> dict:
    """config.json in the official (transformers 4.44) layout with tiny sizes."""
    return {
        "_name_or_path": "minicpmo26_tiny_random", "architectures": ["MiniCPMO"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMOConfig",
                     "AutoModel": "modeling_minicpmo.MiniCPMO", "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO"},
        "model_type": "minicpmo", "version": 2.6, "torch_dtype": "float32", "transformers_version": "4.44.2",
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False, "max_window_layers": 2,
        "tie_word_embeddings": False, "vocab_size": vocab_size, "attention_dropout": 0.0,
        "initializer_range": 0.02, "bos_token_id": vocab_size - 58, "eos_token_id": vocab_size - 56,
        "use_cache": True, "query_num": 64, "image_size": 448, "patch_size": 14, "drop_vision_last_layer": False,
        "batch_vision_input": True, "vision_batch_size": 16, "slice_mode": True,
        "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv"}, "use_image_id": True,
        "audio_pool_step": 2, "audio_chunk_length": 1.0, "chunk_input": True, "listen_speak_type": "asr",
        "vision_config": {"hidden_size": 32, "image_size": 980, "intermediate_size": 64,
                          "model_type": "siglip_vision_model", "num_attention_heads": 2, "num_hidden_layers": 2,
                          "patch_size": 14},
        "audio_config": {"_name_or_path": "openai/whisper-medium", "architectures": ["MiniCPMWhisperEncoder"],
                         "model_type": "whisper", "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2,
                         "encoder_ffn_dim": 128, "decoder_layers": 2, "decoder_attention_heads": 2,
                         "decoder_ffn_dim": 128, "num_hidden_layers": 2, "num_mel_bins": 80,
                         "max_source_positions": 1500, "torch_dtype": "float32"},
        "tts_config": {"model_type": "conditional_chattts", "llm_dim": 128, "hidden_size": 32,
                       "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                       "num_text_tokens": tts_ids["size"], "spk_emb_token_id": tts_ids["[spk_emb]"],
                       "audio_bos_token_id": tts_ids["[Ptts]"], "text_eos_token_id": tts_ids["[Etts]"],
                       "dvae_hidden": 32, "dvae_inner": 64, "dvae_bn_dim": 16, "dvae_num_layers": 2,
                       "dvae_idim": 64, "vocos_dim": 32, "vocos_intermediate_dim": 64, "vocos_num_layers": 1},
    }


PREPROCESSOR_CONFIG = {
    "image_processor_type": "MiniCPMVImageProcessor", "feature_extractor_type": "WhisperFeatureExtractor",
    "auto_map": {"AutoProcessor": "processing_minicpmo.MiniCPMOProcessor",
                 "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
    "processor_class": "MiniCPMOProcessor", "max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14,
    "use_image_id": True, "image_feature_size": 64, "im_start": "<image>", "im_end": "</image>",
    "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>", "im_id_start": "<image_id>",
    "im_id_end": "</image_id>", "slice_mode": True, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5],
    "version": 2.6, "chunk_length": 30, "feature_size": 80, "hop_length": 160, "n_fft": 400,
    "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
    "return_attention_mask": False, "sampling_rate": INPUT_SAMPLE_RATE,
}


def _redraw_parameters(module, seed: int) -> None:
    """Deterministic, well-scaled random weights (the golden set's recipe): visit parameters by name."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            shape = param.shape
            if name.endswith("coef") or name.endswith("original0"):
                value = 0.5 + torch.rand(shape, generator=generator)
            elif param.ndim >= 2:
                value = 0.05 * torch.randn(shape, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                value = 1 + 0.1 * torch.randn(shape, generator=generator)
            else:
                value = 0.02 * torch.randn(shape, generator=generator)
            param.copy_(value.to(param.dtype))


def _write_weights(folder: Path, config_dict: dict, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from minicpmo_cli.model.config import MiniCPMOConfig
    from minicpmo_cli.model.omni import MiniCPMOModel
    from minicpmo_cli.model.vocoder import Vocos

    config = MiniCPMOConfig(**{k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")})
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = MiniCPMOModel(config)
        vocos = Vocos(config.tts_config)
    finally:
        torch.set_default_dtype(previous)
    _redraw_parameters(model, seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the mode every other file of the folder has (umask).
    os.chmod(folder / "model.safetensors", default_file_mode())
    _redraw_parameters(vocos, seed + 1)
    torch.save({k: v.detach().clone() for k, v in vocos.state_dict().items()}, str(folder / "assets" / "Vocos.pt"))


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny random checkpoint into ``out_dir`` (created if needed); returns the folder."""
    folder = Path(out_dir)
    (folder / "assets").mkdir(parents=True, exist_ok=True)
    vocab_size = _write_text_tokenizer(folder)
    tts_ids = _write_tts_tokenizer(folder / "assets" / "chattts_tokenizer")
    config_dict = tiny_config_dict(vocab_size, tts_ids)
    _write_json(folder / "config.json", config_dict)
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(folder / "generation_config.json",
                {"bos_token_id": config_dict["bos_token_id"], "eos_token_id": config_dict["eos_token_id"]})
    _write_weights(folder, config_dict, seed)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m minicpmo_cli.model.tiny OUT_DIR [SEED]", file=sys.stderr)
        return 2
    folder = make_tiny_checkpoint(args[0], seed=int(args[1]) if len(args) == 2 else 0)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
