"""``alignloop evaluate``: policies on the same held-out prompts -> metrics.json + report.html."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignloop.commands import add_chat_template, add_report_to, command
from alignloop.errors import UserError

EXAMPLE = """\
alignloop evaluate --policy base=world:base --policy ppo=runs/demo/ppo/model \\
    --prompts eval.jsonl --reward runs/demo/reward --samples 4 --seed 0 --seed 1 \\
    --checkpoints ppo=runs/demo/ppo --best-of-n 16 --training-run ppo=runs/demo/ppo --out runs/eval"""


def register(sub) -> None:
    p = command(
        sub,
        "evaluate",
        help="compare policies on held-out prompts: reward, toxicity, KL, gold judge, with 95%% intervals",
        description=(
            "Sample each policy on the same prompts (fixed seeds), score the completions, and write "
            "metrics.json (means with bootstrap 95%% intervals, paired differences against the first "
            "policy), samples.jsonl and a self-contained report.html."
        ),
        example=EXAMPLE,
        func=_evaluate,
    )
    p.add_argument(
        "--policy",
        action="append",
        required=True,
        metavar="[NAME=]ID",
        help="a model id or folder (LoRA adapter folders too); repeat; the first is the baseline",
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="held-out prompts JSONL ({'id','prompt','reference'?})",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_report_to(p)
    p.add_argument("--reward", metavar="SPEC", help="reward model SPEC for the reward score (and the proxy)")
    p.add_argument(
        "--toxicity",
        default="world:toxicity",
        metavar="SPEC",
        help="toxicity classifier [:LABEL] (default world:toxicity; hub: "
        "facebook/roberta-hate-speech-dynabench-r4-target); 'none' to skip",
    )
    p.add_argument(
        "--reference", metavar="ID", help="KL is measured to this model (default: the first policy)"
    )
    p.add_argument(
        "--samples", type=int, default=4, metavar="K", help="completions per prompt per seed (default 4)"
    )
    p.add_argument(
        "--seed", type=int, action="append", metavar="N", help="sampling seed; repeat for several (default 0)"
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    add_chat_template(p)
    p.add_argument(
        "--gold",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the world's gold judge (default: for world prompts)",
    )
    p.add_argument(
        "--rouge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ROUGE-L against 'reference' (default: when present)",
    )
    p.add_argument("--independent-samples", action="store_true", help="a separate random stream per policy")
    p.add_argument(
        "--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)"
    )
    p.add_argument(
        "--checkpoints",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="training run whose checkpoints go on the gold-vs-KL plot",
    )
    p.add_argument(
        "--best-of-n",
        type=int,
        default=0,
        metavar="N",
        help="best-of-n curve from N reference samples per prompt",
    )
    p.add_argument(
        "--gold-reward",
        metavar="SPEC",
        help="the 'true' reward of the over-optimization plot (default world:gold)",
    )
    p.add_argument(
        "--training-run",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="draw this run's training curves in the report",
    )


def parse_named(values: list[str], flag: str) -> dict[str, str]:
    """``["ppo=runs/ppo", "world:base"]`` -> ``{"ppo": "runs/ppo", "base": "world:base"}`` (unique names)."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, target = v.partition("=")
        if not sep or not name or "/" in name:
            name, target = default_name(v), v
        if not target:
            raise UserError(f"{flag} {v!r} names nothing", fix=f"write {flag} NAME=ID or {flag} ID")
        base, i = name, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out[name] = target
    return out


def default_name(model_id: str) -> str:
    if model_id.startswith("world:"):
        return model_id.split(":", 1)[1]
    return Path(model_id.rstrip("/")).name or model_id


def _evaluate(args: argparse.Namespace) -> int:
    from alignloop.evaluation import evaluate_policies, write_report
    from alignloop.evaluation.report import evaluation_table
    from alignloop.runs import stage_guard, start_stage

    policies = parse_named(args.policy, "--policy")
    runs = parse_named(args.checkpoints, "--checkpoints")
    curves = parse_named(args.training_run, "--training-run")
    for name, folder in {**runs, **curves}.items():
        if not Path(folder).is_dir():
            raise UserError(f"training run folder of {name!r} not found: {folder}", fix="check the path")
    toxicity = None if args.toxicity.lower() in ("none", "off", "") else args.toxicity
    config = {k: v for k, v in vars(args).items() if k not in ("func", "quiet", "report_to")}
    inputs = {"prompts": args.prompts, **{f"policy:{n}": m for n, m in policies.items()}}
    run = start_stage(args.out, "evaluate", config=config, inputs=inputs, seed=(args.seed or [0])[0])
    with stage_guard(run):
        evaluation = evaluate_policies(
            policies,
            args.prompts,
            reward_spec=args.reward,
            toxicity_spec=toxicity,
            reference=args.reference,
            samples_per_prompt=args.samples,
            seed=args.seed or [0],
            out=args.out,
            gold=args.gold,
            rouge=args.rouge,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            batch_size=args.batch_size,
            limit=args.limit,
            independent_samples=args.independent_samples,
            n_boot=args.bootstrap,
            device=args.device,
            overoptimization=runs or None,
            proxy_spec=args.reward,
            gold_spec=args.gold_reward,
            best_of_n=args.best_of_n,
            chat_template=args.chat_template,
        )
        report = write_report(args.out, evaluation, curves)
        run.table("evaluation", *evaluation_table(evaluation))
        run.finish(evaluation)
    print(summary_lines(evaluation))
    print(f"report: {report}")
    return 0


def summary_lines(evaluation: dict) -> str:
    """A plain-text table: metric, each policy's mean, each difference [interval]."""
    names = list(evaluation["policies"])
    diffs = evaluation.get("differences") or {}
    head = ["metric", *names, *(f"{n} - {evaluation['baseline']}" for n in diffs)]
    rows = [head]
    for m in evaluation["metric_names"]:
        row = [m]
        for n in names:
            v = evaluation["policies"][n]["metrics"].get(m, {}).get("mean")
            row.append("-" if v is None else f"{v:.3f}")
        for n in diffs:
            d = diffs[n].get(m) or {}
            if d.get("diff") is None:
                row.append("-")
            else:
                row.append(f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
