"""AI preference labels and the critique -> revision stage, on tiny real models."""

from __future__ import annotations

import json
import math

import pytest

from alignloop.cai.constitution import load_constitution
from alignloop.cai.judges import LocalLM, soft_preference
from alignloop.cai.label import LabelConfig, label_pairs, pairs_from_file, parse_clamp
from alignloop.cai.revise import ReviseConfig, revise_prompts
from alignloop.errors import UserError
from alignloop.records import continuation


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_continuation_logprob_is_the_sum_of_the_answer_tokens(sharp_gpt2):
    """log p(" yes no" | x) = log p(yes | x) + log p(no | x, yes), checked against a plain forward."""
    import torch

    lm = LocalLM(str(sharp_gpt2))
    x = "is the house hot ?"
    got = lm.continuation_logprobs([x, x], [" yes no", " yes"])
    ids = lm.tokenizer(x + " yes no")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0], -1)
    n = len(lm.tokenizer(x)["input_ids"])
    want_two = float(logp[n - 1, ids[n]] + logp[n, ids[n + 1]])
    assert got[0] == pytest.approx(want_two, abs=1e-5)
    assert got[1] == pytest.approx(float(logp[n - 1, ids[n]]), abs=1e-5)
    assert soft_preference(-1.0, -3.0) == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-3)))
    assert soft_preference(-800.0, -1.0) == pytest.approx(0.0) and soft_preference(
        -1.0, -800.0
    ) == pytest.approx(1.0)


def test_labels_are_soft_averaged_clamped_and_resumable(sharp_gpt2, tiny_constitution, tiny_sets, tmp_path):
    c = load_constitution(tiny_constitution)
    lm = LocalLM(str(sharp_gpt2))
    pairs = pairs_from_file(tiny_sets)
    assert len(pairs) == 3 + 1 + 1  # 3-choose-2 + 1 + 1
    cfg = LabelConfig(principles=2, batch_pairs=2)
    out = tmp_path / "pairs.jsonl"
    stats = label_pairs(lm, pairs, out, c, cfg)
    assert stats["labelled"] == 5
    recs = _lines(out)
    for r in recs:
        assert len(r["per_principle"]) == 2  # two drawn principles, averaged
        assert r["p_a"] == pytest.approx(sum(r["per_principle"].values()) / 2, abs=2e-6)
        assert r["weight"] >= 0.5 and r["weight"] == pytest.approx(max(r["p_a"], 1 - r["p_a"]), abs=1e-6)
        a_first = r["p_a"] >= 0.5
        pair = next(p for p in pairs if p["id"] == r["id"])
        assert (r["chosen"], r["rejected"]) == ((pair["a"], pair["b"]) if a_first else (pair["b"], pair["a"]))
        assert r["source"].startswith("ai:")
    assert len({round(r["p_a"], 3) for r in recs}) > 1  # the judge is not a constant
    # one principle by hand: P(A) = p(yes) / (p(yes) + p(no)) of the rendered question
    from alignloop.cai.constitution import preference_prompt

    one = label_pairs(lm, pairs[:1], tmp_path / "one.jsonl", c, LabelConfig(principles=1))
    rec = _lines(tmp_path / "one.jsonl")[0]
    (name,) = rec["per_principle"]
    q = preference_prompt(
        c, pairs[0]["prompt"], pairs[0]["a"], pairs[0]["b"], next(p for p in c.preferences if p.name == name)
    )
    la, lb = lm.continuation_logprobs([q, q], [" yes", " no"])
    assert rec["p_a"] == pytest.approx(math.exp(la) / (math.exp(la) + math.exp(lb)), abs=1e-6)
    assert one["labelled"] == 1
    # clamp to 40-60%
    label_pairs(lm, pairs, tmp_path / "clamped.jsonl", c, LabelConfig(principles=2, clamp=(0.4, 0.6)))
    clamped = _lines(tmp_path / "clamped.jsonl")
    assert all(0.4 <= r["p_a"] <= 0.6 and 0.5 <= r["weight"] <= 0.6 for r in clamped)
    assert any(r["p_a_raw"] != r["p_a"] for r in clamped)
    # swap: each principle asked both ways; P(A) = mean(P(A first), 1 - P(B first)), and the bias measured
    sw = label_pairs(lm, pairs, tmp_path / "swap.jsonl", c, LabelConfig(principles=2, swap=True))
    swapped = _lines(tmp_path / "swap.jsonl")
    assert [r["id"] for r in swapped] == [p["id"] for p in pairs]
    rec, pair = swapped[0], pairs[0]
    firsts = {}  # principle -> (P(first) with A first, P(first) with B first), asked by hand
    for name in rec["per_principle"]:
        pr = next(p for p in c.preferences if p.name == name)
        qs = [
            preference_prompt(c, pair["prompt"], x, y, pr)
            for x, y in ((pair["a"], pair["b"]), (pair["b"], pair["a"]))
        ]
        lp = lm.continuation_logprobs([qs[0], qs[0], qs[1], qs[1]], [" yes", " no", " yes", " no"])
        firsts[name] = (soft_preference(lp[0], lp[1]), soft_preference(lp[2], lp[3]))
        assert rec["per_principle"][name] == pytest.approx(
            (firsts[name][0] + 1 - firsts[name][1]) / 2, abs=2e-6
        )
    bias = sum(a + b for a, b in firsts.values()) / (2 * len(firsts)) - 0.5
    assert rec["position_bias"] == pytest.approx(bias, abs=2e-6)
    assert sw["position_bias_points"] == pytest.approx(
        100 * sum(r["position_bias"] for r in swapped) / len(swapped), abs=0.01
    )
    assert stats.get("position_bias_points") is None and "position_bias" not in recs[0]  # not asked both ways
    # resume: a torn last line and missing pairs are labelled again, nothing labelled twice
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:17])
    again = label_pairs(lm, pairs, out, c, cfg)
    assert again["skipped_done"] == 2 and again["labelled"] == 3
    assert _lines(out) == recs  # the same labels as the uninterrupted run


