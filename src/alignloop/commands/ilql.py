"""``alignloop ilql``: implicit language Q-learning (offline RL) on scored completions or pairs."""

from __future__ import annotations

import argparse

from alignloop.commands import add_config_args, command


def register(sub) -> None:
    p = command(
        sub,
        "ilql",
        help="offline RL: learn Q and V heads from scored completions or pairs (ILQL)",
        description=(
            "Implicit language Q-learning (Snell et al. 2022): two Q heads with Polyak-averaged targets and a "
            "V head on the language model, trained offline with the Bellman (Q), expectile (V, tau), CQL and "
            "AWAC losses. --data holds scored completions {prompt, completion, reward} (alignloop reward score "
            "--out writes them), scored completion sets, or preference pairs (chosen +1, rejected -1 unless "
            "they carry reward_chosen/reward_rejected). The saved folder decodes with "
            "logits = log pi + beta * (Q - V) in alignloop generate, evaluate and serve. Causal models only."
        ),
        example=(
            "alignloop ilql --policy world:base --data pairs.jsonl --out runs/ilql \\\n"
            "    --set beta=4 --set max_steps=200 --resume"
        ),
        func=_ilql,
    )
    p.add_argument(
        "--policy", required=True, metavar="ID", help="causal LM: hub id, local folder or world:base"
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="scored completions, scored sets, or preference pairs (JSONL)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="run folder; the model and its heads are saved here"
    )
    p.add_argument(
        "--lora", action="store_true", help="train a LoRA adapter on the trunk instead of all weights"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint; skip a finished run"
    )
    add_config_args(p)


def _ilql(args: argparse.Namespace) -> int:
    from alignloop.config import load_config
    from alignloop.models import LoraSettings
    from alignloop.offline.ilql import ILQLConfig, train_ilql

    cfg = load_config(ILQLConfig, path=args.config, overrides=args.overrides)
    if args.lora and cfg.lora is None:
        cfg.lora = LoraSettings()
    metrics = train_ilql(args.policy, args.data, args.out, cfg, resume=args.resume)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(" ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
