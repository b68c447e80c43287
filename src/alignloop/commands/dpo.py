"""``alignloop dpo``: direct preference optimisation (DPO / IPO / conservative DPO) on preference pairs."""

from __future__ import annotations

import argparse

from alignloop.commands import add_config_args, command


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
            "Writes the trained policy (HF folder; with --lora the adapter), manifest.json, metrics.json "
            "and per-step metrics.jsonl to --out."
        ),
        example=(
            "alignloop dpo --policy world:base --pairs pairs.jsonl --out runs/dpo --lora \\\n"
            "    --set beta=0.1 --set lora.r=8 --resume"
        ),
        func=_dpo,
    )
    p.add_argument(
        "--policy", required=True, metavar="ID", help="model to train: hub id, local folder or world:base"
    )
    p.add_argument(
        "--pairs", required=True, metavar="FILE", help="preference pairs JSONL (alignloop feedback export)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="run folder; the trained policy is saved here")
    p.add_argument(
        "--heldout", metavar="FILE", help="held-out pairs JSONL (default: heldout_fraction of the prompts)"
    )
    p.add_argument(
        "--lora", action="store_true", help="train a LoRA adapter (the reference is the adapter disabled)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint; skip a finished run"
    )
    add_config_args(p)


def _dpo(args: argparse.Namespace) -> int:
    from alignloop.config import load_config
    from alignloop.dpo import DPOConfig, train_dpo
    from alignloop.models import LoraSettings

    cfg = load_config(DPOConfig, path=args.config, overrides=args.overrides)
    if args.lora and cfg.lora is None:
        cfg.lora = LoraSettings()
    metrics = train_dpo(args.policy, args.pairs, args.out, cfg, resume=args.resume, heldout_path=args.heldout)
    from alignloop.runs import is_main_process

    if not is_main_process():
        return 0
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(" ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
