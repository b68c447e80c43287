"""``alignloop dpo``: direct preference optimisation (DPO / IPO / conservative DPO) on preference pairs."""

from __future__ import annotations

import argparse

from alignloop.commands import add_chat_template, add_config_args, command


def register(sub) -> None:
    p = command(
        sub,
        "dpo",
        help="train a policy directly on preference pairs (DPO, IPO, conservative DPO)",
        description=(
            "Train a policy on preference pairs (TRL format: prompt, chosen, rejected, weight) with the DPO loss "
            "-log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]), or IPO "
            "(--set loss_type=ipo), or conservative DPO (--set label_smoothing=0.1). The reference log-probs "
            "are computed once before training (--set reference=on_the_fly to compute them each step). "
            "A pair's weight is P(chosen is better), read as 'reward train' reads it: ties (0.5) are dropped and "
            "a weight below 0.5 swaps the pair (--set labels=soft: the weight is the pair's soft label). "
            "Writes the trained policy (HF folder; with --lora the adapter), manifest.json, metrics.json "
            "and per-step metrics.jsonl to --out. With --online (online DPO): no pairs file; each step the "
            "current policy samples group_size completions for each prompt of --prompts, --reward (or an AI "
            "judge: --set judge=MODEL|URL) picks the best and the worst, and DPO learns from those fresh "
            "pairs (model/ in --out; keys in docs/dpo.md)."
        ),
        example=(
            "alignloop dpo --policy world:base --pairs pairs.jsonl --out runs/dpo --lora \\\n"
            "    --set beta=0.1 --set lora.r=8 --resume\n"
            "alignloop dpo --online --policy world:base --reward runs/demo/reward \\\n"
            "    --prompts runs/demo/prompts/train.jsonl --out runs/online-dpo --lora --set steps=60"
        ),
        func=_dpo,
    )
    p.add_argument(
        "--policy", required=True, metavar="ID", help="model to train: hub id, local folder or world:base"
    )
    p.add_argument("--pairs", metavar="FILE", help="preference pairs JSONL (alignloop feedback export)")
    p.add_argument(
        "--online", action="store_true", help="online DPO: fresh pairs from the current policy each step"
    )
    p.add_argument("--reward", metavar="SPEC", help="--online: the reward that picks chosen and rejected")
    p.add_argument("--prompts", metavar="FILE", help="--online: prompt JSONL the policy samples from")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder; the trained policy is saved here")
    p.add_argument(
        "--heldout", metavar="FILE", help="held-out pairs JSONL (default: heldout_fraction of the prompts)"
    )
    p.add_argument(
        "--lora", action="store_true", help="train a LoRA adapter (the reference is the adapter disabled)"
    )
    p.add_argument(
        "--labeller",
        action="append",
        metavar="NAME",
        help="train on this labeller's pairs only (repeat for a group: pairs naming only them); "
        "pairs from 'feedback export --consensus none' (config key target_labellers)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint; skip a finished run"
    )
    add_config_args(p)
    add_chat_template(p)


def _dpo(args: argparse.Namespace) -> int:
    from alignloop.config import load_config
    from alignloop.errors import UserError
    from alignloop.runs import is_main_process

    if args.online:
        from alignloop.rl.online_dpo import OnlineDPOConfig, run_online_dpo

        if args.pairs or args.heldout or args.labeller:
            raise UserError(
                "--online samples its own pairs", fix="drop --pairs/--heldout/--labeller, or drop --online"
            )
        if not args.prompts:
            raise UserError("--online needs --prompts FILE (the prompts the policy samples from)")
        cfg = load_config(OnlineDPOConfig, path=args.config, overrides=args.overrides)
        if args.chat_template:
            cfg.chat_template = args.chat_template
        metrics = run_online_dpo(
            args.policy, args.reward, args.prompts, args.out, lora=args.lora, config=cfg, resume=args.resume
        )
    else:
        from alignloop.models import LoraSettings
        from alignloop.offline.dpo import DPOConfig, train_dpo

        if not args.pairs:
            raise UserError("dpo needs --pairs FILE", fix="or --online --reward SPEC --prompts FILE")
        if args.reward or args.prompts:
            raise UserError("--reward and --prompts are for --online", fix="add --online, or drop them")
        cfg = load_config(DPOConfig, path=args.config, overrides=args.overrides)
        if args.lora and cfg.lora is None:
            cfg.lora = LoraSettings()
        if args.chat_template:
            cfg.chat_template = args.chat_template
        if args.labeller:
            cfg.target_labellers = list(dict.fromkeys(args.labeller))
        metrics = train_dpo(
            args.policy, args.pairs, args.out, cfg, resume=args.resume, heldout_path=args.heldout
        )

    if not is_main_process():
        return 0
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(" ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
