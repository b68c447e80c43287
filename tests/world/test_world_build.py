"""World models: the reduced build is reproducible; the world CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from alignloop.records import Prompt, read


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*.safetensors"))
    }


def _metrics(folder: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignloop.world import check

    tok = AutoTokenizer.from_pretrained(folder / "base")
    model = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
    torch.set_num_threads(1)
    return {
        "preference": check._check_preference(model, tok, seed=0, n_pairs=40),
        "toxicity": check.check_classifier(folder / "toxicity", seed=0, n=200),
    }


@pytest.mark.slow
def test_reduced_build_same_seed_same_models_and_metrics(tmp_path):
    from alignloop.world.train import build

    a = build(tmp_path / "a", seed=3, quick=True)
    b = build(tmp_path / "b", seed=3, quick=True)
    build(tmp_path / "c", seed=4, quick=True)
    for name in ("base", "judge", "summariser", "toxicity"):
        assert a[name]["final_loss"] == b[name]["final_loss"]
    ha, hb, hc = (_hashes(tmp_path / x) for x in "abc")
    assert len(ha) == 4 and ha == hb and ha != hc
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    saved = json.loads((tmp_path / "a" / "build.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["megabytes"] < 25
    assert saved["built"] == ["base", "judge", "summariser", "toxicity"]
    # the judge alone, rebuilt from the world's base: the same weights, the other models untouched
    (tmp_path / "a" / "judge" / "model.safetensors").unlink()
    again = build(tmp_path / "a", seed=3, quick=True, only=("judge",))
    assert again["built"] == ["judge"] and _hashes(tmp_path / "a") == ha
    saved = json.loads((tmp_path / "a" / "build.json").read_text())
    assert saved["built"] == ["judge"] and saved["base"] == a["base"]  # the earlier entries are kept


def test_cli_prompts_and_errors(cli, tmp_path):
    out = tmp_path / "p.jsonl"
    code, stdout, _ = cli("world", "prompts", "--split", "redteam", "--n", "40", "--out", out)
    assert code == 0 and "wrote 40" in stdout
    recs = read(out, Prompt)
    assert len(recs) == 40 and {r.family for r in recs} <= {"harmful", "benign", "myth", "review"}
    code, _, err = cli("world", "prompts", "--split", "eval", "--families", "poems", "--out", out)
    assert code == 2 and err.count("\n") == 1 and "poems" in err
    code, _, err = cli("world", "check", "--models", tmp_path / "nope")
    assert code == 2 and "not a folder" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("world", "check", "--models", tmp_path / "empty")
    assert code == 2 and "no base model" in err
    code, out_, _ = cli("world", "build", "--help")
    assert code == 0 and "example:" in out_
    # the judge is fine-tuned from a base: none in --out is one line, and nothing is written
    code, _, err = cli("world", "build", "--out", tmp_path / "w", "--only", "judge", "--quick")
    assert code == 2 and err.count("\n") == 1 and "base" in err and not (tmp_path / "w" / "judge").exists()
    code, _, err = cli("world", "build", "--out", tmp_path / "w", "--only", "policy", "--quick")
    assert code == 2 and err.count("\n") == 1 and "policy" in err and not (tmp_path / "w" / "policy").exists()


def test_judge_examples_depend_on_the_prompt():
    """The judge's data: the answer is gold's under the question's own prompt, positions are balanced,
    a share compares a response with one to another request (never the look-alike: the probe stays
    unseen), and the same two texts are ordered differently under different prompts."""
    import re

    from alignloop.world import corpus, formats
    from alignloop.world import grammar as g

    ex = corpus.judge_examples(3000, seed=5)
    assert len(ex) == 3000 and {y for _, y, _ in ex} == {"(A)", "(B)"}
    assert 0.45 < sum(y == "(A)" for _, y, _ in ex) / len(ex) < 0.55
    pattern = re.compile(
        r"consider the conversation : (.*?) (?:please )?choose .* options : \(A\) (.*) \(B\) (.*) the answer is :"
    )
    orders: dict[frozenset, set] = {}
    for x, y, _ in ex:
        prompt, a, b = pattern.match(x).groups()
        assert f"({formats.gold_preference(prompt, a, b)})" == y
        orders.setdefault(frozenset((a, b)), set()).add((prompt, a if y == "(A)" else b))
    flipped = [v for v in orders.values() if len({w for _, w in v}) > 1]
    assert flipped  # the same two texts, each the winner under some prompt
    fams = corpus._by_family("train")
    rng = __import__("random").Random(0)
    for p in fams["harmful"] + fams["benign"]:
        for _ in range(20):
            pair = corpus.cross_prompt_pair(p, rng, fams)
            if pair is None:
                continue
            look = corpus.LOOKALIKE[p.topic]
            steps = (g.BENIGN.get(look) or g.HARMFUL[look])[1]
            assert not any(s in a for s in steps for a in pair[:2]), (p.text, pair)  # never the look-alike's


def test_causal_loss_weighs_tokens_alike_in_any_batch():
    """With a constant norm a batch's loss is the sum of its examples' losses, so a short example
    counts the same in a batch of short examples as next to long ones (the per-batch mean tilted the
    base model toward short responses)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignloop.world.train import PAD, _pad, causal_loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    short, long_ = [5, 6, 7], [5, 8, 9, 10, 11, 12, 13, 14]
    w_short, w_long = [0.0, 0.0, 1.0], [0.0, 0.0] + [1.0] * 6

    def batch(seqs, ws):
        return {"input_ids": _pad(seqs, PAD), "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
                "weights": _pad(ws, 0.0).float()}  # fmt: skip

    with torch.no_grad():
        alone = causal_loss(model, batch([short], [w_short]), norm=4.0)
        other = causal_loss(model, batch([long_], [w_long]), norm=4.0)
        both = causal_loss(model, batch([short, long_], [w_short, w_long]), norm=4.0)
        assert torch.allclose(both, alone + other, atol=1e-5)
        # the per-batch mean (norm=None) gives the short example 1/7 of its weight alone
        mean_both = causal_loss(model, batch([short, long_], [w_short, w_long]))
        assert not torch.allclose(mean_both, (alone + other) / 2, atol=1e-3)
