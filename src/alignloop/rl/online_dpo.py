"""Online DPO: DPO on fresh pairs that the current policy samples each step, labelled by a reward or a judge.

Offline DPO (:mod:`alignloop.offline.dpo`) learns from a fixed file of pairs the base model wrote; as the policy
moves, those pairs describe text it no longer writes. Online DPO (Guo et al. 2024, "Direct Language Model
Alignment from Online AI Feedback"; Xu et al. 2023) keeps the pairs on-policy. Each step, on PPO's shared
rollout (:mod:`~alignloop.rl.rollout`):

1. sample ``G`` completions for each of ``batch_size / G`` prompts with the current policy;
2. label them: the completion with the highest reward is *chosen*, the lowest *rejected* (a reward SPEC:
   a reward model, a classifier, the world's judge...; ``pairing=nested``: also the 2nd best against the
   2nd worst...), or with ``judge`` set (``G = 2``) an AI judge (the CAI judge backends: a local model or
   an OpenAI-compatible URL) says which of the two is better; a pair whose scores tie teaches nothing
   and gets weight 0; ``labels=soft`` makes the label the reward's Bradley-Terry probability
   ``p = sigmoid(s_w - s_l)`` (or the judge's own) instead of a sure 1;
3. the reference's log-probs of both (with LoRA the adapter disabled), then ``epochs`` passes of the DPO
   loss over minibatches of pairs:

       h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
       L = -p log sigmoid(beta h) - (1 - p) log sigmoid(-beta h)   (sigmoid; p = 1 with labels=hard)
         or (h - 1/(2 beta))^2                                     (ipo)
         + kl_coef * mean-token k3 KL(pi || ref) of both members   (kl_coef > 0: an explicit anchor)

The losses are :mod:`alignloop.offline.dpo`'s; sampling, the reference, update mechanics (DDP scaling, clipping,
NaN guard), checkpoints, exact resume and metrics are the rollout's. ``minibatch_size`` counts pairs.

    metrics = run_online_dpo("world:base", "runs/demo/reward", "prompts.jsonl", "runs/online-dpo", lora=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from alignloop.errors import UserError
from alignloop.offline.dpo import preference_loss
from alignloop.rl import rollout as R
from alignloop.rl.kl import kl_per_token
from alignloop.rl.losses import approx_kl
from alignloop.rl.masked import masked_mean
from alignloop.rl.rollout import RewardLike, RolloutConfig


class OnlineDPOConfig(RolloutConfig):
    """Online DPO's knobs; the shared ones (steps, batch_size = completions a step, learning rate, sampling,
    LoRA, checkpoints) in :class:`RolloutConfig`. ``minibatch_size`` counts pairs."""

    group_size: int = Field(2, ge=2)  # completions per prompt: chosen = best, rejected = worst
    beta: float = Field(0.1, gt=0)  # DPO's beta (strength of the implicit KL)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    epochs: int = Field(1, ge=1)  # passes over each step's pairs
    judge: str | None = None  # an AI judge (model id or http(s) URL) labels the pairs instead of the reward
    judge_api: Literal["completions", "chat"] = "completions"
    judge_swap: bool = False  # ask the judge both answer orders and average: cancels, measures position bias
    constitution: str | None = None  # the judge's constitution YAML (default: the notes' principles)
    score_norm: Literal["none", "initial"] = "none"  # only the order within a group matters
    minibatch_size: int = Field(8, ge=1)
    learning_rate: float = Field(5e-4, gt=0.0)
    # best_worst: one pair a group (its best vs its worst); nested: G/2 pairs a group, k-th best vs k-th worst
    pairing: Literal["best_worst", "nested"] = "best_worst"
    # hard: every scored pair is sure; soft: the label is the reward's Bradley-Terry P(chosen better) =
    # sigmoid(s_w - s_l), or with a judge its P(chosen better) (sigmoid loss only)
    labels: Literal["hard", "soft"] = "hard"
    kl_coef: float = Field(0.0, ge=0.0)  # + kl_coef * mean k3 KL(pi || ref) per token of the pairs' samples


def check_config(cfg: OnlineDPOConfig, where: str | None = None) -> None:
    """One line for a batch that does not split into groups and pair minibatches."""
    where = where or "config"
    if cfg.batch_size % cfg.group_size:
        raise UserError(
            f"batch_size={cfg.batch_size} is not a multiple of group_size={cfg.group_size}", where,
            "batch_size counts completions: group_size x the prompts a step",
        )  # fmt: skip
    pairs = cfg.batch_size // cfg.group_size * (cfg.group_size // 2 if cfg.pairing == "nested" else 1)
    if cfg.minibatch_size > pairs or pairs % cfg.minibatch_size:
        raise UserError(
            f"{pairs} pairs a step (batch_size / group_size) do not split into minibatch_size={cfg.minibatch_size}",
            where, "minibatch_size counts pairs: make batch_size / group_size a multiple of it",
        )  # fmt: skip
    if cfg.judge_swap and cfg.judge is None:
        raise UserError("judge_swap asks an AI judge both answer orders, but no judge is set", where,
                        "set judge=MODEL, or drop judge_swap")  # fmt: skip
    if cfg.labels == "soft" and cfg.loss_type != "sigmoid":
        raise UserError(
            f"labels=soft needs loss_type=sigmoid, not {cfg.loss_type}", where, "set loss_type=sigmoid"
        )
    if cfg.judge is not None and cfg.group_size != 2:
        raise UserError(
            f"a judge compares two completions; group_size={cfg.group_size}", where, "set group_size=2"
        )


def pairs_from_groups(
    scores: torch.Tensor, group_size: int, pairing: str = "best_worst"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs within each group of ``G`` completions of one prompt.

    ``best_worst``: one pair a group, chosen = its best-scored, rejected = its worst (Xiong et al.'s
    best-vs-worst of K). ``nested``: ``G // 2`` pairs a group, the k-th best against the k-th worst
    (k = 1 .. G/2; with G = 4: 1st vs 4th and 2nd vs 3rd), so every sampled completion is used.

    Args:
        scores: (B,) rows ``g*G .. g*G+G-1`` are group g's. group_size: G.
    Returns:
        ``chosen`` (P,) and ``rejected`` (P,) row indices (P = B/G, or B/G * G//2 nested; a group's pairs
        together), ``weight`` (P,): 1, or 0 where the two scores tie (no preference to learn; in
        ``best_worst`` ties break to the first row).
    """
    s = scores.view(-1, group_size)
    base = torch.arange(s.shape[0]) * group_size
    if pairing == "best_worst":
        best, worst = s.argmax(dim=1), s.argmin(dim=1)
        weight = (s.max(dim=1).values > s.min(dim=1).values).float()
        return base + best, base + worst, weight
    if pairing != "nested":
        raise ValueError(f"unknown pairing {pairing!r}")
    n = group_size // 2
    order = s.argsort(dim=1, descending=True, stable=True)  # (B/G, G): best first
    best, worst = order[:, :n], order[:, -n:].flip(1)  # (B/G, n): k-th best, k-th worst
    weight = (s.gather(1, best) > s.gather(1, worst)).float()
    return (base[:, None] + best).reshape(-1), (base[:, None] + worst).reshape(-1), weight.reshape(-1)


