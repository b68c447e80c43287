"""PPO side by side: ``alignloop ppo`` vs TRL 1.12's PPOTrainer vs the bare-torch floor.

Same model on every side: a random-init GPT-2 (2 layers, width 128, vocab 2048) as the policy, a
GPT-2 sequence classifier of the same size (one label) as the reward model, fp32 (TRL's config
defaults to bf16=True even on a CPU: we pass bf16=False), full fine-tuning with a frozen reference
copy, the same batch, the same *fixed* response length (no stop token: a random model would stop
at random lengths and make one side look cheaper), the same PPO epochs and minibatches, no KL
early stop, no gradient checkpointing. TRL's value model is its own network (its design); ours
is a value head on the policy's trunk (our design) -- that difference is part of what is measured.
alignloop runs GPT-2's ``gelu_new`` (a chain of eight Python-level ops) as torch's fused tanh GELU
(the same function to 5e-7, :func:`alignloop.models.fuse_activations`); TRL runs the model as loaded;
the floor uses the fused form too.

The floor is the bare work a step must do, in plain torch: sample the response tokens with a
KV cache, one no-grad forward of the policy (log-probs + values), one of the reference, one of
the reward model, then ``epochs x minibatches`` forward/backward/AdamW steps.

Each side runs in its own fresh process, alternating A B C A B C for ``--rounds`` rounds. A step's
time is the interval between the ends of consecutive PPO steps (generation, scoring, update,
logging and the trainer's own overhead all count); the first ``--warmup`` steps of each process
are dropped; medians are quoted. Memory: each process's peak RSS minus its RSS after imports.
Ratios are from this one run.

    python benchmarks/ppo.py                     # ~3 minutes on 2 CPU cores
    python benchmarks/ppo.py --rounds 3 --steps 8 --batch 32 --response-length 32

Needs TRL for the TRL side (``pip install -e .[bench]``: trl==1.12.0); without it that side is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import gpt2_config, peak_rss_mb, rss_mb, word_tokenizer

LR = 1e-5
KL_COEF = 0.05
PROMPT_LEN = 16


def build(folder: Path, vocab: int = 2048, seed: int = 0) -> None:
    """``folder/policy``: GPT-2 LM; ``folder/reward``: GPT-2 scalar classifier; ``folder/prompts.json``."""
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    fast = word_tokenizer(vocab)
    torch.manual_seed(seed)
    for name, model in (
        ("policy", GPT2LMHeadModel(gpt2_config(vocab, positions=128, heads=2))),
        ("reward", GPT2ForSequenceClassification(gpt2_config(vocab, positions=128, heads=2, num_labels=1))),
    ):
        model.save_pretrained(folder / name)
        fast.save_pretrained(folder / name)
    g = torch.Generator().manual_seed(seed)
    prompts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, vocab - 4, (PROMPT_LEN,), generator=g))
        for _ in range(256)
    ]
    (folder / "prompts.json").write_text(json.dumps(prompts))


# ----------------------------------------------------------------------------------------------
# The three sides (each runs in its own process and prints one JSON line)
# ----------------------------------------------------------------------------------------------


def side_alignloop(folder: Path, a: argparse.Namespace) -> list[float]:
    from alignloop.rl.ppo import PPOConfig, run_ppo
    from alignloop.runs import set_quiet

    set_quiet(True)
    cfg = PPOConfig(
        steps=a.steps,
        batch_size=a.batch,
        minibatch_size=a.batch // a.minibatches,
        ppo_epochs=a.epochs,
        learning_rate=LR,
        early_stop_kl=None,
        checkpoint_every=10_000,
        kl={"beta": KL_COEF, "adaptive": False},
        sampling={"max_new_tokens": a.response_length, "stop_at_eos": False, "temperature": 1.0},
    )
    prompts = json.loads((folder / "prompts.json").read_text())
    with tempfile.TemporaryDirectory() as out:
        run_ppo(str(folder / "policy"), str(folder / "reward"), prompts, out, lora=False, config=cfg)
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time"] for r in rows]
    return [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]


def side_trl(folder: Path, a: argparse.Namespace) -> list[float]:
    import copy

    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(folder / "policy")
    tok.padding_side = "left"
    prompts = json.loads((folder / "prompts.json").read_text())
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy")
    ref = copy.deepcopy(policy)
    rm = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1)
    vm = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1)
    ends: list[float] = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=1,
            num_mini_batches=a.minibatches,
            num_ppo_epochs=a.epochs,
            total_episodes=a.batch * a.steps,
            local_rollout_forward_batch_size=a.batch,
            response_length=a.response_length,
            stop_token=None,
            missing_eos_penalty=None,
            temperature=1.0,
            kl_coef=KL_COEF,
            learning_rate=LR,
            num_sample_generations=0,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=rm,
            value_model=vm,
            train_dataset=ds,
        )
        trainer.add_callback(StepEnd())
        trainer.train()
    return [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]


def side_floor(folder: Path, a: argparse.Namespace) -> list[float]:
    """Plain torch: KV-cache sampling, 3 no-grad forwards, epochs x minibatches forward/backward/AdamW."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

    from alignloop.models import fuse_activations

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1).requires_grad_(
        False
    )
    fuse_activations(policy)  # the floor runs the fastest form of the same function, as alignloop does
    fuse_activations(rm)
    ref = copy.deepcopy(policy).requires_grad_(False)
    head = torch.nn.Linear(policy.config.n_embd, 1)
    params = list(policy.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR)
    vocab, B, T, mb = policy.config.vocab_size, a.batch, a.response_length, a.batch // a.minibatches
    g = torch.Generator().manual_seed(0)
    ends = []
    for _ in range(a.steps):
        prompts = torch.randint(4, vocab, (B, PROMPT_LEN), generator=g)
        with torch.no_grad():  # sampling with the KV cache
            cache, ids, new = DynamicCache(), prompts, []
            for _t in range(T):
                out = policy(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                ids = torch.multinomial(torch.softmax(out.logits[:, -1], -1), 1, generator=g)
                new.append(ids)
            seq = torch.cat([prompts, *new], dim=1)
            out = policy(seq, output_hidden_states=True)  # log-probs + values
            logp = torch.log_softmax(out.logits[:, PROMPT_LEN - 1 : -1], -1).gather(
                -1, seq[:, PROMPT_LEN:, None]
            )[..., 0]
            head(out.hidden_states[-1][:, PROMPT_LEN - 1 : -1])
            ref_logp = torch.log_softmax(ref(seq).logits[:, PROMPT_LEN - 1 : -1], -1).gather(
                -1, seq[:, PROMPT_LEN:, None]
            )
            score = rm(seq).logits[:, 0]
            adv = (score[:, None] - KL_COEF * (logp - ref_logp[..., 0])).detach()
        for _e in range(a.epochs):
            for m in torch.randperm(B, generator=g).split(mb):
                out = policy(seq[m], output_hidden_states=True)
                lp = torch.log_softmax(out.logits[:, PROMPT_LEN - 1 : -1], -1).gather(
                    -1, seq[m, PROMPT_LEN:, None]
                )[..., 0]
                v = head(out.hidden_states[-1][:, PROMPT_LEN - 1 : -1])[..., 0]
                loss = -(torch.exp(lp - logp[m]) * adv[m]).mean() + 0.1 * ((v - adv[m]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]


def build_small(folder: Path) -> None:
    """``folder/gpt2-small``: a random-init GPT-2-small-sized LM (12 x 768, vocab 50257)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, pad_token_id=0, eos_token_id=1, bos_token_id=3)
    GPT2LMHeadModel(cfg).save_pretrained(folder / "gpt2-small")
    AutoTokenizer.from_pretrained(folder / "policy").save_pretrained(folder / "gpt2-small")  # ids < 2048


def side_lora_memory(folder: Path, a: argparse.Namespace, lora: bool) -> list[float]:
    """GPT-2-small-sized policy (random init, 12 x 768, vocab 50257): batch 8, 64 + 32 tokens, one PPO
    step with LoRA (reference = adapter disabled) or with full fine-tuning (reference = frozen copy)."""
    import torch

    from alignloop.rl.ppo import PPOConfig, run_ppo
    from alignloop.runs import set_quiet

    set_quiet(True)
    big = folder / "gpt2-small"  # built by the parent (building it here would count in this peak)
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 2000, (64,), generator=g)) for _ in range(8)]
    cfg = PPOConfig(
        steps=2,
        batch_size=8,
        minibatch_size=8,
        grad_accum=a.grad_accum,
        gradient_checkpointing=a.gradient_checkpointing,
        ppo_epochs=1,
        checkpoint_every=10_000,
        sampling={"max_new_tokens": 32, "stop_at_eos": False},
    )
    ends = [time.perf_counter()]
    with tempfile.TemporaryDirectory() as out:
        run_ppo(str(big), lambda p, c: [0.0] * len(c), prompts, out, lora=lora, config=cfg)
    ends.append(time.perf_counter())
    return [ends[1] - ends[0]]


SIDES = {
    "alignloop": side_alignloop,
    "trl": side_trl,
    "floor": side_floor,
    "lora": lambda f, a: side_lora_memory(f, a, True),
    "full": lambda f, a: side_lora_memory(f, a, False),
}


def run_side(a: argparse.Namespace) -> None:
    import torch  # noqa: F401  (imports before the baseline RSS, equal on every side)
    import transformers  # noqa: F401

    if a.side == "trl":
        import trl  # noqa: F401
    base = rss_mb()
    times = SIDES[a.side](Path(a.folder), a)
    times = times if a.side in ("lora", "full") else times[a.warmup :]
    print(
        json.dumps(
            {"side": a.side, "times": times, "peak_mb": peak_rss_mb(), "train_mb": peak_rss_mb() - base}
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument(
        "--lora-memory",
        action="store_true",
        help="instead: peak memory of a GPT-2-small-sized PPO step, LoRA (adapter-disabled reference) vs full copy",
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per minibatch (--lora-memory)")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both sides recompute layer activations in the backward pass (--lora-memory)",
    )
    p.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        run_side(a)
        return
    try:
        import trl  # noqa: F401

        sides = ["alignloop", "trl", "floor"]
    except ImportError:
        print("trl not installed (pip install -e .[bench]): skipping the TRL side", file=sys.stderr)
        sides = ["alignloop", "floor"]
    if a.lora_memory:
        sides = ["lora", "full"]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder))
        if a.lora_memory:
            build_small(Path(folder))
        for r in range(a.rounds):
            for s in sides:
                args = [sys.executable, __file__, "--side", s, "--folder", folder]
                for k in (
                    "steps",
                    "warmup",
                    "batch",
                    "response_length",
                    "epochs",
                    "minibatches",
                    "grad_accum",
                ):
                    args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
                if a.gradient_checkpointing:
                    args.append("--gradient-checkpointing")
                proc = subprocess.run(args, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"side {s} failed:\n{proc.stderr[-3000:]}")
                results[s].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(
                    f"round {r + 1} {s}: median {statistics.median(results[s][-1]['times']):.3f} s/step",
                    file=sys.stderr,
                )
    if a.lora_memory:
        peak = {s: statistics.median(x["peak_mb"] for x in results[s]) for s in sides}
        print(
            f"PPO step, GPT-2-small-sized (124M, random init), batch 8 ({a.grad_accum} micro-batches"
            f"{', gradient checkpointing' if a.gradient_checkpointing else ''}), 64+32 tokens: peak RSS"
        )
        print(f"  LoRA, reference = adapter disabled: {peak['lora']:.0f} MB")
        print(f"  full fine-tuning + frozen copy:     {peak['full']:.0f} MB")
        print(f"  ratio {peak['lora'] / peak['full']:.2f}x")
        return
    med = {s: statistics.median(t for x in results[s] for t in x["times"]) for s in sides}
    mem = {s: statistics.median(x["train_mb"] for x in results[s]) for s in sides}
    peak = {s: statistics.median(x["peak_mb"] for x in results[s]) for s in sides}
    print(
        f"PPO step: GPT-2 2x128 vocab 2048, batch {a.batch}, {PROMPT_LEN}+{a.response_length} tokens (fixed), "
        f"{a.epochs} epochs x {a.minibatches} minibatches, fp32, full fine-tuning; {a.rounds} rounds x {a.steps} steps"
    )
    for s in sides:
        print(f"  {s:10s} {med[s]:.3f} s/step   training memory {mem[s]:.0f} MB (peak RSS {peak[s]:.0f} MB)")
    if "trl" in med:
        print(
            f"  alignloop / TRL 1.12:  time {med['alignloop'] / med['trl']:.2f}x   memory {mem['alignloop'] / mem['trl']:.2f}x"
        )
    print(
        f"  alignloop / floor:     time {med['alignloop'] / med['floor']:.2f}x   memory {mem['alignloop'] / mem['floor']:.2f}x"
    )


if __name__ == "__main__":
    main()
