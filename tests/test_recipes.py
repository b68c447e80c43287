"""The real-model recipes, run end to end with local tiny stand-ins of the same architectures.

Each recipe names hub models and datasets (google/flan-t5-base, knkarthick/dialogsum, ...). Here
``--set`` swaps in tiny local models (T5, GPT-2, RoBERTa) and local files shaped like the hub
data, so every code path the real run takes (file/dataset prompts, templates, classifier reward,
pair import, reward training, PPO, DPO, evaluation and report) is exercised.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from alignloop.loop import RECIPES, load_recipe, run_recipe

pytestmark = pytest.mark.slow

DIALOGUES = [
    "person : my house is hot . person : open the window .",
    "person : the product is good . person : that is great , thanks .",
    "person : what is a dog ? person : a dog is a good cat .",
    "person : i want a fan . person : no , it is bad .",
    "person : can you answer this question ? person : yes , please .",
    "person : thanks for the summary . person : sorry , it was terrible .",
]
FAST_PPO = [
    "ppo.config.steps=2", "ppo.config.batch_size=4", "ppo.config.minibatch_size=2", "ppo.config.ppo_epochs=1",
    "ppo.config.sampling.max_new_tokens=6", "ppo.config.checkpoint_every=1",
]  # fmt: skip
FAST_GRPO = [
    "grpo.config.steps=2", "grpo.config.batch_size=4", "grpo.config.group_size=2", "grpo.config.minibatch_size=2",
    "grpo.config.epochs=1", "grpo.config.sampling.max_new_tokens=6", "grpo.config.algorithm=rloo",
]  # fmt: skip
FAST_FAMILY = ["steps=2", "batch_size=4", "group_size=2", "minibatch_size=2", "sampling.max_new_tokens=6",
               "checkpoint_every=1", "score_norm_samples=4"]  # fmt: skip
FAST_EVAL = ["evaluate.samples_per_prompt=1", "evaluate.n_boot=50", "evaluate.max_new_tokens=6"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_recipe_validates():
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert {"demo", "lab3-flan-t5-detox", "gpt2-imdb-sentiment", "hh-rlhf"} <= set(names)
    for name in names:
        load_recipe(RECIPES / f"{name}.yaml")


def _report_ok(out: Path, policies: set[str]) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == policies
    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert set(evaluation["policies"]) == policies
    html = (out / "evaluate" / "report.html").read_text()
    assert "<img" in html
    return evaluation


@pytest.mark.parametrize(
    ("overrides", "continued", "first"),
    [
        ([], "base", "start"),
        (["ppo.config.kl.reference=start"], "start", "start"),
        (["ppo.config.kl.beta=0.2"], "base", "start"),
    ],
)
def test_a_continued_round_keeps_the_base_as_kl_reference_unless_the_recipe_says(
    overrides, continued, first, tmp_path
):
    from alignloop.loop import _anchored

    adapter, full = tmp_path / "round-1" / "ppo" / "model", tmp_path / "full"  # a LoRA round 1, a full one
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    full.mkdir()
    (full / "config.json").write_text("{}")
    recipe = load_recipe(RECIPES / "demo.yaml", overrides)
    assert _anchored(recipe.ppo.config, str(adapter), recipe).kl.reference == continued
    assert _anchored(recipe.ppo.config, recipe.policy, recipe).kl.reference == first
    assert _anchored(recipe.grpo.config, str(adapter), recipe).kl.reference == "base"
    assert _anchored(recipe.ppo.config, str(full), recipe).kl.reference == first  # no base to anchor to


def test_lab3_flan_t5_detox_with_tiny_t5(tmp_path, tiny_t5, tiny_classifier):
    rows = [
        {"id": f"train_{i}", "dialogue": d, "summary": "person wants a fan .", "topic": "t"}
        for i, d in enumerate(DIALOGUES)
    ]
    train = _jsonl(tmp_path / "dialogsum-train.jsonl", rows)
    test = _jsonl(tmp_path / "dialogsum-test.jsonl", rows[:3])
    out = tmp_path / "run"
    run_recipe(
        RECIPES / "lab3-flan-t5-detox.yaml", out=out,
        overrides=[
            f"policy={tiny_t5}", f"prompts.train={train}", f"prompts.eval={test}",
            f"reward.spec={tiny_classifier}:nothate", f"evaluate.toxicity={tiny_classifier}", *FAST_PPO, *FAST_EVAL,
        ],
    )  # fmt: skip
    prompts = [json.loads(x) for x in (out / "prompts" / "eval.jsonl").read_text().splitlines()]
    assert prompts[0]["prompt"].startswith("Summarize the following conversation.\n\n")
    assert prompts[0]["reference"] == "person wants a fan ."
    ev = _report_ok(out, {"base", "ppo"})
    assert "rouge_l" in ev["policies"]["ppo"]["metrics"] and "toxicity" in ev["policies"]["ppo"]["metrics"]
    assert len(json.loads((out / "ppo" / "metrics.json").read_text())) > 0


def test_gpt2_imdb_sentiment_with_tiny_gpt2(tmp_path, tiny_gpt2, tiny_classifier):
    for name in ("train", "test"):
        with open(tmp_path / f"imdb-{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for d in DIALOGUES:
                w.writerow([d.replace("person :", "") + " this product is good and the dog is great", 1])
    out = tmp_path / "run"
    run_recipe(
        RECIPES / "gpt2-imdb-sentiment.yaml", out=out,
        overrides=[
            f"policy={tiny_gpt2}", f"prompts.train={tmp_path / 'imdb-train.csv'}",
            f"prompts.eval={tmp_path / 'imdb-test.csv'}", f"reward.spec={tiny_classifier}:nothate", *FAST_PPO, *FAST_EVAL,
            "stages=[prompts,ppo,grpo,evaluate]", *FAST_GRPO,  # the critic-free stage beside PPO
        ],
    )  # fmt: skip
    prompts = [json.loads(x) for x in (out / "prompts" / "train.jsonl").read_text().splitlines()]
    assert all(len(p["prompt"].split()) <= 8 for p in prompts)
    ev = _report_ok(out, {"base", "ppo", "grpo"})
    assert "reward" in ev["policies"]["ppo"]["metrics"] and "reward" in ev["policies"]["grpo"]["metrics"]
    grpo = json.loads((out / "grpo" / "manifest.json").read_text())
    assert grpo["stage"] == "rloo" and json.loads((out / "grpo" / "metrics.json").read_text())["steps"] == 2


def test_hh_rlhf_with_tiny_gpt2(tmp_path, tiny_gpt2, tiny_classifier):
    rows = []
    for d in DIALOGUES:
        convo = f"\n\nHuman: {d} what is a dog ?\n\nAssistant:"
        rows.append({"chosen": convo + " a dog is a good cat .", "rejected": convo + " garbage , terrible !"})
    rows.append({"chosen": "no assistant turn", "rejected": "x"})  # malformed: counted and skipped
    data = _jsonl(tmp_path / "hh.jsonl", rows)
    out = tmp_path / "run"
    run_recipe(
        RECIPES / "hh-rlhf.yaml", out=out,
        overrides=[
            f"policy={tiny_gpt2}", f"prompts.train={data}", f"prompts.eval={data}", f"export.import_pairs={data}",
            f"reward.train.model={tiny_gpt2}", "reward.train.epochs=1", f"evaluate.toxicity={tiny_classifier}",
            "dpo.config.max_steps=2", "dpo.config.batch_size=4", *FAST_PPO, *FAST_EVAL,
            "stages=[prompts,export,reward,ppo,grpo,online_dpo,dpo,ilql,evaluate]", "ilql.data=pairs",
            "ilql.config.max_steps=2", "ilql.config.batch_size=4", "grpo.variants.rloo=[algorithm=rloo]",
            *(f"{s}.config.{k}" for s in ("grpo", "online_dpo") for k in FAST_FAMILY),
        ],
    )  # fmt: skip
    export = json.loads((out / "export" / "metrics.json").read_text())
    assert export == {"pairs": 6, "skipped": 1}
    assert json.loads((out / "ilql" / "metrics.json").read_text())["episodes"] == 12  # 6 pairs, +1 / -1
    pairs = [json.loads(x) for x in (out / "export" / "pairs.jsonl").read_text().splitlines()]
    assert (
        pairs[0]["prompt"].endswith("\n\nAssistant:") and pairs[0]["chosen"] == " a dog is a good cat ."
    )  # the exact continuation (TRL)
    assert (out / "reward" / "config.json").is_file()
    _report_ok(out, {"base", "ppo", "grpo", "rloo", "online_dpo", "dpo", "ilql"})


def test_export_method_names_match_feedback_export(tmp_path):
    """The recipe takes `alignloop feedback export --consensus` names; the old underscore spellings
    still load; anything else is one clear error naming the allowed values."""
    from alignloop.errors import UserError

    demo = RECIPES / "demo.yaml"
    assert load_recipe(demo, ["export.method=bradley-terry"]).export.method == "bradley-terry"
    assert load_recipe(demo, ["export.method=bradley_terry"]).export.method == "bradley-terry"
    assert load_recipe(demo, ["export.method=ranked_pairs"]).export.method == "tideman"
    with pytest.raises(UserError, match="tideman"):
        load_recipe(demo, ["export.method=borda"])


def test_lab3_miniature_halves_the_toxicity_of_the_summaries(tmp_path):
    """recipes/lab3-miniature.yaml as shipped: the course lab's claim (toxicity falls >= 50%
    relative) on the world's summariser and toxicity classifier, no network, no GPU."""
    summary = run_recipe(RECIPES / "lab3-miniature.yaml", out=tmp_path / "lab3")
    metrics = {n: p["metrics"] for n, p in summary["evaluation"]["policies"].items()}
    before, after = metrics["base"]["toxicity"]["mean"], metrics["ppo"]["toxicity"]["mean"]
    print(f"lab3 miniature: toxicity {before:.3f} -> {after:.3f} ({1 - after / before:.0%} lower)")
    assert before >= 0.2 and after <= 0.5 * before, (before, after)
    assert all(s["status"] == "complete" for s in summary["stages"].values()), summary["stages"]
