"""``alignloop run RECIPE.yaml`` and ``alignloop demo``."""

from __future__ import annotations

import argparse

from alignloop.commands import add_config_args, command


def register(sub) -> None:
    p = command(
        sub,
        "run",
        help="run the stages a recipe lists, in one run folder",
        example="alignloop run recipes/demo.yaml --out runs/demo --set ppo.kl.beta=0.05 --resume",
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
        example="alignloop demo --out runs/demo",
        func=_demo,
    )
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument(
        "--human", action="store_true", help="label in the browser app instead of simulated labellers"
    )
    d.add_argument("--resume", action="store_true", help="skip finished stages")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _run(args: argparse.Namespace) -> int:
    from alignloop.loop import run_recipe

    run_recipe(args.recipe, out=args.out, overrides=args.overrides, resume=args.resume)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from alignloop.loop import run_demo

    run_demo(out=args.out, human=args.human, resume=args.resume, overrides=args.overrides)
    return 0
