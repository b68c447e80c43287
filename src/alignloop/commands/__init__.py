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
    "--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars or chatter"
)


def command(
    sub: Any,
    name: str,
    *,
    help: str,
    example: str,
    func: Callable[[argparse.Namespace], int | None],
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add a subcommand whose ``--help`` ends with an example."""
    p = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog="example:\n  " + example.strip().replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_COMMON],
    )
    p.set_defaults(func=func)
    return p


def group(sub: Any, name: str, *, help: str) -> Any:
    """Add a command group (``alignloop label ...``) and return its sub-parsers."""
    p = sub.add_parser(name, help=help, description=help, parents=[_COMMON])
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p.add_subparsers(title="commands", metavar="COMMAND")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set key=value``."""
    p.add_argument("--config", metavar="FILE", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set learning_rate=1e-5 (repeatable)",
    )
