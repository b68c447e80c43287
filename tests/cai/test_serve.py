"""``alignloop serve`` on 127.0.0.1 and the real HTTP client: same labels as the local backend."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_process import free_port, serving


@pytest.fixture(scope="module")
def server(sharp_gpt2):
    """A real ``alignloop serve`` process on loopback (stopped after the module)."""
    with serving(sharp_gpt2, "sharp") as url:
        yield url


def test_openai_endpoints(server, sharp_gpt2):
    from alignloop.cai.judges import LocalLM

    models = httpx.get(server + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "sharp"
    body = {"prompt": ["is the house hot ?", "what is a dog ?"], "max_tokens": 5, "temperature": 1.0, "seed": 3,
            "logprobs": 2}  # fmt: skip
    r = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    assert r["object"] == "text_completion" and [c["index"] for c in r["choices"]] == [0, 1]
    again = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in r["choices"]]  # seeded
    for c in r["choices"]:
        lp = c["logprobs"]
        assert (
            len(lp["tokens"])
            == len(lp["token_logprobs"])
            == len(lp["top_logprobs"])
            == len(lp["text_offset"])
        )
        assert all(
            len(t) == 2 and max(t.values()) >= x - 1e-6
            for t, x in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True)
        )
        assert c["finish_reason"] in ("stop", "length")
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    # echo + max_tokens 0 scores given text: the same numbers as the local model
    echo = httpx.post(server + "/v1/completions", json={"prompt": "is the house hot ? yes", "max_tokens": 0,
                                                        "echo": True, "logprobs": 0}, timeout=60).json()  # fmt: skip
    lp = echo["choices"][0]["logprobs"]
    assert echo["choices"][0]["text"] == "is the house hot ? yes"
    assert lp["tokens"] == ["is", "the", "house", "hot", "?", "yes"] and lp["token_logprobs"][0] is None
    assert lp["text_offset"] == [0, 3, 7, 13, 17, 19]
    local = LocalLM(str(sharp_gpt2)).continuation_logprobs(["is the house hot ?"], [" yes"])[0]
    assert lp["token_logprobs"][-1] == pytest.approx(local, abs=1e-5)
    # bad requests: clear 4xx, the server keeps serving
    bad = httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
    wrong = httpx.post(server + "/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert wrong.status_code == 404 and "sharp" in wrong.json()["error"]["message"]
    assert httpx.get(server + "/health").status_code == 200


def test_cai_label_over_http_equals_local(cli, server, sharp_gpt2, tiny_constitution, tiny_sets, tmp_path):
    """The acceptance check: `cai label --judge URL` == `cai label --judge MODEL` (same model, seed)."""
    common = ["--pairs-from", tiny_sets, "--constitution", tiny_constitution, "--principles", "2", "--swap",
              "--seed", "5"]  # fmt: skip
    code, _, err = cli(
        "-q", "cai", "label", "--judge", sharp_gpt2, "--out", tmp_path / "local.jsonl", *common
    )
    assert code == 0, err
    code, _, err = cli("-q", "cai", "label", "--judge", server, "--out", tmp_path / "http.jsonl", *common)
    assert code == 0, err
    local = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    remote = [json.loads(x) for x in (tmp_path / "http.jsonl").read_text().splitlines()]
    assert len(local) == len(remote) == 5
    for a, b in zip(local, remote, strict=True):
        assert (a["id"], a["chosen"], a["rejected"]) == (b["id"], b["chosen"], b["rejected"])
        assert a["per_principle"].keys() == b["per_principle"].keys()
        assert a["p_a"] == pytest.approx(b["p_a"], abs=1e-5)
    assert max(abs(a["p_a"] - 0.5) for a in local) > 0.05  # labels that could differ, not coin flips
    assert remote[0]["source"].startswith(f"ai:{server}")


def test_http_judge_errors(cli, tiny_sets, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = cli(
        "cai", "label", "--judge", dead, "--pairs-from", tiny_sets, "--out", tmp_path / "o.jsonl"
    )
    assert code == 2 and "no OpenAI-compatible server" in err and "alignloop serve" in err
    code, _, err = cli("serve", "--model", "world:base", "--port", "0")
    assert code == 2 and "--port" in err


def test_chat_endpoint_and_chat_judge(cli, server, sharp_gpt2, tiny_constitution, tiny_sets, tmp_path):
    """A chat judge answers in text: hard labels, equal to what the local model answers greedily."""
    from alignloop.cai.constitution import load_constitution, preference_prompt
    from alignloop.cai.judges import LocalLM
    from alignloop.cai.label import answer_choice, pairs_from_file

    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "is the dog hot ?"}],
                                                          "max_tokens": 4, "temperature": 0}, timeout=60).json()  # fmt: skip
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    local = LocalLM(str(sharp_gpt2))
    assert (
        r["choices"][0]["message"]["content"] == local.generate(["is the dog hot ?"], 4, temperature=0.0)[0]
    )
    code, _, err = cli("-q", "cai", "label", "--judge", server, "--api", "chat", "--pairs-from", tiny_sets,
                       "--constitution", tiny_constitution, "--out", tmp_path / "chat.jsonl", "--seed", "2")  # fmt: skip
    assert code == 0, err
    got = [json.loads(x) for x in (tmp_path / "chat.jsonl").read_text().splitlines()]
    c = load_constitution(tiny_constitution)
    pairs = pairs_from_file(tiny_sets)
    from alignloop.cai.label import draw_principles

    for rec, p in zip(got, pairs, strict=True):
        (k,) = draw_principles(c, p["id"], 1, seed=2)
        q = preference_prompt(c, p["prompt"], p["a"], p["b"], c.preferences[k])
        answer = local.generate([q], 8, temperature=0.0)[0]
        assert rec["p_a"] == answer_choice(answer, " yes", " no")
    assert answer_choice("yes , no", " yes", " no") == 1.0 and answer_choice("(no) yes", " yes", " no") == 0.0
    assert answer_choice("maybe", " yes", " no") == 0.5


def test_revise_over_http_equals_local(cli, server, sharp_gpt2, tiny_constitution, tmp_path):
    """The writer backend over HTTP: same seeds, same batches -> the same transcripts as locally."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in
                               enumerate(["is the house hot ?", "what is a dog ?", "how do i open the window ?"])))  # fmt: skip
    common = ["--prompts", prompts, "--constitution", tiny_constitution, "--rounds", "2", "--samples", "2",
              "--set", "batch_size=4", "--set", "max_new_tokens=6"]  # fmt: skip
    code, _, err = cli("-q", "cai", "revise", "--model", sharp_gpt2, "--out", tmp_path / "local", *common)
    assert code == 0, err
    code, _, err = cli("-q", "cai", "revise", "--model", server, "--out", tmp_path / "http", *common)
    assert code == 0, err
    local = (tmp_path / "local" / "transcripts.jsonl").read_text()
    assert local == (tmp_path / "http" / "transcripts.jsonl").read_text()
    assert len(local.splitlines()) == 6