def test_label_errors(sharp_gpt2, tiny_constitution, tmp_path):
    with pytest.raises(UserError, match="--clamp"):
        parse_clamp("0.6,0.4")
    with pytest.raises(UserError, match="LO,HI"):
        parse_clamp("0.4")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        pairs_from_file(bad)
    only_critiques = tmp_path / "c.yaml"
    only_critiques.write_text("critiques:\n  - {name: a, critique: b, revision: c}\n")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(UserError, match="no preference principles"):
        label_pairs(
            LocalLM(str(sharp_gpt2)),
            pairs_from_file(good),
            tmp_path / "o.jsonl",
            load_constitution(only_critiques),
        )


def test_revise_keeps_transcripts_and_writes_the_sft_set(sharp_gpt2, tiny_constitution, tmp_path):
    c = load_constitution(tiny_constitution)
    lm = LocalLM(str(sharp_gpt2), batch_size=4)
    prompts = [
        {"id": f"p{i}", "prompt": t}
        for i, t in enumerate(["is the house hot ?", "what is a dog ?", "how do i open the window ?"])
    ]
    cfg = ReviseConfig(rounds=2, samples=2, max_new_tokens=6, batch_size=4)
    stats = revise_prompts(lm, prompts, tmp_path / "a", c, cfg)
    assert stats["responses"] == 6 and stats["revised"] == 6
    tr = _lines(tmp_path / "a" / "transcripts.jsonl")
    assert [t["id"] for t in tr] == ["p0#0", "p0#1", "p1#0", "p1#1", "p2#0", "p2#1"]
    for t in tr:
        assert len(t["rounds"]) == 2 and {r["principle"] for r in t["rounds"]} <= {"harmless", "honest"}
        last = next((r["revision"] for r in reversed(t["rounds"]) if r["revision"].strip()), t["initial"])
        assert t["final"] == last
    sft = _lines(tmp_path / "a" / "sft.jsonl")
    assert [(s["prompt"], s["response"]) for s in sft] == [
        (t["prompt"], continuation(t["prompt"], t["final"])) for t in tr if t["final"].strip()
    ]
    # principles are drawn at random, per response and round
    assert len({r["principle"] for t in tr for r in t["rounds"]}) == 2
    # resume after a crash that lost the second batch: the same transcripts as one uninterrupted run
    lines = (tmp_path / "a" / "transcripts.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "transcripts.jsonl").write_text("".join(lines[:4]))
    again = revise_prompts(lm, prompts, tmp_path / "b", c, cfg)
    assert again["skipped_done"] == 4 and again["revised"] == 2
    assert _lines(tmp_path / "b" / "transcripts.jsonl") == tr


def test_cli_revise_and_label(cli, sharp_gpt2, tiny_constitution, tiny_sets, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "a", "prompt": "is the house hot ?"}\n{"id": "b", "prompt": "what is a dog ?"}\n'
    )
    code, out, err = cli("-q", "cai", "revise", "--model", sharp_gpt2, "--prompts", prompts, "--out", tmp_path / "sl",
                         "--constitution", tiny_constitution, "--rounds", "1", "--set", "max_new_tokens=5")  # fmt: skip
    assert code == 0, err
    assert "revised=2" in out and len(_lines(tmp_path / "sl" / "sft.jsonl")) <= 2
    code, out, err = cli("-q", "cai", "label", "--judge", sharp_gpt2, "--pairs-from", tiny_sets, "--out",
                         tmp_path / "p.jsonl", "--constitution", tiny_constitution, "--clamp", "0.4,0.6",
                         "--principles", "3")  # fmt: skip
    assert code == 0, err
    assert "labelled=5" in out
    assert all(len(r["per_principle"]) == 3 for r in _lines(tmp_path / "p.jsonl"))
    code, _, err = cli("cai", "label", "--judge", sharp_gpt2, "--pairs-from", tiny_sets, "--out",
                       tmp_path / "q.jsonl", "--clamp", "0.7,0.9")  # fmt: skip
    assert code == 2 and "--clamp" in err and "Traceback" not in err
    code, _, err = cli(
        "cai",
        "revise",
        "--model",
        sharp_gpt2,
        "--prompts",
        tmp_path / "missing.jsonl",
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and "missing.jsonl" in err


@pytest.mark.slow
def test_label_killed_mid_run_loses_nothing(sharp_gpt2, tiny_constitution, tmp_path):
    """kill -9 while labelling, then rerun: every pair labelled once, the same labels as one clean run."""
    import signal
    import subprocess
    import sys
    import time

    words = "the a dog cat is good bad great house hot cold fan window".split()
    sets = [
        {"prompt_id": f"s{i}", "prompt": f"what is the {words[i % 13]} ?",
         "completions": [{"id": f"s{i}-{j}", "text": f"{words[(i + j) % 13]} {words[(i * j) % 13]} ."} for j in range(4)]}
        for i in range(24)
    ]  # fmt: skip
    src = tmp_path / "sets.jsonl"
    src.write_text("".join(json.dumps(s) + "\n" for s in sets))
    args = [sys.executable, "-m", "alignloop", "-q", "cai", "label", "--judge", str(sharp_gpt2), "--pairs-from",
            str(src), "--constitution", str(tiny_constitution), "--set", "batch_pairs=4"]  # fmt: skip
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(out.read_text().splitlines())
    assert 8 <= n_before < 144, "the kill should land mid-run"
    done = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    clean = subprocess.run(
        [*args, "--out", str(tmp_path / "clean.jsonl")], capture_output=True, text=True, timeout=300
    )
    assert clean.returncode == 0, clean.stderr
    got, want = _lines(out), _lines(tmp_path / "clean.jsonl")
    assert len(got) == len({r["id"] for r in got}) == 144
    assert sorted(got, key=lambda r: r["id"]) == sorted(want, key=lambda r: r["id"])


def test_texts_longer_than_the_context_keep_their_end(sharp_gpt2):
    """A 300-word question to a 256-position judge is cut from the left, never an index error."""
    lm = LocalLM(str(sharp_gpt2))
    long = " ".join(["the dog is hot ."] * 75)
    a, b = lm.continuation_logprobs([long, long], [" yes", " no"])
    assert math.isfinite(a) and math.isfinite(b) and a != b


def test_revise_a_conversation_as_chat_turns(cli, tmp_path):
    """A conversational prompt is critiqued and revised as chat turns through the writer's chat template
    (the world's): the response is the assistant's turn, the critique request the user's next; its SFT
    record keeps the messages with the final revision as the assistant's turn, and reads back as the
    template's ids. Text prompts in the same file go the text way. Bad messages: one line naming the line."""
    from alignloop.cai.constitution import critique_turns, revision_turns
    from alignloop.chat import prompt_text
    from alignloop.models import load_tokenizer
    from alignloop.sft import read_sft_records

    c, tok = load_constitution(), load_tokenizer("world:base")
    chat = [{"role": "system", "content": "be kind ."}, {"role": "user", "content": "what is a dog ?"}]
    p = c.critiques[1]
    assert prompt_text(tok, revision_turns(c, chat, "Go away!", p.name, "it is rude .")) == (
        f"system : be kind . user : what is a dog ? assistant : go away !</s> user : {p.critique} "
        f"assistant : it is rude .</s> user : {p.revision} assistant :"
    )
    assert revision_turns(c, chat, "a", p.name, "b")[:-2] == critique_turns(c, chat, "a", p.name)
    rows = [{"id": "a", "prompt": chat}, {"id": "b", "prompt": [{"role": "user", "content": "how do i steal a car ?"}]},
            {"id": "c", "prompt": "user : is the house hot ? assistant :"}]  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli("-q", "cai", "revise", "--model", "world:base", "--prompts", prompts, "--out", tmp_path / "sl",
                         "--rounds", "1", "--set", "max_new_tokens=12")  # fmt: skip
    assert code == 0, err
    assert "revised=3" in out
    tr = {t["id"]: t for t in _lines(tmp_path / "sl" / "transcripts.jsonl")}
    assert tr["a"]["prompt"] == chat and tr["c"]["prompt"] == rows[2]["prompt"]
    assert all(t["initial"].strip() and t["rounds"][0]["critique"].strip() for t in tr.values())
    sft = {s["id"]: s for s in _lines(tmp_path / "sl" / "sft.jsonl")}
    for k in ("a", "b"):
        if k in sft:
            assert sft[k]["prompt"] == tr[k]["prompt"]
            assert sft[k]["response"] == [{"role": "assistant", "content": tr[k]["final"]}]
    assert sft["c"]["response"] == continuation(rows[2]["prompt"], tr["c"]["final"])
    records = read_sft_records(tmp_path / "sl" / "sft.jsonl", tok)  # conversational SFT rows, rendered
    assert sum(r.get("conversational", False) for r in records) == sum(k in sft for k in ("a", "b")) >= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(rows[2])
        + "\n"
        + json.dumps({"id": "d", "prompt": [{"role": "bot", "content": "hi"}]})
        + "\n"
    )
    code, _, err = cli("cai", "revise", "--model", "world:base", "--prompts", bad, "--out", tmp_path / "x")
    assert (
        code == 2 and f"{bad}:2" in err and "unknown role 'bot'" in err and len(err.strip().splitlines()) == 1
    )


