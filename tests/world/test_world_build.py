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
