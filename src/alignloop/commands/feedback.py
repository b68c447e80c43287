"""``alignloop feedback report | export | import``: from labellers' rankings to training pairs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from alignloop.commands import command, group


def register(sub: Any) -> None:
    g = group(sub, "feedback", help="agreement report, consensus pairs export, import of preference data")

    r = command(
        g,
        "report",
        help="labeller agreement (Krippendorff's alpha, leave-one-out tau-b, ties, F) as JSON + HTML",
        example=(
            "alignloop feedback report --db sqlite:///labels.db --out runs/feedback\n"
            "alignloop feedback report --sets sets.jsonl --rankings rankings.jsonl --out runs/feedback"
        ),
        func=_report,
    )
    _add_input(r)
    r.add_argument(
        "--out", required=True, metavar="DIR", help="folder for report.json, report.html, agreement.png"
    )
    r.add_argument(
        "--level",
        default="ordinal",
        choices=("nominal", "ordinal", "interval"),
        help="alpha's level of measurement for the outcomes a>b, tie, b>a (default: ordinal)",
    )
    r.add_argument(
        "--reward",
        metavar="SPEC",
        help="also show, per labeller, how their choices sit against this pooled reward model "
        "(and their own output when it is labeller-conditioned): a different taste or misread "
        "instructions (needs --sets or --db for the texts)",
    )

    e = command(
        g,
        "export",
        help="consensus preference pairs for the reward model or DPO (TRL prompt/chosen/rejected, or grouped)",
        example=(
            "alignloop feedback export --db sqlite:///labels.db --out pairs.jsonl --exclude-flagged\n"
            "alignloop feedback export --sets sets.jsonl --rankings rankings.jsonl --out groups.jsonl "
            "--format grouped --consensus bradley-terry"
        ),
        func=_export,
        manifest="file",
    )
    _add_input(e)
    e.add_argument("--out", required=True, metavar="FILE", help="output JSONL file")
    e.add_argument(
        "--format",
        default="trl",
        choices=("trl", "grouped"),
        help="trl: one pair a line; grouped: all pairs of a prompt in one line (default: trl)",
    )
    e.add_argument(
        "--consensus",
        default="majority",
        choices=("majority", "tideman", "bradley-terry", "none"),
        help="how labellers are combined per set; none = every labeller's own pairs (default: majority)",
    )
    e.add_argument("--exclude-flagged", action="store_true", help="leave out labellers the report flags")
    e.add_argument(
        "--exclude", action="append", default=[], metavar="NAME", help="leave out a labeller (repeatable)"
    )
    e.add_argument("--soft-ties", action="store_true", help="a tie gives a pair with weight 0.5 (marked tie)")
    e.add_argument(
        "--keep-failed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="an F completion loses to every ranked completion of its set (default); "
        "--no-keep-failed drops F completions",
    )
    e.add_argument("--margins", action="store_true", help="add a 'margin' (mean rank gap; TRL applies it)")

    i = command(
        g,
        "import",
        help="import HH-RLHF transcripts or plain prompt/chosen/rejected lines as TRL pairs (text or messages)",
        example=(
            "alignloop feedback import --in hh-rlhf-train.jsonl --out pairs.jsonl\n"
            "alignloop feedback import --in hh-rlhf-train.jsonl --out chats.jsonl --messages"
        ),
        func=_import,
        manifest="file",
    )
    i.add_argument("--in", dest="input", required=True, metavar="FILE", help="JSONL file to import")
    i.add_argument("--out", required=True, metavar="FILE", help="output JSONL of TRL pairs")
    i.add_argument(
        "--format", default="auto", choices=("auto", "hh-rlhf", "pairs"), help="line format (default: auto)"
    )
    i.add_argument(
        "--messages",
        action="store_true",
        help="HH-RLHF transcripts as conversational pairs: Human/Assistant turns as user/assistant messages "
        "(TRL's conversational format, docs/chat.md); pairs lines keep the format they have",
    )
    i.add_argument("--strict", action="store_true", help="any bad line is an error (default: skip and count)")


def _add_input(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="URL", help="labelling database (sqlite:///labels.db, postgresql://...)")
    p.add_argument("--project", help="project in the database (default: the only one)")
    p.add_argument("--sets", metavar="FILE", help="completion sets JSONL (instead of --db)")
    p.add_argument("--rankings", metavar="FILE", help="rankings JSONL (instead of --db)")


def _load(args: argparse.Namespace, need_sets: bool) -> tuple[list, list]:
    from alignloop.errors import UserError
    from alignloop.records import CompletionSet, Ranking, read

    if args.db and (args.sets or args.rankings):
        raise UserError("give either --db or --sets/--rankings, not both", "the command line")
    if args.db:
        from alignloop.feedback.store import load_labels

        sets, rankings, _labellers = load_labels(args.db, args.project)
        if not rankings:
            raise UserError("no rankings in the database yet", args.db, "label some sets first")
        return sets, rankings
    if not args.rankings:
        raise UserError("no input", "the command line", "give --db URL, or --rankings FILE (and --sets FILE)")
    if need_sets and not args.sets:
        raise UserError("--sets FILE is needed to export texts", "the command line", "add --sets sets.jsonl")
    sets = read(args.sets, CompletionSet) if args.sets else []
    return sets, read(args.rankings, Ranking)


def _inputs(args: argparse.Namespace) -> dict[str, str]:
    if args.db:
        return {"db": args.db}
    return {k: getattr(args, k) for k in ("sets", "rankings") if getattr(args, k)}


def _report(args: argparse.Namespace) -> int:
    from alignloop.preference.report import feedback_report, reward_scores, write_report
    from alignloop.runs import stage_guard, start_stage

    sets, rankings = _load(args, need_sets=bool(args.reward))
    scores, own = reward_scores(args.reward, sets) if args.reward else (None, None)
    config = {"level": args.level, "reward": args.reward}
    run = start_stage(args.out, "feedback-report", config=config, inputs=_inputs(args))
    with stage_guard(run):
        rep = feedback_report(sets, rankings, level=args.level, scores=scores, own=own, reward=args.reward)
        paths = write_report(rep, args.out)
        run.finish(
            {
                "alpha": rep["alpha"]["value"],
                "n_rankings": rep["n_rankings"],
                "n_labellers": len(rep["labellers"]),
                "flagged": [f["name"] for f in rep["flagged"]],
            }
        )
    alpha = rep["alpha"]["value"]
    print(
        f"alpha ({args.level}) = {'n/a' if alpha is None else f'{alpha:.3f}'} over {rep['alpha']['units']} pairs"
    )
    for row in rep["labellers"]:
        tau = "n/a" if row["tau_b"] is None else f"{row['tau_b']:+.3f}"
        print(
            f"  {row['name']}: tau-b {tau} on {row['n_labelled']} sets"
            + (" FLAGGED" if row["flagged"] else "")
        )
        if "vs_model" in row:
            m = row["vs_model"]
            pct = "n/a" if m["model"] is None else f"{m['model']:.0%}"
            print(f"    vs {args.reward}: {pct} of {m['pairs']} pairs; {m['reading']}")
    for f in rep["flagged"]:
        print(f"flagged {f['name']}: {f['reason']}")
    print(f"wrote {paths['html']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from alignloop.errors import UserError
    from alignloop.preference.export import export_pairs, group_pairs
    from alignloop.preference.report import feedback_report
    from alignloop.records import write_jsonl
    from alignloop.runs import say

    sets, rankings = _load(args, need_sets=True)
    exclude = set(args.exclude)
    known = {r.labeller for r in rankings}
    unknown = sorted(exclude - known)
    if unknown:
        raise UserError(
            f"no labeller named {unknown[0]!r}", "--exclude", f"labellers: {', '.join(sorted(known))}"
        )
    if args.exclude_flagged:
        flagged = [f["name"] for f in feedback_report(sets, rankings)["flagged"]]
        say(f"excluding flagged labellers: {', '.join(flagged) or 'none'}")
        exclude |= set(flagged)
    rows, counts = export_pairs(
        sets,
        rankings,
        args.consensus,
        exclude_labellers=exclude,
        soft_ties=args.soft_ties,
        keep_failed=args.keep_failed,
        margins=args.margins,
    )
    if not rows:
        raise UserError(
            "no preference pairs to export", _inputs(args).popitem()[1], "are all rankings ties or F?"
        )
    out = group_pairs(rows) if args.format == "grouped" else rows
    write_jsonl(args.out, out)
    msg = f"wrote {len(out)} {'groups' if args.format == 'grouped' else 'pairs'} ({counts['pairs']} pairs"
    msg += f" from {counts['sets']} sets, consensus {args.consensus}"
    if args.keep_failed:
        msg += f"; {counts['failed_pairs']} with an F completion as the loser"
    print(msg + f") to {args.out}")
    if counts["unknown_sets"] or counts["unknown_completions"]:
        print(
            f"alignloop: warning: skipped rankings of {counts['unknown_sets']} unknown sets and "
            f"{counts['unknown_completions']} pairs with unknown completion ids",
            file=sys.stderr,
        )
    if counts["empty_completions"]:
        print(
            f"alignloop: warning: skipped {counts['empty_completions']} pairs with an empty completion",
            file=sys.stderr,
        )
    if counts["all_failed_sets"]:
        print(
            f"alignloop: warning: skipped {counts['all_failed_sets']} sets with no completion left after "
            "dropping F (no ranked completion for an F one to lose to)",
            file=sys.stderr,
        )
    if counts["identical"]:
        print(
            f"alignloop: skipped {counts['identical']} pairs whose chosen and rejected texts are the same",
            file=sys.stderr,
        )
    return 0


def _import(args: argparse.Namespace) -> int:
    from alignloop.errors import UserError
    from alignloop.preference.imports import import_preferences
    from alignloop.records import write_jsonl

    rows, problems = import_preferences(args.input, args.format, args.messages)
    if problems and args.strict:
        raise UserError(
            f"{len(problems)} bad lines; the first: {problems[0]}", fix="fix them or drop --strict"
        )
    write_jsonl(args.out, rows)
    print(f"imported {len(rows)} pairs to {args.out}")
    if problems:
        print(
            f"alignloop: warning: skipped {len(problems)} bad line{'s' if len(problems) > 1 else ''} "
            f"of {len(rows) + len(problems)}:",
            file=sys.stderr,
        )
        for p in problems[:10]:
            print(f"  {p}", file=sys.stderr)
        if len(problems) > 10:
            print(f"  ... and {len(problems) - 10} more", file=sys.stderr)
    return 0
