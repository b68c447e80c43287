"""What every online RL algorithm shares, once: the run, the rollout, the update mechanics, the bookkeeping.

An online step is the notes' two phases; an algorithm file (:mod:`~alignloop.rl.ppo`,
:mod:`~alignloop.rl.grpo`) reads top to bottom and calls these pieces in order::

    o = start(run, "ppo", policy_id, reward, texts, out, lora, cfg, resume, value_head=True, chat=chat)
    initial_score_norm(o)                                    # scores / std of the initial policy's
    for step in steps(o):
        ro = sample_and_score(o, prompts, step_seed)         # G completions a prompt, reward SPEC, held-out
        if nonfinite_guard(o, ro, step): continue           # a NaN reward never reaches the weights
        scores = shape_scores(o, ro)                          # normalise, missing-EOS penalty, clip
        batch, old_logprobs, old_values, ref_logprobs = reference_pass(o, ro)
        kl = kl_per_token(old_logprobs, ref_logprobs, cfg.kl.estimator) * mask
        ... advantages (rl/advantages.py) ...
        stats = update(o, mask, epochs, early_stop_kl, seed, micro_loss)   # the algorithm's loss
        if end_step(o, step, row): break                     # log, warnings, checkpoint, snapshot
    return finish(o, stop_reason)

Data-parallel: each step's global batch is split over the processes (row ``j`` belongs to process
``j % world``); each samples, scores and runs the rollout forwards for its rows, the rollouts are
gathered so every process computes the same advantages, and in the update each minibatch is split
again with the loss scaled so that DDP's averaged gradient is the whole minibatch's. Only the main
process writes files. Every random draw is seeded from ``(seed, step)``, and a checkpoint holds the
trainable weights, AdamW, the schedule, the RNG and the loop state, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from alignloop.checkpoints import newest_intact, verify_folder, write_step
from alignloop.config import Config
from alignloop.console import HackingDigest
from alignloop.errors import UserError
from alignloop.generation import SamplingSettings
from alignloop.models import LoraSettings, enable_gradient_checkpointing
from alignloop.rl.kl import adaptive_beta
from alignloop.runs import say

RewardLike = str | Callable[[list[str], list[str]], list[float]]
CHECKPOINTS = "checkpoints"


class KLSettings(Config):
    """The KL penalty ``-beta * KL(pi || pi_ref)`` paid at every response token."""

    beta: float = Field(0.3, ge=0.0)
    estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive: bool = True  # Ziegler et al. controller: beta follows the KL toward `target`
    target: float = Field(4.0, gt=0.0)  # nats per completion (sum over its tokens)
    horizon: int = Field(512, gt=0)  # sequences; smaller = beta reacts faster
    # the policy the KL is measured against: `start` the policy the run starts from; `base` the base model
    # under a trained LoRA adapter it continues (a recipe's round 2+, or a run continued from an earlier
    # one), so the drift of every round counts against one anchor (same as `start` for any other policy)
    reference: Literal["start", "base"] = "start"


class WarnSettings(Config):
    """When to warn that the policy may be hacking the reward."""

    kl_factor: float = 2.0  # mean KL > kl_factor * kl.target
    length_factor: float = 2.0  # mean response length > length_factor * the first step's
    repetition: float = 0.5  # share of repeated bigrams in the responses
    heldout_margin: float = 0.05  # proxy up while held-out down by more than this
    window: int = 3  # steps averaged at the start and at the end of the comparison
    print_every: int = Field(10, ge=1)  # console: one summary line per this many steps (all are logged)


class RolloutConfig(Config):
    """The knobs every online algorithm shares (sampling, reward shaping, KL, optimiser, checkpoints)."""

    seed: int = 0
    steps: int = Field(60, ge=1)  # maximum steps (rollout + update)
    reward_threshold: float | None = None  # stop once the mean score reaches this
    batch_size: int = Field(32, ge=1)  # completions sampled per step (the rollout batch)
    minibatch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches per minibatch
    # recompute layer activations in the backward pass: less peak memory, about one more forward per update
    gradient_checkpointing: bool = False
    learning_rate: float = Field(3e-4, gt=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = 0.0
    max_grad_norm: float = Field(1.0, gt=0.0)
    # score normalisation (Ziegler et al. 2019): scores / std (minus mean) of the INITIAL policy's scores on
    # `score_norm_samples` prompts, fixed for the run, so beta means the same for any reward's scale
    score_norm: Literal["none", "initial"] = "initial"
    score_norm_samples: int = Field(128, ge=2)
    # a reward-model ensemble (a folder with ensemble.json, see alignloop.reward.ensemble) is scored by
    # its members' mean, or conservatively: mean_std = mean - ensemble_penalty * std, min = the worst member
    ensemble: Literal["mean", "mean_std", "min"] = "mean"
    ensemble_penalty: float = 1.0
    score_clip: float | None = None  # clip each (normalised) score to [-score_clip, score_clip]
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion with no EOS
    # Jinja chat template file for conversational prompts (default: the policy tokenizer's; alignloop.chat)
    chat_template: str | None = None
    checkpoint_every: int = Field(10, ge=1)  # training state for --resume (optimizer, RNG, step)
    snapshot_every: int | None = None  # also save the policy as snapshots/step-N (over-optimisation curves)
    heldout: str | None = None  # a second reward SPEC watched for reward hacking (e.g. world:gold)
    kl: KLSettings = Field(default_factory=KLSettings)
    sampling: SamplingSettings = Field(
        default_factory=lambda: SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24)
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    warn: WarnSettings = Field(default_factory=WarnSettings)


def check_batch_shape(cfg: RolloutConfig, where: str | None) -> None:
    """One line for a batch that does not split into minibatches and micro-batches."""
    if cfg.minibatch_size > cfg.batch_size or cfg.batch_size % cfg.minibatch_size:
        raise UserError(
            f"batch_size={cfg.batch_size} is not a multiple of minibatch_size={cfg.minibatch_size}",
            where or "config",
            "make batch_size a multiple of minibatch_size",
        )
    if cfg.minibatch_size % cfg.grad_accum:
        raise UserError(
            f"minibatch_size={cfg.minibatch_size} is not a multiple of grad_accum={cfg.grad_accum}",
            where or "config",
        )


# ----------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------


def read_prompts(path: str | Path, tokenizer: Any = None) -> list[str]:
    """The ``prompt`` texts of a prompt JSONL file (``{"id", "prompt", ...}`` a line); a conversation
    (a message list) as its chat-template rendering with the generation prompt (``tokenizer``'s
    template: :func:`alignloop.chat.prompt_text`), so the policy samples the assistant's turn."""
    return read_prompt_texts(path, tokenizer)[0]


