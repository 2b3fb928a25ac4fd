"""Audio tower against the reference's golden vectors (cases c and d), float32 on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from minicpmo_cli.processing.audio import AUDIO_END, AUDIO_START, extract_audio_features, get_audio_placeholder

FEATURE_TOL = 1e-5
EMBED_TOL = 1e-4


def _case_audio(golden_case, golden_ckpt, name):
    meta, arrays = golden_case(name)
    item = next(c for m in meta["messages"] for c in m["content"] if c["type"] == "audio")
    audio, rate = sf.read(golden_ckpt.parent / "cases" / item["file"], dtype="float32")
    assert rate == 16000 and len(audio) == item["samples"]
    return meta, arrays, audio


@pytest.mark.parametrize("name", ["c_asr", "d_forward"])
def test_features_and_lengths(golden_case, golden_ckpt, name):
    meta, arrays, audio = _case_audio(golden_case, golden_ckpt, name)
    features, lens = extract_audio_features([[audio]], [[0]])
    assert list(features.shape) == meta["inputs"]["audio_features_shape"]
    assert [x.tolist() for x in lens] == meta["inputs"]["audio_feature_lens"]
    assert np.abs(features.numpy() - arrays["audio_features"]).max() <= FEATURE_TOL


@pytest.mark.parametrize(("name", "runs"), [("c_asr", [25, 25, 25]), ("d_forward", [25, 25, 12])])
def test_placeholders_and_bounds(golden_case, golden_ckpt, name, runs):
    from tokenizers import Tokenizer

    meta, _, audio = _case_audio(golden_case, golden_ckpt, name)
    placeholder = get_audio_placeholder(len(audio), chunk_input=True)
    expanded = meta["inputs"]["prompt_expanded"]
    start, end = expanded.index(AUDIO_START), expanded.rindex(AUDIO_END) + len(AUDIO_END)
    assert expanded[start:end] == placeholder
    assert [p.count("<unk>") for p in placeholder.split(AUDIO_START)[1:]] == runs

    # The placeholder's token ids sit in the golden input_ids; the <unk> runs are exactly the audio_bounds.
    ids = Tokenizer.from_file(str(golden_ckpt / "tokenizer.json")).encode(placeholder, add_special_tokens=False).ids
    golden_ids = meta["inputs"]["input_ids"]
    offset = next(i for i in range(len(golden_ids)) if golden_ids[i : i + len(ids)] == ids)
    added = json.loads((golden_ckpt / "added_tokens.json").read_text())
    starts = [offset + i + 1 for i, t in enumerate(ids) if t == added[AUDIO_START]]
    ends = [offset + i for i, t in enumerate(ids) if t == added[AUDIO_END]]
    assert [list(b) for b in zip(starts, ends)] == meta["inputs"]["audio_bounds"]
    assert [e - s for s, e in zip(starts, ends)] == runs


@pytest.mark.parametrize(("name", "tokens"), [("c_asr", 75), ("d_forward", 62)])
def test_audio_embeddings(golden_case, golden_ckpt, audio_tower, name, tokens):
    from minicpmo_cli.model.audio import get_audio_embedding

    apm, projector, pooler, config = audio_tower
    meta, arrays, audio = _case_audio(golden_case, golden_ckpt, name)
    features, lens = extract_audio_features([[audio]], [[0]])
    with torch.no_grad():
        embeds = get_audio_embedding(apm, projector, pooler, features, lens, chunk_length=config.audio_chunk_length)
    assert len(embeds) == 1 and len(embeds[0]) == 1
    assert embeds[0][0].shape == (tokens, config.hidden_size)
    assert np.abs(embeds[0][0].numpy() - arrays["audio_embeds.0"]).max() <= EMBED_TOL


def test_whisper_hidden_states_case_d(golden_case, audio_tower):
    from minicpmo_cli.model.audio import build_audio_attention_mask

    apm = audio_tower[0]
    _, arrays = golden_case("d_forward")
    features = torch.from_numpy(arrays["audio_features"])
    mask = build_audio_attention_mask(torch.tensor([250]), features.shape[-1], 1.0, torch.float32)
    with torch.no_grad():
        out = apm(features, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(apm.layers) + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)  # taken after the final LayerNorm
    hidden = out.last_hidden_state[0, :125].numpy()
    assert hidden.shape == arrays["apm_hidden.0"].shape == (125, 64)
    assert np.abs(hidden - arrays["apm_hidden.0"]).max() <= EMBED_TOL


def test_batched_pieces_are_regrouped_per_sample(golden_case, audio_tower):
    """Rows of several samples in one pass; shows the reference's under-masking of padded rows."""
    from minicpmo_cli.model.audio import get_audio_embedding

    apm, projector, pooler, _ = audio_tower
    _, c_arrays = golden_case("c_asr")
    _, d_arrays = golden_case("d_forward")
    features = torch.zeros(3, 80, 300)
    features[0] = features[2] = torch.from_numpy(c_arrays["audio_features"][0])
    features[1, :, :250] = torch.from_numpy(d_arrays["audio_features"][0])
    lens = [torch.tensor([300, 250]), torch.tensor([300])]
    with torch.no_grad():
        embeds = get_audio_embedding(apm, projector, pooler, features, lens)
    assert [[e.shape[0] for e in sample] for sample in embeds] == [[75, 62], [75]]
    c_golden, d_golden = (torch.from_numpy(a["audio_embeds.0"]) for a in (c_arrays, d_arrays))
    assert (embeds[0][0] - c_golden).abs().max() <= EMBED_TOL
    assert (embeds[1][0] - c_golden).abs().max() <= EMBED_TOL
    # The padded d row masks keys j >= 250 (a *mel* length) among 150 encoder frames, i.e. none: its last chunk
    # also attends to the 25 padded frames, so only its first two seconds equal the unbatched result.
    assert (embeds[0][1][:50] - d_golden[:50]).abs().max() <= EMBED_TOL
    assert (embeds[0][1][50:] - d_golden[50:]).abs().max() > 1e-3
