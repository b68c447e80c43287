"""``alignloop cai revise | label | run``: Constitutional AI and RLAIF."""

from __future__ import annotations

import argparse

from alignloop.commands import add_chat_template, add_config_args, command, group


def register(sub) -> None:
    g = group(sub, "cai", help="Constitutional AI: self-critique and revision, AI preference labels (RLAIF)")

    p = command(
        g,
        "revise",
        help="supervised stage: sample, then critique -> revise under drawn principles; writes an SFT set",
        description=(
            "For each prompt, sample a response, then --rounds rounds of critique -> revision, each under a "
            "critique principle drawn at random from the constitution (few-shot exchanges first). --out gets "
            "transcripts.jsonl (every step) and sft.jsonl ({prompt, response}: the final revisions, for "
            "'alignloop sft'). Transcripts are appended per batch: rerunning the command continues where it stopped."
        ),
        example=(
            "alignloop world prompts --split redteam --out redteam.jsonl\n"
            "alignloop cai revise --model world:base --prompts redteam.jsonl --out runs/sl --rounds 2 --samples 4\n"
            "alignloop sft --model world:base --data runs/sl/sft.jsonl --out runs/sl-model"
        ),
        func=_revise,
        manifest="folder",
    )
    p.add_argument(
        "--model", required=True, metavar="ID|URL", help="writer: model id, folder, or OpenAI-compatible URL"
    )
    p.add_argument("--prompts", required=True, metavar="FILE", help='prompt records {"id", "prompt"} (JSONL)')
    p.add_argument("--out", required=True, metavar="DIR", help="folder for transcripts.jsonl and sft.jsonl")
    p.add_argument("--rounds", type=int, default=None, help="critique -> revision rounds (default 1)")
    p.add_argument("--samples", type=int, default=None, help="responses per prompt (default 1)")
    p.add_argument(
        "--constitution", metavar="FILE", default=None, help="constitution YAML (default: the notes' four)"
    )
    p.add_argument("--api", choices=["completions", "chat"], default="completions", help="for a URL writer")
    p.add_argument("--seed", type=int, default=None)
    add_config_args(p)

    p = command(
        g,
        "label",
        help="RLAIF: a judge model labels which of two responses better follows drawn principles (soft labels)",
        description=(
            "For each pair (every two completions of a completion set, or a chosen/rejected pair) the judge is "
            "asked 'options: (A) ... (B) ... the answer is:' under --principles drawn preference principles; "
            "the label is the normalised probability of (A) vs (B), averaged over the principles and optionally "
            "clamped. Writes TRL-compatible pairs with 'weight' = P(chosen better) for 'alignloop reward train'. "
            "--judge is a model id or the URL of an OpenAI-compatible server ('alignloop serve'). Labels are "
            "appended per batch: rerunning the command labels only what is missing."
        ),
        example=(
            "alignloop generate --model runs/sl-model --prompts redteam.jsonl --k 2 --out sets.jsonl\n"
            "alignloop cai label --judge world:judge --pairs-from sets.jsonl --out pairs.jsonl --clamp 0.4,0.6 "
            "--principles 2\n"
            "alignloop reward train --model world:base --pairs pairs.jsonl --out runs/rm"
        ),
        func=_label,
        manifest="file",
    )
    p.add_argument(
        "--judge", required=True, metavar="ID|URL", help="judge: model id, folder, or OpenAI-compatible URL"
    )
    p.add_argument("--judge-model", default=None, help="model name on the server (default: its first model)")
    p.add_argument(
        "--pairs-from", required=True, metavar="FILE", help="completion sets (k >= 2) or pair records"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="labelled pairs (JSONL)")
    p.add_argument(
        "--api",
        choices=["completions", "chat"],
        default="completions",
        help="for a URL judge: completions (log-probs: soft labels) or chat (answers: hard labels)",
    )
    p.add_argument(
        "--constitution", metavar="FILE", default=None, help="constitution YAML (default: the notes' four)"
    )
    p.add_argument("--clamp", metavar="LO,HI", default=None, help="clamp P(A) into [LO, HI], e.g. 0.4,0.6")
    p.add_argument(
        "--principles", type=int, default=None, help="principles drawn and averaged per pair (default 1)"
    )
    p.add_argument(
        "--swap", action="store_true", help="also ask with A and B swapped (cancels position bias)"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="texts per judge call (default 16)")
    add_config_args(p)

    p = command(
        g,
        "run",
        help="the whole pipeline: revise -> SFT -> pairs -> AI labels -> reward model -> PPO -> red-team evaluation",
        description=(
            "Constitutional AI end to end on the embedded world (or your own prompt files): the supervised stage "
            "(critique -> revision, then SFT on the revisions), the RL stage (two responses per prompt from the SL "
            "model, AI soft labels from the judge, a reward model on them, PPO with LoRA) and an evaluation on "
            "held-out red-team prompts with the gold judge. --prompts takes text or conversational prompts "
            "(message lists, e.g. 'alignloop world prompts --format conversational'): conversations are critiqued "
            "and revised as chat turns and every stage reads them through the model's chat template. Every stage "
            "has its own folder under --out and --resume skips finished stages and continues interrupted ones."
        ),
        example="alignloop cai run --out runs/cai --resume --set revise.rounds=2 --set ppo.steps=30",
        func=_run,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (one sub-folder per stage)")
    p.add_argument("--model", default=None, metavar="ID", help="the model to align (default world:base)")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        default=None,
        help="red-team prompts for the supervised stage, text or conversational (config key redteam_prompts; "
        "default: the world's redteam split)",
    )
    p.add_argument(
        "--constitution", metavar="FILE", default=None, help="constitution YAML (default: the notes' four)"
    )
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue interrupted ones")
    add_chat_template(p)
    add_config_args(p)


