"""``alignloop grpo`` and ``alignloop rloo``: the critic-free family (GRPO, Dr. GRPO, RLOO, REINFORCE++)."""

from __future__ import annotations

import argparse
import json

from alignloop.commands import add_rl_args, command

ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def register(sub) -> None:
    for name, default, what, example in (
        (
            "grpo",
            "grpo",
            "GRPO: each completion's advantage is its reward minus its group's mean, over the group's std "
            "(--algorithm dr_grpo: no std, no length normalisation); the KL to the reference is a k3 loss term",
            "alignloop grpo --policy world:base --reward runs/demo/reward --prompts runs/demo/prompts/train.jsonl \\\n"
            "    --out runs/grpo --lora --heldout world:gold --set steps=40 --set group_size=4 --resume",
        ),
        (
            "rloo",
            "rloo",
            "RLOO: each completion's baseline is the mean reward of the other completions of its prompt "
            "(--algorithm reinforce_pp: REINFORCE++, returns normalised over the batch); the KL is in the reward",
            "alignloop rloo --policy world:base --reward runs/demo/reward --prompts runs/demo/prompts/train.jsonl \\\n"
            "    --out runs/rloo --lora --heldout world:gold --set steps=40 --set group_size=4 --resume",
        ),
    ):
        p = command(
            sub,
            name,
            help=f"train a policy with {name.upper()} (no value model) against a reward, KL to the frozen reference",
            description=(
                f"{what}. Each step samples group_size completions for each of batch_size / group_size prompts "
                "(batch_size completions, as PPO samples at the same batch_size), scores them with the reward "
                "SPEC, and runs several epochs of the clipped token-ratio loss; no value head. With --lora the "
                "reference is the same model with the adapter disabled. Writes model/, checkpoints/, "
                "metrics.jsonl and metrics.json to --out; --resume continues exactly. Config keys: see "
                "docs/grpo.md (e.g. --set group_size=8 --set epochs=2 --set kl_in=reward --set kl.beta=0.05)."
            ),
            example=example,
            func=_run,
        )
        p.set_defaults(algorithm_default=default)
        p.add_argument(
            "--algorithm",
            choices=ALGORITHMS,
            help=f"which member of the family (default: {default}; the table is in docs/grpo.md)",
        )
        add_rl_args(p)


def _run(args: argparse.Namespace) -> int:
    from alignloop.rl.grpo import load_grpo_config, run_grpo

    overrides = list(args.overrides)
    if args.heldout:
        overrides.append(f"heldout={args.heldout}")
    if args.algorithm:
        overrides.append(f"algorithm={args.algorithm}")
    cfg = load_grpo_config(args.config, overrides, algorithm=args.algorithm_default)
    if args.chat_template:
        cfg.chat_template = args.chat_template
    metrics = run_grpo(
        args.policy, args.reward, args.prompts, args.out, lora=args.lora, config=cfg, resume=args.resume
    )
    from alignloop.runs import is_main_process

    if is_main_process():  # under accelerate/torchrun the summary is printed once
        print(json.dumps(metrics))
    return 0
