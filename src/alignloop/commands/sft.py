"""``alignloop sft``: supervised fine-tuning on prompt/response records."""

from __future__ import annotations

import argparse

from alignloop.commands import add_chat_template, add_config_args, command


def register(sub) -> None:
    p = command(
        sub,
        "sft",
        help="supervised fine-tuning on prompt/response records (loss on the response only)",
        description=(
            'Fine-tune a causal or seq2seq model on {"prompt", "response"} records (JSONL, CSV or Parquet; '
            '"completion" is accepted for "response"): the loss is the mean negative log-likelihood of the '
            "response tokens given the prompt. With --lora only a LoRA adapter trains. --out gets the trained "
            "model (an HF folder: the adapter with --lora, or merged with --set merge=true), manifest.json, "
            "metrics.json and metrics.jsonl; --resume continues from its checkpoint."
        ),
        example=(
            "alignloop sft --model world:base --data revisions.jsonl --out runs/sl-cai --lora \\\n"
            "    --set epochs=2 --set learning_rate=3e-4 --set lora.r=8"
        ),
        func=_sft,
    )
    p.add_argument(
        "--model", required=True, metavar="ID", help="hub id, local folder, world:base or an adapter folder"
    )
    p.add_argument("--data", required=True, metavar="FILE", help="prompt/response records")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder; the trained model is saved here")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint; skip a finished run")
    add_config_args(p)
    add_chat_template(p)


def _sft(args: argparse.Namespace) -> int:
    from alignloop.config import load_config
    from alignloop.models import LoraSettings
    from alignloop.sft import SFTConfig, train_sft

    cfg = load_config(SFTConfig, path=args.config, overrides=args.overrides)
    if args.lora and cfg.lora is None:
        cfg.lora = LoraSettings()
    if args.chat_template:
        cfg.chat_template = args.chat_template
    metrics = train_sft(args.model, args.data, args.out, cfg, resume=args.resume)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    from alignloop.runs import is_main_process

    if not is_main_process():  # under accelerate/torchrun the summary is printed once
        return 0
    print(" ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
