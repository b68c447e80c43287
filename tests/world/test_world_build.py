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
    for name in ("base", "summariser", "toxicity"):
        assert a[name]["final_loss"] == b[name]["final_loss"]
    ha, hb, hc = (_hashes(tmp_path / x) for x in "abc")
    assert len(ha) == 3 and ha == hb and ha != hc
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    saved = json.loads((tmp_path / "a" / "build.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["megabytes"] < 25


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
