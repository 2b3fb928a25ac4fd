"""Chunk mask, encoder KV cache and streaming vs non-streaming audio embeddings."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperConfig

from minicpmo_cli.model.audio import (
    MiniCPMWhisperEncoder,
    WhisperEncoderCache,
    build_audio_attention_mask,
    get_audio_embedding,
    get_audio_embedding_streaming,
    subsequent_chunk_mask,
)


def test_subsequent_chunk_mask_is_block_causal():
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(subsequent_chunk_mask(5, 2), expected.bool())


def test_attention_mask_keeps_the_reference_padding_quirk():
    # Two pieces: 100 and 40 mel frames -> 50 and 20 encoder frames. The reference masks keys j >= mel length,
    # so the short row masks keys 40..49 only (its true padding starts at 20).
    mask = build_audio_attention_mask(torch.tensor([100, 40]), 100, chunk_length=-1, dtype=torch.float32)
    assert mask.shape == (2, 1, 50, 50)
    assert torch.isinf(mask[1, 0, :, 40:]).all() and (mask[1, 0, :, :40] == 0).all()
    assert (mask[0] == 0).all()
    chunked = build_audio_attention_mask(torch.tensor([300]), 300, chunk_length=1.0, dtype=torch.float32)
    allowed = chunked[0, 0] == 0
    assert allowed[49, :50].all() and not allowed[49, 50:].any()  # chunk 0 sees itself only
    assert allowed[100, :150].all() and not allowed[100, 150:].any()  # chunk 2 sees chunks 0-2


def test_later_seconds_do_not_change_earlier_chunks(audio_tower):
    apm, projector, pooler, _ = audio_tower
    features = torch.randn(1, 80, 300, generator=torch.Generator().manual_seed(0))
    changed = features.clone()
    changed[:, :, 101:] += 1.0  # mel 100 still feeds encoder frame 49 through conv1, so perturb from 101 on
    lens = [torch.tensor([300])]
    with torch.no_grad():
        a = get_audio_embedding(apm, projector, pooler, features, lens)[0][0]
        b = get_audio_embedding(apm, projector, pooler, changed, lens)[0][0]
    assert torch.equal(a[:25], b[:25])
    assert not torch.allclose(a[25:], b[25:])


def _stream(apm, projector, pooler, pieces):
    cache, outs = None, []
    for piece in pieces:
        embeds, cache = get_audio_embedding_streaming(
            apm, projector, pooler, piece, [torch.tensor([piece.shape[-1]])], cache
        )
        outs.append(embeds[0][0])
    return torch.cat(outs), cache


def test_streaming_agrees_where_the_computation_is_the_same(golden_case, audio_tower):
    """Streaming 1 s pieces = the chunk-masked encoder with conv padding cut at every piece boundary."""
    apm, projector, pooler, _ = audio_tower
    _, arrays = golden_case("c_asr")
    features = torch.from_numpy(arrays["audio_features"])  # 3 s, the non-streaming features
    pieces = [features[:, :, 100 * k : 100 * (k + 1)] for k in range(3)]
    with torch.no_grad():
        streamed, cache = _stream(apm, projector, pooler, pieces)
        assert cache.get_seq_length() == 150
        # Same computation done in one pass: per-piece convolutions, positions 0..149, 1 s chunk mask.
        hidden = torch.cat([apm.embed(p, position_offset=50 * k) for k, p in enumerate(pieces)], dim=1)
        mask = build_audio_attention_mask(torch.tensor([300]), 300, 1.0, torch.float32)
        for layer in apm.layers:
            hidden = layer(hidden, mask)
        manual = pooler(projector(apm.layer_norm(hidden)).transpose(1, 2)).transpose(1, 2)[0]
        assert torch.allclose(streamed, manual, atol=1e-5, rtol=0)

        # First chunk: equal to the non-streaming path once the non-streaming conv cannot see mel frame 100.
        cut = features.clone()
        cut[:, :, 100] = 0.0
        non_streaming_cut = get_audio_embedding(apm, projector, pooler, cut, [torch.tensor([300])])[0][0]
        assert torch.allclose(streamed[:25], non_streaming_cut[:25], atol=1e-5, rtol=0)

        # A single piece from an empty cache equals the non-streaming result for that piece alone.
        alone = get_audio_embedding(apm, projector, pooler, pieces[0].contiguous(), [torch.tensor([100])])[0][0]
        assert torch.allclose(streamed[:25], alone, atol=1e-6, rtol=0)


def test_streaming_differs_from_non_streaming_across_boundaries(golden_case, audio_tower):
    """Documented difference: conv padding at piece boundaries (and per-piece log-mel in real sessions).

    On the golden weights every chunk moves (by ~0.07 here, embeddings of mean |x| 0.17): the boundary
    frame of chunk k changes, and within-chunk attention spreads that to the whole chunk and to later ones.
    """
    apm, projector, pooler, _ = audio_tower
    _, arrays = golden_case("c_asr")
    features = torch.from_numpy(arrays["audio_features"])
    with torch.no_grad():
        streamed, _ = _stream(apm, projector, pooler, [features[:, :, 100 * k : 100 * (k + 1)] for k in range(3)])
    golden = torch.from_numpy(arrays["audio_embeds.0"])
    assert streamed.shape == golden.shape
    for k in range(3):
        diff = (streamed[25 * k : 25 * (k + 1)] - golden[25 * k : 25 * (k + 1)]).abs().max().item()
        assert 1e-3 < diff < 0.5


def _tiny_encoder(max_positions: int) -> MiniCPMWhisperEncoder:
    config = WhisperConfig(
        d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, max_source_positions=max_positions
    )
    torch.manual_seed(0)
    return MiniCPMWhisperEncoder(config).eval()


def test_cache_is_reset_before_it_would_exceed_the_position_table():
    apm = _tiny_encoder(max_positions=120)
    projector, pooler = torch.nn.Linear(16, 8), torch.nn.AvgPool1d(2, stride=2)
    piece = torch.randn(1, 80, 100)
    with torch.no_grad():
        _, cache = _stream(apm, projector, pooler, [piece, piece])
        assert cache.get_seq_length() == 100
        # 100 cached + 50 new >= 120: the reference drops the cache first, so this equals a fresh start.
        again, cache2 = get_audio_embedding_streaming(apm, projector, pooler, piece, [torch.tensor([100])], cache)
        fresh, _ = get_audio_embedding_streaming(apm, projector, pooler, piece, [torch.tensor([100])], None)
    assert cache2.get_seq_length() == 50
    assert torch.equal(again[0][0], fresh[0][0])


def test_positions_past_the_table_repeat_the_last_vector():
    apm = _tiny_encoder(max_positions=60)
    cache = WhisperEncoderCache()
    with torch.no_grad():
        apm(torch.randn(1, 80, 80), past_key_values=cache, use_cache=True)  # 40 frames cached
        embedded = apm.embed(torch.zeros(1, 80, 80), position_offset=40)  # 40 more: 20 past the table
    conv_only = apm.embed(torch.zeros(1, 80, 80), position_offset=0) - apm.embed_positions.weight[:40]
    positions = embedded - conv_only
    table = apm.embed_positions.weight
    assert torch.allclose(positions[0, :20], table[40:60], atol=1e-6)
    assert torch.allclose(positions[0, 20:], table[-1].expand(20, -1), atol=1e-6)


def test_streaming_takes_one_piece_at_a_time():
    apm = _tiny_encoder(max_positions=120)
    with pytest.raises(ValueError):
        get_audio_embedding_streaming(
            apm, torch.nn.Linear(16, 8), torch.nn.AvgPool1d(2), torch.zeros(2, 80, 100), [torch.tensor([100, 100])]
        )
