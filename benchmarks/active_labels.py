"""Issue 28's measurement: PPO gold gain from N actively selected labelled sets vs N random ones.

    python benchmarks/active_labels.py --out runs/active --n 150 300 600 --seeds 0

On the embedded world with its simulated labellers (the default panel, 3 labels a set, majority
consensus with the confused labeller excluded), from one pool of generated sets (the base policy,
``--pool`` world train prompts, k = 4):

- random N: ``label.budget=N`` drawn at random from the pool -> export -> reward model -> PPO.
- active N: a seed reward model trained on ``--seed-sets`` random sets; then ``N - seed_sets``
  sets chosen by uncertainty (its top-two reward margin, ``label.random_share`` of them at random)
  from the rest of the pool; the final reward model trains on the seed's pairs plus these, so
  both arms pay for exactly N labelled sets.

Every PPO run starts from world:base with the demo recipe's settings (LoRA, 60 steps, batch 32,
no beta=0 variant); one evaluation at the end scores base and every PPO policy on the same
held-out prompts, with the paired gold difference against base and its bootstrap interval.
Results: ``OUT/results-TAG.json`` (TAG: the N, arms and seeds run) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
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
    stage_reward,
)
from alignloop.records import CompletionSet, Pair, read, write_jsonl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/active")
    ap.add_argument("--n", type=int, nargs="+", default=[150, 300, 600])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pool", type=int, default=700)
    ap.add_argument("--seed-sets", type=int, default=100)
    ap.add_argument("--random-share", type=float, default=0.2)
    ap.add_argument("--arms", nargs="+", default=["random", "active"])
    ap.add_argument("--only", nargs="+", help="run only these ARM-N (e.g. random-600 active-300)")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    args = ap.parse_args()
    out = Path(args.out)
    base = [
        "stages=[prompts, generate, label, export, reward, ppo, evaluate]", f"prompts.n_train={args.pool}",
        "ppo.variants={}", "ppo.config.snapshot_every=null", "evaluate.toxicity=null", *args.set,
    ]  # fmt: skip
    recipe0 = load_recipe(RECIPES / "demo.yaml", base)
    prompts = stage_prompts(recipe0, out / "pool" / "prompts", resume=True)
    pool = stage_generate(recipe0, recipe0.policy, prompts["train"], out / "pool" / "generate", resume=True)
    policies: dict[str, str] = {"base": recipe0.policy}
    timings: dict[str, float] = {}
    for seed in args.seeds:
        rec = lambda *o, seed=seed: load_recipe(RECIPES / "demo.yaml", [*base, f"seed={seed}", *o])  # noqa: E731
        sdir = out / f"seed-{seed}"
        seed_rm = seed_pairs = None
        for n in args.n:
            for arm in args.arms:
                if args.only and f"{arm}-{n}" not in args.only:
                    continue
                t0 = time.time()
                d = sdir / f"{arm}-{n}"
                if arm == "random":
                    r = rec(f"label.budget={n}")
                    label = stage_label(r, pool, d / "label", True, r.policy)
                    pairs = stage_export(r, label, d / "export", True)
                else:
                    if seed_rm is None:  # the seed reward model: the first seed_sets labels, at random
                        r = rec(f"label.budget={args.seed_sets}")
                        label = stage_label(r, pool, sdir / "seed-rm" / "label", True, r.policy)
                        seed_pairs = stage_export(r, label, sdir / "seed-rm" / "export", True)
                        seed_rm = stage_reward(r, seed_pairs, sdir / "seed-rm" / "reward", True, r.policy)
                        seen = {s.set_id for s in read(label["sets"], CompletionSet)}
                        rest = [s for s in read(pool, CompletionSet) if s.set_id not in seen]
                        write_jsonl(sdir / "seed-rm" / "rest.jsonl", rest)
                    r = rec(
                        f"label.budget={n - args.seed_sets}", "label.select=uncertainty",
                        f"label.random_share={args.random_share}", f"label.select_reward={seed_rm}",
                    )  # fmt: skip
                    label = stage_label(
                        r, sdir / "seed-rm" / "rest.jsonl", d / "label", True, r.policy, seed_rm
                    )
                    chosen = stage_export(r, label, d / "export", True)
                    pairs = d / "pairs.jsonl"
                    write_jsonl(pairs, [*read(seed_pairs, Pair), *read(chosen, Pair)])
                rm = stage_reward(r, pairs, d / "reward", True, r.policy)
                runs = stage_ppo(r, r.policy, rm, prompts["train"], d / "ppo", True)
                policies[f"s{seed}-{arm}-{n}"] = str(runs["ppo"] / "model")
                timings[f"s{seed}-{arm}-{n}"] = round(time.time() - t0, 1)
                print(f"[active] seed {seed} {arm} {n}: {timings[f's{seed}-{arm}-{n}']} s", flush=True)
    # one evaluation: base and every PPO policy on the same held-out prompts (paired differences)
    tag = (
        "-".join(args.only)
        if args.only
        else "-".join(map(str, args.n)) + "-" + "-".join(args.arms) + "-s" + "-".join(map(str, args.seeds))
    )
    evaluation = stage_evaluate(recipe0, policies, prompts["eval"], None, {}, out / f"evaluate-{tag}", False)
    rows = {}
    for name in policies:
        if name == "base":
            continue
        g = evaluation["differences"][name]["gold_score"]
        rows[name] = {"gain": g["diff"], "ci_low": g["ci_low"], "ci_high": g["ci_high"]}
        print(f"{name:<20} gold gain {g['diff']:+.3f}  [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]")
    base_gold = evaluation["policies"]["base"]["metrics"]["gold_score"]["mean"]
    (out / f"results-{tag}.json").write_text(
        json.dumps({"base_gold": base_gold, "gains": rows, "seconds": timings, "args": vars(args)}, indent=1)
    )
    print(markdown_table(rows, args.seeds, args.n, base_gold))


def markdown_table(rows: dict[str, dict], seeds: list[int], ns: list[int], base_gold: float) -> str:
    """Gold gain over base per N and arm: each seed's gain [95% paired bootstrap over eval prompts]."""
    lines = [
        f"| labelled sets N | random: gold gain [95% CI] | active: gold gain [95% CI] |  (base gold {base_gold:.3f})",
        "|---|---|---|",
    ]
    for n in ns:
        cells = []
        for arm in ("random", "active"):
            got = [rows.get(f"s{s}-{arm}-{n}") for s in seeds]
            cells.append(
                "; ".join(f"{g['gain']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]" for g in got if g)
                or "not run"
            )
        lines.append(f"| {n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
