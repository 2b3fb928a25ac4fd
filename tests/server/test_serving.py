"""Many clients at once on `minicpmo serve` (the official `openai` client, httpx, prometheus_client's parser):
answers equal to the same requests alone, a request joining while others stream, aborted streams (text and
speech) freeing their places, /metrics, and 429 + Retry-After under a flood. Tests wait for states (read from
/metrics), never for a clock; deadlines only turn a hang into a failure."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import API_KEY, MODEL, metrics, post_and_hold, start_server, stop_server, wait_for

CLIENTS = 16


def ask(server, index: int, **options) -> str:
    messages = [{"role": "user", "content": f"Question number {index}: what comes next?"}]
    answer = server.client().chat.completions.create(model=MODEL, messages=messages, **options)
    return answer.choices[0].message.content


def test_sixteen_at_once_equal_alone_greedy_and_seeded(server):
    """Greedy and seeded sampled answers are the same bytes alone and with 15 others running."""
    kinds = {"greedy": {"temperature": 0, "max_tokens": 12},
             "seeded": {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_tokens": 12}}
    for name, options in kinds.items():
        alone = [ask(server, index, **options) for index in range(CLIENTS)]
        assert len(set(alone)) > 1, name  # the prompts really differ
        with ThreadPoolExecutor(CLIENTS) as pool:
            together = list(pool.map(lambda index: ask(server, index, **options), range(CLIENTS)))
        assert together == alone, name


def mixed_request(server, index: int) -> str | None:
    """Request ``index`` of a mix: greedy, seeded sampled (every other one streamed) or unseeded sampled (whose
    answer is not comparable: None)."""
    kind = index % 3
    if kind == 2:
        ask(server, index, temperature=1.0, max_tokens=12)
        return None
    if kind == 0:
        return ask(server, index, temperature=0, max_tokens=12)
    options = {"temperature": 0.9, "top_p": 0.95, "seed": 100 + index, "max_tokens": 12}
    if index % 2:
        return stream_text(open_stream(server, index, **options))
    return ask(server, index, **options)


def test_seeded_answers_sent_with_unseeded_and_greedy_ones_equal_alone(server):
    """Seeded sampled requests (each its own generator) run together with greedy and unseeded sampled ones
    (which draw from torch's global generator) and give the answers they give alone."""
    alone = {index: mixed_request(server, index) for index in range(18) if index % 3 != 2}
    assert len({alone[i] for i in alone if i % 3 == 1}) > 1  # the seeds really differ
    with ThreadPoolExecutor(18) as pool:
        together = dict(zip(range(18), pool.map(lambda index: mixed_request(server, index), range(18))))
    assert {index: together[index] for index in alone} == alone


def spoken_stream(server, seed: int | None) -> tuple[str, bytes]:
    """(transcript, pcm16 bytes) of a streamed spoken answer."""
    import base64

    extra = {} if seed is None else {"seed": seed}
    chunks = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=8, temperature=0.9,
        stream=True, modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"}, **extra)
    transcript, pcm = [], b""
    for chunk in chunks:
        audio = chunk.choices[0].delta.audio if chunk.choices else None
        if audio:
            transcript.append(getattr(audio, "transcript", None) or "")
            pcm += base64.b64decode(getattr(audio, "data", None) or "")
    return "".join(transcript), pcm


def spoken_whole(server, seed: int | None) -> tuple[str, bytes]:
    """(transcript, wav bytes) of a whole (not streamed) spoken answer."""
    import base64

    extra = {} if seed is None else {"seed": seed}
    answer = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=8, temperature=0.9,
        modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, **extra)
    audio = answer.choices[0].message.audio
    return audio.transcript, base64.b64decode(audio.data)


@pytest.mark.parametrize("spoken", [spoken_stream, spoken_whole], ids=["streamed", "whole"])
def test_a_seeded_spoken_answer_with_others_running_equals_alone(server, spoken):
    """The speech of a spoken answer, streamed or whole, draws from the seed's own generator: the same text and
    audio alone and while greedy text streams and an unseeded spoken answer (the global generator) run beside
    it (no exclusive turn any more)."""
    expected = spoken(server, 5)
    assert len(expected[1]) > 44  # some speech (more than a wav header)
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(lambda i=i: stream_text(open_stream(server, i, max_tokens=40))) for i in range(2)]
        unseeded = pool.submit(spoken, server, None)
        seeded = pool.submit(spoken, server, 5)
        assert seeded.result() == expected
        unseeded.result()
        [other.result() for other in others]


def open_stream(server, index: int, max_tokens: int = 300, **options):
    messages = [{"role": "user", "content": f"Tell a long story number {index}."}]
    options = {"temperature": 0, **options}
    return server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                   stream=True, **options)


def stream_text(stream) -> str:
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_a_request_joins_while_others_stream(server):
    """A short request sent while four long answers stream is answered before they end, the same as alone,
    and the streams go on to the answers they give alone."""
    long_alone = [stream_text(open_stream(server, index)) for index in range(4)]
    short_alone = ask(server, 99, temperature=0, max_tokens=3)
    streams = [open_stream(server, index) for index in range(4)]
    heads = [next(iter(stream)) for stream in streams]  # every stream has started
    wait_for("four streams running", lambda: metrics(server)["minicpmo:num_requests_running"] >= 4)
    assert ask(server, 99, temperature=0, max_tokens=3) == short_alone
    assert metrics(server)["minicpmo:num_requests_running"] >= 4  # the streams had not ended
    for head, stream, expected in zip(heads, streams, long_alone):
        text = (head.choices[0].delta.content or "" if head.choices else "") + stream_text(stream)
        assert text == expected


