"""``alignloop generate``: K completions per prompt, written as completion-set records."""

from __future__ import annotations

import argparse

from alignloop.commands import add_chat_template, command


def register(sub) -> None:
    p = command(
        sub,
        "generate",
        help="sample K completions per prompt (the sets labellers rank)",
        description=(
            "Sample K completions for each prompt with the KV cache, in batches, and append one completion-set "
            'record per prompt to --out as it is produced: {"prompt_id", "prompt", "completions": [{"id", "text"}], '
            '"model", "sampling"}. Completion ids are <prompt id>-<j>. A completion\'s text is the exact '
            "continuation of its prompt (prompt + text is what the model wrote: TRL's convention). --distinct "
            "samples repeats again. Rerunning with the same --out skips the "
            "prompts already there (resume). Same --seed and --batch-size: identical output. Prompt files: JSONL, "
            "CSV, Parquet, or a `datasets` name (NAME or NAME:CONFIG with --split)."
        ),
        example=(
            "alignloop generate --model world:base --prompts prompts.jsonl --k 4 --distinct --out sets.jsonl\n"
            "alignloop generate --model google/flan-t5-base --prompts knkarthick/dialogsum --split test \\\n"
            "    --template 'Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary:' --k 4 --out sets.jsonl"
        ),
        func=_generate,
        manifest="file",
    )
    p.add_argument("--model", required=True, metavar="ID", help="hub id, local folder, or world:base")
    p.add_argument(
        "--prompts", required=True, metavar="FILE", help="JSONL/CSV/Parquet file or a datasets name"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="completion sets JSONL (appended; resumable)")
    p.add_argument("--k", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest completion (default 64)")
    p.add_argument("--ignore-eos", action="store_true", help="always write max-new-tokens tokens")
    p.add_argument(
        "--distinct",
        type=int,
        nargs="?",
        const=4,
        default=0,
        metavar="ROUNDS",
        help="sample again a completion whose text repeats one of its set, up to ROUNDS rounds "
        "(default 4 when given); the sets still short of K distinct texts are counted (short_sets)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default 32)")
    p.add_argument("--prompt-column", default="prompt", help="column holding the prompt (default 'prompt')")
    p.add_argument(
        "--id-column", default="id", help="column holding the prompt id (default 'id'; else the row)"
    )
    p.add_argument(
        "--template", help="build the prompt from columns, e.g. 'Summarize: {dialogue}\\nSummary:'"
    )
    p.add_argument("--split", default="train", help="split of a datasets dataset (default train)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) empty or malformed prompt rows")
    p.add_argument(
        "--engine", choices=["auto", "torch", "hf"], default="auto", help="sampling loop (default auto)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument(
        "--backend",
        choices=["transformers", "vllm", "auto"],
        default="transformers",
        help="who samples (alignloop.generation_backends): the model through transformers (default), "
        "a vLLM engine (CUDA), or auto",
    )
    add_chat_template(p)


def _generate(args: argparse.Namespace) -> int:
    from alignloop.errors import UserError
    from alignloop.generation import SamplingSettings, generate_completions, load_prompts
    from alignloop.runs import say

    for name in ("k", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature < 0 or args.top_k < 0:
        raise UserError("--temperature and --top-k must not be negative")
    if args.distinct < 0:
        raise UserError(f"--distinct must not be negative, got {args.distinct}")
    from alignloop.chat import use_chat_template
    from alignloop.models import load_tokenizer

    # conversations (message lists) are checked against the chat template row by row, before any sampling
    tokenizer = use_chat_template(load_tokenizer(args.model), args.chat_template)
    prompts, problems = load_prompts(
        args.prompts,
        tokenizer=tokenizer,
        prompt_column=args.prompt_column,
        id_column=args.id_column,
        template=args.template,
        split=args.split,
        limit=args.limit,
        skip_bad=args.skip_bad,
    )
    if problems:
        say(f"[generate] skipped {len(problems)} bad prompt rows, first: {problems[0]}")
    settings = SamplingSettings(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        stop_at_eos=not args.ignore_eos,
        do_sample=args.temperature > 0,
        backend=args.backend,
    )
    stats = generate_completions(
        args.model,
        prompts,
        args.out,
        k=args.k,
        settings=settings,
        seed=args.seed,
        batch_size=args.batch_size,
        engine=args.engine,
        device=args.device,
        distinct=args.distinct,
        chat_template=args.chat_template,
    )
    stats["skipped_bad"] = len(problems)
    shown = {k: round(v, 1) if isinstance(v, float) else v for k, v in stats.items()}
    print(" ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
