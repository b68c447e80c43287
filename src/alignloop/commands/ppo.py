"""``alignloop ppo``: PPO with a per-token KL penalty against a frozen reference."""

from __future__ import annotations

import argparse
import json

from alignloop.commands import add_rl_args, command


def register(sub) -> None:
    p = command(
        sub,
        "ppo",
        help="train a policy with PPO against a reward, with a KL penalty to the frozen reference",
        description=(
            "Each step samples one completion per prompt, scores it with the reward SPEC, pays "
            "-beta * KL(policy || reference) at every token and the score at the completion's last token (EOS), "
            "then runs several epochs of the clipped PPO loss + value loss - entropy bonus. With --lora the "
            "reference is the same model with the adapter disabled. Writes model/ (the trained policy), "
            "checkpoints/, metrics.jsonl (every step) and metrics.json to --out; --resume continues exactly. "
            "Config keys: see docs/ppo.md (e.g. --set steps=60 --set kl.beta=0.05 --set kl.adaptive=false)."
        ),
        example=(
            "alignloop ppo --policy world:base --reward world:toxicity:nothate --prompts prompts.jsonl \\\n"
            "    --out runs/ppo-detox --lora --heldout world:gold --set steps=40 --resume"
        ),
        func=_ppo,
    )
    add_rl_args(p)


def _ppo(args: argparse.Namespace) -> int:
    from alignloop.rl.ppo import load_ppo_config, run_ppo

    overrides = list(args.overrides)
    if args.heldout:
        overrides.append(f"heldout={args.heldout}")
    cfg = load_ppo_config(args.config, overrides)
    if args.chat_template:
        cfg.chat_template = args.chat_template
    metrics = run_ppo(
        args.policy, args.reward, args.prompts, args.out, lora=args.lora, config=cfg, resume=args.resume
    )
    from alignloop.runs import is_main_process

    if is_main_process():  # under accelerate/torchrun the summary is printed once
        print(json.dumps(metrics))
    return 0
