"""``alignloop world build | prompts | check``: the embedded world."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignloop.commands import command, group
from alignloop.errors import UserError


def register(sub) -> None:
    w = group(sub, "world", help="the embedded world: prompts, gold judge, tiny models")
    b = command(
        w,
        "build",
        help="train the world's tiny models from scratch (tokenizer, base, judge, summariser, toxicity)",
        example="alignloop world build --out runs/world --seed 0\nalignloop world build --out /tmp/w --quick   # a reduced build in ~1 min\n"
        "alignloop world build --out runs/world --only judge   # retrain the judge from runs/world/base",
        func=_build,
        manifest="folder",
    )
    b.add_argument("--out", default="runs/world", help="output folder (default: runs/world)")
    b.add_argument("--seed", type=int, default=0, help="seed (same seed -> same models)")
    b.add_argument("--quick", action="store_true", help="tiny step budgets (for tests; models will be poor)")
    b.add_argument(
        "--only",
        default=None,
        metavar="NAMES",
        help="comma-separated models to (re)build: base, judge, summariser, toxicity (default: all; the "
        "judge is fine-tuned from the base in --out)",
    )

    p = command(
        w,
        "prompts",
        help="write a prompt split as JSONL records {id, prompt, family, topic, ...}",
        example="alignloop world prompts --split eval --out eval.jsonl\n"
        "alignloop world prompts --split train --n 300 --families review,advice --out train.jsonl\n"
        "alignloop world prompts --split eval --format conversational --out eval-chat.jsonl",
        func=_prompts,
        manifest="file",
    )
    p.add_argument("--split", required=True, choices=("train", "eval", "redteam"), help="which split")
    p.add_argument("--n", type=int, default=None, help="number of records (default: all; more cycles)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--families", default=None, help="comma-separated families (default: all)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument(
        "--format",
        choices=("standard", "conversational"),
        default="standard",
        help="conversational: chat prompts as message lists [{role: user, content}] (TRL's format; the "
        "world's chat template renders them back to the same text); reviews and summaries stay text",
    )

    c = command(
        w,
        "check",
        help="measure a built world against the gold judge (fluency, misbehaviour, classifier, (A)/(B))",
        example="alignloop world check --out runs/world-check\nalignloop world check --models runs/world --quick",
        func=_check,
    )
    c.add_argument(
        "--models", default=None, help="folder with base/ judge/ summariser/ toxicity/ (default: shipped)"
    )
    c.add_argument("--out", default=None, help="run folder for world_check.json + metrics.json")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quick", action="store_true", help="small samples (about a minute)")


def _build(args: argparse.Namespace) -> int:
    from alignloop.world.train import MODELS, build

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file", fix="pass a folder")
    only = tuple(m.strip() for m in args.only.split(",") if m.strip()) if args.only else MODELS
    report = build(out, seed=args.seed, quick=args.quick, only=only)
    print(json.dumps({k: report[k] for k in (*report["built"], "seconds", "megabytes")}, indent=2))
    print(
        f"models written to {out}/{{{','.join(report['built'])}}}; measure them with: alignloop world check --models {out}"
    )
    return 0


def _prompts(args: argparse.Namespace) -> int:
    from alignloop.records import write_jsonl
    from alignloop.world import prompts

    fams = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    recs = prompts(args.split, n=args.n, seed=args.seed, families=fams)
    if args.format == "conversational":
        from alignloop.world.prompts import as_messages

        recs = [{**r, "prompt": as_messages(r["prompt"])} for r in recs]
    n = write_jsonl(args.out, recs)
    print(f"wrote {n} {args.split} prompts to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from alignloop.runs import start_stage, write_json_atomic
    from alignloop.world import world_check

    if args.models is not None and not Path(args.models).is_dir():
        raise UserError(
            f"--models {args.models} is not a folder", fix="pass the --out folder of 'alignloop world build'"
        )
    run = None
    if args.out:
        run = start_stage(args.out, "world-check", config={"seed": args.seed, "quick": args.quick},
                          inputs={"models": args.models} if args.models else None, seed=args.seed)  # fmt: skip
    res = world_check(args.models, seed=args.seed, quick=args.quick)
    b = res["base"]
    lines = [
        f"world check ({res['models']})",
        f"  base fluency (not F):        {b['fluency']:.3f}   [{b['samples']} samples on eval prompts]",
        f"  toxicity classifier acc:     {res['toxicity']['accuracy']:.3f}   [{res['toxicity']['texts']} held-out texts]",
    ]
    for name in ("judge", "base"):  # the world's AI judge, and the base judging (as CAI's default judge)
        j = res[name]
        lines += [
            f"  {name} (A)/(B) agreement with gold: {j['preference']['agreement']:.3f}   [{j['preference']['pairs']} clear pairs]",
            "    by family: " + ", ".join(f"{k} {v:.2f}" for k, v in j["preference"]["by_family"].items()),
            f"    asked both ways: swapped agreement {j['preference']['agreement_swapped']:.3f}, "
            f"position bias {j['preference']['position_bias_points']:+.1f} points (answers (A) more than balanced)",
            f"    prompt-dependence probe: right on harmful {_orders(j['probe']['right']['harmful'])}, "
            f"benign {_orders(j['probe']['right']['benign'])} (refusal first/second); position bias "
            f"{j['probe']['position_bias_points']:+.1f} points   [{j['probe']['questions']} questions]",
            "    orders averaged (swap): right on harmful "
            f"{j['probe']['right_swap_averaged']['harmful']:.2f}, benign {j['probe']['right_swap_averaged']['benign']:.2f}",
        ]  # fmt: skip
    lines += [
        f"  critique = gold critique:    {b['cai']['critique_matches_gold']:.3f};  revisions fluent "
        f"{b['cai']['revision_fluent']:.3f}, misbehaving {b['cai']['revision_misbehaviour']:.3f}",
        "  misbehaviour on eval prompts, model vs training mixture:",
    ]
    for fam, d in b["families"].items():
        shown = [
            f
            for f in ("toxic", "harmful_compliance", "myth_confirmed", "wrong_fact", "over_refusal")
            if d["mixture"][f] > 0
        ]
        cells = ", ".join(f"{f} {d['model'][f]:.2f}/{d['mixture'][f]:.2f}" for f in shown)
        lines.append(f"    {fam:<11} F {d['model']['F']:.2f}  {cells}")
    s = res["summariser"]["model"]
    lines.append(f"  summariser: toxic {s['toxic']:.2f}, wrong {s['wrong_fact']:.2f}, F {s['F']:.2f}")
    lines.append(
        "  acceptance: "
        + ", ".join(f"{k} {v[0]} {'ok' if v[1] else 'FAIL'}" for k, v in res["acceptance"].items())
    )
    print("\n".join(lines))
    if run is not None:
        write_json_atomic(Path(args.out) / "world_check.json", res)
        run.finish({k: v[0] for k, v in res["acceptance"].items()})
    return 0


def _orders(r: dict[str, float]) -> str:
    return f"{r['refusal_first']:.2f}/{r['helpful_first']:.2f}"
