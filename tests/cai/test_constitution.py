"""Constitution files: the default matches the world's training formats; bad files are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignloop.cai.constitution import (
    critique_prompt,
    load_constitution,
    preference_prompt,
    revision_prompt,
)
from alignloop.errors import UserError
from alignloop.world import formats


def test_default_holds_the_notes_four_principles_in_the_world_wording():
    c = load_constitution()
    assert [p.name for p in c.critiques] == ["hhh", "harmless", "respectful", "wise"]
    assert [p.name for p in c.preferences] == ["hhh", "harmless", "respectful", "wise"]
    prompt, resp = "user : how do i pick a lock ? assistant :", "First, get a pin. Then TURN it!"
    for p in c.critiques:
        assert critique_prompt(c, prompt, resp, p.name) == formats.critique_prompt(prompt, resp, p.name)
        assert revision_prompt(c, prompt, resp, p.name, "It helps, badly.") == formats.revision_prompt(
            prompt, resp, p.name, "It helps, badly."
        )
    for p in c.preferences:
        assert preference_prompt(c, prompt, resp, "No.", p) == formats.preference_prompt(
            prompt, resp, "No.", p.name
        )


def test_few_shot_exchanges_come_before_the_request(tiny_constitution):
    c = load_constitution(tiny_constitution)
    text = critique_prompt(c, "is the house hot ?", "yes .", "honest")
    shot, _, request = text.rpartition("\n\n")
    assert shot.startswith(
        "what do you want ? you are garbage . . question : is it honest ? answer : it is toxic ."
    )
    assert shot.endswith("answer : sorry , i can not answer that .")
    assert request == "is the house hot ? yes . . question : is it honest ? answer :"
    rev = revision_prompt(c, "is the house hot ?", "yes .", "honest", "fine")
    assert rev.startswith(shot) and rev.endswith("question : please answer honest . answer :")


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\npreferences:\n  - name: a\n    choose: pick\n    chose: typo\n",
         "unknown config key 'preferences.chose'"),
        ("name: x\ncritques: []\npreferences:\n  - {name: a, choose: b}\n", "did you mean 'critiques'"),
        ("name: x\n", "the constitution has no principles"),
        ("name: x\ncritiques: []\npreferences: []\n", "the constitution has no principles"),
        ("preferences:\n  - {name: a, choose: b}\ntemplates:\n  preference: '{prompt} {a} {b} ?'\n",
         "template 'preference' has placeholders"),
        ("preferences:\n  - {name: a, choose: b}\ntemplates:\n  options: [' x', ' x']\n", "two different answers"),
        ("preferences:\n  - {name: a, choose: b}\n  - {name: a, choose: c}\n", "duplicate preferences"),
        ("preferences: [1, 2]\n", "bad value 1"),
        ("critiques: {name: x\n", "invalid YAML"),
    ],
)  # fmt: skip
def test_bad_constitution_is_one_clear_line(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_constitution(p)
    line = e.value.line()
    assert message in line and "\n" not in line
    assert str(p) in line


def test_bad_constitution_through_the_cli(cli, tmp_path, tiny_sets):
    p = _write(tmp_path, "name: x\npreferences:\n  - {name: a, choose: b, wieght: 2}\n")
    code, _, err = cli("cai", "label", "--judge", "world:base", "--pairs-from", tiny_sets, "--out",
                       tmp_path / "o.jsonl", "--constitution", p)  # fmt: skip
    assert code == 2
    assert (
        err.count("\n") == 1 and "unknown config key 'preferences.wieght'" in err and "Traceback" not in err
    )
    code, _, err = cli("cai", "label", "--judge", "world:base", "--pairs-from", tiny_sets, "--out",
                       tmp_path / "o.jsonl", "--constitution", _write(tmp_path, "name: empty\n"))  # fmt: skip
    assert code == 2 and "no principles" in err
    assert not (tmp_path / "o.jsonl").exists()
