"""``alignloop serve``: an OpenAI-compatible completions endpoint for any HF model."""

from __future__ import annotations

import argparse

from alignloop.commands import add_chat_template, command


def register(sub) -> None:
    p = command(
        sub,
        "serve",
        help="serve a model as an OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models)",
        description=(
            "Serve any causal or seq2seq HF model over HTTP with the OpenAI API (the official openai client "
            "works unchanged): prompts (one or a list) or chat messages, max_tokens / max_completion_tokens, "
            "temperature, top_p, n, seed, stop, stream (server-sent events), logprobs (with top alternatives and "
            "text offsets) and echo; any other parameter is a 400 naming it. 'echo: true, max_tokens: 0' scores "
            "given text, which is how 'alignloop cai label --judge URL' reads the judge's p(A) and p(B); so a "
            "team can host the judge on another machine."
        ),
        example=(
            "alignloop serve --model world:base --port 8000\n"
            "alignloop cai label --judge http://127.0.0.1:8000 --pairs-from sets.jsonl --out pairs.jsonl"
        ),
        func=_serve,
    )
    p.add_argument("--model", required=True, metavar="ID", help="hub id, local folder or world:base")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None, help="model name reported by /v1/models (default: --model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    add_chat_template(p)


def _serve(args: argparse.Namespace) -> int:
    from alignloop.errors import UserError
    from alignloop.serve import serve

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1-65535, got {args.port}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    serve(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        device=args.device,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
    )
    return 0
