"""PPO with a per-token KL penalty against a frozen reference, top to bottom in one function.

Each PPO step is the notes' two phases:

1. **Rollout** (no gradients): sample one completion per prompt with the current policy, score
   it with the reward, compute the log-probs and values of the policy (one forward) and the
   log-probs of the frozen reference (one forward; with LoRA the same model with the adapter
   off), turn score + KL penalty into per-token rewards and GAE advantages.
2. **Update**: ``ppo_epochs`` passes over shuffled minibatches minimising
   ``L = L_policy + c1 L_VF - c2 H``; the epoch loop stops early when the approximate KL to
   the rollout policy passes ``early_stop_kl``.

The run stops after ``steps`` PPO steps or once the mean score reaches ``reward_threshold``.
Every random draw is seeded from ``(seed, step)``, so a run resumed from a checkpoint
continues exactly as if it had never stopped.

    metrics = run_ppo("world:base", "world:toxicity:nothate", "prompts.jsonl", "runs/ppo", lora=True)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from alignloop.checkpoints import newest_intact, verify_folder, write_step
from alignloop.config import Config, load_config
from alignloop.errors import UserError
from alignloop.generation import SamplingSettings
from alignloop.models import LoraSettings, enable_gradient_checkpointing
from alignloop.rl.gae import gae, token_rewards
from alignloop.rl.kl import adaptive_beta, kl_per_token
from alignloop.rl.losses import approx_kl, explained_variance, policy_loss, ppo_loss, value_loss
from alignloop.rl.masked import masked_mean, masked_whiten
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


class WarnSettings(Config):
    """When to warn that the policy may be hacking the reward."""

    kl_factor: float = 2.0  # mean KL > kl_factor * kl.target
    length_factor: float = 2.0  # mean response length > length_factor * the first step's
    repetition: float = 0.5  # share of repeated bigrams in the responses
    heldout_margin: float = 0.05  # proxy up while held-out down by more than this
    window: int = 3  # steps averaged at the start and at the end of the comparison


class PPOConfig(Config):
    """Every PPO knob, with defaults that pass the embedded world's acceptance runs."""

    seed: int = 0
    steps: int = Field(60, ge=1)  # maximum PPO steps (rollout + update)
    reward_threshold: float | None = None  # stop once the mean score reaches this
    batch_size: int = Field(32, ge=1)  # prompts per rollout
    minibatch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches per minibatch
    # recompute layer activations in the backward pass: less peak memory, about one more forward per update
    gradient_checkpointing: bool = False
    ppo_epochs: int = Field(4, ge=1)
    learning_rate: float = Field(3e-4, gt=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = 0.0
    max_grad_norm: float = Field(1.0, gt=0.0)
    clip_eps: float = Field(0.2, gt=0.0)
    vf_clip: float | None = 0.2
    vf_coef: float = 0.1
    # the value head reads a detached trunk: value-loss gradients stay out of the LM (world: F rate kept down)
    value_detach: bool = True
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    # score normalisation (Ziegler et al. 2019): scores / std (minus mean) of the INITIAL policy's scores on
    # `score_norm_samples` prompts, fixed for the run, so beta means the same for any reward's scale
    score_norm: Literal["none", "initial"] = "initial"
    score_norm_samples: int = Field(128, ge=2)
    score_clip: float | None = None  # clip each (normalised) score to [-score_clip, score_clip]
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion with no EOS
    early_stop_kl: float | None = 0.05  # stop the epoch loop when approx KL(rollout || now) passes this
    checkpoint_every: int = Field(10, ge=1)  # training state for --resume (optimizer, RNG, step)
    snapshot_every: int | None = None  # also save the policy as snapshots/step-N (over-optimisation curves)
    heldout: str | None = None  # a second reward SPEC watched for reward hacking (e.g. world:gold)
    kl: KLSettings = Field(default_factory=KLSettings)
    sampling: SamplingSettings = Field(
        default_factory=lambda: SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24)
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    warn: WarnSettings = Field(default_factory=WarnSettings)


def load_ppo_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PPOConfig:
    """A :class:`PPOConfig` from an optional YAML file (top level or a ``ppo:`` section) and ``--set``."""
    from alignloop.config import read_yaml

    data = read_yaml(path) if path is not None else {}
    if isinstance(data.get("ppo"), dict):
        data = data["ppo"]
    cfg = load_config(PPOConfig, data=data, overrides=overrides, where=str(path) if path else None)
    if cfg.minibatch_size > cfg.batch_size or cfg.batch_size % cfg.minibatch_size:
        raise UserError(
            f"batch_size={cfg.batch_size} is not a multiple of minibatch_size={cfg.minibatch_size}",
            str(path) if path else "config",
            "make batch_size a multiple of minibatch_size",
        )
    if cfg.minibatch_size % cfg.grad_accum:
        raise UserError(
            f"minibatch_size={cfg.minibatch_size} is not a multiple of grad_accum={cfg.grad_accum}",
            str(path) if path else "config",
        )
    return cfg


# ----------------------------------------------------------------------------------------------
# Small helpers the loop calls (each one thing)
# ----------------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` texts of a prompt JSONL file (``{"id", "prompt", ...}`` a line)."""
    from alignloop.records import Prompt, read

    prompts = [p.prompt for p in read(path, Prompt)]
    if not prompts:
        raise UserError(
            "no prompts in the file", str(path), 'one JSON object a line: {"id": ..., "prompt": ...}'
        )
    return prompts


def batch_indices(n_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of PPO step ``step``: a stream of seeded permutations, cut into batches.

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
    """Learning-rate multiplier at PPO step ``step``: linear warm-up, then constant/linear/cosine decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def hacking_warnings(history: list[dict[str, Any]], cfg: PPOConfig) -> list[tuple[str, str]]:
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


def _load_reward(reward: RewardLike) -> Callable[[list[str], list[str]], list[float]]:
    if callable(reward):
        return reward
    from alignloop.reward import load_reward

    return load_reward(reward)


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
                "trainable": {n: p.detach().cpu().clone() for n, p in _trainable(policy).items()},
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


def load_checkpoint(out: Path, policy: Any, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
    """Restore the newest intact checkpoint of ``out`` (falling back to an older one, with a warning, when
    the newest is damaged); return its loop state, or None when there is no checkpoint at all."""
    hit = newest_intact(out / CHECKPOINTS, read_checkpoint, "ppo")
    if hit is None:
        return None
    folder, ck = hit
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
    say(f"[ppo] resuming at step {ck['state']['step']} from {folder}")
    return ck["state"]


def _truncate_log(out: Path, step: int) -> None:
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


def _stats(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _gather_rows(local: list[Any], world: int) -> list[Any]:
    """Every process's rows, back in global order: row ``j`` of the global batch was process ``j % world``'s
    ``j // world``-th (the strided shard of :func:`alignloop.distributed.shard`)."""
    from alignloop.distributed import gather_objects

    if world == 1:
        return list(local)
    parts = gather_objects(list(local))
    total = sum(len(p) for p in parts)
    return [parts[j % world][j // world] for j in range(total)]


def _gather_tensor(local: torch.Tensor, world: int) -> torch.Tensor:
    """``[B/world, T]`` per process -> ``[B, T]`` in global row order (see :func:`_gather_rows`)."""
    if world == 1:
        return local
    return torch.stack(_gather_rows(list(local.cpu()), world)).to(local.device)


def _sync_grads(params: Sequence[torch.nn.Parameter], world: int) -> None:
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
# The algorithm
# ----------------------------------------------------------------------------------------------


def run_ppo(
    policy_id: str,
    reward: RewardLike,
    prompts: str | Path | Sequence[str],
    out: str | Path,
    lora: bool = True,
    config: PPOConfig | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``policy_id`` with PPO against ``reward``; write the policy, metrics and checkpoints to ``out``.

    Runs unchanged as one process or under ``accelerate launch`` / torchrun: each step's global batch
    of ``batch_size`` prompts is split over the processes (every ``world``-th row), each samples, scores
    and runs the rollout forwards for its rows, the rollouts are gathered so every process computes the
    same advantages, and each minibatch is split again, with the loss scaled so that DDP's averaged
    gradient is the whole minibatch's. Only the main process writes files.

    Args:
        policy_id: model id or folder (``world:base``, ``google/flan-t5-base``, a LoRA adapter folder).
        reward: a reward SPEC (``world:gold``, ``world:toxicity:nothate``, a reward-model folder, ...)
            or a callable ``(prompts, completions) -> list[float]``.
        prompts: a prompt JSONL file or a list of prompt texts.
        out: the run folder: ``model/`` (final policy), ``checkpoints/``, ``metrics.jsonl``, ``metrics.json``.
        lora: train a LoRA adapter (reference = adapter disabled) instead of every weight (reference = copy).
        config: :class:`PPOConfig`; defaults if None.
        resume: continue from the newest intact checkpoint in ``out`` (or skip if the run already finished).

    Returns:
        The final metrics (also in ``out/metrics.json``).
    """
    from alignloop.distributed import (
        all_reduce_sum,
        barrier,
        make_accelerator,
        rank_world,
        uses_sharded_weights,
    )
    from alignloop.generation import row_seed, sample
    from alignloop.models import forward_batch, load_policy
    from alignloop.runs import is_main_process, progress, say, stage_guard, start_stage

    cfg = config or PPOConfig()
    out = Path(out)
    prompt_path = None if isinstance(prompts, (list, tuple)) else Path(prompts)
    texts = list(prompts) if prompt_path is None else read_prompts(prompt_path)
    inputs: dict[str, Any] = {"policy": policy_id}
    if prompt_path is not None:
        inputs["prompts"] = prompt_path
    if isinstance(reward, str):
        inputs["reward"] = reward
    fingerprinted = {**cfg.model_dump(mode="json"), "lora_on": lora}
    if prompt_path is None:  # prompts given as a list: their hash goes into the fingerprint
        fingerprinted["prompts_sha256"] = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    run = start_stage(out, "ppo", config=fingerprinted, inputs=inputs, seed=cfg.seed, resume=resume)
    if run.skipped:
        return run.metrics
    with stage_guard(run):
        accelerator = make_accelerator()
        rank, world = rank_world()
        if uses_sharded_weights(accelerator):
            raise UserError(
                "PPO does not run under ZeRO-3 or FSDP yet (sampling would need the gathered weights)",
                fix="use plain DDP (accelerate launch --multi_gpu) or ZeRO-1/2",
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
            policy_id, lora=cfg.lora if lora else None, value_head=True, device=accelerator.device
        )
        reward_fn = _load_reward(reward)
        heldout_fn = _load_reward(cfg.heldout) if cfg.heldout else None
        tok = policy.tokenizer
        params = policy.trainable_parameters()
        head_params = list(policy.value_head.parameters()) if policy.value_head is not None else []
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-5)
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
            loaded = load_checkpoint(out, policy, optimizer, scheduler)
            if loaded is not None and loaded.get("fingerprint") != state["fingerprint"]:
                raise UserError(
                    "the checkpoint was written with other inputs or another config",
                    str(out / CHECKPOINTS),
                    "resume with the same arguments and config, or use a new --out folder",
                )
            if loaded is not None:
                state = loaded
            if is_main_process():
                _truncate_log(out, state["step"])
        elif is_main_process():
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        barrier()
        policy.model.eval()  # dropout is off in PPO: rollout and update log-probs must agree
        if cfg.gradient_checkpointing:  # active only in training mode (set for the update phase below)
            enable_gradient_checkpointing(policy.model)
        model = accelerator.prepare(policy.model)  # DDP under a launcher; the model itself otherwise
        if cfg.value_detach and policy.value_head is not None:  # value loss trains the head only
            policy.value_head.register_forward_pre_hook(lambda _m, args: (args[0].detach(),))

        def rollout(batch_prompts: list[str], seed: int) -> dict[str, Any]:
            """Sample and score this process's rows of a global batch (every ``world``-th; row ``j`` sampled
            with seed ``row_seed(seed, j)`` whatever the process count), then gather: every process gets
            every row, in global order. Returns ``prompt_ids``, ``response_ids``, ``finished``, ``scores``,
            ``heldout`` (lists over the global batch) and the seconds spent sampling and scoring."""
            mine = list(range(rank, len(batch_prompts), world))
            my_prompts = [batch_prompts[j] for j in mine]
            t = time.perf_counter()
            s = sample(policy.model, tok, my_prompts, cfg.sampling, seed=[row_seed(seed, j) for j in mine])
            t_gen = time.perf_counter() - t
            sc = [float(x) for x in reward_fn(my_prompts, s.texts)]
            if len(sc) != len(my_prompts):
                raise UserError(
                    f"the reward returned {len(sc)} scores for {len(my_prompts)} completions",
                    str(reward) if isinstance(reward, str) else "reward",
                    "a reward must return one float per (prompt, completion)",
                )
            ho = [float(x) for x in heldout_fn(my_prompts, s.texts)] if heldout_fn else [math.nan] * len(sc)
            local = list(zip(s.prompt_ids, s.response_ids, s.finished, sc, ho, strict=True))
            cols = list(zip(*_gather_rows(local, world), strict=True))
            names = ("prompt_ids", "response_ids", "finished", "scores", "heldout")
            got: dict[str, Any] = {k: list(v) for k, v in zip(names, cols, strict=True)}
            if heldout_fn is None:
                got["heldout"] = None
            got.update(time_generate=t_gen, time_score=time.perf_counter() - t - t_gen)
            return got

        if cfg.score_norm == "initial" and "score_mean" not in state:
            # score normalisation: the initial policy's scores on score_norm_samples prompts (seeded)
            idx = batch_indices(len(texts), cfg.score_norm_samples, 0, cfg.seed + 7_919)
            norm_scores: list[float] = []
            for i in range(0, len(idx), cfg.batch_size):
                part = [texts[j] for j in idx[i : i + cfg.batch_size]]
                norm_scores += rollout(part, cfg.seed * 1_000_003 - 1 - i)["scores"]
            t = torch.tensor(norm_scores)
            if not torch.isfinite(t).all():
                raise UserError(
                    "the reward returned non-finite scores for the initial policy's samples",
                    str(reward) if isinstance(reward, str) else "reward",
                )
            std = t.std().item()
            state["score_mean"], state["score_std"] = t.mean().item(), std if std > 1e-6 else 1.0
            say(
                f"[ppo] score normalisation: the initial policy's scores have mean {state['score_mean']:.3f}, "
                f"std {std:.3f} ({len(t)} samples)"
            )

        stop_reason = "max_steps"
        n_mb = cfg.batch_size // cfg.minibatch_size
        steps_this_call = 0
        t_start = time.perf_counter()
        bar = progress(
            range(state["step"], cfg.steps), total=cfg.steps - state["step"], desc="ppo", unit="step"
        )
        for step in bar:
            step_seed = cfg.seed * 1_000_003 + step
            t0 = time.perf_counter()

            # ---- Phase 1: rollout --------------------------------------------------------------
            idx = batch_indices(len(texts), cfg.batch_size, step, cfg.seed)
            batch_prompts = [texts[i] for i in idx]
            ro = rollout(batch_prompts, step_seed)  # sampled and scored, the global batch
            t_score = time.perf_counter()
            scores = torch.tensor(ro["scores"], dtype=torch.float32)
            if not torch.isfinite(scores).all():  # NaN guard: a bad reward never reaches the weights
                state["skipped_batches"] += 1
                bad = int((~torch.isfinite(scores)).sum())
                say(
                    f"[ppo] warning: step {step}: {bad} non-finite reward(s), batch skipped "
                    f"({state['skipped_batches']} so far)"
                )
                run.log(step, skipped="non-finite reward")
                state["step"] = step + 1
                continue
            raw_scores = scores.clone()
            finished = torch.tensor(ro["finished"])
            if cfg.score_norm == "initial":  # score normalisation with the initial policy's statistics
                scores = normalise_scores(scores, state["score_mean"], state["score_std"])
            if cfg.missing_eos_penalty is not None:  # a completion that never ends pays a penalty
                scores = scores - cfg.missing_eos_penalty * (~finished).float()
            if cfg.score_clip is not None:  # score clipping
                scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
            scores = scores.to(policy.device)
            batch = policy.batch(ro["prompt_ids"], ro["response_ids"])  # the global batch, on every process
            mask = batch.response_mask.float()
            with torch.no_grad():
                mine = batch.select(list(range(rank, cfg.batch_size, world)))  # this process's rows
                old = policy.forward(
                    mine, temperature=cfg.sampling.temperature
                )  # log-probs + values, one pass
                ref = policy.reference_logprobs(mine, temperature=cfg.sampling.temperature)
                old_logprobs = _gather_tensor(old.logprobs, world) * mask
                old_values = _gather_tensor(old.values, world) * mask
                ref_logprobs = _gather_tensor(ref, world)
                kl = kl_per_token(old_logprobs, ref_logprobs, cfg.kl.estimator) * mask
                if cfg.whiten_rewards:  # reward whitening (scores keep their mean)
                    scores = masked_whiten(
                        scores[:, None], torch.ones_like(scores[:, None]), shift_mean=False
                    )[:, 0]
                # score at the last real token (EOS), -beta * KL at every token
                rewards, non_score = token_rewards(scores, kl, mask, state["beta"])
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:  # advantage whitening over the batch's real tokens
                    advantages = masked_whiten(advantages, mask)
            t_roll = time.perf_counter()

            # ---- Phase 2: update -----------------------------------------------------------------
            # every process shuffles the same way; each takes every world-th row of a minibatch and splits
            # it into grad_accum micro-batches. A micro-batch's token-mean losses are scaled by
            # tokens(micro) * world / tokens(minibatch): summed over micro-batches and averaged over the
            # processes by DDP, the gradient is the token mean over the whole minibatch.
            g = torch.Generator().manual_seed(step_seed)
            # training mode turns transformers' checkpointing on; every dropout p is 0, so the log-probs
            # are those of the rollout either way (and generation, in eval mode, keeps its KV cache)
            policy.model.train(cfg.gradient_checkpointing)
            sums = torch.zeros(
                8, dtype=torch.float64
            )  # pg, vf, entropy, clip, vclip, approx-kl (x tokens), tokens, bad
            epochs_done = 0
            nonfinite = 0
            for _epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(cfg.batch_size, generator=g)  # shuffled minibatches
                epoch_sums = torch.zeros(8, dtype=torch.float64)
                for m in range(n_mb):
                    mb_idx = perm[m * cfg.minibatch_size : (m + 1) * cfg.minibatch_size]
                    mb_tokens = mask[mb_idx].sum().clamp(min=1.0)
                    my_idx = mb_idx[rank::world]
                    micro = len(my_idx) // cfg.grad_accum
                    optimizer.zero_grad(set_to_none=True)
                    for a in range(cfg.grad_accum):  # gradient accumulation over micro-batches
                        i = my_idx[a * micro : (a + 1) * micro]
                        mb, mmask = batch.select(i), mask[i]
                        last_micro = a == cfg.grad_accum - 1
                        with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                            new = forward_batch(
                                model, mb, policy.value_head, cfg.sampling.temperature,
                                entropy_grad=cfg.ent_coef != 0,  # else logged only: no graph kept
                            )  # fmt: skip
                            pg, clip_frac = policy_loss(
                                new.logprobs, old_logprobs[i], advantages[i], mmask, cfg.clip_eps
                            )
                            vf, vf_clip_frac = value_loss(
                                new.values, old_values[i], returns[i], mmask, cfg.vf_clip
                            )
                            entropy = masked_mean(new.entropy, mmask)
                            loss = ppo_loss(pg, vf, entropy, cfg.vf_coef, cfg.ent_coef)
                            n_tok = mmask.sum()
                            accelerator.backward(loss * n_tok * world / mb_tokens)
                        with torch.no_grad():
                            row = torch.stack(
                                [
                                    pg,
                                    vf,
                                    entropy,
                                    clip_frac,
                                    vf_clip_frac,
                                    approx_kl(new.logprobs, old_logprobs[i], mmask),
                                ]
                            )
                            if torch.isfinite(row).all():
                                epoch_sums[:6] += (row * n_tok).double().cpu()
                                epoch_sums[6] += float(n_tok)
                            else:
                                epoch_sums[7] += 1
                    _sync_grads(head_params, world)  # DDP averages the model's gradients; the head's here
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # gradient clipping
                    if not torch.isfinite(
                        grad_norm
                    ):  # NaN guard: never step on a bad gradient (all processes agree)
                        nonfinite += 1
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    optimizer.step()
                epoch_sums = all_reduce_sum(epoch_sums)
                sums += epoch_sums
                epochs_done += 1
                epoch_kl = float(epoch_sums[5] / max(1.0, float(epoch_sums[6])))
                if cfg.early_stop_kl is not None and epoch_kl > cfg.early_stop_kl:
                    break  # early stop: the policy moved too far from the rollout policy
            policy.model.eval()  # the next rollout samples with the KV cache
            scheduler.step()  # optional learning-rate schedule, one tick per PPO step
            if nonfinite:
                state["skipped_batches"] += nonfinite
                say(
                    f"[ppo] warning: step {step}: {nonfinite} minibatch(es) with non-finite loss or gradient skipped"
                )
            t_upd = time.perf_counter()

            # ---- KL controller, logging, warnings, checkpoint, stopping --------------------------
            seq_kl = kl.sum(1).mean().item()
            if cfg.kl.adaptive:  # adaptive beta: move KL toward the target
                state["beta"] = adaptive_beta(
                    state["beta"], seq_kl, cfg.kl.target, cfg.kl.horizon, cfg.batch_size
                )
            n = max(1.0, float(sums[6]))
            new_tokens = int(mask.sum().item())
            row = {
                "score": raw_scores.mean().item(),
                "kl": seq_kl,
                "beta": state["beta"],
                "non_score_reward": non_score.sum(1).mean().item(),
                "entropy": float(sums[2]) / n,
                "policy_loss": float(sums[0]) / n,
                "value_loss": float(sums[1]) / n,
                "clip_fraction": float(sums[3]) / n,
                "value_clip_fraction": float(sums[4]) / n,
                "approx_kl": float(sums[5]) / n,
                "epochs": epochs_done,
                "explained_variance": explained_variance(old_values, returns, mask).item(),
                "response_length": mask.sum(1).mean().item(),
                "no_eos_fraction": 1.0 - finished.float().mean().item(),
                "repetition": repetition_rate(ro["response_ids"]),
                "lr": scheduler.get_last_lr()[0],
                "time_generate": ro["time_generate"],
                "time_score": ro["time_score"],
                "time_forward": t_roll - t_score,
                "time_update": t_upd - t_roll,
                "tokens_per_second": new_tokens / max(1e-9, t_upd - t0),
            }
            if ro["heldout"] is not None:
                row["heldout"] = _stats(ro["heldout"])
            state["history"].append(row)
            warns = hacking_warnings(state["history"], cfg)
            for kind, message in warns:  # reward-hacking warnings, counted by kind
                state["warnings"][kind] = state["warnings"].get(kind, 0) + 1
                say(f"[ppo] reward-hacking warning at step {step}: {message}")
            run.log(step, **row, warnings=[m for _, m in warns])
            state["step"] = step + 1
            steps_this_call += 1
            done = cfg.reward_threshold is not None and row["score"] >= cfg.reward_threshold
            if state["step"] % cfg.checkpoint_every == 0 or done or state["step"] == cfg.steps:
                if is_main_process():
                    save_checkpoint(out, policy, optimizer, scheduler, state)
                barrier()
            if cfg.snapshot_every and state["step"] % cfg.snapshot_every == 0 and is_main_process():
                policy.save(out / "snapshots" / f"step-{state['step']}")
            if done:  # stopping: the mean reward reached the threshold
                stop_reason = "reward_threshold"
                break

        if is_main_process():
            policy.save(out / "model")
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
            "score_norm": [state.get("score_mean"), state.get("score_std")]
            if cfg.score_norm != "none"
            else None,
            "skipped_batches": state["skipped_batches"],
            "warnings": state["warnings"],
            "processes": world,
            "seconds_per_step": (time.perf_counter() - t_start) / max(1, steps_this_call),
        }
        return run.finish(metrics)