def _revise(args: argparse.Namespace) -> int:
    from alignloop.cai.constitution import load_constitution
    from alignloop.cai.judges import open_backend
    from alignloop.cai.revise import ReviseConfig, revise_prompts
    from alignloop.config import load_config
    from alignloop.generation import load_prompts

    cfg = load_config(ReviseConfig, path=args.config, overrides=args.overrides)
    for key in ("rounds", "samples", "seed"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    c = load_constitution(args.constitution)
    prompts, _ = load_prompts(args.prompts)
    writer = open_backend(args.model, api=args.api, batch_size=cfg.batch_size)
    stats = revise_prompts(writer, prompts, args.out, c, cfg)
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def _label(args: argparse.Namespace) -> int:
    from alignloop.cai.constitution import load_constitution
    from alignloop.cai.judges import open_backend
    from alignloop.cai.label import LabelConfig, label_pairs, pairs_from_file, parse_clamp
    from alignloop.config import load_config
    from alignloop.errors import UserError

    cfg = load_config(LabelConfig, path=args.config, overrides=args.overrides)
    if args.clamp is not None:
        cfg.clamp = parse_clamp(args.clamp)
    if args.principles is not None:
        cfg.principles = args.principles
    if args.seed is not None:
        cfg.seed = args.seed
    if args.swap:
        cfg.swap = True
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    c = load_constitution(args.constitution)
    pairs = pairs_from_file(args.pairs_from)
    judge = open_backend(args.judge, model=args.judge_model, api=args.api, batch_size=args.batch_size)
    stats = label_pairs(judge, pairs, args.out, c, cfg)
    print(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in stats.items()))
    return 0


def _run(args: argparse.Namespace) -> int:
    from alignloop.cai.pipeline import CAIConfig, run_cai
    from alignloop.config import load_config

    data = {}
    if args.model:
        data["model"] = args.model
    if args.constitution:
        data["constitution"] = args.constitution
    if args.prompts:
        data["redteam_prompts"] = args.prompts
    if args.chat_template:
        data["chat_template"] = args.chat_template
    cfg = load_config(CAIConfig, path=args.config, data=data, overrides=args.overrides)
    result = run_cai(args.out, cfg, resume=args.resume)
    for k, v in result.items():
        print(f"{k}: {v}")
    return 0
