"""evaluate_policies and `alignloop evaluate` on tiny real models (random init, real tokenizer).

What the numbers mean on a trained world is tested in test_world.py; here: the machinery
(sampling, KL estimator, ROUGE-L for seq2seq, errors, files written) on models that load fast.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from alignloop.errors import UserError
from alignloop.evaluation import evaluate_policies
from alignloop.evaluation.metrics import rouge_l

PROMPTS = [
    {"id": f"p{i}", "prompt": text, "reference": ref}
    for i, (text, ref) in enumerate(
        [
            ("the dog is", "the dog is good"),
            ("what is the cat ?", "the cat is a cat"),
            ("this product is", "this product is great"),
            ("how do you open the window ?", "you open the window"),
            ("my house is hot", "the house is hot"),
            ("i want a fan", "the person wants a fan"),
        ]
    )
]


@pytest.fixture(scope="module")
def perturbed_gpt2(tiny_gpt2, tmp_path_factory):
    """tiny_gpt2 with noise added to every weight: a policy that has moved away from its reference."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("perturbed")
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    for f in tiny_gpt2.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def test_policy_against_itself_common_seeds_is_exactly_zero(tiny_gpt2, tiny_classifier, tmp_path):
    ev = evaluate_policies(
        {"a": str(tiny_gpt2), "b": str(tiny_gpt2)},
        PROMPTS,
        reward_spec=f"{tiny_classifier}:nothate",
        toxicity_spec=str(tiny_classifier),
        samples_per_prompt=2,
        max_new_tokens=8,
        out=tmp_path,
        rouge=False,
        gold=False,
    )
    assert {"reward", "toxicity", "expected_max_toxicity", "toxicity_probability", "kl_per_token"} <= set(
        ev["metric_names"]
    )
    for m, d in ev["differences"]["b"].items():
        assert d["diff"] == 0.0 and d["ci_low"] == 0.0 and d["ci_high"] == 0.0, (
            m
        )  # same seeds -> same samples
    assert ev["policies"]["a"]["metrics"]["kl_sequence"]["mean"] == 0.0  # the reference is the policy itself
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(PROMPTS) * 2
    assert {"policy", "prompt_id", "seed", "text", "reward", "toxicity", "kl", "tokens", "length"} <= set(
        rows[0]
    )


def test_kl_estimate_matches_exact_kl(tiny_gpt2, perturbed_gpt2):
    """One new token: KL(pi || ref) at the first position is exact from the logits; the Monte-Carlo
    estimate from samples must agree within its standard error (and be clearly > 0)."""
    import torch

    from alignloop.models import load_lm

    prompt = "what is the cat ?"
    n = 400
    ev = evaluate_policies(
        {"ref": str(tiny_gpt2), "moved": str(perturbed_gpt2)},
        [{"id": f"c{i}", "prompt": prompt} for i in range(n)],
        toxicity_spec=None,
        samples_per_prompt=1,
        max_new_tokens=1,
        rouge=False,
        gold=False,
        n_boot=200,
        batch_size=200,
    )
    pol, tok = load_lm(perturbed_gpt2)
    ref, _ = load_lm(tiny_gpt2)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        lp = torch.log_softmax(pol(**ids).logits[0, -1], -1)
        lq = torch.log_softmax(ref(**ids).logits[0, -1], -1)
    exact = float((lp.exp() * (lp - lq)).sum())
    est = ev["policies"]["moved"]["metrics"]["kl_sequence"]
    half_width = (est["ci_high"] - est["ci_low"]) / 2
    assert exact > 0.05
    assert abs(est["mean"] - exact) < 2 * half_width + 0.02, (est, exact)
    assert ev["policies"]["moved"]["metrics"]["kl_per_token"]["mean"] == pytest.approx(
        est["mean"]
    )  # 1 token each
    assert ev["differences"]["moved"]["kl_sequence"]["ci_low"] > 0


def test_seq2seq_rouge_l_against_references(tiny_t5, tmp_path):
    ev = evaluate_policies(
        {"t5": str(tiny_t5)},
        PROMPTS,
        toxicity_spec=None,
        samples_per_prompt=2,
        max_new_tokens=6,
        out=tmp_path,
        gold=False,
    )
    assert "rouge_l" in ev["metric_names"] and ev["settings"]["rouge_l"] is True
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    refs = {p["id"]: p["reference"] for p in PROMPTS}
    expected = rouge_l([r["text"] for r in rows], [refs[r["prompt_id"]] for r in rows])
    assert [r["rouge_l"] for r in rows] == pytest.approx(expected)
    assert ev["policies"]["t5"]["metrics"]["rouge_l"]["mean"] == pytest.approx(sum(expected) / len(expected))
    assert ev["samples"][0]["reference"] == PROMPTS[0]["reference"]


