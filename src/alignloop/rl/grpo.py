"""The critic-free family on PPO's rollout: GRPO, Dr. GRPO, RLOO and REINFORCE++, top to bottom in one function.

They differ from PPO in one idea -- no value network: the baseline comes from other samples -- and from
each other by a line, the advantage (:mod:`~alignloop.rl.advantages`):

====================  ==========================================================  ===========  ===========
algorithm             advantage of completion i of a prompt (group of G)           KL           loss mean
====================  ==========================================================  ===========  ===========
``grpo``              ``(r_i - mean(r)) / s`` (Shao et al. 2024; ``s`` below)       k3 loss      per sequence
``dr_grpo``           ``r_i - mean(r)`` (Liu et al. 2025: no std, no length norm)  k3 loss      / max tokens
``rloo``              ``r_i - mean(r_others)`` (Ahmadian et al. 2024)              in reward    per token
``reinforce_pp``      returns of ``r - beta * KL``, whitened over the batch (Hu)   in reward    per token
====================  ==========================================================  ===========  ===========

``s`` is ``scale_rewards`` (TRL's name): ``group`` -- the group's std, the paper's -- ``batch`` (one std over
the step's rewards) or ``none`` (``s = 1``, Dr. GRPO's advantage). GRPO's default is ``none``: on the
embedded world with a learned reward model, dividing by the group's std (which gives a group whose rewards
barely differ advantages as large as any other's) reached 62% of PPO's gold gain on seed 0; ``none``
94-114% on seeds 0-2, with the F rate inside the base's interval on two of them (docs/grpo.md, "Measured").

Each step: sample G completions for each of ``batch_size / G`` prompts (``batch_size`` completions,
as many as PPO samples at the same ``batch_size``), score them with the reward, compute the policy's and
the reference's log-probs (no value head), the per-token KL, the advantages; then ``epochs`` passes of
the clipped token-ratio loss over shuffled minibatches, with the KL either in the reward (``kl_in:
reward``: ``r - beta * sum_t kl_t``, as PPO) or as a k3 loss term (``kl_in: loss``: ``+ beta * k3``, as
GRPO). Sampling, scoring, reference, KL, checkpoints, exact resume, data parallelism, warnings and
metrics are PPO's (:mod:`~alignloop.rl.rollout`).

    metrics = run_grpo("world:base", "runs/demo/reward", "prompts.jsonl", "runs/grpo", lora=True)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from alignloop.config import load_config
from alignloop.errors import UserError
from alignloop.rl import rollout as R
from alignloop.rl.advantages import (
    batch_normalised_returns,
    flat_groups,
    group_normalised,
    leave_one_out,
    token_rewards,
)
from alignloop.rl.kl import kl_k3, kl_per_token
from alignloop.rl.losses import aggregate, clipped_surrogate, k3_loss
from alignloop.rl.rollout import RewardLike, RolloutConfig

ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
Algorithm = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
# each algorithm's own KL placement and loss mean (the table above), when the config leaves them unset
KL_IN = {"grpo": "loss", "dr_grpo": "loss", "rloo": "reward", "reinforce_pp": "reward"}
LOSS_MEAN = {"grpo": "sequence", "dr_grpo": "constant", "rloo": "token", "reinforce_pp": "token"}
SCALE_REWARDS = {
    "grpo": "none",
    "dr_grpo": "none",
}  # the std dividing r - mean(group); grpo: measured, docs/grpo.md


class GRPOConfig(RolloutConfig):
    """The critic-free family's knobs (the shared ones -- steps, batch_size = completions a step, learning
    rate, score shaping, KL, sampling, LoRA, checkpoints -- in :class:`RolloutConfig`)."""

    algorithm: Algorithm = "grpo"
    group_size: int = Field(4, ge=1)  # completions per prompt (G); batch_size / G prompts a step
    epochs: int = Field(2, ge=1)  # update passes over each rollout (mu in the GRPO paper)
    clip_eps: float = Field(0.2, gt=0.0)
    kl_in: Literal["reward", "loss"] | None = None  # None: the algorithm's own (table in rl/grpo.py)
    loss_mean: Literal["token", "sequence", "constant"] | None = None  # None: the algorithm's own
    # grpo / dr_grpo: the std dividing r - mean(group) (TRL's scale_rewards): group, batch or none;
    # None: the algorithm's own (SCALE_REWARDS: none for both); rloo and reinforce_pp do not read it
    scale_rewards: Literal["group", "batch", "none"] | None = None
    early_stop_kl: float | None = None  # stop the epoch loop when approx KL(rollout || now) passes this


def load_grpo_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), algorithm: str | None = None
) -> GRPOConfig:
    """A :class:`GRPOConfig` from an optional YAML file (top level or a ``grpo:`` section), ``--set`` overrides
    and the command's algorithm (an ``algorithm=`` in the file or ``--set`` wins)."""
    from alignloop.config import read_yaml

    data = read_yaml(path) if path is not None else {}
    if isinstance(data.get("grpo"), dict):
        data = data["grpo"]
    if algorithm is not None:
        data = {"algorithm": algorithm, **data}
    where = str(path) if path else None
    cfg = load_config(GRPOConfig, data=data, overrides=overrides, where=where)
    check_config(cfg, where)
    return cfg


