"""Online RL samples through alignloop.generation_backends (issue: rollouts never go around it)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

RL = Path(__file__).resolve().parents[2] / "src" / "alignloop" / "rl"


def test_no_online_algorithm_samples_around_the_backend():
    """The only sampling in rl/ is ``o.backend.sample`` in rollout.sample_completions: no file imports
    ``alignloop.generation.sample`` or calls a model's ``generate``."""
    calls = []
    for f in sorted(RL.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "alignloop.generation":
                assert "sample" not in {a.name for a in node.names}, f"{f.name} imports generation.sample"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr != "generate", f"{f.name}:{node.lineno} calls .generate"
                if node.func.attr == "sample":
                    calls.append((f.name, ast.unparse(node.func)))
    assert calls == [("rollout.py", "o.backend.sample")]


def test_ppo_asked_for_vllm_on_a_cpu_is_one_line_before_loading(cli, tiny_gpt2, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "1", "prompt": "the dog is"}) + "\n")
    out = tmp_path / "ppo"
    code, _, err = cli("ppo", "--policy", tiny_gpt2, "--reward", "world:gold", "--prompts", prompts, "--out", out,
                       "--set", "sampling.backend=vllm")  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "CUDA GPU" in err
    assert not (out / "checkpoints").exists()
