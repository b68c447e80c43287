"""The generation backend interface: transformers by default (the same tokens as generation.sample), vLLM optional."""

from __future__ import annotations

import importlib.util

import pytest

from alignloop.errors import UserError
from alignloop.generation import SamplingSettings, row_seed, sample
from alignloop.generation_backends import (
    gathered_for_generation,
    make_backend,
    merged_state_dict,
    pick_backend,
    vllm_available,
)
from alignloop.models import LoraSettings, load_lm, load_policy

PROMPTS = ["what is the dog ?", "how is the cat ?", "why is the house hot ?"]
SETTINGS = SamplingSettings(temperature=1.0, max_new_tokens=6)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_t5"])
def test_transformers_backend_samples_what_generation_samples(fixture, request):
    model, tok = load_lm(str(request.getfixturevalue(fixture)))
    backend = make_backend("transformers", model, tok)
    assert backend.name == "transformers"
    seeds = [row_seed(5, j) for j in range(len(PROMPTS))]
    got = backend.sample(PROMPTS, SETTINGS, seed=seeds)
    want = sample(model, tok, PROMPTS, SETTINGS, seed=seeds)
    assert got.response_ids == want.response_ids and got.texts == want.texts
    assert got.finished == want.finished
    backend.load_weights(model)  # a no-op: the live model is sampled


def test_auto_is_transformers_without_vllm_and_vllm_alone_is_one_clear_error(tiny_gpt2):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert not vllm_available()
    assert pick_backend("auto") == "transformers"
    model, tok = load_lm(str(tiny_gpt2))
    assert make_backend("auto", model, tok).name == "transformers"
    with pytest.raises(UserError, match=r"alignloop\[vllm\]"):
        make_backend("vllm", model, tok)
    with pytest.raises(UserError, match="unknown generation backend"):
        pick_backend("tgi")


def test_gathered_for_generation_without_sharding_is_the_bare_model(tiny_gpt2):
    from accelerate import Accelerator

    model, _ = load_lm(str(tiny_gpt2))
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    with gathered_for_generation(accelerator, prepared) as bare:
        assert bare is accelerator.unwrap_model(prepared)
    with gathered_for_generation(None, model) as bare:
        assert bare is model


def test_merged_state_dict_folds_lora_into_the_base_names(tiny_gpt2):
    import torch

    policy = load_policy(str(tiny_gpt2), lora=LoraSettings(r=4, alpha=8), value_head=False, reference=False)
    for n, p in policy.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero adapter
    plain, _ = load_lm(str(tiny_gpt2))
    merged = merged_state_dict(policy.model)
    assert set(merged) == set(plain.state_dict())  # HF names: what vLLM's load_weights expects
    changed = {k for k in merged if not torch.equal(merged[k], plain.state_dict()[k])}
    adapted = {
        n.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".weight")
        for n, _ in policy.model.named_parameters()
        if "lora_A" in n
    }
    assert adapted and changed == adapted  # the adapted layers' weights, nothing else
    # the adapter is unmerged again: the policy's outputs are those of base + adapter, as before
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = policy.model(input_ids=ids).logits
        merged_state_dict(policy.model)
        after = policy.model(input_ids=ids).logits
    torch.testing.assert_close(before, after)


def test_generate_samples_through_the_backend_and_vllm_on_a_cpu_is_one_line(cli, tiny_gpt2, tmp_path):
    """`alignloop generate` takes its samples from the backend object (sampling.backend / --backend):
    the transformers backend writes the same completions as sampling the model directly with the same
    per-row seeds; asking for vLLM on this CPU is refused before anything is loaded or written."""
    import json

    import torch

    from alignloop.generation import SamplingSettings, row_seed, sample

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(["the dog is", "my house"])
        )
    )
    out = tmp_path / "sets.jsonl"
    code, _, err = cli("generate", "--model", tiny_gpt2, "--prompts", prompts, "--out", out, "--k", "2",
                       "--max-new-tokens", "5", "--backend", "vllm")  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "CUDA GPU" in err and not out.exists()
    code, _, err = cli("generate", "--model", tiny_gpt2, "--prompts", prompts, "--out", out, "--k", "2",
                       "--max-new-tokens", "5", "--backend", "transformers")  # fmt: skip
    assert code == 0, err
    sets = [json.loads(x) for x in out.read_text().splitlines()]
    assert sets[0]["sampling"]["backend"] == "transformers"
    model, tok = load_lm(str(tiny_gpt2))
    settings = SamplingSettings(max_new_tokens=5)
    direct = sample(model, tok, ["the dog is"] * 2, settings, seed=[row_seed(0, "0", j) for j in range(2)])
    assert [c["text"] for c in sets[0]["completions"]] == direct.texts


def test_gpu_smoke_script_fails_loudly_without_a_gpu():
    """benchmarks/gpu_smoke.py never skips: on a machine without GPU it stops with exit 1 and the reason."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "gpu_smoke: FAILED: no CUDA GPU" in res.stderr
