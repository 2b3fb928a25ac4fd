"""16 clients x 4 requests at once (threads, the official client): every answer complete and equal to the same
request sent alone. Deterministic decoding (temperature 0) makes "equal" exact; distinct prompts per client
make any mix-up between requests (two in one cache, pieces sent to the wrong stream) visible."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.server.conftest import MODEL, need

CLIENTS, ROUNDS = 16, 4


def request(server, index: int, speech_bytes: bytes | None) -> str:
    client = server.client()
    kind = index % 4
    if kind == 3 and speech_bytes is not None:  # a quarter of the clients transcribe
        return client.audio.transcriptions.create(model=MODEL, file=("speech.wav", speech_bytes),
                                                  extra_body={"max_new_tokens": 6}).text
    messages = [{"role": "user", "content": f"Question number {index}: what comes next?"}]
    if kind == 1:  # a quarter stream
        chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert answer.usage.completion_tokens == 6 or answer.choices[0].finish_reason == "stop"
    return answer.choices[0].message.content


def test_sixteen_clients_at_once_lose_nothing(server, media_files):
    speech_bytes = need(media_files, "speech").read_bytes()
    alone = {index: request(server, index, speech_bytes) for index in range(CLIENTS)}
    assert len(set(alone.values())) > 1  # the prompts really differ

    def client_session(index: int) -> list[str]:
        return [request(server, index, speech_bytes) for _ in range(ROUNDS)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = dict(zip(range(CLIENTS), pool.map(client_session, range(CLIENTS))))
    for index, answers in results.items():
        assert answers == [alone[index]] * ROUNDS, index