def read_prompt_texts(path: str | Path, tokenizer: Any = None) -> tuple[list[str], frozenset[str]]:
    """:func:`read_prompts` and the set of those texts that were rendered from conversations."""
    from alignloop.chat import is_rendered
    from alignloop.records import Prompt, read

    records = read(path, Prompt, tokenizer=tokenizer)
    if not records:
        raise UserError(
            "no prompts in the file", str(path), 'one JSON object a line: {"id": ..., "prompt": ...}'
        )
    return [p.prompt for p in records], frozenset(p.prompt for p in records if is_rendered(p))


def batch_indices(n_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of step ``step``: a stream of seeded permutations, cut into batches.

    A pure function of ``(step, seed)``: the data position needs no state to resume.
    """
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_prompts)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_prompts, generator=g).tolist()
        out.extend(perm[offset : offset + batch_size - len(out)])
    return out


def repetition_rate(responses: Sequence[Sequence[int]]) -> float:
    """Mean share of repeated bigrams per response (0 = none repeated, -> 1 = one bigram looped)."""
    rates = []
    for r in responses:
        bigrams = list(zip(r[:-1], r[1:], strict=False))
        if len(bigrams) >= 2:
            rates.append(1.0 - len(set(bigrams)) / len(bigrams))
    return sum(rates) / len(rates) if rates else 0.0


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at step ``step``: linear warm-up, then constant/linear/cosine decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def hacking_warnings(history: list[dict[str, Any]], cfg: RolloutConfig) -> list[tuple[str, str]]:
    """Signs of reward hacking in the step records so far, as ``(kind, one-line message)``.

    - KL far over target: mean KL of the last step > ``warn.kl_factor * kl.target``.
    - Response length exploding: the last ``window`` steps' mean length > ``length_factor`` x the first's.
    - Repetition exploding: share of repeated bigrams > ``warn.repetition``.
    - Proxy up, held-out down: over the first and last ``window`` steps, the proxy score rose while
      the held-out score fell by more than ``heldout_margin``.
    """
    w, last = cfg.warn, history[-1]
    out = []
    if last["kl"] > w.kl_factor * cfg.kl.target:
        out.append(
            ("kl_over_target", f"KL {last['kl']:.2f} is over {w.kl_factor:g}x the target {cfg.kl.target:g}")
        )
    n = w.window
    if len(history) >= 2 * n:

        def mean(key: str, rows: list[dict[str, Any]]) -> float:
            return sum(r[key] for r in rows) / len(rows)

        first, recent = history[:n], history[-n:]
        if mean("response_length", recent) > w.length_factor * max(1.0, mean("response_length", first)):
            out.append(
                (
                    "length",
                    f"response length exploding: {mean('response_length', first):.1f} -> "
                    f"{mean('response_length', recent):.1f} tokens",
                )
            )
        if "heldout" in last:
            proxy_up = mean("score", recent) > mean("score", first)
            held_drop = mean("heldout", first) - mean("heldout", recent)
            if proxy_up and held_drop > w.heldout_margin:
                out.append(
                    (
                        "proxy_vs_heldout",
                        f"proxy reward rising ({mean('score', first):.3f} -> {mean('score', recent):.3f}) while the "
                        f"held-out reward falls ({mean('heldout', first):.3f} -> {mean('heldout', recent):.3f})",
                    )
                )
    if last["repetition"] > w.repetition:
        out.append(("repetition", f"repetition exploding: {last['repetition']:.0%} of bigrams repeated"))
    return out


def normalise_scores(scores: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(score - mean) / std`` with the initial policy's statistics (Ziegler et al. 2019, section 2.2).

    Fixed for the whole run (not re-estimated per batch, which would make every score relative to its
    batch): a reward model whose scores spread over +-4 and a judge in [-1, 1] then meet the same KL
    penalty ``beta``. ``[B] -> [B]``.
    """
    return (scores - mean) / max(std, 1e-6)


def load_reward_fn(
    reward: RewardLike, ensemble: str = "mean", penalty: float = 1.0
) -> Callable[[list[str], list[str]], list[float]]:
    """A reward SPEC (see :func:`alignloop.reward.load_reward`) or a callable, as a callable.

    ``ensemble``/``penalty``: how an ensemble's members are combined (:func:`alignloop.reward.functions.conservative`).
    """
    from alignloop.reward import load_reward
    from alignloop.reward.functions import Reward, conservative

    if callable(reward) and not isinstance(reward, Reward):
        conservative(Reward("a callable", "python", reward), ensemble, penalty)  # checks the settings
        return reward  # as given (a non-finite score skips the batch, as rollouts count)
    return conservative(reward if isinstance(reward, Reward) else load_reward(reward), ensemble, penalty)


# ----------------------------------------------------------------------------------------------
# Data-parallel gathering
# ----------------------------------------------------------------------------------------------


def gather_rows(local: list[Any], world: int) -> list[Any]:
    """Every process's rows, back in global order: row ``j`` of the global batch was process ``j % world``'s
    ``j // world``-th (the strided shard of :func:`alignloop.distributed.shard`)."""
    from alignloop.distributed import gather_objects

    if world == 1:
        return list(local)
    parts = gather_objects(list(local))
    total = sum(len(p) for p in parts)
    return [parts[j % world][j // world] for j in range(total)]


def gather_tensor(local: torch.Tensor, world: int) -> torch.Tensor:
    """``[B/world, T]`` per process -> ``[B, T]`` in global row order (see :func:`gather_rows`)."""
    if world == 1:
        return local
    return torch.stack(gather_rows(list(local.cpu()), world)).to(local.device)


def sync_grads(params: Sequence[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of parameters DDP does not manage (the value head) over the processes."""
    if world == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


# ----------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ----------------------------------------------------------------------------------------------


def _trainable_module(policy: Any) -> torch.nn.Module:
    """The policy's model and value head as one module (what an FSDP2 checkpoint holds the trainable state of)."""
    parts = {"model": policy.model}
    if policy.value_head is not None:
        parts["value_head"] = policy.value_head
    return torch.nn.ModuleDict(parts)


def save_sharded_checkpoint(
    out: Path, policy: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int = 2
) -> Path:
    """``out/checkpoints/step-N`` of an FSDP2 run: every process writes its shard of the trainable weights and
    AdamW state and its RNG (:func:`alignloop.distributed.save_sharded_step`); the main process adds
    ``state.pt`` with the schedule and the loop state; sealed and verified like :func:`save_checkpoint`'s.
    Every process calls it."""
    from alignloop.distributed import save_sharded_step

    def extra(tmp: Path) -> None:
        torch.save({"scheduler": scheduler.state_dict(), "state": state}, tmp / "state.pt")

    info = {k: v for k, v in state.items() if k != "history"}
    root = out / CHECKPOINTS
    return save_sharded_step(root, state["step"], _trainable_module(policy), optimizer, info, keep, extra)


def _trainable(policy: Any) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    if policy.value_head is not None:
        params.update({f"value_head.{n}": p for n, p in policy.value_head.named_parameters()})
    return params


def save_checkpoint(
    out: Path, policy: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int = 2
) -> Path:
    """``out/checkpoints/step-N``: trainable weights, AdamW, schedule, RNG and loop state, written atomically.

    The files go to a temporary folder, are flushed to disk (fsync), and the folder is renamed into place:
    a kill at any moment leaves either the new checkpoint or none, never half of one. ``state.json``
    records the size and SHA-256 of ``state.pt``, so a checkpoint damaged later (a truncated file) is
    recognised on ``--resume``. The last ``keep`` checkpoints are kept (the older one is the fallback).
    """

    def write(tmp: Path) -> None:
        torch.save(
            {
                # written right away: no copy of the weights (a 124M model's 0.5 GB at every checkpoint)
                "trainable": {n: p.detach().cpu() for n, p in _trainable(policy).items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "state": state,
            },
            tmp / "state.pt",
        )

    info = {k: v for k, v in state.items() if k != "history"}
    return write_step(out / CHECKPOINTS, state["step"], write, info, keep)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The contents of one checkpoint folder, verified: raises ``ValueError`` saying what is wrong when
    ``state.json`` is unreadable or ``state.pt`` is missing, truncated or altered (size / SHA-256)."""
    files = verify_folder(folder)["files"]
    if "state.pt" not in files:
        raise ValueError("state.pt is missing")
    try:
        return torch.load(folder / "state.pt", weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means a damaged file
        raise ValueError(f"state.pt cannot be read ({type(e).__name__}: {e})") from None


def load_checkpoint(
    out: Path, policy: Any, optimizer: Any, scheduler: Any, name: str = "ppo"
) -> dict[str, Any] | None:
    """Restore the newest intact checkpoint of ``out`` (falling back to an older one, with a warning, when
    the newest is damaged); return its loop state, or None when there is no checkpoint at all."""
    hit = newest_intact(out / CHECKPOINTS, read_checkpoint, name)
    if hit is None:
        return None
    folder, ck = hit
    from alignloop.distributed import is_sharded, load_sharded_step

    if is_sharded(policy.model) != ("trainable" not in ck):
        how = "FSDP2 (configs/accelerate/fsdp.yaml)" if "trainable" not in ck else "without FSDP2"
        raise UserError(
            f"the checkpoint was written by a run launched {how}",
            str(folder),
            "resume with the same launcher and config, or use a new --out folder",
        )
    if "trainable" not in ck:  # FSDP2: this process's shard, and its RNG
        load_sharded_step(folder, _trainable_module(policy), optimizer)
        scheduler.load_state_dict(ck["scheduler"])
        say(f"[{name}] resuming at step {ck['state']['step']} from {folder}")
        return ck["state"]
    params = _trainable(policy)
    if set(params) != set(ck["trainable"]):
        raise UserError(
            "the checkpoint does not match this policy (different model or LoRA settings)",
            str(folder),
            "resume with the same --policy, --lora and config, or use a new --out folder",
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ck["trainable"][n])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"]["torch"])
    random.setstate(ck["rng"]["python"])
    say(f"[{name}] resuming at step {ck['state']['step']} from {folder}")
    return ck["state"]


def truncate_log(out: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` rows of steps >= ``step`` (logged after the checkpoint we resume from)
    and a torn last line left by a kill."""
    log = out / "metrics.jsonl"
    if not log.is_file():
        return
    rows = []
    for line in log.read_text().splitlines():
        try:
            if line.strip() and json.loads(line)["step"] < step:
                rows.append(line)
        except (json.JSONDecodeError, KeyError):
            pass
    log.write_text("".join(r + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------
# The run: start, sample and score, reference pass, update mechanics, end of step, finish
# ----------------------------------------------------------------------------------------------


def open_run(
    name: str,
    policy_id: str,
    reward: RewardLike,
    prompts: str | Path | Sequence[str],
    out: Path,
    lora: bool,
    cfg: RolloutConfig,
    resume: bool,
) -> tuple[Any, list[str], frozenset[str]]:
    """The stage's run folder (:func:`alignloop.runs.start_stage`), the prompt texts and those of them
    rendered from conversations (:func:`read_prompt_texts`).

    The fingerprint covers the config, whether LoRA is on, and the prompts (their file's hash, or the
    texts' hash when given as a list): ``--resume`` refuses a checkpoint written with other inputs.
    """
    from alignloop.chat import use_chat_template
    from alignloop.models import load_tokenizer
    from alignloop.reward.functions import check_labeller
    from alignloop.runs import start_stage

    for spec in (reward, cfg.heldout):  # DIR:NAME with a labeller the model lacks: one error, no run folder
        if isinstance(spec, str):
            check_labeller(spec)
    prompt_path = None if isinstance(prompts, (list, tuple)) else Path(prompts)
    tok = use_chat_template(load_tokenizer(policy_id), cfg.chat_template)  # conversations -> its template
    texts, chat = (list(prompts), frozenset()) if prompt_path is None else read_prompt_texts(prompt_path, tok)
    inputs: dict[str, Any] = {"policy": policy_id}
    if prompt_path is not None:
        inputs["prompts"] = prompt_path
    if isinstance(reward, str):
        inputs["reward"] = reward
    fingerprinted = {**cfg.model_dump(mode="json"), "lora_on": lora}
    if prompt_path is None:  # prompts given as a list: their hash goes into the fingerprint
        fingerprinted["prompts_sha256"] = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    run = start_stage(out, name, config=fingerprinted, inputs=inputs, seed=cfg.seed, resume=resume)
    return run, texts, chat


@dataclass
class Online:
    """What a running online stage holds (built by :func:`start`; read by the algorithm's loop)."""

    name: str
    cfg: Any
    run: Any
    out: Path
    texts: list[str]
    reward_label: str
    accelerator: Any
    rank: int
    world: int
    policy: Any
    model: Any  # the policy's model as prepared by accelerate (DDP under a launcher)
    reward_fn: Callable[[list[str], list[str]], list[float]]
    heldout_fn: Callable[[list[str], list[str]], list[float]] | None
    params: list[torch.nn.Parameter]
    head_params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    state: dict[str, Any]
    hacking: HackingDigest | None = None  # reward-hacking warnings printed aggregated (all are logged)
    backend: Any = None  # the generation backend every rollout samples through (sample_completions)
    state_bytes: int | None = None  # this process's parameter + gradient + AdamW + frozen-model bytes
    steps_this_call: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    chat: frozenset[str] = frozenset()  # the prompt texts rendered from conversations (open_run)
    turn_end: str = ""  # the policy's chat template's end-of-turn (alignloop.chat.turn_end), for them


def start(
    run: Any,
    name: str,
    policy_id: str,
    reward: RewardLike,
    texts: list[str],
    out: Path,
    lora: bool,
    cfg: RolloutConfig,
    resume: bool,
    value_head: bool,
    chat: frozenset[str] = frozenset(),
) -> Online:
    """Processes, seeded policy (+ value head) and reference, rewards, AdamW + schedule, loop state (restored
    from the newest intact checkpoint with ``resume``), the model in eval mode and prepared by accelerate."""
    from alignloop.chat import turn_end, use_chat_template
    from alignloop.distributed import barrier, fsdp2, make_accelerator, rank_world, uses_sharded_weights
    from alignloop.generation_backends import make_backend, pick_backend
    from alignloop.models import load_policy, make_optimizer
    from alignloop.runs import is_main_process

    pick_backend(cfg.sampling.backend)  # a backend this machine cannot run: one line before any loading
    accelerator = make_accelerator()
    rank, world = rank_world()
    sharded = fsdp2(accelerator)
    if uses_sharded_weights(accelerator) and not sharded:
        raise UserError(
            f"{name} does not run under DeepSpeed ZeRO-3 (sampling would need the gathered weights)",
            fix="use FSDP2 (configs/accelerate/fsdp.yaml), plain DDP (accelerate launch --multi_gpu) or ZeRO-1/2",
        )
    if sharded and cfg.score_norm == "initial" and cfg.score_norm_samples % world:
        raise UserError(
            f"score_norm_samples={cfg.score_norm_samples} does not split over {world} FSDP processes",
            "config",
            f"use a multiple of {world} (every process must run the same number of forwards)",
        )
    if cfg.batch_size % world or cfg.minibatch_size % (world * cfg.grad_accum):
        raise UserError(
            f"batch_size={cfg.batch_size} and minibatch_size={cfg.minibatch_size} must split evenly over "
            f"{world} processes x grad_accum={cfg.grad_accum}",
            "config",
            f"make minibatch_size a multiple of {world * cfg.grad_accum}",
        )
    torch.manual_seed(cfg.seed)  # LoRA init and value head: seeded (the same on every process)
    random.seed(cfg.seed)
    policy = load_policy(
        policy_id,
        lora=cfg.lora if lora else None,
        value_head=value_head,
        device=accelerator.device,
        reference_base=cfg.kl.reference == "base",
    )
    use_chat_template(policy.tokenizer, cfg.chat_template)  # the saved policy carries the template
    reward_fn = load_reward_fn(reward, cfg.ensemble, cfg.ensemble_penalty)
    heldout_fn = load_reward_fn(cfg.heldout) if cfg.heldout else None
    if sharded:  # FSDP2: before the optimizer is built, which must see the shards
        shard_frozen_and_trained(policy, reward_fn, heldout_fn)
    params = policy.trainable_parameters()
    head_params = list(policy.value_head.parameters()) if policy.value_head is not None else []
    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay, eps=1e-5)  # fused AdamW
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
    )
    state: dict[str, Any] = {
        "step": 0,
        "beta": cfg.kl.beta,
        "history": [],
        "skipped_batches": 0,
        "warnings": {},
        "fingerprint": run.manifest["fingerprint"],
    }
    if resume:
        loaded = load_checkpoint(out, policy, optimizer, scheduler, name)
        if loaded is not None and loaded.get("fingerprint") != state["fingerprint"]:
            raise UserError(
                "the checkpoint was written with other inputs or another config",
                str(out / CHECKPOINTS),
                "resume with the same arguments and config, or use a new --out folder",
            )
        if loaded is not None:
            state = loaded
        if is_main_process():
            truncate_log(out, state["step"])
    elif is_main_process():
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    barrier()
    policy.model.eval()  # dropout is off: rollout and update log-probs must agree
    if cfg.gradient_checkpointing:  # active only in training mode (set for the update phase)
        enable_gradient_checkpointing(policy.model)
    # DDP under a launcher (FSDP2 reduces its gradients itself); the model itself otherwise
    model = policy.model if sharded else accelerator.prepare(policy.model)
    label = str(reward) if isinstance(reward, str) else "reward"
    backend = make_backend(
        cfg.sampling.backend, policy.model, policy.tokenizer, accelerator=accelerator,
        model_path=str(policy_id),
    )  # fmt: skip
    return Online(
        name, cfg, run, out, texts, label, accelerator, rank, world, policy, model,
        reward_fn, heldout_fn, params, head_params, optimizer, scheduler, state, backend=backend,
        chat=chat, turn_end=turn_end(policy.tokenizer) if chat else "",
    )  # fmt: skip


def shard_frozen_and_trained(policy: Any, *rewards: Any) -> None:
    """FSDP2 for an online run: the policy, its frozen reference (full fine-tuning) and every model reward
    (a reward model or classifier) keep 1/world of each weight on each process
    (:func:`alignloop.distributed.shard_model`). The value head (``hidden + 1`` numbers) stays whole on every
    process; :func:`sync_grads` averages its gradient. A sharded model all-gathers each block in every
    forward, so the processes run the same forwards: equal rows each (``batch_size`` splits evenly) and
    sampling on unsharded weights (:func:`alignloop.generation_backends.fsdp2_unsharded`)."""
    from alignloop.distributed import shard_model

    shard_model(policy.model)
    if policy.reference is not None:
        shard_model(policy.reference, frozen=True)
    for r in rewards:
        if getattr(r, "model", None) is not None:
            shard_model(r.model, frozen=True)


def sample_completions(o: Online, prompts: list[str], seeds: list[int]) -> Any:
    """THE sampling call of every online algorithm: one completion per (prompt, seed) from the live policy.

    Returns :class:`alignloop.generation.Samples`. Every rollout goes through here and here through the
    run's generation backend (``sampling.backend``: transformers on the live model, or vLLM, whose
    weights :func:`update` refreshes after each update).
    """
    return o.backend.sample(prompts, o.cfg.sampling, seed=seeds)


def sample_and_score(o: Online, batch_prompts: list[str], seed: int) -> dict[str, Any]:
    """Sample and score this process's rows of a global batch (every ``world``-th; row ``j`` sampled with
    seed ``row_seed(seed, j)`` whatever the process count), then gather: every process gets every row, in
    global order. A prompt repeated G times in ``batch_prompts`` gets G different completions (a group).

    Returns ``prompt_ids``, ``response_ids``, ``finished``, ``scores``, ``heldout`` (lists over the global
    batch; ``heldout`` None without a held-out reward) and the seconds spent sampling and scoring.
    """
    from alignloop.chat import sampled_texts
    from alignloop.generation import row_seed

    mine = list(range(o.rank, len(batch_prompts), o.world))
    my_prompts = [batch_prompts[j] for j in mine]
    t = time.perf_counter()
    s = sample_completions(o, my_prompts, [row_seed(seed, j) for j in mine])
    t_gen = time.perf_counter() - t

    def read(reward: Any) -> list[str]:  # a reward model reads a finished chat turn with its end-of-turn
        return sampled_texts(reward, my_prompts, s.texts, s.finished, o.chat, o.turn_end)

    sc = [float(x) for x in o.reward_fn(my_prompts, read(o.reward_fn))]
    if len(sc) != len(my_prompts):
        raise UserError(
            f"the reward returned {len(sc)} scores for {len(my_prompts)} completions",
            o.reward_label,
            "a reward must return one float per (prompt, completion)",
        )
    ho = (
        [float(x) for x in o.heldout_fn(my_prompts, read(o.heldout_fn))]
        if o.heldout_fn
        else [math.nan] * len(sc)
    )
    local = list(zip(s.prompt_ids, s.response_ids, s.finished, sc, ho, strict=True))
    cols = list(zip(*gather_rows(local, o.world), strict=True))
    names = ("prompt_ids", "response_ids", "finished", "scores", "heldout")
    got: dict[str, Any] = {k: list(v) for k, v in zip(names, cols, strict=True)}
    if o.heldout_fn is None:
        got["heldout"] = None
    got.update(time_generate=t_gen, time_score=time.perf_counter() - t - t_gen)
    return got


def initial_score_norm(o: Online) -> None:
    """Score normalisation: the initial policy's scores on ``score_norm_samples`` prompts (seeded), their mean
    and std kept in the loop state for the whole run (once; a resumed run keeps the first estimate)."""
    cfg, state = o.cfg, o.state
    if cfg.score_norm != "initial" or "score_mean" in state:
        return
    idx = batch_indices(len(o.texts), cfg.score_norm_samples, 0, cfg.seed + 7_919)
    norm_scores: list[float] = []
    for i in range(0, len(idx), cfg.batch_size):
        part = [o.texts[j] for j in idx[i : i + cfg.batch_size]]
        norm_scores += sample_and_score(o, part, cfg.seed * 1_000_003 - 1 - i)["scores"]
    t = torch.tensor(norm_scores)
    if not torch.isfinite(t).all():
        raise UserError(
            "the reward returned non-finite scores for the initial policy's samples", o.reward_label
        )
    std = t.std().item()
    state["score_mean"], state["score_std"] = t.mean().item(), std if std > 1e-6 else 1.0
    say(
        f"[{o.name}] score normalisation: the initial policy's scores have mean {state['score_mean']:.3f}, "
        f"std {std:.3f} ({len(t)} samples)"
    )


def steps(o: Online) -> Iterator[int]:
    """The steps still to run (from the resumed step on), with a progress bar."""
    from alignloop.runs import progress

    o.t_start = time.perf_counter()
    o.hacking = HackingDigest(o.name, every=o.cfg.warn.print_every)
    o.hacking.counts = o.state["warnings"]  # counted by kind across resumes, in metrics.json
    total = o.cfg.steps - o.state["step"]
    yield from progress(range(o.state["step"], o.cfg.steps), total=total, desc=o.name, unit="step")


def nonfinite_guard(o: Online, ro: dict[str, Any], step: int) -> bool:
    """NaN guard: True (batch skipped, counted, logged) when the reward returned a non-finite score."""
    scores = torch.tensor(ro["scores"], dtype=torch.float32)
    if torch.isfinite(scores).all():
        return False
    o.state["skipped_batches"] += 1
    bad = int((~torch.isfinite(scores)).sum())
    say(
        f"[{o.name}] warning: step {step}: {bad} non-finite reward(s), batch skipped "
        f"({o.state['skipped_batches']} so far)"
    )
    o.run.log(step, skipped="non-finite reward")
    o.state["step"] = step + 1
    return True


def shape_scores(o: Online, ro: dict[str, Any]) -> torch.Tensor:
    """The scores the algorithm sees, ``[B]`` on the policy's device: normalised with the initial policy's
    statistics, minus the missing-EOS penalty, clipped -- each only when configured."""
    cfg = o.cfg
    scores = torch.tensor(ro["scores"], dtype=torch.float32)
    finished = torch.tensor(ro["finished"])
    if cfg.score_norm == "initial":  # score normalisation with the initial policy's statistics
        scores = normalise_scores(scores, o.state["score_mean"], o.state["score_std"])
    if cfg.missing_eos_penalty is not None:  # a completion that never ends pays a penalty
        scores = scores - cfg.missing_eos_penalty * (~finished).float()
    if cfg.score_clip is not None:  # score clipping
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores.to(o.policy.device)


@torch.no_grad()
def reference_pass(
    o: Online, ro: dict[str, Any]
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The rollout's forwards, no gradients: ``(batch, mask, old_logprobs, old_values, ref_logprobs)``.

    Each process runs its rows (every ``world``-th) through the policy (log-probs and, with a value head,
    values in ONE pass) and the frozen reference (with LoRA the same model with the adapter off); the
    results are gathered so every process holds the global ``[B, T]`` tensors. ``old_values`` is None
    without a value head. Log-probs are those of the sampling distribution (logits / temperature).

    The forwards run in chunks of the update's micro-batch (``minibatch_size / grad_accum`` rows), one
    chunk's ``(rows, T, V)`` logits alive at a time instead of the whole rollout's: the peak is the
    update's, not ``batch_size / micro`` times it. Each row's log-probs are the same whichever rows share
    its forward (same padded width; rows never mix).
    """
    policy, temp = o.policy, o.cfg.sampling.temperature
    batch = policy.batch(ro["prompt_ids"], ro["response_ids"])  # the global batch, on every process
    mask = batch.response_mask.float()
    rows = list(range(o.rank, len(batch), o.world))  # this process's rows
    micro = max(1, o.cfg.minibatch_size // o.cfg.grad_accum // o.world)
    logp, values, ref = [], [], []
    for c in range(0, len(rows), micro):
        part = batch.select(rows[c : c + micro])
        old = policy.forward(part, temperature=temp, entropy=False)  # log-probs + values, one pass
        logp.append(old.logprobs)
        if old.values is not None:
            values.append(old.values)
        ref.append(policy.reference_logprobs(part, temperature=temp))
        del old, part  # this chunk's logits go before the next chunk's forward
    old_logprobs = gather_tensor(torch.cat(logp), o.world) * mask
    old_values = gather_tensor(torch.cat(values), o.world) * mask if values else None
    ref_logprobs = gather_tensor(torch.cat(ref), o.world)
    return batch, mask, old_logprobs, old_values, ref_logprobs


def update(
    o: Online,
    mask: torch.Tensor,
    row_weight: torch.Tensor,
    epochs: int,
    early_stop_kl: float | None,
    seed: int,
    micro_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[dict[str, float], int]:
    """``epochs`` passes over shuffled minibatches of the rollout, minimising ``micro_loss``.

    ``micro_loss(rows)`` returns the loss of those rows (``[n]`` long indices into the global batch), a
    mean weighted by ``row_weight`` (``[B]``: each row's token count for a token mean, 1 for a mean over
    sequences), and its statistics (scalars taken the same way, so their weighted sum over micro-batches
    and processes is the minibatch's value whatever the split; one of them ``approx_kl``). Every
    process shuffles the same way; each takes every world-th row of a minibatch and splits it into
    ``grad_accum`` micro-batches. A micro-batch's loss is scaled by ``weight(micro) * world /
    weight(minibatch)``: summed over micro-batches and averaged over the processes by DDP, the gradient is
    the whole minibatch's mean. Then
    gradient clipping, a NaN guard (never step on a non-finite gradient), AdamW; the epoch loop stops early
    once the approximate KL to the rollout policy passes ``early_stop_kl``; the schedule ticks once.

    Returns the weighted means of the statistics over the epochs run (plus ``epochs``), and the
    number of minibatches skipped for a non-finite loss or gradient.
    """
    from alignloop.distributed import all_reduce_sum, clip_grad_norm

    cfg, rank, world, optimizer = o.cfg, o.rank, o.world, o.optimizer
    n_rows, n_mb = mask.shape[0], mask.shape[0] // cfg.minibatch_size
    g = torch.Generator().manual_seed(seed)
    # training mode turns transformers' checkpointing on; every dropout p is 0, so the log-probs
    # are those of the rollout either way (and generation, in eval mode, keeps its KV cache)
    o.policy.model.train(cfg.gradient_checkpointing)
    names: list[str] = []
    sums: torch.Tensor | None = None
    epochs_done = 0
    nonfinite = 0
    for _epoch in range(epochs):
        perm = torch.randperm(n_rows, generator=g)  # shuffled minibatches
        epoch_sums: torch.Tensor | None = None
        for m in range(n_mb):
            mb_idx = perm[m * cfg.minibatch_size : (m + 1) * cfg.minibatch_size]
            mb_weight = row_weight[mb_idx].sum().clamp(min=1e-8)
            my_idx = mb_idx[rank::world]
            micro = len(my_idx) // cfg.grad_accum
            optimizer.zero_grad(set_to_none=True)
            for a in range(cfg.grad_accum):  # gradient accumulation over micro-batches
                i = my_idx[a * micro : (a + 1) * micro]
                last_micro = a == cfg.grad_accum - 1
                with contextlib.nullcontext() if last_micro else o.accelerator.no_sync(o.model):
                    loss, stats = micro_loss(i)
                    w = row_weight[i].sum()  # this micro-batch's share of the minibatch mean
                    o.accelerator.backward(loss * w * world / mb_weight)
                with torch.no_grad():
                    if epoch_sums is None:  # summed on the device, read once an epoch (+ tokens, bad rows)
                        names = list(stats)
                        epoch_sums = torch.zeros(len(names) + 2, device=mask.device)
                    row = torch.stack([stats[k] for k in names])
                    ok = torch.isfinite(row).all()  # no host sync: a bad row counts in the last column
                    epoch_sums += torch.cat(
                        [torch.where(ok, row * w, 0.0), (w * ok)[None], (~ok).float()[None]]
                    )
            sync_grads(o.head_params, world)  # DDP averages the model's gradients; the head's here
            grad_norm = clip_grad_norm(o.params, cfg.max_grad_norm)  # gradient clipping (FSDP2 too)
            if not torch.isfinite(grad_norm):  # NaN guard: never step on a bad gradient (all processes agree)
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            if o.state_bytes is None:
                o.state_bytes = _state_bytes(o)
        assert epoch_sums is not None
        epoch_sums = all_reduce_sum(epoch_sums).double().cpu()
        sums = epoch_sums if sums is None else sums + epoch_sums
        epochs_done += 1
        epoch_kl = float(epoch_sums[names.index("approx_kl")] / max(1.0, float(epoch_sums[len(names)])))
        if early_stop_kl is not None and epoch_kl > early_stop_kl:
            break  # early stop: the policy moved too far from the rollout policy
    o.policy.model.eval()  # the next rollout samples with the KV cache
    o.backend.load_weights(o.policy.model)  # vLLM: the updated weights (transformers: the live model)
    o.scheduler.step()  # optional learning-rate schedule, one tick per step
    if nonfinite:
        o.state["skipped_batches"] += nonfinite
        say(f"[{o.name}] warning: {nonfinite} minibatch(es) with non-finite loss or gradient skipped")
    assert sums is not None
    n = max(1.0, float(sums[len(names)]))
    means = {k: float(sums[j]) / n for j, k in enumerate(names)}
    return {**means, "epochs": epochs_done}, nonfinite


def _state_bytes(o: Online) -> int:
    """Bytes this process holds for the trainable state (parameters, gradients, AdamW moments) and the frozen
    models (reference, model rewards), read from the tensors (a DTensor counts its local shard)."""
    from alignloop.distributed import model_state_bytes

    frozen = [o.policy.reference] + [getattr(r, "model", None) for r in (o.reward_fn, o.heldout_fn)]
    return model_state_bytes(_trainable_module(o.policy), o.optimizer, [m for m in frozen if m is not None])[
        "total"
    ]


def kl_controller(o: Online, seq_kl: float) -> None:
    """Adaptive beta (Ziegler et al.): move the mean per-sequence KL toward ``kl.target``."""
    cfg = o.cfg
    if cfg.kl.adaptive:
        o.state["beta"] = adaptive_beta(
            o.state["beta"], seq_kl, cfg.kl.target, cfg.kl.horizon, cfg.batch_size
        )


def rollout_row(
    o: Online, ro: dict[str, Any], kl: torch.Tensor, mask: torch.Tensor, times: dict[str, float]
) -> dict[str, Any]:
    """The per-step metrics every algorithm logs about its rollout: raw score, KL, length, EOS, repetition,
    learning rate, held-out score, timings (``times``: seconds of forward/update, from the loop)."""
    return {
        "score": float(torch.tensor(ro["scores"], dtype=torch.float32).mean().item()),
        "kl": kl.sum(1).mean().item(),
        "beta": o.state["beta"],
        "response_length": mask.sum(1).mean().item(),
        "no_eos_fraction": 1.0 - torch.tensor(ro["finished"]).float().mean().item(),
        "repetition": repetition_rate(ro["response_ids"]),
        "lr": o.scheduler.get_last_lr()[0],
        "time_generate": ro["time_generate"],
        "time_score": ro["time_score"],
        **times,
        **({"heldout": _mean(ro["heldout"])} if ro["heldout"] is not None else {}),
    }


def end_step(o: Online, step: int, row: dict[str, Any]) -> bool:
    """Log the step, count reward-hacking warnings, checkpoint, snapshot; True when the run should stop
    (the mean score reached ``reward_threshold``)."""
    from alignloop.distributed import barrier, full_state_dict, is_sharded
    from alignloop.runs import is_main_process

    cfg, state = o.cfg, o.state
    sharded = is_sharded(o.policy.model)
    state["history"].append(row)
    warns = hacking_warnings(state["history"], cfg)
    assert o.hacking is not None
    o.hacking.add(step, warns)  # counted by kind, printed aggregated; every one is logged below
    o.run.log(step, **row, warnings=[m for _, m in warns], warning_kinds=[k for k, _ in warns])
    state["step"] = step + 1
    o.steps_this_call += 1
    done = cfg.reward_threshold is not None and row["score"] >= cfg.reward_threshold
    if state["step"] % cfg.checkpoint_every == 0 or done or state["step"] == cfg.steps:
        if sharded:  # every process writes its shard
            save_sharded_checkpoint(o.out, o.policy, o.optimizer, o.scheduler, state)
        elif is_main_process():
            save_checkpoint(o.out, o.policy, o.optimizer, o.scheduler, state)
        barrier()
    if cfg.snapshot_every and state["step"] % cfg.snapshot_every == 0:
        whole = full_state_dict(o.policy.model) if sharded else None  # every process gathers
        if is_main_process():
            o.policy.save(o.out / "snapshots" / f"step-{state['step']}", state_dict=whole)
    return done


def finish(o: Online, stop_reason: str) -> dict[str, Any]:
    """Save the policy to ``out/model`` and write the final metrics (``out/metrics.json``)."""
    from alignloop.distributed import barrier, full_state_dict, is_sharded
    from alignloop.runs import is_main_process

    cfg, state = o.cfg, o.state
    if o.hacking is not None:
        o.hacking.close(state["step"])
    whole = full_state_dict(o.policy.model) if is_sharded(o.policy.model) else None  # every process gathers
    if is_main_process():
        o.policy.save(o.out / "model", state_dict=whole)  # whole HF weights (or the LoRA adapter)
    barrier()
    hist = state["history"]
    last = hist[-1] if hist else {}
    first = hist[0] if hist else {}
    metrics = {
        "steps": state["step"],
        "stop_reason": stop_reason,
        "score_first": first.get("score"),
        "score_last": last.get("score"),
        "kl_last": last.get("kl"),
        "kl_max": max((h["kl"] for h in hist), default=None),
        "beta_last": state["beta"],
        "entropy_last": last.get("entropy"),
        "response_length_last": last.get("response_length"),
        "heldout_first": first.get("heldout"),
        "heldout_last": last.get("heldout"),
        "score_norm": [state.get("score_mean"), state.get("score_std")] if cfg.score_norm != "none" else None,
        "skipped_batches": state["skipped_batches"],
        "warnings": state["warnings"],
        "processes": o.world,
        **({"model_state_bytes": o.state_bytes} if o.state_bytes is not None else {}),
        "seconds_per_step": (time.perf_counter() - o.t_start) / max(1, o.steps_this_call),
    }
    return o.run.finish(metrics)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
