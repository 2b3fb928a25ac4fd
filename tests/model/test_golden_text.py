"""Golden cases a (text chat), b (image chat) and d (one forward over image + audio) against the reference.

Tolerances from the golden README: ids, prompts and bounds exact; logits and embeddings <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpmo_cli.generation.text import guide_decode, run_llm_generate

LOGIT_TOL = 1e-4
GREEDY = {"num_beams": 1, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def model(golden_ckpt):
    from minicpmo_cli import MiniCPMO

    torch.manual_seed(0)
    return MiniCPMO.from_pretrained(golden_ckpt, dtype=torch.float32)


def _messages(meta, cases_dir):
    """The case's messages with media loaded as the README prescribes."""
    import soundfile
    from PIL import Image

    msgs = []
    for message in meta["messages"]:
        content = []
        for item in message["content"]:
            if item["type"] == "text":
                content.append(item["text"])
            elif item["type"] == "image":
                content.append(Image.open(cases_dir / item["file"]).convert("RGB"))
            else:
                content.append(soundfile.read(cases_dir / item["file"], dtype="float32")[0])
        msgs.append({"role": message["role"], "content": content})
    return msgs


@pytest.fixture(scope="module")
def case(golden_case, golden_ckpt):
    cases_dir = golden_ckpt.parent / "cases"

    def load(name):
        meta, arrays = golden_case(name)
        return meta, arrays, _messages(meta, cases_dir)

    return load


def _generated_ids(model, inputs, settings):
    embeds, _ = model.get_inputs_embeds(dict(inputs))
    sequences, _ = run_llm_generate(model, embeds, inputs["attention_mask"], model.processor.tokenizer, settings)
    return sequences[0].tolist()


def _check_decoding(model, meta, msgs, inputs):
    greedy, beam3 = meta["decoding"]["greedy"], meta["decoding"]["beam3"]
    assert _generated_ids(model, inputs, guide_decode(False, 16, 0, GREEDY)) == greedy["generated_ids"]
    assert _generated_ids(model, inputs, guide_decode(False, 16)) == beam3["generated_ids"]
    text = model.chat(msgs=msgs, sampling=False, max_new_tokens=16, **GREEDY)
    assert text == greedy["chat_return_text"]
    assert model.chat(msgs=msgs, sampling=False, max_new_tokens=16) == beam3["chat_return_text"]


def test_case_a_prompt_and_ids(model, case):
    meta, _, msgs = case("a_text_chat")
    prompts, _, _, _ = model.processor.render_prompts(msgs)
    assert prompts == [meta["inputs"]["prompt_text"]]
    inputs = model.processor.apply_chat_template(msgs=msgs)
    assert inputs["input_ids"][0].tolist() == meta["inputs"]["input_ids"]
    assert bool(inputs["attention_mask"].all())
    assert inputs["image_bound"][0].shape == (0, 2) and inputs["spk_bounds"][0].shape == (0, 2)


def test_case_a_logits_and_decoding(model, case):
    meta, arrays, msgs = case("a_text_chat")
    inputs = model.processor.apply_chat_template(msgs=msgs)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].numpy()
    np.testing.assert_allclose(logits, arrays["prefill_last_logits"], atol=LOGIT_TOL, rtol=0)
    embeds, _ = model.get_inputs_embeds(dict(inputs))
    with torch.no_grad():
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=16,
                                 do_sample=False, pad_token_id=0, eos_token_id=[1002, 1000], output_logits=True,
                                 return_dict_in_generate=True)
    step_logits = torch.stack(out.logits, dim=1)[0].numpy()
    np.testing.assert_allclose(step_logits, arrays["greedy.step_logits"], atol=LOGIT_TOL, rtol=0)
    assert out.sequences[0].tolist() == arrays["greedy.generated_ids"][0].tolist()
    _check_decoding(model, meta, msgs, inputs)
    assert model.processor.tokenizer.decode(meta["decoding"]["beam3"]["generated_ids"]) == meta["decoding"]["beam3"]["decoded"]


def test_case_b_image_chat(model, case):
    meta, arrays, msgs = case("b_image_chat")
    inputs = model.processor.apply_chat_template(msgs=msgs)
    assert inputs["input_ids"][0].tolist() == meta["inputs"]["input_ids"]
    assert inputs["image_bound"][0].tolist() == meta["inputs"]["image_bound"]
    assert inputs["tgt_sizes"][0].tolist() == meta["inputs"]["tgt_sizes"]
    assert len(inputs["pixel_values"][0]) == meta["inputs"]["num_pixel_value_entries"]
    _, vision_states = model.get_vllm_embedding(dict(inputs))
    np.testing.assert_allclose(vision_states[0].detach().numpy(), arrays["vision_embeds"], atol=LOGIT_TOL, rtol=0)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].numpy()
    np.testing.assert_allclose(logits, arrays["prefill_last_logits"], atol=LOGIT_TOL, rtol=0)
    _check_decoding(model, meta, msgs, inputs)


def test_case_d_forward(model, case):
    meta, arrays, msgs = case("d_forward")
    inputs = model.processor.apply_chat_template(msgs=msgs)
    assert inputs["input_ids"][0].tolist() == meta["inputs"]["input_ids"]
    assert inputs["image_bound"][0].tolist() == meta["inputs"]["image_bound"]
    assert inputs["audio_bounds"][0].tolist() == meta["inputs"]["audio_bounds"]
    assert inputs["spk_bounds"][0].tolist() == meta["inputs"]["spk_bounds"]
    assert [lens.tolist() for lens in inputs["audio_feature_lens"]] == meta["inputs"]["audio_feature_lens"]
    np.testing.assert_allclose(inputs["audio_features"].numpy(), arrays["audio_features"], atol=1e-5, rtol=0)
    data = dict(inputs)
    data["position_ids"] = torch.arange(inputs["input_ids"].shape[1])[None]
    with torch.no_grad():
        embeds, _ = model.get_inputs_embeds(dict(data))
        logits = model(data=data, use_cache=False).logits[0].numpy()
    np.testing.assert_allclose(embeds[0].numpy(), arrays["inputs_embeds"], atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(logits, arrays["logits"], atol=LOGIT_TOL, rtol=0)


def test_case_c_asr_decoding(model, case):
    meta, arrays, msgs = case("c_asr")
    inputs = model.processor.apply_chat_template(msgs=msgs)
    assert inputs["input_ids"][0].tolist() == meta["inputs"]["input_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].numpy()
    np.testing.assert_allclose(logits, arrays["prefill_last_logits"], atol=LOGIT_TOL, rtol=0)
    _check_decoding(model, meta, msgs, inputs)


def test_case_e_speaker_conditioning(model, case):
    """The TTS conditioning: final-norm LLM state at <|spk|> of the prompt pass (greedy chat, TTS template)."""
    meta, arrays, msgs = case("e_tts_pieces")
    out = model.chat(msgs=msgs, sampling=False, max_new_tokens=16, use_tts_template=True, return_spk_embed=True,
                     **GREEDY)
    assert out.text == meta["llm"]["chat_return_text"]
    np.testing.assert_allclose(out.spk_embeds.numpy(), arrays["spk_embeds"], atol=LOGIT_TOL, rtol=0)
