"""DPO's acceptance run in the embedded world (issue 10), measured and printed.

    python tests/dpo/world_acceptance.py [--out DIR] [--set key=value]...

1. The demo recipe up to PPO (``alignloop run recipes/demo.yaml``: world:base -> 4 completions for
   300 train prompts -> three simulated labellers -> consensus pairs -> reward model -> PPO with
   LoRA and the KL penalty). Finished stages are reused (``--resume``).
2. DPO with LoRA on the SAME exported pairs (``DIR/export/pairs.jsonl``), with the demo recipe's
   ``dpo.config`` (IPO on summed log-probs, beta 0.25, 3 epochs) plus ``--set`` overrides, snapshots
   kept for the curve (``--set loss_type=sigmoid ...`` to try others).
3. ``alignloop evaluate`` of base, PPO and DPO on the world's eval prompts (never trained on):
   gold judge score, KL to the base per completion, with both runs' checkpoints on one
   gold-vs-sqrt(KL) plot in ``DIR/acceptance-eval/report.html``.

Prints the gold improvement of each over the base and DPO's as a fraction of PPO's (target >= 0.8).
Not a pytest file: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "src" / "alignloop" / "recipes" / "demo.yaml"  # (ROOT/recipes may be a plain-file symlink)


def alignloop(*args: str) -> None:
    cmd = [sys.executable, "-m", "alignloop", *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/dpo-acceptance")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="DPO config override")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N eval prompts only")
    p.add_argument("--base", default="world:base", help="the world's base model (default: the shipped one)")
    p.add_argument("--toxicity", default="world:toxicity", help="the world's toxicity classifier")
    p.add_argument("--recipe-set", action="append", default=[], help="demo recipe override")
    p.add_argument(
        "--reuse", action="store_true", help="use DIR/export and DIR/ppo as they are (no demo run)"
    )
    p.add_argument("--ppo-gold", metavar="RUN", help="also show PPO's own acceptance run (reward world:gold)")
    a = p.parse_args()
    out = Path(a.out)

    t = time.time()
    recipe_sets = [f"policy={a.base}", f"reward.train.model={a.base}", *a.recipe_set]
    if not a.reuse:
        alignloop("run", RECIPE, "--out", out, "--resume",
                  "--set", "stages=[prompts, generate, label, export, reward, ppo]",
                  *[x for kv in recipe_sets for x in ("--set", kv)])  # fmt: skip
    pairs = out / "export" / "pairs.jsonl"
    print(
        f"demo up to PPO: {(time.time() - t) / 60:.1f} min; {sum(1 for _ in open(pairs))} pairs", flush=True
    )

    t = time.time()
    dpo = out / "dpo-acceptance"
    import yaml

    recipe_dpo = (yaml.safe_load(RECIPE.read_text()).get("dpo") or {}).get("config") or {}
    dpo_sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in recipe_dpo.items()]
    sets = [x for kv in ["snapshot_every=10", *dpo_sets, *a.overrides] for x in ("--set", kv)]
    alignloop("dpo", "--policy", a.base, "--pairs", pairs, "--out", dpo, "--lora", "--resume", *sets)
    dpo_minutes = (time.time() - t) / 60

    prompts = out / "prompts" / "eval.jsonl"
    ev = out / "acceptance-eval"
    limit = ["--limit", str(a.limit)] if a.limit else []
    gold_run = []
    if a.ppo_gold:
        gold_run = [
            "--policy",
            f"ppo-gold={Path(a.ppo_gold) / 'model'}",
            "--checkpoints",
            f"ppo-gold={a.ppo_gold}",
        ]
    alignloop("evaluate", "--policy", f"base={a.base}", "--toxicity", a.toxicity, "--policy", f"ppo={out / 'ppo' / 'model'}",
              "--policy", f"dpo={dpo}", "--prompts", prompts, "--reward", out / "reward",
              "--samples", a.samples, "--checkpoints", f"ppo={out / 'ppo'}", "--checkpoints", f"dpo={dpo}",
              "--training-run", f"ppo={out / 'ppo'}", "--training-run", f"dpo={dpo}", "--out", ev, *limit, *gold_run)  # fmt: skip

    metrics = json.loads((ev / "metrics.json").read_text())
    pol = metrics["policies"]

    def mean(name: str, key: str) -> float | None:
        m = pol[name]["metrics"].get(key)
        return None if m is None else m["mean"]

    names = list(pol)
    gold = {n: mean(n, "gold_score") for n in names}
    kl = {n: mean(n, "kl_sequence") for n in names}
    gain = {n: gold[n] - gold["base"] for n in names if n != "base"}
    dpo_metrics = json.loads((dpo / "metrics.json").read_text())
    summary = {
        "gold": gold,
        "kl_per_completion": kl,
        "gold_gain": gain,
        "dpo_fraction_of_ppo_gain": {
            n: gain["dpo"] / g for n, g in gain.items() if n.startswith("ppo") and g
        },
        "dpo_heldout_accuracy": dpo_metrics.get("heldout/accuracy"),
        "dpo_minutes": round(dpo_minutes, 1),
        "report": str(ev / "report.html"),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
