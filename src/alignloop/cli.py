"""The ``alignloop`` command: one entry point, each subcommand a thin call into a stage.

A :class:`~alignloop.errors.UserError` is printed as one line and exits 2; a bug keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# OpenMP workers that spin-wait for a busy core made torch ~10x slower on a loaded 2-core box
# (0.19 vs 2.05 s per reward step); passive waiting costs nothing when cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from alignloop import __version__
from alignloop.errors import UserError

# Each command name -> the module that registers it, in the order of the loop. A module that does
# not exist (yet) is left out.
COMMANDS = {
    "demo": "alignloop.commands.run",
    "run": "alignloop.commands.run",
    "world": "alignloop.commands.world",
    "sft": "alignloop.commands.sft",
    "generate": "alignloop.commands.generate",
    "label": "alignloop.commands.label",
    "feedback": "alignloop.commands.feedback",
    "reward": "alignloop.commands.reward",
    "ppo": "alignloop.commands.ppo",
    "grpo": "alignloop.commands.grpo",
    "rloo": "alignloop.commands.grpo",
    "dpo": "alignloop.commands.dpo",
    "ilql": "alignloop.commands.ilql",
    "cai": "alignloop.commands.cai",
    "evaluate": "alignloop.commands.evaluate",
    "serve": "alignloop.commands.serve",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))

EPILOG = """\
the loop:
  alignloop demo                                   everything, on the embedded world
  alignloop generate --model M --prompts P --k 4 --out sets.jsonl
  alignloop label serve --db sqlite:///labels.db   humans rank completions in a browser
  alignloop feedback export --db sqlite:///labels.db --out pairs.jsonl
  alignloop reward train --model M --pairs pairs.jsonl --out rm/
  alignloop ppo --policy M --reward rm/ --prompts P --out ppo/ --lora
  alignloop grpo --policy M --reward rm/ --prompts P --out grpo/ --lora   (or rloo: no value model)
  alignloop evaluate --policy M --policy ppo/ --prompts P --out eval/

run 'alignloop COMMAND --help' for a command's options and an example.
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only`` (a command name), just that command's module is imported,
    so ``alignloop label serve`` does not pay for importing every other command."""
    parser = argparse.ArgumentParser(
        prog="alignloop",
        description="alignloop: the whole RLHF loop, from the labelling app to the aligned model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alignloop {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help="errors and the final summary only")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="also show third-party warnings, logs and bars"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    modules = [COMMANDS[only]] if only in COMMANDS else COMMAND_MODULES
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first)
    args = parser.parse_args(argv)
    from alignloop.console import configure

    configure(quiet=bool(getattr(args, "quiet", False)), verbose=bool(getattr(args, "verbose", False)))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from alignloop import tracking

    try:
        with tracking.scoped():  # --report-to holds for this command, not for the next main() in-process
            if getattr(args, "report_to", None) is not None:
                tracking.configure(args.report_to)
            code = func(args)
    except UserError as e:
        print(f"alignloop: error: {e.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignloop: interrupted", file=sys.stderr)
        return 130
    _leave_process_group()
    return int(code or 0)


def _leave_process_group() -> None:
    """Under a launcher, end the run together: wait for every process, then tear the process group
    down. Left to interpreter exit, gloo's threads can be torn down in the wrong order and a process
    that finished cleanly aborts ("terminate called without an active exception", SIGABRT)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
