"""Issue 28's personalisation measurement: per-labeller held-out accuracy, conditioned vs pooled.

    python benchmarks/personal_reward.py --out runs/personal --seeds 0 1 2

On the embedded world with the default panel's careful and noisy labellers plus the opt-in
``terse`` one (docs/labelling.md, *Tastes*), every labeller ranks every set (``per_set = 3``):

1. the demo recipe's prompts (``--prompts`` world train prompts) and the base policy's k = 4
   completions, ranked by the three simulated labellers (seeded by ``seed``);
2. ``feedback export --consensus none``: each labeller's own pairs, one row a labeller and pair,
   ``labellers: [name]`` (no consensus: that is what a per-labeller model needs);
3. whole prompts held out (``--eval-fraction``, seeded), the same split for both models;
4. two reward models from world:base on the same training pairs, the demo's reward settings:
   *pooled* (the default: one head, every labeller's pairs) and *conditioned*
   (``per_labeller=true``: a pooled head plus one head per labeller over the shared trunk);
5. per labeller, on their own held-out pairs: the accuracy of the pooled model and of the
   conditioned model's head for that labeller (and of its pooled head), with a 95% bootstrap
   interval over held-out prompts of the difference conditioned - pooled.

With ``--ppo`` (step 6): PPO from world:base with the demo's settings (LoRA, 60 steps, no beta=0
variant) twice, once on the pooled model and once on the conditioned model's ``sim-terse`` output
(the SPEC ``DIR:sim-terse``), then one evaluation of the three policies on the held-out prompts,
scored by the gold view of the terse taste (``world:gold:terse``, the evaluation's ``reward``
column) and by gold: paired differences against the pooled-reward policy with bootstrap intervals.

Results: ``OUT/seed-S/results.json`` (``ppo.json`` with ``--ppo``) and tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

from alignloop.loop import (
    RECIPES,
    load_recipe,
    stage_evaluate,
    stage_export,
    stage_generate,
    stage_label,
    stage_ppo,
    stage_prompts,
)
from alignloop.records import iter_jsonl, write_jsonl

PANEL = ["careful", "noisy", "terse"]


def split_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts: ``(train rows, eval rows)``, ``round(fraction * prompts)`` held out."""
    prompts = sorted({json.dumps(r["prompt"]) for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: round(fraction * len(prompts))])
    return [r for r in rows if json.dumps(r["prompt"]) not in held], [
        r for r in rows if json.dumps(r["prompt"]) in held
    ]


def right_by_prompt(rows: list[dict], spec: str) -> list[int]:
    """Per pair row: 1 if the reward ``spec`` scores its chosen side above its rejected side, else 0."""
    from alignloop.reward import load_reward

    reward = load_reward(spec)
    chosen = reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    return [int(c > j) for c, j in zip(chosen, rejected, strict=True)]


