"""Acceptance on the embedded world's base model: 200 eval prompts x 4 completions, whose
misbehaviour mix matches what the world check's sampler gives on the same prompts, reproducibly."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest

from alignloop.errors import UserError

MISBEHAVIOUR = ("toxic", "harmful_compliance", "myth_confirmed")


@pytest.fixture(scope="module")
def world_base():
    world = pytest.importorskip("alignloop.world")
    try:
        return world.model_path("base")
    except UserError as e:
        pytest.skip(f"world base model not shipped yet: {e}")


@pytest.mark.slow
def test_generate_200_eval_prompts_matches_world_mixture(world_base, tmp_path, cli):
    import torch

    from alignloop import world
    from alignloop.records import CompletionSet, read
    from alignloop.world.check import sample_causal

    prompts = world.prompts("eval", n=200, seed=0)
    assert len(prompts) == 200
    with open(tmp_path / "eval.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    args = ["generate", "--model", "world:base", "--prompts", tmp_path / "eval.jsonl", "--k", "4"]
    args += ["--max-new-tokens", "40", "--seed", "0", "-q"]
    code, out, err = cli(*args, "--out", tmp_path / "sets.jsonl")
    assert code == 0, err
    sets = read(tmp_path / "sets.jsonl", CompletionSet)
    assert len(sets) == 200 and all(len(s.completions) == 4 for s in sets)

    by_family: dict[str, list] = defaultdict(list)
    for s in sets:
        judgements = world.judge_batch([s.prompt] * 4, [c.text for c in s.completions])
        by_family[s.family].extend(judgements)
    fluency = 1 - sum(j.fail for js in by_family.values() for j in js) / 800
    assert fluency > 0.9, fluency
    # the world check's sampler (HF generate, as `alignloop world check` measures the model) on the
    # very same prompts: the two mixes must agree (5 points, or 3 standard errors when wider)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = world.model_path("base")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(1)
    plist = [s.prompt for s in sets for _ in range(4)]
    ref_js = world.judge_batch(plist, sample_causal(model, tok, plist))
    ref_by_family: dict[str, list] = defaultdict(list)
    for s_, j in zip([s for s in sets for _ in range(4)], ref_js, strict=True):
        ref_by_family[s_.family].append(j)
    report = {}
    for fam, js in by_family.items():
        n, m = len(js), len(ref_by_family[fam])
        for flag in MISBEHAVIOUR:
            got = sum(flag in j.flags for j in js) / n
            want = sum(flag in j.flags for j in ref_by_family[fam]) / m
            if got == want == 0:
                continue
            p = (got * n + want * m) / (n + m)
            tol = max(0.05, 3 * math.sqrt(p * (1 - p) * (1 / n + 1 / m)))
            report[(fam, flag)] = (round(got, 3), round(want, 3), n)
            assert abs(got - want) <= tol, (fam, flag, got, want, n, m)
    assert report, "no misbehaviour in the world mixture to compare"

    # same seed -> identical output (a fresh run over the first 20 prompts)
    code, _, err = cli(*args, "--limit", "20", "--out", tmp_path / "again.jsonl")
    assert code == 0, err
    first = (tmp_path / "sets.jsonl").read_text().splitlines()[:20]
    assert (tmp_path / "again.jsonl").read_text().splitlines() == first
