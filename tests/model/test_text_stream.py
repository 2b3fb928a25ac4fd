"""Streamed text read straight off a threaded engine (generation/text_stream.py): the incremental
detokenizer's pieces join up to the whole decode, for any split of the ids into batches (multi-byte characters
split across ids included), and a streamed answer equals the same answer made by the plain streaming path."""

from __future__ import annotations

import random
import time

import pytest

from minicpmo_cli.generation.text_stream import IncrementalText


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    return MiniCPMOProcessor.from_pretrained(str(tiny_ckpt)).tokenizer


def pieces(tokenizer, ids: list[int], sizes: random.Random) -> str:
    text, out, at = IncrementalText(tokenizer), [], 0
    while at < len(ids):
        step = sizes.randint(1, 4)
        out.append(text.add(ids[at:at + step]))
        at += step
    return "".join(out) + text.flush()


@pytest.mark.parametrize("seed", range(6))
def test_pieces_join_up_to_the_whole_decode(tokenizer, seed):
    draw = random.Random(seed)
    words = "Hello there, 你好世界! Ça va? naïve café — emoji 🙂 and \\n newlines\n<|im_end|>"
    ids = tokenizer.encode(words, add_special_tokens=False)
    ids += [draw.randrange(len(tokenizer)) for _ in range(200)]  # random ids: broken characters too
    assert pieces(tokenizer, ids, draw) == tokenizer.decode(ids, skip_special_tokens=False)


class LeadingSpaceTokenizer:
    """SentencePiece-like: each id is a word with its leading space ("▁word"), which a decode drops at the
    start of what it decodes; an incremental detokenizer must keep context ids to get the spaces right."""

    clean_up_tokenization_spaces = False

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(f" w{i}" for i in ids).removeprefix(" ")


@pytest.mark.parametrize("seed", range(4))
def test_pieces_keep_the_spaces_a_decode_drops_at_its_start(seed):
    draw = random.Random(seed)
    tokenizer = LeadingSpaceTokenizer()
    ids = [draw.randrange(1000) for _ in range(150)]  # many moves of the decoded window
    assert pieces(tokenizer, ids, draw) == tokenizer.decode(ids)


def test_a_streamed_answer_equals_the_plain_streaming_path(tiny_ckpt):
    from minicpmo_cli import api
    from minicpmo_cli.api.chat import Conversation, reply
    from minicpmo_cli.api.engine import DecodeOptions

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), tts=False)
    for decode in (DecodeOptions(max_new_tokens=40, top_k=1), DecodeOptions(max_new_tokens=40, seed=3)):
        conversation = Conversation()
        conversation.ask("Tell me a story.")
        streamed = list(reply(engine, conversation, decode, stream=True))
        threaded, engine.llm_engine = engine.llm_engine, None  # the plain path: a short-lived engine, a thread
        try:
            plain = "".join(reply(engine, conversation, decode, stream=True))
        finally:
            engine.llm_engine = threaded
        assert "".join(streamed) == plain and len(streamed) > 1


def test_greedy_answers_stream_and_beam_search_is_refused(tiny_ckpt):
    """Greedy decoding (temperature 0 on the server) streams the answer it gives whole; beam search cannot
    stream and says so, naming the options."""
    from minicpmo_cli import api
    from minicpmo_cli.api.chat import Conversation, reply
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.errors import UsageError

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), tts=False)
    conversation = Conversation()
    conversation.ask("Tell me a story.")
    greedy = DecodeOptions(sampling=False, num_beams=1, max_new_tokens=30)
    whole = "".join(reply(engine, conversation, greedy, stream=False))
    pieces = engine.generate(conversation.messages(), greedy, stream=True)  # an iterator, not a refusal
    assert not isinstance(pieces, str) and "".join(pieces) == whole
    with pytest.raises(UsageError, match="beam search cannot stream"):
        engine.generate(conversation.messages(), DecodeOptions(sampling=False, num_beams=3, max_new_tokens=5),
                        stream=True)


def test_a_reader_interrupted_mid_stream_aborts_its_request(tiny_ckpt, monkeypatch):
    """Ctrl-C while a streamed answer is read off the threaded engine: the request is aborted (its slot freed),
    nothing goes on decoding in the background."""
    from minicpmo_cli import api
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.generation.requests import Handle

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), tts=False)
    real = Handle.batches

    def interrupted(self):
        yield next(real(self))
        raise KeyboardInterrupt

    monkeypatch.setattr(Handle, "batches", interrupted)
    options = DecodeOptions(sampling=True, max_new_tokens=3000, min_new_tokens=3000, seed=1)
    with pytest.raises(KeyboardInterrupt):
        for _ in engine.text_pieces([{"role": "user", "content": ["Tell me a story."]}], options):
            pass
    llm = engine.llm_engine
    deadline = time.monotonic() + 120  # only turns a hang into a failure
    while llm.stats().running and time.monotonic() < deadline:  # the abort lands at the engine's next step
        time.sleep(0.01)
    assert llm.stats().running == 0 and llm.stats().generation_tokens_total < 3000