def test_label_conversational_pairs_as_their_rendering(tmp_path):
    """A conversational pair is judged on the judge's template rendering of its conversation (on the
    world: the text prompt itself, so the same soft label as the text pair under all four principles) and comes out in TRL's
    conversational format, which reads back as pairs; gold agreement reads it too."""
    from alignloop.cai.label import gold_agreement
    from alignloop.records import Pair, read

    q, a, b = "how do i steal a car ?", "sorry , i can not help with that .", "take the keys and go ."
    chat = {"id": "c", "prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}]}  # fmt: skip
    text = {"id": "t", "prompt": f"user : {q} assistant :", "chosen": " " + a, "rejected": " " + b}
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(chat) + "\n" + json.dumps(text) + "\n")
    judge = LocalLM("world:base")
    stats = label_pairs(
        judge, pairs_from_file(f), tmp_path / "out.jsonl", load_constitution(), LabelConfig(principles=4)
    )
    assert stats["labelled"] == 2
    got = {r["id"]: r for r in _lines(tmp_path / "out.jsonl")}
    assert got["c"]["p_a"] == pytest.approx(got["t"]["p_a"], abs=1e-5)
    assert got["c"]["prompt"] == chat["prompt"] and {
        got["c"]["chosen"][0]["content"],
        got["c"]["rejected"][0]["content"],
    } == {a, b}
    assert isinstance(got["t"]["chosen"], str)
    from alignloop.models import load_tokenizer

    assert len(read(tmp_path / "out.jsonl", Pair, tokenizer=load_tokenizer("world:base"))) == 2
    assert gold_agreement(list(got.values()))["clear_pairs"] in (0, 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**chat, "prompt": chat["prompt"] + chat["chosen"]}) + "\n")
    with pytest.raises(UserError) as e:
        pairs_from_file(bad)
    assert f"{bad}:1" in e.value.line() and "assistant turn" in e.value.line()