def check_config(cfg: GRPOConfig, where: str | None = None) -> None:
    """One line for a group that cannot be its own baseline, or a batch that does not split."""
    where = where or "config"
    if cfg.group_size < 2 and cfg.algorithm != "reinforce_pp":
        raise UserError(
            f"group_size={cfg.group_size}: {cfg.algorithm} compares the completions of a prompt with each "
            "other, so it needs at least 2 per prompt (with 1 there is no baseline)",
            where,
            "set group_size to 2 or more (e.g. --set group_size=4), or use --algorithm reinforce_pp",
        )
    if cfg.batch_size % cfg.group_size:
        raise UserError(
            f"batch_size={cfg.batch_size} is not a multiple of group_size={cfg.group_size}",
            where,
            "batch_size counts completions: make it group_size x the prompts a step",
        )
    R.check_batch_shape(cfg, where)


def run_grpo(
    policy_id: str,
    reward: RewardLike,
    prompts: str | Path | Sequence[str],
    out: str | Path,
    lora: bool = True,
    config: GRPOConfig | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``policy_id`` with ``config.algorithm`` against ``reward``; write the policy, metrics and
    checkpoints to ``out``. Arguments, files and distributed behaviour as :func:`alignloop.rl.ppo.run_ppo`
    (``model/`` holds no value head)."""
    from alignloop.models import forward_batch
    from alignloop.runs import say, stage_guard

    cfg = config or GRPOConfig()
    check_config(cfg)
    out = Path(out)
    name, G = cfg.algorithm, cfg.group_size
    kl_in = cfg.kl_in or KL_IN[name]
    loss_mean = cfg.loss_mean or LOSS_MEAN[name]
    scale = cfg.scale_rewards or SCALE_REWARDS.get(name)
    max_tokens = cfg.sampling.max_new_tokens
    run, texts, chat = R.open_run(name, policy_id, reward, prompts, out, lora, cfg, resume)
    if run.skipped:
        return run.metrics
    with stage_guard(run):
        o = R.start(run, name, policy_id, reward, texts, out, lora, cfg, resume, value_head=False, chat=chat)
        R.initial_score_norm(o)  # score normalisation: the initial policy's score mean and std

        stop_reason = "max_steps"
        for step in R.steps(o):
            step_seed = cfg.seed * 1_000_003 + step
            t0 = time.perf_counter()

            # ---- Phase 1: rollout: G completions of each prompt, scored ------------------------------
            idx = R.batch_indices(len(texts), cfg.batch_size // G, step, cfg.seed)
            group_prompts = [texts[i] for i in idx for _ in range(G)]  # rows g*G .. g*G+G-1: prompt g
            ro = R.sample_and_score(o, group_prompts, step_seed)
            t_score = time.perf_counter()
            if R.nonfinite_guard(o, ro, step):  # NaN guard: a bad reward never reaches the weights
                continue
            scores = R.shape_scores(o, ro)  # normalised, missing-EOS penalty, clipped (as configured)
            batch, mask, old_logprobs, _, ref_logprobs = R.reference_pass(o, ro)  # no value head
            with torch.no_grad():
                kl = kl_per_token(old_logprobs, ref_logprobs, cfg.kl.estimator) * mask
                beta = o.state["beta"]
                # KL in the reward (as PPO): -beta * kl_t at every token; or 0 here and a k3 loss term below
                rewards, non_score = token_rewards(scores, kl, mask, beta if kl_in == "reward" else 0.0)
                seq_rewards = rewards.sum(1)  # r(x, y) - beta * sum_t kl_t (or the score alone)
                if name in ("grpo", "dr_grpo"):  # (r - mean(group)) / std (group's, batch's; Dr. GRPO: none)
                    advantages = group_normalised(seq_rewards, G, scale)[:, None].expand_as(mask)
                elif name == "rloo":  # leave-one-out baseline: the mean of the other G - 1
                    advantages = leave_one_out(seq_rewards, G)[:, None].expand_as(mask)
                else:  # REINFORCE++: per-token returns, normalised over the whole batch
                    advantages = batch_normalised_returns(rewards, mask)
                # groups whose scores are all equal carry no signal (their group advantage is 0)
                flat = flat_groups(scores, G).float().mean().item() if G > 1 else 0.0
            if flat == 1.0:  # every group flat: this step cannot move the policy (counted warning)
                o.state["warnings"]["flat_groups"] = o.state["warnings"].get("flat_groups", 0) + 1
                say(
                    f"[{name}] warning: step {step}: every group of {G} completions got equal rewards "
                    "(zero advantages: no learning signal this step)"
                )
            t_roll = time.perf_counter()

            # ---- Phase 2: update: the clipped token-ratio loss, no value loss --------------------------
            def micro_loss(i: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                """Clipped surrogate (+ beta * k3 KL to the reference with kl_in=loss) on the rows ``i``."""
                mb, mmask = batch.select(i), mask[i]
                new = forward_batch(o.model, mb, None, cfg.sampling.temperature, entropy_grad=False)
                per_token, clipped = clipped_surrogate(
                    new.logprobs, old_logprobs[i], advantages[i], cfg.clip_eps
                )
                pg = aggregate(per_token, mmask, loss_mean, max_tokens)
                kl_term = k3_loss(new.logprobs, ref_logprobs[i], mmask, loss_mean, max_tokens)
                loss = pg + beta * kl_term if kl_in == "loss" else pg
                stats = {  # each averaged like the loss (their sums over micro-batches add up)
                    "policy_loss": pg, "kl_loss": kl_term,
                    "entropy": aggregate(new.entropy, mmask, loss_mean, max_tokens),
                    "clip_fraction": aggregate(clipped.float(), mmask, loss_mean, max_tokens),
                    "approx_kl": aggregate(kl_k3(old_logprobs[i], new.logprobs), mmask, loss_mean, max_tokens),
                }  # fmt: skip
                return loss, stats

            # a token mean weighs each row by its tokens; a mean over sequences weighs each row by 1
            row_weight = mask.sum(1) if loss_mean == "token" else torch.ones_like(mask[:, 0])
            stats, _ = R.update(o, mask, row_weight, cfg.epochs, cfg.early_stop_kl, step_seed, micro_loss)
            t_upd = time.perf_counter()

            # ---- KL controller, logging, warnings, checkpoint, stopping ------------------------------
            R.kl_controller(o, kl.sum(1).mean().item())  # adaptive beta: move KL toward the target
            times = {"time_forward": t_roll - t_score, "time_update": t_upd - t_roll}
            row = R.rollout_row(o, ro, kl, mask, times)
            row.update(
                non_score_reward=non_score.sum(1).mean().item(),
                **stats,
                flat_groups=flat,
                tokens_per_second=int(mask.sum().item()) / max(1e-9, t_upd - t0),
            )
            if R.end_step(o, step, row):  # stopping: the mean reward reached the threshold
                stop_reason = "reward_threshold"
                break
        return R.finish(o, stop_reason)
