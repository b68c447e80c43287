"""``alignloop serve`` (a real process on loopback, the world base model) driven by the official ``openai``
client: every parameter it accepts behaves as the OpenAI API documents, the others get a 400 naming them."""

from __future__ import annotations

import httpx
import pytest
from serve_process import serving

openai = pytest.importorskip("openai")

QUESTION = "user : what is the way to read my old messages on a new phone ? assistant :"
OPEN = "user : hi assistant :"  # the world model answers this one in many ways


@pytest.fixture(scope="module")
def server():
    with serving("world:base", "world") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat_of(text: str) -> list[dict]:
    """The world prompt ``user : Q assistant :`` as a chat: the world's chat template renders it back."""
    from alignloop.world.prompts import as_messages

    return as_messages(text)


def test_seed_temperature_top_p(client):
    texts = [client.completions.create(model="world", prompt=OPEN, max_tokens=20, seed=s).choices[0].text for s in range(6)]  # fmt: skip
    assert len(set(texts)) >= 3  # temperature 1 samples
    again = client.completions.create(model="world", prompt=OPEN, max_tokens=20, seed=2).choices[0].text
    assert again == texts[2]  # same seed, same text
    greedy = {client.completions.create(model="world", prompt=OPEN, max_tokens=20, seed=s, temperature=0).choices[0].text
              for s in range(3)}  # fmt: skip
    assert len(greedy) == 1  # temperature 0: the argmax whatever the seed
    nucleus = {client.completions.create(model="world", prompt=OPEN, max_tokens=20, seed=s, top_p=1e-6).choices[0].text
               for s in range(3)}  # fmt: skip
    assert nucleus == greedy  # top_p that keeps only the likeliest token is greedy
    chats = [client.chat.completions.create(model="world", messages=chat_of(OPEN), max_tokens=20, seed=s)
             for s in (4, 4)]  # fmt: skip
    assert chats[0].choices[0].message.content == chats[1].choices[0].message.content


def test_stop_string_and_list(client):
    full = client.completions.create(model="world", prompt=QUESTION, max_tokens=30, seed=1, temperature=0)
    text = full.choices[0].text
    word = text.split()[3]  # a word well inside the answer
    cut = text.index(word)
    for stop in (word, ["never-seen", word]):
        r = client.completions.create(
            model="world", prompt=QUESTION, max_tokens=30, seed=1, temperature=0, stop=stop
        )
        c = r.choices[0]
        assert c.text == text[:cut] and word not in c.text and c.finish_reason == "stop"
        assert r.usage.completion_tokens < full.usage.completion_tokens
    chat = client.chat.completions.create(model="world", messages=chat_of(QUESTION), max_tokens=30, temperature=0,
                                          stop=[word])  # fmt: skip
    # the chat's prompt is the template's rendering (== QUESTION); a completion is the prompt's
    # continuation (leading space); a chat message is a text of its own
    assert text.startswith(" ") and chat.choices[0].message.content == text[:cut].lstrip()
    assert chat.choices[0].finish_reason == "stop"


def test_n_max_tokens_and_max_completion_tokens(client):
    r = client.completions.create(model="world", prompt=[OPEN, QUESTION], n=3, max_tokens=12, seed=5)
    assert [c.index for c in r.choices] == list(range(6))
    assert len({c.text for c in r.choices[:3]}) >= 2  # the n samples of one prompt are drawn apart
    short = client.completions.create(model="world", prompt=QUESTION, max_tokens=3, seed=1)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    for key in ("max_tokens", "max_completion_tokens"):
        chat = client.chat.completions.create(
            model="world", messages=chat_of(QUESTION), n=2, seed=1, **{key: 2}
        )
        assert [c.index for c in chat.choices] == [0, 1]
        assert chat.usage.completion_tokens == 4 and {c.finish_reason for c in chat.choices} == {"length"}