def bootstrap_diff(
    right_a: list[int], right_b: list[int], groups: list[str], n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over pairs and its 95% interval, resampling whole prompts (``groups``)."""
    by: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for a, b, g in zip(right_a, right_b, groups, strict=True):
        by[g].append((a, b))
    keys = sorted(by)
    rng = random.Random(seed)

    def diff(ks: list[str]) -> float:
        cells = [x for k in ks for x in by[k]]
        return sum(a - b for a, b in cells) / max(len(cells), 1)

    draws = sorted(diff([rng.choice(keys) for _ in keys]) for _ in range(n))
    return diff(keys), draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/personal")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--data-only", action="store_true", help="stop after the pairs")
    ap.add_argument("--ppo", action="store_true", help="also PPO on the pooled and the terse reward (step 6)")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    args = ap.parse_args()
    from alignloop.reward.train import RewardTrainConfig, train_reward_model

    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        recipe = load_recipe(
            RECIPES / "demo.yaml",
            [
                f"seed={seed}", f"prompts.n_train={args.prompts}", f"label.labellers=[{', '.join(PANEL)}]",
                "label.per_set=3", "export.method=none", "export.exclude_flagged=false", "ppo.variants={}",
                "ppo.config.snapshot_every=null", "evaluate.toxicity=null", *args.set,
            ],
        )  # fmt: skip
        t0 = time.time()
        prompts = stage_prompts(recipe, out / "prompts", resume=True)
        sets = stage_generate(recipe, recipe.policy, prompts["train"], out / "generate", resume=True)
        label = stage_label(recipe, sets, out / "label", True, recipe.policy)
        pairs = stage_export(recipe, label, out / "export", True)
        rows = [r for _, r in iter_jsonl(pairs)]
        train, held = split_by_prompt(rows, args.eval_fraction, seed)
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "eval.jsonl", held)
        print(
            f"[personal] seed {seed}: {len(train)} train / {len(held)} held-out pairs ({time.time() - t0:.0f} s)"
        )
        if args.data_only:
            continue
        base_cfg = recipe.reward.train.model_copy(update={"model": recipe.policy, "seed": seed})
        specs = {}
        # the per-labeller options (--set reward.train.labeller_*) tune the conditioned model only
        pooled_extra = {"labeller_shrink": 0.0, "labeller_select": "all"}
        for name, extra in (("pooled", pooled_extra), ("conditioned", {"per_labeller": True})):
            t1 = time.time()
            cfg = RewardTrainConfig(**{**base_cfg.model_dump(), **extra})
            train_reward_model(
                out / "train.jsonl", out / name, cfg, eval_pairs=out / "eval.jsonl", resume=True
            )
            specs[name] = str(out / name)
            print(f"[personal] seed {seed}: {name} trained in {time.time() - t1:.0f} s", flush=True)
        from alignloop.world.labellers import panel

        kinds = {f"sim-{p.name}": p.kind for p in panel(seed, ["terse"])}
        results: dict[str, dict] = {}
        by_labeller: dict[str, list[dict]] = defaultdict(list)
        for r in held:
            by_labeller[r["labellers"][0]].append(r)
        for who, rs in sorted(by_labeller.items()):
            groups = [json.dumps(r["prompt"]) for r in rs]
            pooled = right_by_prompt(rs, specs["pooled"])
            own = right_by_prompt(rs, f"{specs['conditioned']}:{who}")
            pooled_head = right_by_prompt(rs, specs["conditioned"])
            d, lo, hi = bootstrap_diff(own, pooled, groups, seed=seed)
            results[who] = {
                "kind": kinds.get(who, "?"), "pairs": len(rs), "pooled": sum(pooled) / len(rs), "conditioned": sum(own) / len(rs),
                "conditioned_pooled_head": sum(pooled_head) / len(rs), "diff": d, "ci_low": lo, "ci_high": hi,
            }  # fmt: skip
        (out / "results.json").write_text(
            json.dumps({"seed": seed, "args": vars(args), "labellers": results}, indent=1)
        )
        print(table(results, seed))
        if args.ppo:
            ppo_vs_pooled(recipe, prompts, specs, out)


def ppo_vs_pooled(recipe, prompts: dict[str, Path], specs: dict[str, str], out: Path) -> None:
    """PPO on the pooled reward and on the terse labeller's output; one evaluation, differences vs pooled."""
    policies = {}
    for name, spec in (("pooled", specs["pooled"]), ("terse", f"{specs['conditioned']}:sim-terse")):
        t0 = time.time()
        runs = stage_ppo(recipe, recipe.policy, spec, prompts["train"], out / f"ppo-{name}", True)
        policies[f"ppo-{name}"] = str(runs["ppo"] / "model")
        print(f"[personal] PPO on {spec}: {time.time() - t0:.0f} s", flush=True)
    policies["base"] = recipe.policy
    ev = stage_evaluate(recipe, policies, prompts["eval"], "world:gold:terse", {}, out / "evaluate", True)
    rows = {}
    for name in ("ppo-terse", "base"):
        d = ev["differences"][name]
        rows[name] = {
            m: {k: d[m][k] for k in ("diff", "ci_low", "ci_high")} for m in ("reward", "gold_score")
        }
    means = {
        n: {m: ev["policies"][n]["metrics"][m]["mean"] for m in ("reward", "gold_score")} for n in policies
    }
    (out / "ppo.json").write_text(json.dumps({"vs_ppo_pooled": rows, "means": means}, indent=1))
    for name, r in rows.items():
        print(
            f"{name} - ppo-pooled: terse view {r['reward']['diff']:+.3f} [{r['reward']['ci_low']:+.3f}, "
            f"{r['reward']['ci_high']:+.3f}], gold {r['gold_score']['diff']:+.3f} "
            f"[{r['gold_score']['ci_low']:+.3f}, {r['gold_score']['ci_high']:+.3f}]"
        )
    print("means:", json.dumps(means))


def table(results: dict[str, dict], seed: int) -> str:
    """Markdown rows: labeller, held-out pairs, pooled / conditioned accuracy, difference [95% CI]."""
    lines = [
        "| seed | labeller (kind) | held-out pairs | pooled model | conditioned (own head) | difference [95% CI] | conditioned's pooled head |",
        "|---|---|---|---|---|---|---|",
    ]
    for who, r in results.items():
        lines.append(
            f"| {seed} | {who} ({r.get('kind', '?')}) | {r['pairs']} | {r['pooled']:.3f} | {r['conditioned']:.3f} | "
            f"{100 * r['diff']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] points | "
            f"{r['conditioned_pooled_head']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
