"""PPO with a per-token KL penalty against a frozen reference, top to bottom in one function.

Each PPO step is the notes' two phases:

1. **Rollout** (no gradients; the shared pieces of :mod:`~alignloop.rl.rollout`): sample one completion
   per prompt with the current policy, score it with the reward, compute the log-probs and values of the
   policy (one forward) and the log-probs of the frozen reference (one forward; with LoRA the same model
   with the adapter off), turn score + KL penalty into per-token rewards and GAE advantages
   (:mod:`~alignloop.rl.advantages`).
2. **Update**: ``ppo_epochs`` passes over shuffled minibatches minimising
   ``L = L_policy + c1 L_VF - c2 H``; the epoch loop stops early when the approximate KL to
   the rollout policy passes ``early_stop_kl``.

The run stops after ``steps`` PPO steps or once the mean score reaches ``reward_threshold``.
Every random draw is seeded from ``(seed, step)``, so a run resumed from a checkpoint
continues exactly as if it had never stopped.

    metrics = run_ppo("world:base", "world:toxicity:nothate", "prompts.jsonl", "runs/ppo", lora=True)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from alignloop.config import load_config
from alignloop.rl import rollout as R
from alignloop.rl.advantages import gae, token_rewards
from alignloop.rl.kl import kl_per_token
from alignloop.rl.losses import approx_kl, explained_variance, policy_loss, ppo_loss, value_loss
from alignloop.rl.masked import masked_mean, masked_whiten

# the shared pieces, importable from here as before
from alignloop.rl.rollout import (  # noqa: F401
    CHECKPOINTS,
    KLSettings,
    RewardLike,
    RolloutConfig,
    WarnSettings,
    batch_indices,
    hacking_warnings,
    load_checkpoint,
    lr_factor,
    normalise_scores,
    read_checkpoint,
    read_prompts,
    repetition_rate,
    save_checkpoint,
)


class PPOConfig(RolloutConfig):
    """Every PPO knob, with defaults that pass the embedded world's acceptance runs (the shared ones --
    steps, batch, learning rate, score shaping, KL, sampling, LoRA, checkpoints -- in :class:`RolloutConfig`)."""

    ppo_epochs: int = Field(4, ge=1)
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
    early_stop_kl: float | None = 0.05  # stop the epoch loop when approx KL(rollout || now) passes this


def load_ppo_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PPOConfig:
    """A :class:`PPOConfig` from an optional YAML file (top level or a ``ppo:`` section) and ``--set``."""
    from alignloop.config import read_yaml

    data = read_yaml(path) if path is not None else {}
    if isinstance(data.get("ppo"), dict):
        data = data["ppo"]
    cfg = load_config(PPOConfig, data=data, overrides=overrides, where=str(path) if path else None)
    R.check_batch_shape(cfg, str(path) if path else None)
    return cfg


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
    from alignloop.models import forward_batch
    from alignloop.runs import stage_guard

    cfg = config or PPOConfig()
    out = Path(out)
    run, texts, chat = R.open_run("ppo", policy_id, reward, prompts, out, lora, cfg, resume)
    if run.skipped:
        return run.metrics
    with stage_guard(run):
        o = R.start(run, "ppo", policy_id, reward, texts, out, lora, cfg, resume, value_head=True, chat=chat)
        policy = o.policy
        if cfg.value_detach and policy.value_head is not None:  # value loss trains the head only
            policy.value_head.register_forward_pre_hook(lambda _m, args: (args[0].detach(),))
        R.initial_score_norm(o)  # score normalisation: the initial policy's score mean and std

        stop_reason = "max_steps"
        for step in R.steps(o):
            step_seed = cfg.seed * 1_000_003 + step
            t0 = time.perf_counter()

            # ---- Phase 1: rollout --------------------------------------------------------------
            idx = R.batch_indices(len(texts), cfg.batch_size, step, cfg.seed)
            ro = R.sample_and_score(o, [texts[i] for i in idx], step_seed)  # the global batch, scored
            t_score = time.perf_counter()
            if R.nonfinite_guard(o, ro, step):  # NaN guard: a bad reward never reaches the weights
                continue
            scores = R.shape_scores(o, ro)  # normalised, missing-EOS penalty, clipped (as configured)
            # log-probs + values of the policy (one pass) and the reference's log-probs
            batch, mask, old_logprobs, old_values, ref_logprobs = R.reference_pass(o, ro)
            with torch.no_grad():
                kl = kl_per_token(old_logprobs, ref_logprobs, cfg.kl.estimator) * mask
                if cfg.whiten_rewards:  # reward whitening (scores keep their mean)
                    scores = masked_whiten(
                        scores[:, None], torch.ones_like(scores[:, None]), shift_mean=False
                    )[:, 0]
                # score at the last real token (EOS), -beta * KL at every token
                rewards, non_score = token_rewards(scores, kl, mask, o.state["beta"])
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:  # advantage whitening over the batch's real tokens
                    advantages = masked_whiten(advantages, mask)
            t_roll = time.perf_counter()

            # ---- Phase 2: update -----------------------------------------------------------------
            def micro_loss(i: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                """``L = L_policy + c1 L_VF - c2 H`` on the rows ``i`` (token means)."""
                mb, mmask = batch.select(i), mask[i]
                new = forward_batch(
                    o.model, mb, policy.value_head, cfg.sampling.temperature,
                    entropy_grad=cfg.ent_coef != 0,  # else logged only: no graph kept
                )  # fmt: skip
                pg, clip_frac = policy_loss(new.logprobs, old_logprobs[i], advantages[i], mmask, cfg.clip_eps)
                vf, vf_clip_frac = value_loss(new.values, old_values[i], returns[i], mmask, cfg.vf_clip)
                entropy = masked_mean(new.entropy, mmask)
                loss = ppo_loss(pg, vf, entropy, cfg.vf_coef, cfg.ent_coef)
                stats = {
                    "policy_loss": pg, "value_loss": vf, "entropy": entropy, "clip_fraction": clip_frac,
                    "value_clip_fraction": vf_clip_frac, "approx_kl": approx_kl(new.logprobs, old_logprobs[i], mmask),
                }  # fmt: skip
                return loss, stats

            # ppo_epochs over shuffled minibatches (loss: token mean), gradient clipping, early stop on approx KL
            stats, _ = R.update(
                o, mask, mask.sum(1), cfg.ppo_epochs, cfg.early_stop_kl, step_seed, micro_loss
            )
            t_upd = time.perf_counter()

            # ---- KL controller, logging, warnings, checkpoint, stopping --------------------------
            R.kl_controller(o, kl.sum(1).mean().item())  # adaptive beta: move KL toward the target
            times = {"time_forward": t_roll - t_score, "time_update": t_upd - t_roll}
            row = R.rollout_row(o, ro, kl, mask, times)
            row.update(
                non_score_reward=non_score.sum(1).mean().item(),
                **stats,
                explained_variance=explained_variance(old_values, returns, mask).item(),
                tokens_per_second=int(mask.sum().item()) / max(1e-9, t_upd - t0),
            )
            if R.end_step(o, step, row):  # stopping: the mean reward reached the threshold
                stop_reason = "reward_threshold"
                break
        return R.finish(o, stop_reason)
