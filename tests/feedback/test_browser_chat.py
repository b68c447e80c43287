"""A conversational set (TRL's message-list prompt) from `label import` through the labelling page in
real Chromium to `feedback export`: the turns are shown in order, escaped, and the pairs keep the
conversational format."""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import expect

from alignloop.feedback import store as st
from alignloop.records import Pair, read

pytestmark = [pytest.mark.browser, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

TURNS = [
    {"role": "system", "content": "be kind ."},
    {"role": "user", "content": "what is a dog ?"},
    {"role": "assistant", "content": "a dog is an <b>animal</b> ."},
    {"role": "user", "content": "and a cat ? <img src=x onerror=alert(1)>"},
]


def test_a_multi_turn_prompt_is_labelled_as_turns_and_exported_as_messages(
    db, live_server, browser, cli, tmp_path
):
    sets = tmp_path / "sets.jsonl"
    record = {
        "prompt_id": "chat1",
        "prompt": TURNS,
        "completions": [
            {"id": f"c{j}", "text": t}
            for j, t in enumerate(["a cat is an animal .", "meow", "<script>x</script>"])
        ],
        "model": "tiny",
    }
    sets.write_text(json.dumps(record) + "\n", encoding="utf-8")
    code, _, err = cli("label", "import", "--db", db, "--completions", sets, "--per-set", "1")
    assert code == 0, err

    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: problems.append(f"dialog {d.message}"))
    page.goto(st.invite(db, "ada", base_url=live_server)["link"])
    page.click("#login")
    page.click("#acknowledge")
    page.wait_for_url("**/label")

    # every turn in order, its role as a label, the model's text as text (no element made of it)
    turns = page.locator("#prompt li.turn")
    expect(turns).to_have_count(4)
    assert page.locator("#prompt li.turn .role").all_text_contents() == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    assert page.locator("#prompt li.turn pre.text").all_inner_texts() == [m["content"] for m in TURNS]
    assert page.locator("#prompt b, #prompt img, li.card script").count() == 0
    assert page.locator("li.card pre.text").all_inner_texts() == [c["text"] for c in record["completions"]]

    page.locator("li.card").first.click()
    for key in ("1", "2", "f", "Enter"):
        page.keyboard.press(key)
    page.wait_for_selector("#all-done")
    assert problems == []

    out = tmp_path / "pairs.jsonl"
    code, _, err = cli("feedback", "export", "--db", db, "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    said = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    best, second, nonsense = "a cat is an animal .", "meow", "<script>x</script>"
    # ranked best > second, and the F completion loses to both (export's default)
    assert sorted(json.dumps((r["prompt"], r["chosen"], r["rejected"])) for r in rows) == sorted(
        json.dumps((TURNS, said(c), said(r)))
        for c, r in [(best, second), (best, nonsense), (second, nonsense)]
    )
    assert len(read(out, Pair)) == 3  # alignloop's pair reader takes it as conversational
