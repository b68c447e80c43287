"""PPO side by side: ``alignloop ppo`` vs TRL 1.12's PPOTrainer vs the bare-torch floor.

The same work on every side (the rules: ``benchmarks/README.md``):

- policy: a random-init GPT-2, ``--size tiny`` (2 layers x 128, vocab 2048) or ``--size small``
  (GPT-2-small's shape: 12 x 768, vocab 50257, 124M); fp32 (TRL gets ``bf16=False``: its default
  bf16 is ~10x slower on a CPU); full fine-tuning with a frozen reference copy, or ``--lora`` (r 16,
  alpha 32 on c_attn/c_proj/c_fc, reference = adapter disabled) on every side;
- reward: the same random-init GPT-2 sequence classifier (2 x 128, the policy's vocabulary) on every
  side. TRL's value model is a separate network initialised from the reward model (TRL's recipe), so
  here it is that small classifier: its separate critic costs TRL as little as it can. alignloop and
  the floor use a value head on the policy's trunk (alignloop's design);
- the same batch, prompts of exactly ``--prompt-len`` tokens, a *fixed* response length (no stop
  token: a random model would stop at random lengths and make one side cheaper), the same PPO
  epochs and minibatches, no KL early stop, gradient checkpointing off (or ``--gradient-checkpointing``
  on every side), AdamW fused on every side (TRL's default with torch >= 2.8; alignloop's
  ``make_optimizer``; the floor's too), gradient clipping at 1.0;
- GPT-2's ``gelu_new`` as torch's fused tanh GELU (:func:`alignloop.models.fuse_activations`) for
  alignloop and the floor; TRL runs the model as loaded.

The floor is the bare work a step must do, in plain torch + transformers: sample the response with a
KV cache, one no-grad forward of the policy (log-probs + values), one of the reference, one of the
reward model, then ``epochs x minibatches`` forward/backward/clip/AdamW steps; the LM head on the
response columns only (``logits_to_keep``), log-probs as ``log_softmax(...).gather``.

Each side runs in its own fresh process after the same imports (``common.import_all``), the sides
alternating A B C A B C for ``--rounds`` rounds. A step's time is the interval between the ends of
consecutive PPO steps (generation, scoring, update, logging and each trainer's own overhead count),
so the first step of each process is never timed; ``--warmup`` more are dropped; medians are quoted.
CPU time per step is read the same way on every side (``common.CpuClock`` maps the wall-clock step ends
to the process's CPU time): on a shared, oversubscribed machine it is the steadier figure.
Memory: each process's own peak RSS (VmHWM) for its whole run, after identical imports.

    python benchmarks/ppo.py                                 # tiny, ~4 minutes on 2 idle cores
    python benchmarks/ppo.py --size small --rounds 2 --steps 3 --warmup 0
    python benchmarks/ppo.py --size small --lora --rounds 2 --steps 3 --warmup 0

Needs TRL 1.12 for the TRL side (``pip install -e .[bench]``); without it that side is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    CpuClock,
    default_threads,
    gpt2_config,
    import_all,
    load_average,
    peak_rss_mb,
    rss_mb,
    run_side,
    versions,
    word_tokenizer,
)

LR = 1e-5
KL_COEF = 0.05
TOKENIZER_VOCAB = 2048  # prompt words w0..w2043: ids below 2048 at either size
LORA = {"r": 16, "alpha": 32, "target_modules": ["c_attn", "c_proj", "c_fc"]}
SIZES = {  # size -> (vocab, positions, heads, defaults: batch, prompt, response, minibatches)
    "tiny": (2048, 128, 2, {"batch": 32, "prompt_len": 16, "response_length": 32, "minibatches": 4}),
    "small": (50257, 1024, 12, {"batch": 8, "prompt_len": 64, "response_length": 32, "minibatches": 1}),
}


def build(folder: Path, size: str, prompt_len: int, seed: int = 0) -> None:
    """``folder/policy`` (GPT-2 LM), ``folder/reward`` (2 x 128 GPT-2 scalar classifier, same vocab),
    ``folder/prompts.json`` (256 prompts of ``prompt_len`` words = tokens)."""
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    vocab, positions, heads, _ = SIZES[size]
    fast = word_tokenizer(TOKENIZER_VOCAB)
    torch.manual_seed(seed)
    for name, model in (
        ("policy", GPT2LMHeadModel(gpt2_config(vocab, positions, heads, size=size))),
        ("reward", GPT2ForSequenceClassification(gpt2_config(vocab, positions, 2, num_labels=1))),
    ):
        model.save_pretrained(folder / name)
        fast.save_pretrained(folder / name)
    g = torch.Generator().manual_seed(seed)
    prompts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, TOKENIZER_VOCAB - 4, (prompt_len,), generator=g))
        for _ in range(256)
    ]
    (folder / "prompts.json").write_text(json.dumps(prompts))


# ----------------------------------------------------------------------------------------------
# The three sides (each runs in its own process and prints one JSON line)
# ----------------------------------------------------------------------------------------------


def side_alignloop(folder: Path, a: argparse.Namespace) -> tuple[list[float], dict]:
    from alignloop import tracking
    from alignloop.rl.ppo import PPOConfig, run_ppo
    from alignloop.runs import read_metrics_log, set_quiet

    set_quiet(True)
    tracking.configure("none")  # TRL's side reports to nothing either (report_to=[])
    cfg = PPOConfig(
        steps=a.steps,
        batch_size=a.batch,
        minibatch_size=a.batch // a.minibatches,
        ppo_epochs=a.epochs,
        learning_rate=LR,
        early_stop_kl=None,
        checkpoint_every=10_000,
        score_norm="none",  # TRL has no such pass (it runs before the first step anyway)
        gradient_checkpointing=a.gradient_checkpointing,
        lora={"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": LORA["target_modules"]},
        kl={"beta": KL_COEF, "adaptive": False},
        sampling={"max_new_tokens": a.response_length, "stop_at_eos": False, "temperature": 1.0},
    )
    prompts = json.loads((folder / "prompts.json").read_text())
    with tempfile.TemporaryDirectory() as out:
        run_ppo(str(folder / "policy"), str(folder / "reward"), prompts, out, lora=a.lora, config=cfg)
        ends = [r["time"] for r in read_metrics_log(out)]
    settings = {
        "dtype": "float32", "bf16": False, "gradient_checkpointing": cfg.gradient_checkpointing,
        "optimizer": "AdamW fused (make_optimizer)", "value": "head on the policy trunk",
        "minibatch": cfg.minibatch_size, "epochs": cfg.ppo_epochs, "response": "fixed",
        "trackers": "none",
    }  # fmt: skip
    return ends, settings


def side_trl(folder: Path, a: argparse.Namespace) -> tuple[list[float], dict]:
    import copy

    from datasets import Dataset
    from peft import LoraConfig
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
    ref = None if a.lora else copy.deepcopy(policy)
    rm = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1)
    vm = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1)
    ends: list[float] = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.time())

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
            gradient_checkpointing=a.gradient_checkpointing,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        peft_config = None
        if a.lora:
            peft_config = LoraConfig(
                r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                lora_dropout=0.0, task_type="CAUSAL_LM",
            )  # fmt: skip
        trainer = PPOTrainer(
            args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
            value_model=vm, train_dataset=ds, peft_config=peft_config,
        )  # fmt: skip
        trainer.add_callback(StepEnd())
        trainer.train()
    settings = {
        "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."), "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing, "optimizer": getattr(args.optim, "value", args.optim),
        "value": "separate model (the 2x128 reward classifier)",
        "minibatch": a.batch // args.num_mini_batches, "epochs": args.num_ppo_epochs, "response": "fixed",
        "trackers": "none" if not args.report_to else ",".join(args.report_to),
    }  # fmt: skip
    return ends, settings


def side_floor(folder: Path, a: argparse.Namespace) -> tuple[list[float], dict]:
    """Plain torch: KV-cache sampling, 3 no-grad forwards, epochs x minibatches forward/backward/AdamW."""
    import contextlib
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

    from alignloop.models import disable_dropout, fuse_activations, make_optimizer

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy").eval()
    disable_dropout(policy)  # as alignloop and TRL do
    rm = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1).eval()
    rm.requires_grad_(False)
    fuse_activations(policy)  # the floor runs the fastest form of the same function, as alignloop does
    fuse_activations(rm)
    if a.lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"])
        policy = get_peft_model(policy, cfg)
        ref = None
    else:
        ref = copy.deepcopy(policy).requires_grad_(False)
    if a.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    width = policy.config.hidden_size
    head = torch.nn.Linear(width, 1)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    opt = make_optimizer(params, LR)
    B, P, T = a.batch, a.prompt_len, a.response_length
    mb = B // a.minibatches
    keep = torch.arange(P - 1, P - 1 + T)  # the LM head on the columns that predict the response

    def logprobs(model, seq, hidden=False):
        out = model(seq, output_hidden_states=hidden, logits_to_keep=keep)
        lp = torch.log_softmax(out.logits, -1).gather(-1, seq[:, P:, None])[..., 0]
        return lp, (out.hidden_states[-1][:, P - 1 : P - 1 + T] if hidden else None)

    g = torch.Generator().manual_seed(0)
    ends = []
    for _ in range(a.steps):
        prompts = torch.randint(4, TOKENIZER_VOCAB, (B, P), generator=g)
        with torch.no_grad():  # sampling with the KV cache
            cache, ids, new = DynamicCache(), prompts, []
            for _t in range(T):
                out = policy(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                ids = torch.multinomial(torch.softmax(out.logits[:, -1], -1), 1, generator=g)
                new.append(ids)
            seq = torch.cat([prompts, *new], dim=1)
            logp, hid = logprobs(policy, seq, hidden=True)  # log-probs + values
            head(hid)
            with policy.disable_adapter() if a.lora else contextlib.nullcontext():
                ref_logp, _ = logprobs(policy if a.lora else ref, seq)
            score = rm(seq).logits[:, 0]
            adv = (score[:, None] - KL_COEF * (logp - ref_logp)).detach()
        policy.train(a.gradient_checkpointing)
        for _e in range(a.epochs):
            for m in torch.randperm(B, generator=g).split(mb):
                lp, hid = logprobs(policy, seq[m], hidden=True)
                v = head(hid.detach())[..., 0]
                loss = -(torch.exp(lp - logp[m]) * adv[m]).mean() + 0.1 * ((v - adv[m]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
        policy.eval()
        ends.append(time.time())
    settings = {
        "dtype": "float32", "bf16": False, "gradient_checkpointing": a.gradient_checkpointing,
        "optimizer": "AdamW fused (make_optimizer)", "value": "head on the policy trunk",
        "minibatch": mb, "epochs": a.epochs, "response": "fixed",
    }  # fmt: skip
    return ends, settings


def side_lora_memory(folder: Path, a: argparse.Namespace, lora: bool) -> tuple[list[float], dict]:
    """GPT-2-small-sized policy (random init, 12 x 768, vocab 50257): batch 8, 64 + 32 tokens, one PPO
    step with LoRA (reference = adapter disabled) or with full fine-tuning (reference = frozen copy)."""
    import torch

    from alignloop.rl.ppo import PPOConfig, run_ppo
    from alignloop.runs import set_quiet

    set_quiet(True)
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
        score_norm="none",
        sampling={"max_new_tokens": 32, "stop_at_eos": False},
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        run_ppo(str(folder / "policy"), lambda p, c: [0.0] * len(c), prompts, out, lora=lora, config=cfg)
    return [t0, time.time()], {"gradient_checkpointing": a.gradient_checkpointing}


SIDES = {
    "alignloop": side_alignloop,
    "trl": side_trl,
    "floor": side_floor,
    "lora": lambda f, a: side_lora_memory(f, a, True),
    "full": lambda f, a: side_lora_memory(f, a, False),
}
KNOBS = (
    "size",
    "steps",
    "warmup",
    "batch",
    "prompt_len",
    "response_length",
    "epochs",
    "minibatches",
    "grad_accum",
)


def child(a: argparse.Namespace) -> None:
    import_all(("trl.experimental.ppo",) if _has_trl() else ())  # the same imports on every side
    after_imports = rss_mb()
    clock = CpuClock(every=0.02)
    ends, settings = SIDES[a.side](Path(a.folder), a)
    clock.stop()
    drop = 0 if a.side in ("lora", "full") else a.warmup
    times = [b - e for e, b in zip(ends[:-1], ends[1:], strict=True)][drop:]
    cpu = clock.intervals(ends)[drop:]
    settings.update(lora=a.lora, **{k: getattr(a, k) for k in ("batch", "prompt_len", "response_length")})
    settings.update(versions())
    out = {
        "side": a.side,
        "times": times,
        "cpu": cpu,
        "peak_mb": peak_rss_mb(),
        "after_imports_mb": after_imports,
    }
    print(json.dumps({**out, "settings": settings}))


def _has_trl() -> bool:
    try:
        import trl.experimental.ppo  # noqa: F401

        return True
    except ImportError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--lora", action="store_true", help="LoRA on every side (reference = adapter disabled)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="PPO steps per process (the first is never timed)")
    p.add_argument("--warmup", type=int, default=1, help="timed steps dropped at the start of each process")
    p.add_argument("--batch", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-length", type=int)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatches", type=int)
    p.add_argument("--sides", default="alignloop,trl,floor", help="comma-separated subset")
    p.add_argument(
        "--threads", type=int, help="torch threads of every side (default: common.default_threads)"
    )
    p.add_argument(
        "--lora-memory",
        action="store_true",
        help="instead: peak memory of a GPT-2-small-sized PPO step, LoRA (adapter-disabled reference) vs full copy",
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per minibatch (--lora-memory)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on every side")
    p.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.lora_memory:
        a.size = "small"
    for k, v in SIZES[a.size][3].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.side:
        child(a)
        return
    sides = ["lora", "full"] if a.lora_memory else a.sides.split(",")
    if "trl" in sides and not _has_trl():
        print("trl 1.12 not installed (pip install -e .[bench]): skipping the TRL side", file=sys.stderr)
        sides.remove("trl")
    a.threads = a.threads or default_threads()
    load_start = load_average()
    results: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder), a.size, 64 if a.lora_memory else a.prompt_len)
        for r in range(a.rounds):
            for s in sides:  # A B C A B C
                args = [__file__, "--side", s, "--folder", folder]
                for k in KNOBS:
                    args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
                args += ["--lora"] * a.lora + ["--gradient-checkpointing"] * a.gradient_checkpointing
                results[s].append(run_side(sys.executable, args[0], args[1:], threads=a.threads))
                res = results[s][-1]
                print(f"round {r + 1} {s}: median {statistics.median(res['times']):.3f} s/step wall, "
                      f"{statistics.median(res['cpu']):.3f} s CPU, peak RSS {res['peak_mb']:.0f} MB",
                      file=sys.stderr, flush=True)  # fmt: skip
    load_end = load_average()
    peak = {s: statistics.median(x["peak_mb"] for x in results[s]) for s in sides}
    if a.lora_memory:
        print(
            f"PPO step, GPT-2-small-sized (124M, random init), batch 8 ({a.grad_accum} micro-batches"
            f"{', gradient checkpointing' if a.gradient_checkpointing else ''}), 64+32 tokens: peak RSS"
        )
        print(f"  LoRA, reference = adapter disabled: {peak['lora']:.0f} MB")
        print(f"  full fine-tuning + frozen copy:     {peak['full']:.0f} MB")
        print(f"  ratio {peak['lora'] / peak['full']:.2f}x")
        print(f"  load average: start {load_start}; end {load_end}")
        return
    med = {s: statistics.median(t for x in results[s] for t in x["times"]) for s in sides}
    cpu = {s: statistics.median(t for x in results[s] for t in x["cpu"]) for s in sides}
    imp = {s: statistics.median(x["after_imports_mb"] for x in results[s]) for s in sides}
    n = {s: sum(len(x["times"]) for x in results[s]) for s in sides}
    shape = "GPT-2-small shape (12x768, vocab 50257, 124M)" if a.size == "small" else "GPT-2 2x128 vocab 2048"
    print(
        f"PPO step: {shape}, random init, {'LoRA' if a.lora else 'full fine-tuning'}, batch {a.batch}, "
        f"{a.prompt_len}+{a.response_length} tokens (fixed), {a.epochs} epochs x {a.minibatches} minibatch(es), "
        f"fp32, {a.threads} thread(s) each; {a.rounds} rounds x {a.steps} steps, first step + {a.warmup} "
        "warm-up step(s) dropped per process"
    )
    print("  settings of each side (what changes the work):")
    for s in sides:
        st = results[s][0]["settings"]
        print(f"    {s:10s} " + ", ".join(f"{k}={v}" for k, v in st.items()))
    for s in sides:
        print(
            f"  {s:10s} {med[s]:.3f} s/step wall, {cpu[s]:.3f} s CPU ({n[s]} steps)   peak RSS {peak[s]:.0f} MB "
            f"(after imports {imp[s]:.0f} MB)"
        )
    grown = {s: peak[s] - imp[s] for s in sides}  # above the same imports, read at the same point
    for other, label in (("trl", "TRL 1.12"), ("floor", "floor")):
        if other in med and "alignloop" in med:
            print(
                f"  alignloop / {label + ':':9s} time {med['alignloop'] / med[other]:.2f}x   "
                f"CPU time {cpu['alignloop'] / cpu[other]:.2f}x   "
                f"peak RSS {peak['alignloop'] / peak[other]:.2f}x   "
                f"(peak - RSS after the same imports {grown['alignloop'] / max(1.0, grown[other]):.2f}x)"
            )
    print(f"  load average: start {load_start}; end {load_end}")


if __name__ == "__main__":
    main()