def test_seq2seq_model_served_and_judged_locally(tiny_t5):
    """A seq2seq judge scores the answer with its decoder; the server generates but cannot echo."""
    import torch

    from alignloop.cai.judges import LocalLM
    from alignloop.serve import CompletionRequest, complete

    lm = LocalLM(str(tiny_t5))
    got = lm.continuation_logprobs(["is the house hot ?"], [" yes no"])[0]
    enc = lm.tokenizer(["is the house hot ?"], return_tensors="pt")
    target = lm.tokenizer(["yes no"], add_special_tokens=False)["input_ids"][0]
    dec = torch.tensor([[lm.model.config.decoder_start_token_id, *target[:-1]]])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(**enc, decoder_input_ids=dec).logits[0], -1)
    assert got == pytest.approx(float(sum(logp[i, t] for i, t in enumerate(target))), abs=1e-5)
    r = complete(
        lm.model,
        lm.tokenizer,
        "t5",
        CompletionRequest(prompt=["a dog", "the cat"], max_tokens=4, seed=1, logprobs=1),
    )
    assert len(r["choices"]) == 2 and all(len(c["logprobs"]["token_logprobs"]) <= 4 for c in r["choices"])
    from alignloop.errors import UserError

    with pytest.raises(UserError, match="echo"):
        complete(
            lm.model,
            lm.tokenizer,
            "t5",
            CompletionRequest(prompt="a dog", max_tokens=0, echo=True, logprobs=0),
        )
