"""``alignloop reward train | score | serve``."""

from __future__ import annotations

import argparse

from alignloop.commands import add_chat_template, add_config_args, command, group


def register(sub) -> None:
    g = group(sub, "reward", help="train a reward model, score with any reward, serve a reward over HTTP")

    t = command(
        g,
        "train",
        help="train a reward model (scalar head, -log sigmoid(r_chosen - r_rejected)) on preference pairs",
        example=(
            "alignloop reward train --model world:base --pairs pairs.jsonl --out runs/rm\n"
            "alignloop reward train --model gpt2 --pairs pairs.jsonl --out rm/ --lora --set epochs=2"
        ),
        func=_train,
    )
    t.add_argument("--model", help="base model: hub id, local folder or world:base (default: config 'model')")
    t.add_argument(
        "--pairs", required=True, nargs="+", metavar="FILE", help="TRL-format or grouped pairs JSONL"
    )
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (HF model + metrics)")
    t.add_argument("--eval-pairs", metavar="FILE", help="held-out pairs (default: a share of the prompts)")
    t.add_argument(
        "--reference",
        metavar="FILE",
        help="completions whose mean reward is set to 0 (default: training ones)",
    )
    t.add_argument("--lora", action="store_true", help="train a LoRA adapter (merged into the saved model)")
    t.add_argument("--epochs", type=int, help="maximum epochs (early stop on held-out accuracy)")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--skip-bad", action="store_true", help="count and skip malformed pair lines")
    t.add_argument(
        "--per-labeller",
        action="store_true",
        help="labeller-conditioned: a reward head per labeller beside the pooled one (pairs from "
        "'feedback export --consensus none'); score as a labeller with --reward DIR:NAME",
    )
    t.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="K",
        help="train K members (seeds seed..seed+K-1) into one ensemble folder: PPO/GRPO can then optimise "
        "a conservative reward (--set ensemble=mean_std); default 1",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint (a damaged one falls back to the previous)",
    )
    add_config_args(t)
    add_chat_template(t)

    s = command(
        g,
        "score",
        help="score completions with a reward SPEC (pairs: also the accuracy)",
        example=(
            "alignloop reward score --reward runs/rm --data pairs.jsonl\n"
            "alignloop reward score --reward world:toxicity:nothate --data sets.jsonl --out scored.jsonl"
        ),
        func=_score,
        manifest="file",
        description=(
            "Score every completion of a data file with a reward SPEC. The file holds pairs "
            "(prompt/chosen/rejected), completion sets (prompt/completions) or prompt/completion lines. "
            "SPEC: a reward-model folder, MODEL:LABEL, pkg.module:function, http://host:port, world:gold."
        ),
    )
    s.add_argument("--reward", required=True, metavar="SPEC", help="the reward (see docs/reward.md)")
    s.add_argument(
        "--data", required=True, metavar="FILE", help="JSONL of pairs, completion sets or completions"
    )
    s.add_argument("--out", metavar="FILE", help="write each line with its scores added (JSONL)")
    s.add_argument("--batch-size", type=int, default=32, help="sequences per forward (model rewards)")
    s.add_argument("--device", help="cpu, cuda, ... (default: auto)")
    s.add_argument(
        "--chat-model",
        metavar="ID",
        help="for conversational data: the model whose chat template renders it (default: the reward model)",
    )
    add_chat_template(s)

    v = command(
        g,
        "serve",
        help="serve a reward over HTTP: POST /score {prompts, completions} -> {scores}",
        example="alignloop reward serve --reward runs/rm --port 8008\nalignloop ppo --reward http://127.0.0.1:8008 ...",
        func=_serve,
    )
    v.add_argument("--reward", required=True, metavar="SPEC", help="the reward to serve")
    v.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8008, help="port (default 8008)")
    v.add_argument("--batch-size", type=int, default=32, help="sequences per forward")
    v.add_argument("--device", help="cpu, cuda, ... (default: auto)")


def _train(args: argparse.Namespace) -> int:
    from alignloop.config import load_config
    from alignloop.reward.ensemble import train_ensemble
    from alignloop.reward.train import RewardTrainConfig

    data: dict = {}
    if args.model:
        data["model"] = args.model
    if args.epochs is not None:
        data["epochs"] = args.epochs
    if args.lr is not None:
        data["learning_rate"] = args.lr
    if args.skip_bad:
        data["skip_bad"] = True
    if args.per_labeller:
        data["per_labeller"] = True
    if args.lora:
        data["lora"] = {}
    if args.chat_template:
        data["chat_template"] = args.chat_template
    cfg = load_config(RewardTrainConfig, path=args.config, data=data, overrides=args.overrides)
    metrics = train_ensemble(
        args.pairs, args.out, cfg, args.ensemble,
        eval_pairs=args.eval_pairs, reference=args.reference, resume=args.resume,
    )  # fmt: skip
    from alignloop.runs import is_main_process

    if not is_main_process():  # under accelerate/torchrun the summary is printed once
        return 0
    acc = metrics.get("eval_accuracy")
    msg = f"{args.out}: held-out accuracy {acc:.3f}" if isinstance(acc, float) else f"{args.out}: trained"
    if "eval_gold_agreement" in metrics:  # world prompts: the gold judge's view of the held-out pairs
        msg += (
            f"; agreement with gold {metrics['eval_gold_agreement']:.3f}"
            f" (labels {metrics['eval_labels_gold_agreement']:.3f}, {metrics['eval_gold_pairs']} pairs)"
        )
    if args.ensemble > 1:
        accs = ", ".join(f"{a:.3f}" if isinstance(a, float) else "-" for a in metrics["member_eval_accuracy"])
        msg += f"; ensemble of {args.ensemble} (members' held-out accuracy {accs})"
    print(msg)
    return 0


def _score(args: argparse.Namespace) -> int:
    from alignloop.reward.score import score_file

    summary = score_file(
        args.reward, args.data, out=args.out, batch_size=args.batch_size, device=args.device,
        chat_model=args.chat_model, chat_template=args.chat_template,
    )  # fmt: skip
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from alignloop.reward.server import serve

    serve(args.reward, host=args.host, port=args.port, batch_size=args.batch_size, device=args.device)
    return 0