def test_logprobs(client):
    r = client.completions.create(model="world", prompt=QUESTION, max_tokens=6, logprobs=2, seed=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(
        len(t) == 2 and max(t.values()) >= x - 1e-6
        for t, x in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    chat = client.chat.completions.create(model="world", messages=chat_of(QUESTION), max_completion_tokens=6,
                                          logprobs=True, top_logprobs=3, seed=1)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6  # no end-of-text within 6 tokens here
    assert [e.token for e in content] == lp.tokens  # the chat prompt of one plain message is its text
    assert [e.logprob for e in content] == pytest.approx(lp.token_logprobs, abs=1e-5)
    for e in content:
        assert len(e.top_logprobs) == 3 and e.bytes == list(e.token.encode())
        assert max(t.logprob for t in e.top_logprobs) >= e.logprob - 1e-6
    plain = client.chat.completions.create(model="world", messages=chat_of(QUESTION), max_tokens=3, seed=1)
    assert plain.choices[0].logprobs is None


def test_stream_completions_and_chat(client, server):
    kw = {"model": "world", "prompt": [OPEN, QUESTION], "max_tokens": 16, "seed": 3, "n": 2}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > len(whole.choices) + 2  # token by token
    texts = ["" for _ in whole.choices]
    reasons = {}
    for ch in chunks[:-1]:
        (c,) = ch.choices
        texts[c.index] += c.text
        if c.finish_reason:
            reasons[c.index] = c.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    ckw = {"model": "world", "messages": chat_of(QUESTION), "max_completion_tokens": 16, "seed": 3}
    whole = client.chat.completions.create(**ckw)
    stream = list(client.chat.completions.create(**ckw, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == whole.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in stream)

    # a stop string mid-stream: the pieces stop where the whole answer does (text that could begin a
    # stop string is held back until it cannot)
    full = (
        client.completions.create(model="world", prompt=QUESTION, max_tokens=30, temperature=0)
        .choices[0]
        .text
    )
    stop = full.split()[4]
    kw = {
        "model": "world",
        "prompt": QUESTION,
        "max_tokens": 30,
        "temperature": 0,
        "stop": [stop[:2] + "#", stop],
    }
    streamed = list(client.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == full[: full.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"
    # with log-probs the pieces carry their token's log-probs (the answer is scored, then sent)
    lp = list(client.chat.completions.create(**ckw, stream=True, logprobs=True))
    content = [e for ch in lp if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert len(content) == whole.usage.completion_tokens - (whole.choices[0].finish_reason == "stop")

    # the wire format: server-sent events, each "data: {json}", the last "data: [DONE]"
    with httpx.stream(
        "POST", server + "/v1/chat/completions", json={**ckw, "stream": True}, timeout=120
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_unsupported_and_bad_parameters_are_400s_naming_them(client):
    def refused(call, **kw) -> str:
        with pytest.raises(openai.BadRequestError) as e:
            call(model="world", max_tokens=3, **kw)
        return str(e.value.message)

    complete, chat = client.completions.create, client.chat.completions.create
    assert "frequency_penalty" in refused(complete, prompt=QUESTION, frequency_penalty=0.5)
    assert "logit_bias" in refused(complete, prompt=QUESTION, logit_bias={"5": 10})
    assert "suffix" in refused(complete, prompt=QUESTION, suffix=" end")
    assert "'foo'" in refused(complete, prompt=QUESTION, extra_body={"foo": 1})
    assert "tools" in refused(chat, messages=chat_of(QUESTION), tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])  # fmt: skip
    msg = refused(complete, prompt=QUESTION, stop=[f"s{i}" for i in range(100)])
    assert "stop" in msg and "at most 4" in msg and "100" in msg
    msg = refused(chat, messages=chat_of(QUESTION), n=10000)
    assert "'n'" in msg and "32" in msg and "10000" in msg
    assert "top_logprobs" in refused(chat, messages=chat_of(QUESTION), top_logprobs=2)
    # a parameter at the value that changes nothing is accepted, and the server keeps serving
    ok = complete(
        model="world", prompt=QUESTION, max_tokens=2, frequency_penalty=0, presence_penalty=0, seed=1
    )
    assert ok.usage.completion_tokens == 2
