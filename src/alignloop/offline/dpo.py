"""Direct preference optimisation (DPO), IPO and conservative DPO, on the same pairs as the reward model.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model") trains the policy on preference pairs ``(x, y_w, y_l)`` directly, with no reward
model and no sampling. With ``pi`` the policy, ``ref`` the frozen reference and

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))

the losses (all minimised, one value per pair) are

    DPO:               -log sigmoid(beta * h)                                     (paper eq. 7)
    conservative DPO:  -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
                       (labels flipped with probability eps; Mitchell 2023)
    IPO:               (h - 1 / (2 * tau))^2          (Azar et al. 2023, eq. 17; tau = beta)

and, with ``nll_coef = alpha > 0``, each pair adds ``alpha * NLL(y_w|x) / |y_w|`` (the chosen
response's mean token negative log-likelihood; Pang et al. 2024, "Iterative Reasoning Preference
Optimization", eq. 1): the preference term can lower the likelihood of chosen *and* rejected
responses, and the mass they lose goes to text neither side ever showed (in the world: ungrammatical
F text); the NLL term keeps the chosen responses likely.

``beta * (log pi(y|x) - log ref(y|x))`` is the *implicit reward* of a completion: DPO is the
reward model's pair-wise logistic loss ``-log sigmoid(r_w - r_l)`` with that reward.

The trainer (:func:`train_dpo`, ``alignloop dpo``) reads Pair records (TRL format, ``weight`` =
P(chosen is better) read as reward training reads it: :func:`read_labels`), computes the reference
log-probs once before training (or on the fly), trains with
LoRA or full fine-tuning, logs implicit rewards/margin/accuracy each step and held-out accuracy,
and writes atomic checkpoints that resume exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from alignloop.chat import is_rendered, use_chat_template
from alignloop.checkpoints import (
    newest_intact,
    remove_folder,
    truncate_metrics_log,
    verify_folder,
    write_step,
)
from alignloop.config import Config
from alignloop.distributed import (
    fsdp2,
    full_state_dict,
    is_sharded,
    load_sharded_step,
    make_accelerator,
    model_state_bytes,
    prepare,
    save_sharded_step,
    shard_model,
)
from alignloop.errors import UserError
from alignloop.models import (
    Batch,
    LoraSettings,
    Policy,
    context_length,
    enable_gradient_checkpointing,
    encode_pairs,
    load_policy,
    load_tokenizer,
    logprobs_from_logits,
    make_optimizer,
    token_logprobs,
)
from alignloop.records import Pair, iter_jsonl, read
from alignloop.runs import StageRun, progress, say, stage_guard, start_stage

LOSS_TYPES = ("sigmoid", "ipo")


# ----------------------------------------------------------------------------------------------
# The maths: small pure functions
# ----------------------------------------------------------------------------------------------


def preference_logits(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> Tensor:
    """The log-ratio difference ``h`` that every loss here is a function of.

    ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``

    Args:
        policy_chosen_logps: ``[B]`` sequence log-probs ``log pi(y_w|x)`` (with grad).
        policy_rejected_logps: ``[B]`` ``log pi(y_l|x)`` (with grad).
        reference_chosen_logps: ``[B]`` ``log ref(y_w|x)`` (no grad).
        reference_rejected_logps: ``[B]`` ``log ref(y_l|x)`` (no grad).

    Returns:
        ``[B]`` h.
    """
    return (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)


def dpo_loss(logits: Tensor, beta: float, label_smoothing: float | Tensor = 0.0) -> Tensor:
    """DPO's sigmoid loss per pair; with ``label_smoothing = eps > 0``, conservative DPO.

    ``L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``

    ``logsigmoid`` keeps it finite for any ``beta * h`` (``log(sigmoid(x))`` underflows to
    ``-inf`` below about -104 in fp32). Its gradient is the pair-wise logistic one:
    ``dL/dh = -beta * ((1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h))``.

    Args:
        logits: ``[B]`` h from :func:`preference_logits`.
        beta: inverse temperature (KL strength); larger stays closer to the reference.
        label_smoothing: eps in ``[0, 0.5)``, the assumed probability that a label is flipped; or a
            ``[B]`` tensor ``1 - p`` of soft labels ``p = P(chosen is better)`` (``labels=soft``).

    Returns:
        ``[B]`` loss per pair.
    """
    z = beta * logits
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(logits: Tensor, beta: float) -> Tensor:
    """IPO's squared loss per pair: regress h onto ``1 / (2 * tau)`` (``tau = beta``).

    ``L = (h - 1 / (2 * beta))^2``

    Unlike DPO it does not push h to infinity on deterministic preferences: the margin it
    wants is finite, so the policy stays nearer the reference.

    Args:
        logits: ``[B]`` h from :func:`preference_logits` (TRL uses length-averaged log-probs here,
            see :func:`average_logps`).
        beta: tau of the IPO paper.

    Returns:
        ``[B]`` loss per pair.
    """
    return (logits - 1.0 / (2.0 * beta)) ** 2


def weighted_mean(
    losses: Tensor, weights: Tensor | None = None, total_weight: Tensor | float | None = None
) -> Tensor:
    """``sum_i w_i * L_i / sum_i w_i`` (a plain mean without weights).

    Args:
        losses: ``[B]`` per-pair losses.
        weights: ``[B]`` non-negative pair weights (the Pair record's ``weight``) or None.
        total_weight: divide by this instead of ``sum_i w_i`` (data parallel: the *global*
            batch's weight, so that averaging the ranks' gradients gives the global mean).

    Returns:
        scalar.
    """
    if weights is None:
        weights = torch.ones_like(losses)
    weights = weights.to(losses.dtype)
    denom = weights.sum() if total_weight is None else total_weight
    return (weights * losses).sum() / denom


def chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Mean token negative log-likelihood of each chosen response, ``-log pi(y_w|x) / |y_w|``.

    Args:
        chosen_logps: ``[B]`` summed log-probs ``log pi(y_w|x)`` (with grad).
        chosen_lengths: ``[B]`` response lengths in tokens (EOS included).

    Returns:
        ``[B]`` NLL per token.
    """
    return -chosen_logps / chosen_lengths.to(chosen_logps.dtype).clamp(min=1)


def implicit_rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward ``r(x, y) = beta * (log pi(y|x) - log ref(y|x))``, ``[B]`` -> ``[B]`` (no grad)."""
    return (beta * (policy_logps - reference_logps)).detach()


def average_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Length-averaged sequence log-prob ``sum_t m_t log p_t / sum_t m_t``: ``[B, T], [B, T] -> [B]``."""
    return (token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float | Tensor = 0.0,
    weights: Tensor | None = None,
    total_weight: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The batch loss and its metrics, from the four ``[B]`` sequence log-probs.

    Returns:
        ``(loss, stats)``: scalar weighted loss; ``stats`` holds ``[B]`` tensors (no grad):
        ``losses``, ``rewards_chosen``, ``rewards_rejected``, ``margin`` (chosen - rejected
        implicit reward) and ``correct`` (1.0 where the chosen reward is higher).
    """
    h = preference_logits(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    if loss_type == "sigmoid":
        losses = dpo_loss(h, beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(h, beta)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {LOSS_TYPES}")
    loss = weighted_mean(losses, weights, total_weight)
    chosen = implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta)
    rejected = implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta)
    stats = {
        "losses": losses.detach(),
        "rewards_chosen": chosen,
        "rewards_rejected": rejected,
        "margin": chosen - rejected,
        "correct": (chosen > rejected).float(),
    }
    return loss, stats


# ----------------------------------------------------------------------------------------------
# The trainer: config, data, reference log-probs, the loop, checkpoints
# ----------------------------------------------------------------------------------------------

REFERENCE_FILE = "reference_logps.safetensors"
CHECKPOINTS = "checkpoints"


class DPOConfig(Config):
    """``alignloop dpo`` settings (YAML or ``--set key=value``)."""

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = Field(0.25, gt=0)  # measured in the world: 0.1 drifts far (KL 33 nats by 3 epochs)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # how a pair's "weight" (P(chosen is better), docs/preference.md) is read, as in reward training:
    # hard: every pair is sure, weight < 0.5 swaps it, soft ties (0.5 / "tie": true) are dropped;
    # soft: weight is the label p of -p log sigmoid(beta h) - (1 - p) log sigmoid(-beta h)
    labels: Literal["hard", "soft"] = "hard"
    # + nll_coef * mean token NLL of the chosen response (RPO, Pang et al. 2024); world: keeps F down
    nll_coef: float = Field(0.0, ge=0)
    average_logprobs: bool | None = None  # None: True for ipo (as TRL does), False for sigmoid
    reference: Literal["precompute", "on_the_fly"] = "precompute"
    lora: LoraSettings | None = None  # set (or --lora) to train a LoRA adapter
    learning_rate: float = Field(5e-4, gt=0)
    schedule: Literal["constant", "linear"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = 1.0
    batch_size: int = Field(16, ge=1)  # pairs per optimizer step, over all processes
    micro_batch_size: int | None = Field(None, ge=1)  # pairs per forward on one process
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    heldout_fraction: float = Field(0.1, ge=0, lt=1)  # of the prompts (a prompt's pairs stay together)
    eval_every: int = Field(25, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # the older one is the fallback if the newest is damaged
    # keep HF folders snapshots/step-N (the evaluation's gold-vs-KL curve)
    snapshot_every: int | None = Field(None, ge=1)
    max_prompt_tokens: int = Field(256, ge=1)  # prompts are cut from the left
    max_response_tokens: int = Field(128, ge=1)  # responses from the right
    # Jinja chat template file for conversational pairs (default: the tokenizer's own; alignloop.chat)
    chat_template: str | None = None
    share_prompt: bool = True  # run each prompt once for both responses (KV cache / encoder output)
    # train on one labeller's (or a group's) pairs only: those naming labellers all in this list
    # (feedback export --consensus none names one a pair; issue 28); --labeller NAME on the command line
    target_labellers: list[str] | None = None
    seed: int = 0
    device: str | None = None  # None: cuda if present, else cpu

    def averaged(self) -> bool:
        return self.loss_type == "ipo" if self.average_logprobs is None else self.average_logprobs

    @model_validator(mode="after")
    def _one_label_source(self) -> DPOConfig:
        if self.labels == "soft" and (self.loss_type != "sigmoid" or self.label_smoothing):
            raise ValueError(
                "labels=soft needs loss_type=sigmoid and label_smoothing=0 (it sets each pair's)"
            )
        return self


@dataclass
class PairData:
    """Tokenized pairs: ``N`` prompts, chosen and rejected responses, ``[N]`` loss weights (ones), ``[N]``
    labels ``P(chosen is better)`` and reference log-probs."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    weights: Tensor
    labels: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)


def split_heldout(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out about ``fraction`` of the *prompts* (all pairs of a prompt on one side), chosen by a
    hash of the prompt text and the seed, so the split does not depend on file order."""
    if fraction <= 0:
        return pairs, []
    train, held = [], []
    for p in pairs:
        h = hashlib.sha256(f"{seed}\n{p.prompt}".encode()).digest()
        (held if int.from_bytes(h[:8], "big") / 2**64 < fraction else train).append(p)
    if not train:  # tiny files: never hold out everything
        return held, []
    return train, held


def is_target(labellers: list[str] | None, target: list[str]) -> bool:
    """A pair is the target's when it names at least one labeller and every one it names is in
    ``target`` (one labeller: their own pairs, ``feedback export --consensus none``; a group: also
    consensus pairs formed within the group). A pair naming nobody is nobody's."""
    return bool(labellers) and set(labellers) <= set(target)  # type: ignore[arg-type]


def check_target(pairs_path: str | Path, target: list[str]) -> int:
    """How many pairs of ``pairs_path`` are the target's (:func:`is_target`); one UserError (before
    anything is written) when a target labeller names no pair of the file, listing those that do,
    or when none of its pairs is the target's."""
    rows = [row.get("labellers") or [] for _, row in iter_jsonl(pairs_path)]
    present = sorted({n for names in rows for n in names if isinstance(n, str)})
    unknown = [n for n in target if n not in present]
    if unknown:
        raise UserError(
            f"no pair names the labeller{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
            str(pairs_path),
            f"target one of: {', '.join(present)}"
            if present
            else "these pairs name no labeller: export each labeller's own pairs with "
            "alignloop feedback export --consensus none",
        )
    n = sum(is_target(names, target) for names in rows)
    if not n:
        raise UserError(
            f"no pair is only {', '.join(target)}'s: every pair naming them also names another labeller",
            str(pairs_path),
            "export each labeller's own pairs: alignloop feedback export --consensus none",
        )
    return n


def tokenize_pairs(
    pairs: list[Pair], tokenizer: Any, seq2seq: bool, cfg: DPOConfig, max_length: int | None
) -> PairData:
    """Tokenize prompt / chosen / rejected apart (responses end with EOS), cut them to the budgets."""
    if not pairs:
        return PairData([], [], [], torch.zeros(0), torch.zeros(0))
    prompts = [p.prompt for p in pairs]
    chat = [is_rendered(p) for p in pairs]  # conversational: the template's tokens, no added EOS (TRL)
    p_ids, c_ids = encode_pairs(tokenizer, prompts, [p.chosen for p in pairs], seq2seq, chat=chat)
    _, r_ids = encode_pairs(tokenizer, prompts, [p.rejected for p in pairs], seq2seq, chat=chat)
    cut = 0
    for i in range(len(p_ids)):
        p, c, r = (
            p_ids[i][-cfg.max_prompt_tokens :],
            c_ids[i][: cfg.max_response_tokens],
            r_ids[i][: cfg.max_response_tokens],
        )
        if max_length is not None and not seq2seq and len(p) + max(len(c), len(r)) > max_length:
            # causal: prompt + response must fit the positions; the prompt keeps at least half of them
            p = p[-max(max_length - max(len(c), len(r)), max_length // 2) :]
            c, r = c[: max_length - len(p)], r[: max_length - len(p)]
        cut += (len(p), len(c), len(r)) != (len(p_ids[i]), len(c_ids[i]), len(r_ids[i]))
        p_ids[i], c_ids[i], r_ids[i] = p, c, r
    if cut:
        say(f"[dpo] {cut} of {len(p_ids)} pairs cut to max_prompt_tokens / max_response_tokens / the context")
    labels = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    return PairData(p_ids, c_ids, r_ids, torch.ones(len(pairs)), labels)


def is_tie(pair: Pair) -> bool:
    """A soft tie: ``weight`` 0.5 (or ``"tie": true``) says neither side is better."""
    return pair.weight == 0.5 or (pair.model_extra or {}).get("tie") is True


def read_labels(pairs: list[Pair], labels: str) -> tuple[list[Pair], int]:
    """Pairs as the trainer reads their ``weight`` = P(chosen is better), the reward model's way.

    ``hard``: ties dropped (their count returned), a weight below 0.5 swaps chosen and rejected,
    every pair then has weight 1. ``soft``: unchanged (the weight is each pair's label).
    """
    if labels == "soft":
        return pairs, 0
    out = []
    for p in pairs:
        if is_tie(p):
            continue
        if p.weight < 0.5:
            p = p.model_copy(update={"chosen": p.rejected, "rejected": p.chosen})
        out.append(p.model_copy(update={"weight": 1.0}))
    return out, len(pairs) - len(out)


def _smoothing(data: PairData, idx: list[int], cfg: DPOConfig) -> float | Tensor:
    """The eps of :func:`dpo_loss` for pairs ``idx``: ``1 - p`` with soft labels, else the config's."""
    return 1.0 - data.labels[idx] if cfg.labels == "soft" else cfg.label_smoothing


def pair_logps(
    model: Any, policy: Policy, data: PairData, idx: list[int], average: bool, share_prompt: bool = True
) -> tuple[Tensor, Tensor]:
    """``[B]`` log pi(chosen) and ``[B]`` log pi(rejected) of pairs ``idx``.

    ``share_prompt`` (the fast path): each prompt goes through the model ONCE and both responses
    continue from it (causal: from its KV cache; seq2seq: from its encoder output), instead of
    running the prompt twice, once per response. Otherwise one forward over the 2B sequences
    ``prompt + chosen`` and ``prompt + rejected``. Both give the same numbers (a test checks).
    """
    B = len(idx)
    prompts = [data.prompt_ids[i] for i in idx]
    responses = [data.chosen_ids[i] for i in idx] + [data.rejected_ids[i] for i in idx]
    batch = policy.batch(prompts + prompts, responses)  # rows: B chosen, then B rejected
    if share_prompt:
        logits = _shared_prompt_logits(model, batch, B)
        tok = logprobs_from_logits(logits, batch.response_ids) * batch.response_mask
    else:
        tok = token_logprobs(model, batch)  # [2B, R], zero at padding
    logps = average_logps(tok, batch.response_mask) if average else tok.sum(-1)
    return logps[:B], logps[B:]


def _shared_prompt_logits(model: Any, batch: Batch, B: int) -> Tensor:
    """``[2B, R, V]`` logits predicting the response tokens of a batch whose rows ``i`` and ``B + i``
    share a prompt, computing each prompt once.

    Causal: the prompts' forward returns their KV cache and the logits at the last prompt column
    (which predict every response's first token); the cache is repeated for the two halves and the
    responses run on top of it, with the full ``[2B, P + R]`` attention mask and the positions
    continuing from the prompt's. Seq2seq: the encoder runs once; its output is repeated.
    """
    two = torch.arange(B, device=batch.input_ids.device).repeat(2)  # [0..B-1, 0..B-1]
    if batch.is_seq2seq:
        enc = model.get_encoder()(input_ids=batch.input_ids[:B], attention_mask=batch.attention_mask[:B])
        out = model(
            encoder_outputs=(enc.last_hidden_state[two],),
            attention_mask=batch.attention_mask,
            decoder_input_ids=batch.decoder_input_ids,
            decoder_attention_mask=batch.decoder_attention_mask,
            use_cache=False,
        )
        return out.logits
    P = batch.prompt_width
    first = model(
        input_ids=batch.input_ids[:B, :P],
        attention_mask=batch.attention_mask[:B, :P],
        position_ids=batch.position_ids[:B, :P],
        use_cache=True,
        logits_to_keep=1,
    )
    if batch.response_ids.shape[1] == 1:
        return first.logits[two][:, -1:]
    cache = first.past_key_values
    cache.reorder_cache(two)  # index_select: differentiable, so the prompt gets both responses' gradients
    rest = model(
        input_ids=batch.input_ids[:, P:-1],  # the last response token predicts nothing we score
        attention_mask=batch.attention_mask[:, :-1],
        position_ids=batch.position_ids[:, P:-1],
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([first.logits[two][:, -1:], rest.logits], dim=1)


def _share(model: Any, cfg: DPOConfig) -> bool:
    # the shared prompt runs on a KV cache, which gradient checkpointing turns off
    return cfg.share_prompt and not cfg.gradient_checkpointing and supports_shared_prompt(model)


def supports_shared_prompt(model: Any) -> bool:
    """The fast path needs the bare (or PEFT-wrapped) model: DDP/FSDP wrappers expect one forward per
    backward, and the causal path needs ``logits_to_keep`` (recent transformers models have it)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or is_sharded(model):
        return False
    if getattr(model.config, "is_encoder_decoder", False):
        return hasattr(model, "get_encoder")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def reference_pair_logps(
    policy: Policy, data: PairData, idx: list[int], average: bool
) -> tuple[Tensor, Tensor]:
    """Like :func:`pair_logps` under the frozen reference (LoRA: adapter disabled; else a frozen copy)."""
    prompts = [data.prompt_ids[i] for i in idx]
    responses = [data.chosen_ids[i] for i in idx] + [data.rejected_ids[i] for i in idx]
    batch = policy.batch(prompts + prompts, responses)
    tok = policy.reference_logprobs(batch)
    logps = average_logps(tok, batch.response_mask) if average else tok.sum(-1)
    return logps[: len(idx)], logps[len(idx) :]


@torch.no_grad()
def precompute_reference(
    model: Any, policy: Policy, data: PairData, cfg: DPOConfig, desc: str
) -> tuple[Tensor, Tensor]:
    """``[N]`` reference log-probs of every chosen and rejected response, computed with ``model`` as it is
    *before training* (that is the reference). Each process does its share; a sum all-reduce joins them."""
    rank, world = _rank_world()
    n = len(data)
    chosen, rejected = torch.zeros(n), torch.zeros(n)
    mine = list(range(rank, n, world))
    starts = range(0, len(mine), cfg.eval_batch_size)
    model.eval()
    for s in progress(starts, total=len(starts), desc=desc, unit="batch"):
        idx = mine[s : s + cfg.eval_batch_size]
        c, r = pair_logps(model, policy, data, idx, cfg.averaged(), _share(model, cfg))
        chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    if world > 1:
        import torch.distributed as dist

        both = torch.stack([chosen, rejected]).to(policy.device)
        dist.all_reduce(both)
        chosen, rejected = both[0].cpu(), both[1].cpu()
    return chosen, rejected


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The pairs of optimizer step ``step``: a window of an endless stream of seeded permutations
    (epoch e uses ``randperm(n, seed + e)``), so the data position is a pure function of the step."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out += perm[offset : offset + batch_size - len(out)].tolist()
    return out


def learning_rate_at(step: int, total: int, cfg: DPOConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or linear decay to 0 at ``total``."""
    lr = cfg.learning_rate
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "linear":
        rest = max(1, total - cfg.warmup_steps)
        return lr * max(0.0, 1.0 - (step - cfg.warmup_steps) / rest)
    return lr


@torch.no_grad()
def evaluate_pairs(model: Any, policy: Policy, data: PairData, cfg: DPOConfig) -> dict[str, float]:
    """Held-out loss, accuracy (chosen implicit reward > rejected), mean margin and rewards."""
    rank, world = _rank_world()
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # weighted loss, weight, correct, margin, chosen, rejected
    mine = list(range(rank, len(data), world))
    per_process = math.ceil(len(data) / world)  # the most any process has
    for s in range(0, per_process, cfg.eval_batch_size):
        idx = mine[s : s + cfg.eval_batch_size]
        if not idx:  # FSDP2: every process takes part in every forward (a discarded one here)
            if is_sharded(model):
                pair_logps(model, policy, data, [0], cfg.averaged(), False)
            continue
        pc, pr = pair_logps(model, policy, data, idx, cfg.averaged(), _share(model, cfg))
        rc, rr = _reference_for(policy, data, idx, cfg)
        w = data.weights[idx]
        _, st = preference_loss(
            pc.float().cpu(), pr.float().cpu(), rc, rr, cfg.beta, cfg.loss_type, _smoothing(data, idx, cfg), w
        )
        sums += torch.tensor(
            [
                (w * st["losses"]).sum(),
                w.sum(),
                st["correct"].sum(),
                st["margin"].sum(),
                st["rewards_chosen"].sum(),
                st["rewards_rejected"].sum(),
            ],
            dtype=torch.float64,
        )
    sums = _all_reduce_sum(sums, policy.device)
    n = max(1, len(data))
    model.train()
    return {
        "heldout/loss": float(sums[0] / sums[1].clamp(min=1e-12)),
        "heldout/accuracy": float(sums[2] / n),
        "heldout/margin": float(sums[3] / n),
        "heldout/rewards_chosen": float(sums[4] / n),
        "heldout/rewards_rejected": float(sums[5] / n),
    }


def _reference_for(policy: Policy, data: PairData, idx: list[int], cfg: DPOConfig) -> tuple[Tensor, Tensor]:
    if data.ref_chosen is not None and data.ref_rejected is not None:
        return data.ref_chosen[idx], data.ref_rejected[idx]
    c, r = reference_pair_logps(policy, data, idx, cfg.averaged())
    return c.float().cpu(), r.float().cpu()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: Tensor, device: torch.device) -> Tensor:
    if _rank_world()[1] == 1:
        return t
    import torch.distributed as dist

    x = t.to(device)
    dist.all_reduce(x)
    return x.cpu()


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed (a kill -9 leaves the last good one)
# ----------------------------------------------------------------------------------------------


def save_checkpoint(folder: Path, step: int, model: Any, optimizer: Any, fingerprint: str, keep: int) -> Path:
    """``folder/checkpoints/step-<step>``: trainable weights, optimizer state, RNG states, step."""
    from safetensors.torch import save_file

    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")

    return write_step(folder / CHECKPOINTS, step, write, {"step": step, "fingerprint": fingerprint}, keep)


def save_snapshot(folder: Path, model: Any, tokenizer: Any, state_dict: dict | None = None) -> Path:
    """The policy as it is now, as an HF folder (LoRA: the adapter) that loads with ``from_pretrained``
    (``state_dict``: the whole weights of a sharded model)."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    remove_folder(folder)
    os.replace(tmp, folder)
    return folder


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest intact checkpoint; a damaged one is reported and the previous one used instead."""
    hit = newest_intact(folder / CHECKPOINTS, verify_folder, "dpo")
    return hit[0] if hit else None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, fingerprint: str) -> int:
    """Restore weights, optimizer and RNG from ``ckpt``; return the step to continue from."""
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        raise UserError(
            "the checkpoint was made with another config or other input files",
            str(ckpt),
            "run without --resume to start over, or pass another --out",
        )
    if is_sharded(model):  # FSDP2: this process's shard (save_sharded_step)
        load_sharded_step(ckpt, model, optimizer)
        return int(state["step"])
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise UserError("the checkpoint does not match this model", str(ckpt), "run without --resume")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return int(state["step"])


def _save_reference(path: Path, tensors: dict[str, Tensor], fingerprint: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": fingerprint}
    )
    os.replace(tmp, path)


def _load_reference(path: Path, fingerprint: str) -> dict[str, Tensor] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # noqa: BLE001 -- a damaged file: computed again (it is a pure function of the inputs)
        say(f"[dpo] warning: {path} is damaged ({e}); computing the reference log-probs again")
        return None


# ----------------------------------------------------------------------------------------------
# train_dpo: the whole algorithm, top to bottom
# ----------------------------------------------------------------------------------------------


def train_dpo(
    policy_id: str | Path,
    pairs_path: str | Path,
    out: str | Path,
    config: DPOConfig | None = None,
    resume: bool = False,
    heldout_path: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``policy_id`` on the preference pairs in ``pairs_path``; save it (HF folder) to ``out``.

    Returns the final metrics (also in ``out/metrics.json``); per-step metrics go to
    ``out/metrics.jsonl``. With ``resume`` a finished run is skipped and an interrupted one
    continues from its last checkpoint exactly (weights, optimizer, RNG, data position).
    """
    cfg = config or DPOConfig()
    out = Path(out)
    inputs: dict[str, str | Path] = {"policy": str(policy_id), "pairs": str(pairs_path)}
    if heldout_path is not None:
        inputs["heldout"] = str(heldout_path)
    if cfg.target_labellers:  # an unknown labeller: one error, no run folder
        check_target(pairs_path, cfg.target_labellers)
    run = start_stage(out, "dpo", config=cfg, inputs=inputs, seed=cfg.seed, resume=resume)
    if run.skipped:
        return run.metrics
    with stage_guard(run):
        return _train(run, policy_id, pairs_path, cfg, resume, heldout_path)


def _train(
    run: StageRun,
    policy_id: str | Path,
    pairs_path: str | Path,
    cfg: DPOConfig,
    resume: bool,
    heldout_path: str | Path | None,
) -> dict[str, Any]:
    out, fp = run.dir, run.manifest["fingerprint"]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 1. pairs -> train / held-out split (by prompt), weights checked; conversational pairs as text
    # through the chat template (prompt with the generation prompt; chosen/rejected its continuations)
    tok = use_chat_template(load_tokenizer(policy_id), cfg.chat_template)
    pairs = read(pairs_path, Pair, tokenizer=tok)
    if cfg.target_labellers:
        n_all, pairs = len(pairs), [p for p in pairs if is_target(p.labellers, cfg.target_labellers)]
        say(f"[dpo] target {', '.join(cfg.target_labellers)}: {len(pairs)} of {n_all} pairs are theirs")
    for i, p in enumerate(pairs, 1):
        if not 0 <= p.weight <= 1:
            raise UserError(
                f"pair {i} has a {'negative ' if p.weight < 0 else ''}weight {p.weight} outside [0, 1]",
                str(pairs_path),
                "weight is P(chosen is better): 1 sure, 0.5 a tie (docs/preference.md)",
            )
    pairs, ties = read_labels(pairs, cfg.labels)
    if not pairs:
        raise UserError(
            f'every pair is a tie (weight 0.5 / "tie": true): {ties} pairs, none says which side is better',
            str(pairs_path),
            "export without --soft-ties, or train with --set labels=soft",
        )
    if ties:
        say(f"[dpo] skipped {ties} tie pairs (weight 0.5); --set labels=soft trains on them as 50/50 labels")
    same = [p for p in pairs if p.chosen == p.rejected]
    if same:  # h is 0 whatever the policy: no gradient, only a diluted loss
        pairs = [p for p in pairs if p.chosen != p.rejected]
        if not pairs:
            raise UserError("every pair has identical chosen and rejected texts", str(pairs_path))
        say(f"[dpo] skipped {len(same)} pairs whose chosen and rejected texts are identical")
    if heldout_path is not None:
        held_pairs = read(heldout_path, Pair, tokenizer=tok)
        if cfg.target_labellers:  # measured on the target's held-out pairs too
            held_pairs = [p for p in held_pairs if is_target(p.labellers, cfg.target_labellers)]
        train_pairs, held_pairs = pairs, read_labels(held_pairs, cfg.labels)[0]
    else:
        train_pairs, held_pairs = split_heldout(pairs, cfg.heldout_fraction, cfg.seed)

    # 2. the policy (LoRA or full); its reference only when computed on the fly
    accelerator = make_accelerator(cfg.device)  # DDP, or FSDP2 under an FSDP config (alignloop.distributed)
    device = accelerator.device
    if cfg.batch_size < accelerator.num_processes:
        raise UserError(
            f"batch_size={cfg.batch_size} is smaller than the {accelerator.num_processes} processes",
            fix="raise --set batch_size (it counts pairs over all processes)",
        )
    on_the_fly = cfg.reference == "on_the_fly"
    policy = load_policy(policy_id, lora=cfg.lora, value_head=False, device=device, reference=on_the_fly)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy.model)
    use_chat_template(
        policy.tokenizer, cfg.chat_template
    )  # the saved policy carries the template it trained on
    train = tokenize_pairs(
        train_pairs, policy.tokenizer, policy.is_seq2seq, cfg, context_length(policy.model)
    )
    held = tokenize_pairs(held_pairs, policy.tokenizer, policy.is_seq2seq, cfg, context_length(policy.model))
    n_params = sum(p.numel() for p in policy.trainable_parameters())
    say(
        f"[dpo] {len(train)} training pairs, {len(held)} held out; {cfg.loss_type} loss, beta={cfg.beta}; "
        f"{'LoRA' if policy.is_lora else 'full fine-tuning'} ({n_params:,} trainable parameters)"
    )

    # 3. reference log-probs, once, before any update (the policy as loaded *is* the reference), saved
    #    beside the checkpoints so a resumed run uses the same ones
    if not on_the_fly:
        ref_path = out / REFERENCE_FILE
        saved = _load_reference(ref_path, fp) if resume else None
        if saved is None:  # (on --resume too: the model is not yet restored, so it is still the reference)
            saved = {}
            saved["train_chosen"], saved["train_rejected"] = precompute_reference(
                policy.model, policy, train, cfg, "dpo reference"
            )
            if len(held):
                saved["heldout_chosen"], saved["heldout_rejected"] = precompute_reference(
                    policy.model, policy, held, cfg, "dpo reference (held out)"
                )
            if accelerator.is_main_process:
                _save_reference(ref_path, saved, fp)
        train.ref_chosen, train.ref_rejected = saved["train_chosen"], saved["train_rejected"]
        held.ref_chosen, held.ref_rejected = saved.get("heldout_chosen"), saved.get("heldout_rejected")

    # 4. FSDP2: every process keeps 1/world of each weight (its gradient and optimizer state too); each
    #    process must then run the same number of forwards, so the batch splits evenly
    if fsdp2(accelerator):
        if cfg.batch_size % accelerator.num_processes:
            raise UserError(
                f"batch_size={cfg.batch_size} does not split over {accelerator.num_processes} FSDP processes",
                fix=f"use a multiple of {accelerator.num_processes}",
            )
        shard_model(policy.model)
    # 5. optimiser; a resumed run restores weights, optimizer, RNG and the step (= data position)
    params = policy.trainable_parameters()
    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
    start = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, policy.model, optimizer, fp)
        say(f"[dpo] resumed from {ckpt.name} (step {start} of {total})")
    elif not resume and accelerator.is_main_process:  # only the main process touches the run folder
        for old in (out / CHECKPOINTS, out / "snapshots"):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()  # no process reads checkpoints while the main one removes them
    if resume and accelerator.is_main_process:
        truncate_metrics_log(out, start)  # steps after the checkpoint are logged again
    model, optimizer = prepare(accelerator, policy.model, optimizer)
    rank, world = _rank_world()
    micro = cfg.micro_batch_size or cfg.batch_size
    share = _share(model, cfg)

    # 6. the loop: each step takes the next `batch_size` pairs of the seeded stream; each process
    #    its share; weights normalised by the GLOBAL batch weight so averaged gradients = 1 process
    model.train()
    last: dict[str, Any] = {}
    state_bytes: int | None = None
    for step in progress(range(start, total), total=total - start, desc="dpo", unit="step"):
        t0 = time.perf_counter()
        lr = learning_rate_at(step, total, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = batch_indices(step, len(train), cfg.batch_size, cfg.seed)
        global_weight = float(train.weights[idx].sum()) / world  # DDP averages over processes
        mine = idx[rank::world]
        sums = torch.zeros(7, dtype=torch.float64)
        chunks = [mine[s : s + micro] for s in range(0, len(mine), micro)]
        for k, part in enumerate(chunks):
            sync = contextlib.nullcontext() if k == len(chunks) - 1 else accelerator.no_sync(model)
            with sync:  # gradients are all-reduced once, on the last micro-batch
                pc, pr = pair_logps(model, policy, train, part, cfg.averaged(), share)
                rc, rr = _reference_for(policy, train, part, cfg)
                w = train.weights[part].to(pc.device)
                eps = _smoothing(train, part, cfg)
                eps = eps.to(pc.device) if isinstance(eps, Tensor) else eps
                loss, st = preference_loss(
                    pc, pr, rc.to(pc.device), rr.to(pc.device), cfg.beta, cfg.loss_type, eps,
                    w, total_weight=max(global_weight, 1e-12),
                )  # fmt: skip
                nll = torch.zeros((), device=pc.device)
                if cfg.nll_coef > 0:
                    lengths = torch.tensor([len(train.chosen_ids[i]) for i in part], device=pc.device)
                    # pc is already a mean when the log-probs are averaged (ipo)
                    nll = weighted_mean(
                        -pc if cfg.averaged() else chosen_nll(pc, lengths), w, max(global_weight, 1e-12)
                    )
                    loss = loss + cfg.nll_coef * nll
                accelerator.backward(loss)
            sums += torch.tensor(
                [
                    float(loss.detach()),
                    st["correct"].sum(),
                    st["margin"].sum(),
                    st["rewards_chosen"].sum(),
                    st["rewards_rejected"].sum(),
                    len(part),
                    float(nll.detach()),
                ],
                dtype=torch.float64,
            )
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        if step == start:  # this process's share of the training state (FSDP2: about 1/world of it)
            state_bytes = model_state_bytes(model, optimizer)["total"]
        optimizer.zero_grad(set_to_none=True)
        sums = _all_reduce_sum(sums, policy.device)
        n = max(1.0, float(sums[5]))
        last = {
            "loss": float(sums[0]) / world,
            "rewards/chosen": float(sums[3]) / n,
            "rewards/rejected": float(sums[4]) / n,
            "rewards/margin": float(sums[2]) / n,
            "rewards/accuracy": float(sums[1]) / n,
            "lr": lr,
            "pairs_per_second": len(idx) / (time.perf_counter() - t0),
        }
        if cfg.nll_coef > 0:
            last["nll_chosen"] = float(sums[6]) / world
        if grad_norm is not None:
            last["grad_norm"] = grad_norm
        done = step + 1
        if len(held) and (done % cfg.eval_every == 0 or done == total):
            last.update(evaluate_pairs(model, policy, held, cfg))
        run.log(done, **last)
        if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < total:
            whole = full_state_dict(model) if is_sharded(model) else None  # every process gathers
            if accelerator.is_main_process:
                folder = out / "snapshots" / f"step-{done:08d}"
                save_snapshot(folder, accelerator.unwrap_model(model), policy.tokenizer, whole)
        if done % cfg.checkpoint_every == 0 and done < total:
            if is_sharded(model):  # every process writes its shard
                info = {"step": done, "fingerprint": fp}
                save_sharded_step(out / CHECKPOINTS, done, model, optimizer, info, cfg.keep_checkpoints)
            elif accelerator.is_main_process:
                save_checkpoint(
                    out, done, accelerator.unwrap_model(model), optimizer, fp, cfg.keep_checkpoints
                )
            accelerator.wait_for_everyone()

    # 7. the trained policy as an HF folder (LoRA: the adapter), then the final metrics
    accelerator.wait_for_everyone()
    final = {k: v for k, v in last.items() if k not in ("lr", "pairs_per_second")}
    final.update({"steps": total, "train_pairs": len(train), "heldout_pairs": len(held), "processes": world})
    if state_bytes is not None:  # parameters + gradients + optimizer state held by the main process
        final["model_state_bytes"] = state_bytes
    if len(held) and "heldout/accuracy" not in final:  # resumed at the very end
        final.update(evaluate_pairs(model, policy, held, cfg))
    whole = full_state_dict(model) if is_sharded(model) else None  # every process gathers
    if accelerator.is_main_process:
        policy.model = accelerator.unwrap_model(model)
        policy.save(out, state_dict=whole)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        say(
            f"[dpo] saved {out}: train accuracy {final.get('rewards/accuracy', 0):.2f}"
            + (f", held-out accuracy {final['heldout/accuracy']:.2f}" if "heldout/accuracy" in final else "")
        )
    return run.finish(final)