def soft_label_smoothing(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry soft labels as DPO's per-pair label smoothing ``eps = 1 - p``.

    ``p = P(chosen better) = sigmoid(s_w - s_l)`` (the reward model's own preference probability, trained
    so), hence ``eps = sigmoid(s_l - s_w)``; a pair the reward barely separates (p near 0.5) pulls little.

    Args:
        chosen_scores, rejected_scores: (P,) raw scores of each pair's members.
    Returns:
        (P,) eps in (0, 0.5] for chosen_scores >= rejected_scores.
    """
    return torch.sigmoid(rejected_scores - chosen_scores)


def _judge_scores(
    judge: Callable[..., Any], prompts: list[str], texts: list[str]
) -> tuple[list[float], float | None]:
    """Per-row scores from a pairwise judge: for each pair of rows (A, B) ``[P(A better), 1 - P(A better)]``;
    and the judge's mean position bias over the pairs (None unless it was asked both ways)."""
    pairs = [
        {"id": str(k), "prompt": prompts[2 * k], "a": texts[2 * k], "b": texts[2 * k + 1]}
        for k in range(len(texts) // 2)
    ]
    out: list[float] = []
    labels = judge(pairs)
    for rec in labels:
        out += [rec["p_a"], 1.0 - rec["p_a"]]
    bias = [r["position_bias"] for r in labels if "position_bias" in r]
    return out, (sum(bias) / len(bias) if bias else None)


def open_judge(cfg: OnlineDPOConfig) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The CAI judge as ``pairs -> labels``; an unreachable judge fails here, before anything is written."""
    from alignloop.cai.constitution import load_constitution
    from alignloop.cai.judges import open_backend
    from alignloop.cai.label import LabelConfig, label_batch

    assert cfg.judge is not None
    backend = open_backend(cfg.judge, api=cfg.judge_api)  # a URL is asked for its models now, not mid-run
    constitution = load_constitution(cfg.constitution)
    lcfg = LabelConfig(seed=cfg.seed, swap=cfg.judge_swap)
    return lambda pairs: label_batch(backend, constitution, pairs, lcfg)


def run_online_dpo(
    policy_id: str,
    reward: RewardLike | None,
    prompts: str | Path | Sequence[str],
    out: str | Path,
    lora: bool = True,
    config: OnlineDPOConfig | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``policy_id`` by online DPO: pairs sampled from the current policy each step, labelled by
    ``reward`` (a SPEC or callable) or by ``config.judge``. Files and arguments as
    :func:`alignloop.rl.ppo.run_ppo` (``model/`` holds the policy)."""
    from alignloop.models import forward_batch
    from alignloop.runs import stage_guard

    cfg = config or OnlineDPOConfig()
    check_config(cfg)
    if reward is None and cfg.judge is None:
        raise UserError(
            "online DPO needs a reward SPEC or a judge", fix="pass --reward SPEC or --set judge=MODEL"
        )
    judge = open_judge(cfg) if cfg.judge is not None else None  # before any file is written
    G, out = cfg.group_size, Path(out)
    # with a judge the rollout's own score is a placeholder (0); the judge's P(better) replaces it below
    scorer: RewardLike = reward if judge is None else (lambda p, t: [0.0] * len(t))  # type: ignore[assignment]
    run, texts, chat = R.open_run(
        "online_dpo", policy_id, reward or f"judge:{cfg.judge}", prompts, out, lora, cfg, resume
    )
    if run.skipped:
        return run.metrics
    with stage_guard(run):
        o = R.start(
            run, "online_dpo", policy_id, scorer, texts, out, lora, cfg, resume, value_head=False, chat=chat
        )
        R.initial_score_norm(o)  # only with score_norm=initial (the default is none)

        stop_reason = "max_steps"
        judge_bias: list[float] = []  # per step, with judge_swap
        for step in R.steps(o):
            step_seed = cfg.seed * 1_000_003 + step
            t0 = time.perf_counter()

            # ---- 1. fresh completions: G for each prompt, from the current policy ----------------------
            idx = R.batch_indices(len(texts), cfg.batch_size // G, step, cfg.seed)
            group_prompts = [texts[i] for i in idx for _ in range(G)]
            ro = R.sample_and_score(o, group_prompts, step_seed)
            if judge is not None:  # ---- 2a. an AI judge labels each pair (same answer on every process)
                from alignloop.generation import continuation_texts

                completions = continuation_texts(
                    o.policy.tokenizer, ro["prompt_ids"], ro["response_ids"], o.policy.is_seq2seq
                )
                ro["scores"], bias = _judge_scores(judge, group_prompts, completions)
                if bias is not None:
                    judge_bias.append(bias)
            t_score = time.perf_counter()
            if R.nonfinite_guard(o, ro, step):  # NaN guard: a bad reward never reaches the weights
                continue
            # ---- 2. pairs: best vs worst of each group; a tied group gets weight 0 ---------------------
            scores = torch.tensor(ro["scores"], dtype=torch.float32)
            chosen, rejected, weight = pairs_from_groups(scores, G, cfg.pairing)
            # soft labels: eps = 1 - P(chosen better), the reward's Bradley-Terry probability (or the judge's own)
            eps = torch.zeros_like(weight)
            if cfg.labels == "soft":
                eps = (
                    scores[rejected]
                    if judge is not None
                    else soft_label_smoothing(scores[chosen], scores[rejected])
                )
            # ---- 3. reference log-probs (adapter off with LoRA), from the rollout's forwards -----------
            batch, mask, old_logprobs, _, ref_logprobs = R.reference_pass(o, ro)
            with torch.no_grad():
                ref_seq = (ref_logprobs * mask).sum(1)
                kl = kl_per_token(old_logprobs, ref_logprobs, "k1") * mask  # logged: how far the policy is
            pair_mask = mask[chosen] + mask[rejected]  # tokens of both members (weights the logged stats)
            t_roll = time.perf_counter()

            # ---- 4. DPO on this step's pairs -----------------------------------------------------------
            def micro_loss(i: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                """The weighted DPO loss of pairs ``i`` (both members in one forward)."""
                rows = torch.cat([chosen[i], rejected[i]])
                new = forward_batch(
                    o.model, batch.select(rows), None, cfg.sampling.temperature, entropy_grad=False
                )
                seq = (new.logprobs * mask[rows]).sum(1)
                n = len(i)
                w = weight[i].to(seq.device)
                loss, st = preference_loss(
                    seq[:n], seq[n:], ref_seq[chosen[i]].to(seq.device), ref_seq[rejected[i]].to(seq.device),
                    cfg.beta, cfg.loss_type, label_smoothing=eps[i].to(seq.device), weights=w,
                    total_weight=w.sum().clamp(min=1e-8),
                )  # fmt: skip
                kl_tok = kl_per_token(new.logprobs, ref_logprobs[rows].to(seq.device), "k3")
                kl_pair = masked_mean(kl_tok[:n], mask[chosen[i]]) + masked_mean(
                    kl_tok[n:], mask[rejected[i]]
                )
                if cfg.kl_coef > 0:  # an explicit anchor to the reference, as PPO's KL penalty
                    loss = loss + cfg.kl_coef * kl_pair
                stats = {
                    "dpo_loss": loss.detach(),
                    "kl_k3": kl_pair.detach(),
                    "rewards/margin": (st["margin"] * w).sum() / w.sum().clamp(min=1e-8),
                    "rewards/accuracy": (st["correct"] * w).sum() / w.sum().clamp(min=1e-8),
                    "entropy": masked_mean(new.entropy, mask[rows]),
                    "approx_kl": approx_kl(new.logprobs, old_logprobs[rows], mask[rows]),
                }
                return loss, stats

            stats, _ = R.update(o, pair_mask, weight, cfg.epochs, None, step_seed, micro_loss)
            t_upd = time.perf_counter()

            # ---- logging, warnings, checkpoint ---------------------------------------------------------
            row = R.rollout_row(
                o, ro, kl, mask, {"time_forward": t_roll - t_score, "time_update": t_upd - t_roll}
            )
            row.update(
                **stats, beta=cfg.beta, tied_groups=1.0 - weight.mean().item(),
                score_margin=(scores[chosen] - scores[rejected]).mean().item(),
                pairs_per_second=len(chosen) / max(1e-9, t_upd - t0),
            )  # fmt: skip
            if judge is not None and cfg.judge_swap and judge_bias:
                row["judge_position_bias_points"] = 100 * judge_bias[-1]
            if R.end_step(o, step, row):
                stop_reason = "reward_threshold"
                break
        if judge_bias:
            from alignloop.runs import say

            say(f"[online_dpo] judge position bias {100 * sum(judge_bias) / len(judge_bias):+.2f} points (mean of "
                f"{len(judge_bias)} steps, each pair asked both ways; swap averaging cancelled it)")  # fmt: skip
        return R.finish(o, stop_reason)