def test_overoptimization_from_checkpoints(tiny_gpt2, perturbed_gpt2, tiny_classifier, tmp_path):
    from alignloop.evaluation import overoptimization_curves

    run = tmp_path / "ppo"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(perturbed_gpt2, run / "checkpoints" / "step-10")
    (run / "metrics.jsonl").write_text('{"step": 10, "kl": 0.3}\n')
    over = overoptimization_curves(
        str(tiny_gpt2),
        PROMPTS,
        runs={"ppo": run},
        proxy_spec=f"{tiny_classifier}:nothate",
        gold_spec=f"{tiny_classifier}:hate",
        samples_per_prompt=2,
        best_of_n=4,
        max_new_tokens=6,
    )
    assert [p["n"] for p in over["best_of_n"]] == [1, 2, 4]
    assert over["best_of_n"][-1]["kl"] == pytest.approx(math.log(4) - 0.75)
    proxies = [p["proxy"] for p in over["best_of_n"]]
    assert proxies == sorted(proxies)  # picking by the proxy can only raise the proxy
    steps = over["series"]["ppo"]
    assert [p["step"] for p in steps] == [0, 10]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0
    assert over["peaks"]["ppo"] in steps


# ----------------------------------------------------------------------------- errors and the CLI


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_end_to_end(cli, tiny_gpt2, tiny_classifier, tmp_path):
    prompts = _write(
        tmp_path / "p.jsonl", [{k: v for k, v in p.items() if k != "reference"} for p in PROMPTS]
    )
    run = tmp_path / "train"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "score": i / 10, "kl": i / 100}) + "\n" for i in range(5))
    )
    out = tmp_path / "eval"
    code, stdout, err = cli(
        "evaluate", "--policy", f"base={tiny_gpt2}", "--policy", str(tiny_gpt2), "--prompts", prompts,
        "--reward", f"{tiny_classifier}:nothate", "--toxicity", str(tiny_classifier), "--samples", "2",
        "--seed", "0", "--seed", "1", "--max-new-tokens", "6", "--training-run", f"ppo={run}", "--out", out, "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "toxicity" in stdout and f"report: {out / 'report.html'}" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["policies"]) == ["base", tiny_gpt2.name]
    assert len(metrics["policies"]["base"]["per_seed"]["reward"]) == 2
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # bars + training reward + training KL


def test_cli_errors(cli, tiny_gpt2, tmp_path):
    good = _write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "the dog is"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    partial = _write(
        tmp_path / "partial.jsonl", [{"id": "a", "prompt": "x", "reference": "y"}, {"id": "b", "prompt": "z"}]
    )
    cases = [
        (["--policy", str(tiny_gpt2), "--prompts", str(empty)], "no valid prompt records"),
        (
            ["--policy", str(tmp_path / "nowhere"), "--prompts", str(good)],
            "policy 'nowhere' cannot be loaded",
        ),
        (["--policy", str(broken), "--prompts", str(good)], "policy 'broken' cannot be loaded"),
        (["--policy", str(tiny_gpt2), "--prompts", str(good), "--rouge"], "prompt 'a' has no 'reference'"),
        (["--policy", str(tiny_gpt2), "--prompts", str(partial)], "prompt 'b' has no 'reference'"),
        (["--policy", str(tiny_gpt2), "--prompts", str(tmp_path / "missing.jsonl")], "file not found"),
    ]
    for args, message in cases:
        code, _, err = cli("evaluate", *args, "--toxicity", "none", "--out", str(tmp_path / "o"), "-q")
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_api_errors(tiny_gpt2):
    with pytest.raises(UserError, match="no policy"):
        evaluate_policies({}, PROMPTS)
    with pytest.raises(UserError, match="prompt 0 has no text"):
        evaluate_policies({"a": str(tiny_gpt2)}, [{"id": "x", "prompt": "  "}])


def test_world_prompts_get_rouge_on_their_summaries_only():
    from alignloop.evaluation.evaluate import check_references

    world = [
        {"id": "s", "prompt": "summarize ...", "family": "summary", "reference": "ann wants tea"},
        {"id": "r", "prompt": "review ...", "family": "review"},
    ]
    assert check_references(world, None, "eval.jsonl") is True  # the summaries are scored
    with pytest.raises(UserError, match="prompt 'r' has no 'reference'"):
        check_references(world, True, "eval.jsonl")  # --rouge: every prompt needs one
    assert check_references(world, False, "eval.jsonl") is False
