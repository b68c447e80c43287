"""``alignloop run RECIPE.yaml`` and ``alignloop demo``."""

from __future__ import annotations

import argparse

from alignloop.commands import add_config_args, add_report_to, command


def register(sub) -> None:
    p = command(
        sub,
        "run",
        help="run the stages a recipe lists, in one run folder",
        example="alignloop run recipes/demo.yaml --out runs/demo --set ppo.config.kl.beta=0.05 --resume",
        func=_run,
    )
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="skip stages whose inputs and config are unchanged")
    add_config_args(p)
    p.set_defaults(config=None)

    d = command(
        sub,
        "demo",
        help="the whole loop on the embedded world, in minutes on a CPU",
        example=(
            "alignloop demo --out runs/demo\nalignloop demo --seeds 3 --out runs/demo-3seeds\n"
            "alignloop demo --compare --out runs/compare\n"
            "alignloop demo --format conversational --out runs/demo-chat"
        ),
        func=_demo,
    )
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument(
        "--human", action="store_true", help="label in the browser app instead of simulated labellers"
    )
    d.add_argument("--resume", action="store_true", help="skip finished stages")
    d.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run the demo with N seeds (seed, seed+1, ...; each in OUT/seed-S) and print each metric's "
        "mean and spread over them (default: 1)",
    )
    d.add_argument(
        "--compare",
        action="store_true",
        help="every method side by side: PPO, GRPO, RLOO, online DPO, DPO and ILQL on the same prompts, "
        "labels, reward model and evaluation (recipes/compare.yaml)",
    )
    d.add_argument(
        "--format",
        choices=("text", "conversational"),
        default="text",
        help="conversational: the world's chat prompts as message lists, so every stage applies the chat "
        "template (docs/chat.md; recipe key prompts.format)",
    )
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_report_to(d)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alignloop.loop import demo_table, run_recipe

    summary = run_recipe(args.recipe, out=args.out, overrides=args.overrides, resume=args.resume)
    print(demo_table(summary, Path(summary["out"])))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from alignloop.loop import run_demo

    fmt = [f"prompts.format={args.format}"] if args.format != "text" else []
    run_demo(
        out=args.out, human=args.human, resume=args.resume, overrides=[*fmt, *args.overrides],
        seeds=args.seeds, compare=args.compare,
    )  # fmt: skip
    return 0
