"""Command-line subcommands, one module per command group.

Each module has ``register(sub)`` that adds its parsers with :func:`command` and points each
at a function ``(args) -> int | None``. These modules import no torch at import time: the
work is imported inside the function, so ``alignloop --help`` and ``alignloop label serve``
start fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument(
    "--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="errors and the final summary only"
)
_COMMON.add_argument(
    "--verbose",
    "-v",
    action="store_true",
    default=argparse.SUPPRESS,
    help="also show third-party warnings, logs and bars",
)


def command(
    sub: Any,
    name: str,
    *,
    help: str,
    example: str,
    func: Callable[[argparse.Namespace], int | None],
    description: str | None = None,
    manifest: str | None = None,
) -> argparse.ArgumentParser:
    """Add a subcommand whose ``--help`` ends with an example.

    ``manifest="file"`` (its ``--out`` is one file) or ``"folder"``: the command is a stage that
    does not write its own manifest; one is written for it (:func:`with_manifest`).
    """
    p = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog="example:\n  " + example.strip().replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_COMMON],
    )
    stage = p.prog.split(" ", 1)[-1]  # "feedback export"
    p.set_defaults(func=with_manifest(func, stage, manifest) if manifest else func)
    return p


# the arguments that name what a stage reads: hashed into its manifest (files, folders, world models)
INPUT_ARGS = ("model", "policy", "reward", "judge", "prompts", "data", "pairs", "pairs_from", "completions",
              "sets", "rankings", "input", "constitution")  # fmt: skip
_NOT_CONFIG = {"func", "out", "quiet", "verbose", *INPUT_ARGS}


def with_manifest(
    func: Callable[[argparse.Namespace], int | None], name: str, kind: str
) -> Callable[[argparse.Namespace], int | None]:
    """``func`` run as a stage: a manifest (command, arguments as its config, inputs with their
    sha256, versions, times, status) in the ``--out`` folder, or beside the ``--out`` file as
    ``FILE.manifest.json``; its metrics are the output's size (records of a JSONL file)."""

    def run(args: argparse.Namespace) -> int | None:
        from alignloop.runs import stage_guard, start_file_stage, start_stage

        out = getattr(args, "out", None)
        if not out:
            return func(args)
        inputs = {k: v for k in INPUT_ARGS if isinstance(v := getattr(args, k, None), str)}
        config = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and not callable(v)}
        start = start_file_stage if kind == "file" else start_stage
        stage = start(out, name, config=config, inputs=inputs, seed=getattr(args, "seed", None))
        with stage_guard(stage):
            code = func(args)
            stage.finish(_output_size(out))
        return code

    return run


def _output_size(out: str) -> dict[str, int]:
    from pathlib import Path

    p = Path(out)
    if p.is_file():
        with open(p, "rb") as f:
            records = sum(1 for line in f if line.strip()) if p.suffix == ".jsonl" else None
        return {"bytes": p.stat().st_size, **({"records": records} if records is not None else {})}
    return {"files": sum(1 for x in p.rglob("*") if x.is_file())} if p.is_dir() else {}


def group(sub: Any, name: str, *, help: str) -> Any:
    """Add a command group (``alignloop label ...``) and return its sub-parsers."""
    p = sub.add_parser(name, help=help, description=help, parents=[_COMMON])
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p.add_subparsers(title="commands", metavar="COMMAND")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE``, repeatable ``--set key=value`` and ``--report-to``."""
    add_report_to(p)
    p.add_argument("--config", metavar="FILE", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set learning_rate=1e-5 (repeatable)",
    )


def add_rl_args(p: argparse.ArgumentParser) -> None:
    """What every RL trainer on the shared rollout takes (``ppo``, the ``grpo`` family): ``--policy``,
    ``--reward``, ``--prompts``, ``--out``, ``--lora``, ``--heldout``, ``--resume``, the config
    arguments and ``--chat-template``."""
    p.add_argument(
        "--policy", required=True, metavar="ID", help="model to train: hub id, local folder or world:base"
    )
    p.add_argument(
        "--reward",
        required=True,
        metavar="SPEC",
        help="reward: reward-model folder, CLASSIFIER:LABEL, py:module:function, URL, world:gold, world:toxicity:nothate",
    )
    p.add_argument("--prompts", required=True, metavar="FILE", help='prompt JSONL ({"id", "prompt"} a line)')
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (reference = adapter disabled)")
    p.add_argument(
        "--heldout", metavar="SPEC", help="a second reward watched for reward hacking (e.g. world:gold)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint; skip a finished run"
    )
    add_config_args(p)
    add_chat_template(p)


def add_chat_template(p: argparse.ArgumentParser) -> None:
    """``--chat-template FILE``: a Jinja chat template for conversational data (config key chat_template)."""
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template for conversational data (message lists), for a tokenizer without one or "
        "to replace its own (config key chat_template)",
    )


def add_report_to(p: argparse.ArgumentParser) -> None:
    """``--report-to``: the experiment trackers (applied by ``alignloop.cli.main``)."""
    p.add_argument(
        "--report-to",
        metavar="TRACKERS",
        help="experiment trackers: none, or a comma list of tensorboard, wandb, mlflow, trackio "
        "(default: tensorboard; all offline, see docs/foundation.md)",
    )