def test_clients_that_leave_stop_their_work(server):
    """Text streams, a spoken answer streamed as it is synthesised and a whole-file speech request (minutes
    of work: 40 sentences of up to 30 s each) all stop when their clients leave: the running count falls
    to zero long before the answers could be done, and each that was still running is counted as aborted."""
    before = metrics(server)
    streams = [open_stream(server, index, max_tokens=4000) for index in range(3)]
    for stream in streams:
        next(iter(stream))
    speech = post_and_hold(server, "/v1/audio/speech", {
        "model": MODEL, "input": "A long text to read aloud. " * 40, "voice": "alloy", "response_format": "pcm",
        "max_audio_seconds": 30})
    spoken = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Talk for a long time."}], max_tokens=200,
        temperature=0, stream=True, modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"})
    spoken_chunks = iter(spoken)
    while not any(c.choices and c.choices[0].delta.audio and c.choices[0].delta.audio.data for c in [
            next(spoken_chunks)]):
        pass  # up to the first piece of speech
    # The spoken answer's job may already have made all its (short) speech into the outbox by now: it is not
    # waited for; the text streams and the whole-file speech are minutes of work and must all be running.
    wait_for("the four long requests running",
             lambda: metrics(server)["minicpmo:num_requests_running"] >= 4)
    for stream in streams:
        stream.close()
    speech.close()
    spoken.close()
    wait_for("every request stopped", lambda: metrics(server)["minicpmo:num_requests_running"] == 0)
    after = metrics(server)
    name = "minicpmo:request_success_total{finished_reason=abort}"
    assert after.get(name, 0) - before.get(name, 0) >= 4
    assert server.log_text().count("client went away") >= 4


def test_metrics_after_real_requests(server):
    before = metrics(server)
    ask(server, 1, temperature=0, max_tokens=5)
    stream_text(open_stream(server, 2, max_tokens=5))
    server.client().audio.speech.create(model=MODEL, input="Hi.", voice="alloy", response_format="pcm",
                                        extra_body={"max_audio_seconds": 0.2})
    after = metrics(server)
    grew = lambda name: after[name] - before.get(name, 0)  # noqa: E731
    assert grew("minicpmo:time_to_first_token_seconds_count") >= 2
    assert grew("minicpmo:e2e_request_latency_seconds_count") >= 3
    assert grew("minicpmo:time_per_output_token_seconds_count") >= 2
    assert grew("minicpmo:request_queue_time_seconds_count") >= 3
    assert grew("minicpmo:prompt_tokens_total") > 0 and grew("minicpmo:generation_tokens_total") >= 10
    assert after["minicpmo:num_requests_waiting"] == 0 and after["minicpmo:num_pool_threads"] >= 1
    assert "minicpmo:kv_slots_used" in after
    assert after["minicpmo:e2e_request_latency_seconds_sum"] > 0
    assert grew("minicpmo:tts_frames_total") > 0 and grew("minicpmo:tts_steps_total") > 0
    assert after["minicpmo:num_tts_rows_running"] == 0 and after["minicpmo:tts_slots_total"] >= 1
    assert after["minicpmo:tts_cache_bytes"] > 0


@pytest.fixture(scope="module")
def small_server(tiny_ckpt, tmp_path_factory):
    """One request at a time and one waiting: the smallest server a flood overflows."""
    running = start_server(tiny_ckpt, tmp_path_factory.mktemp("small-server"), "--served-model-name", MODEL,
                           "--api-key", API_KEY, "--max-batch", "1", "--max-queue", "1")
    yield running
    stop_server(running)


def test_flood_gets_429_with_retry_after_never_5xx(small_server):
    """Eight requests at a server that runs one and holds one: the rest are refused at once with 429, a
    Retry-After and OpenAI's error shape; every other answer is complete; nothing is a 5xx."""
    import openai

    hold = open_stream(small_server, 0, max_tokens=4000)  # keeps the one thread busy
    next(iter(hold))
    wait_for("one running", lambda: metrics(small_server)["minicpmo:num_requests_running"] == 1)
    statuses, retry_after, lock = [], [], threading.Lock()

    def one(index: int) -> None:
        try:
            ask(small_server, index, temperature=0, max_tokens=2)
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status == 429:
                body = exc.response.json()["error"]
                assert body["code"] == "rate_limit_exceeded" and body["message"]
                retry_after.append(int(exc.response.headers["retry-after"]))
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    wait_for("seven refused", lambda: statuses.count(429) >= 7)  # one waits behind the held stream
    hold.close()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] + [429] * 7
    assert all(seconds >= 1 for seconds in retry_after)


def test_streamed_speech_given_the_seed_is_what_the_seeded_global_generator_gave(engine):
    """What a seeded streamed spoken answer sounded like when it ran alone drawing from the global generator
    (seeded by its written half, whose sampling draws from a generator of its own) is what it sounds like now
    from the seed's own generator, whatever the global generator's state."""
    import numpy as np
    import torch

    from minicpmo_cli.api.chat import Conversation, reply_with_speaker
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.api.speech import stream_answer_speech

    conversation = Conversation()
    conversation.ask("Say something.")
    decode = DecodeOptions(seed=5, max_new_tokens=8, temperature=0.9)
    text, spk = reply_with_speaker(engine, conversation, decode)  # seeds the global generator with 5
    before = np.concatenate(list(stream_answer_speech(engine, spk, text)))
    again, spk = reply_with_speaker(engine, conversation, decode)
    torch.manual_seed(1234)  # another request's draws meanwhile
    now = np.concatenate(list(stream_answer_speech(engine, spk, again, seed=5)))
    assert again == text and np.array_equal(now, before) and before.size
