"""Train a reward model from preference pairs: ``alignloop reward train``.

The algorithm, top to bottom (:func:`train_reward_model`):

1. read the pairs (TRL or grouped), group them by prompt, hold out whole prompts;
2. load ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a scalar head on the
   last token for causal models, on the pooled/first token for encoders), LoRA or full;
3. tokenize every distinct ``prompt + completion`` once;
4. each step takes a few prompt groups, forwards each completion ONCE and computes the loss
   of all the groups' pairs from those rewards (InstructGPT's grouped batching); under
   ``accelerate launch`` / torchrun each process takes its share of the step's groups and the
   loss is scaled so that the averaged gradients equal one process's (see alignloop.distributed);
5. held-out accuracy every epoch, keep the best epoch, stop after ``patience`` epochs
   without improvement; an atomic, SHA-256-verified checkpoint every ``checkpoint_every`` steps
   and at the end of every epoch (``--resume`` continues from the newest intact one, exactly);
6. shift (and optionally scale) the head so the reference completions' mean reward is 0, in the
   weights (the head's bias, or the final LayerNorm's for a bias-free head), so plain HF tools agree;
7. save an HF folder (``config.json``, ``model.safetensors``, tokenizer) with the run's
   ``manifest.json``/``metrics.json``/``metrics.jsonl``: ``load_reward(out)`` reads it.

Labeller-conditioned (``per_labeller=true``, issue 28): the head has ``1 + L`` outputs over the
shared trunk, output 0 the pooled reward (every pair) and output ``1 + l`` labeller ``l``'s
(only the pairs that labeller made; pairs name their labeller when exported with
``--consensus none``). ``id2label`` holds ``["reward", *labellers]``; each output's mean shift
is stored as ``alignloop_reward.offsets`` (step 6 cannot fold several into one bias).
``load_reward("DIR")`` scores with the pooled output, ``load_reward("DIR:NAME")`` as NAME.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from alignloop.chat import use_chat_template
from alignloop.checkpoints import newest_intact, remove_folder, verify_folder, write_folder, write_step
from alignloop.config import Config
from alignloop.distributed import (
    all_reduce_sum,
    barrier,
    fsdp2,
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_full_state,
    make_accelerator,
    model_state_bytes,
    prepare,
    rank_world,
    shard,
    shard_model,
    trainable_state,
)
from alignloop.errors import UserError
from alignloop.evaluation.metrics import gold_agreement, pearson, within_slope, word_length
from alignloop.models import (
    LoraSettings,
    configure_threads,
    default_dtype,
    disable_dropout,
    enable_gradient_checkpointing,
    fuse_activations,
    load_tokenizer,
    lora_target_modules,
    make_optimizer,
    resolve_model_id,
    sorted_adapter_config,
)
from alignloop.records import full_text
from alignloop.reward.data import Group, read_pairs, split_groups
from alignloop.reward.functions import encode_texts, model_max_length, pad_right
from alignloop.reward.losses import grouped_pairwise_loss, pair_accuracy, pick, shrink_penalty
from alignloop.runs import progress, say, stage_guard, start_stage, write_json_atomic


class RewardTrainConfig(Config):
    """``alignloop reward train`` settings (``--set key=value``)."""

    model: str = "world:base"
    # Defaults fit the default model (world:base, ~0.7M parameters). For 100M+ models use
    # learning_rate ~1e-5 (full) or ~1e-4 (LoRA) and fewer epochs.
    epochs: int = 8
    # 1.5e-3: on the world base (retrained 6f4e80c) eval-split agreement with gold was 0.874 / 0.892 /
    # 0.916 / 0.911 at 5e-4 / 1e-3 / 1.5e-3 / 2e-3, and 2.5e-3 and up diverged (consensus: 0.939)
    learning_rate: float = 1.5e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    batch_prompts: int = 8  # prompt groups per step over all processes (each brings all its pairs)
    max_length: int = 512  # tokens of prompt + completion; the prompt is cut from the left
    eval_fraction: float = 0.1  # share of prompts held out (when no --eval-pairs)
    patience: int = 2  # epochs without a better held-out accuracy before stopping; 0 = never
    labels: Literal["soft", "hard"] = (
        "hard"  # hard: every pair sure, ties dropped; soft: "weight" = P(chosen better)
    )
    use_margin: bool = True  # subtract a pair's "margin" inside the sigmoid when it has one
    # P(chosen better) a pair whose rejected was marked F trains with (export's "failed": true): below 1
    # the loss of these easy pairs stops pushing once r_chosen - r_F exceeds logit(failed_label)
    failed_label: float = Field(1.0, gt=0.5, le=1.0)
    normalize: Literal["none", "mean", "mean_std"] = "mean"  # reference completions -> mean 0 (std 1)
    # length correction: fit the reward's within-prompt slope per completion word on the training
    # completions and subtract it whenever the model scores (stored as config alignloop_reward.length_slope)
    length_correction: bool = False
    # the share of the fitted slope subtracted (1: all of it); below 1 a partial correction, since the
    # labels' preference for longer answers is partly right (docs/reward.md, "Length correction")
    length_correction_strength: float = Field(1.0, gt=0, le=1)
    # one reward head per labeller beside the pooled one, over the shared trunk (pairs naming one labeller
    # each: feedback export --consensus none); score as a labeller with the SPEC DIR:NAME
    per_labeller: bool = False
    # per_labeller: + labeller_shrink x mean (r_labeller - r_pooled)^2 over the batch's completions
    # (losses.shrink_penalty): each labeller's output is pulled toward the pooled one. 0 (off): 0.01
    # and 0.1 were measured and neither holds every cell (docs/labelling.md, "One labeller's taste")
    labeller_shrink: float = Field(0.0, ge=0)
    # per_labeller: the held-out accuracy that picks the best epoch and stops early (select_score):
    # all = every pair entry of every output (a labeller's pair counts for the pooled output and theirs);
    # pooled = the pooled output on every pair; labellers = the mean over labellers of their own
    # output's accuracy on their own pairs
    labeller_select: Literal["all", "pooled", "labellers"] = "all"
    lora: LoraSettings | None = None
    max_grad_norm: float = 1.0
    disable_dropout: bool = True
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory
    skip_bad: bool = False  # count and skip malformed pair lines instead of stopping
    # Jinja chat template file for conversational pairs (default: the model tokenizer's; alignloop.chat)
    chat_template: str | None = None
    # training state for --resume every N steps inside an epoch (0: only at the end of each epoch,
    # where one is always written); the older of the kept ones is the fallback if the newest is damaged
    checkpoint_every: int = Field(100, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    device: str | None = None


# ----------------------------------------------------------------------------- batches


def labeller_heads(groups: Sequence[Group]) -> dict[str, int]:
    """``{labeller: output index}`` of a labeller-conditioned model: ``1 + position`` in name order
    (output 0 is the pooled reward), over the labellers the pairs of ``groups`` name."""
    names = sorted({p.labeller for g in groups for p in g.pairs if p.labeller is not None})
    return {name: 1 + i for i, name in enumerate(names)}


def encode_groups(
    groups: Sequence[Group],
    model: nn.Module,
    tokenizer: Any,
    max_length: int,
    use_margin: bool = True,
    heads: dict[str, int] | None = None,
    failed_label: float = 1.0,
) -> list[dict]:
    """Tokenize each distinct ``prompt + completion`` once; pairs become index lists.

    Returns one dict per group: ``ids`` (list of token lists, one per completion), ``chosen``,
    ``rejected`` (indices into ``ids``), ``label``, ``margin`` (floats) and ``head`` (the output
    that scores it), one per pair entry. With ``heads`` (a labeller-conditioned model) a pair made by
    a labeller in ``heads`` is entered twice: for the pooled output 0 and for that labeller's. A pair
    whose rejected was marked F gets the label ``min(label, failed_label)``.
    """
    texts = [full_text(g.prompt, c) for g in groups for c in g.completions]
    ids = encode_texts(model, tokenizer, texts, max_length)
    out, k = [], 0
    for g in groups:
        n = len(g.completions)
        entries = [(p, 0) for p in g.pairs]
        if heads:
            entries += [(p, heads[p.labeller]) for p in g.pairs if p.labeller in heads]
        out.append(
            {
                "ids": ids[k : k + n],
                "chosen": [p.chosen for p, _ in entries],
                "rejected": [p.rejected for p, _ in entries],
                "label": [min(p.label, failed_label) if p.failed else p.label for p, _ in entries],
                "margin": [p.margin if use_margin else 0.0 for p, _ in entries],
                "head": [h for _, h in entries],
            }
        )
        k += n
    return out


def collate_groups(groups: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Flatten groups into one right-padded batch of distinct completions plus pair indices.

    Returns ``input_ids``/``attention_mask`` ``(N, T)`` for the ``N`` completions of all the
    groups, and ``chosen_index``/``rejected_index``/``label``/``margin``/``head`` ``(P,)`` over their
    pair entries.
    """
    seqs, chosen, rejected, label, margin, head = [], [], [], [], [], []
    for g in groups:
        base = len(seqs)
        seqs.extend(g["ids"])
        chosen.extend(base + i for i in g["chosen"])
        rejected.extend(base + i for i in g["rejected"])
        label.extend(g["label"])
        margin.extend(g["margin"])
        head.extend(g.get("head") or [0] * len(g["chosen"]))
    input_ids, attention_mask = pad_right(seqs, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "chosen_index": torch.tensor(chosen, dtype=torch.long),
        "rejected_index": torch.tensor(rejected, dtype=torch.long),
        "label": torch.tensor(label, dtype=torch.float32),
        "margin": torch.tensor(margin, dtype=torch.float32),
        "head": torch.tensor(head, dtype=torch.long),
    }


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(N, T)`` right-padded tokens -> ``(N,)`` scalar rewards (the head's single output), or
    ``(N, H)`` for a labeller-conditioned model (``H = 1 + L`` outputs, 0 the pooled reward)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return logits[:, 0] if logits.shape[1] == 1 else logits


@torch.no_grad()
def evaluate_groups(
    model: nn.Module, encoded: Sequence[dict], pad_id: int, batch_prompts: int = 16
) -> dict[str, float]:
    """Held-out ``loss`` and ``accuracy`` (pairs whose label the rewards order right).

    With several processes each scores its share of the groups and the sums are all-reduced:
    every process returns the numbers of the whole set.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64)  # loss x pairs, pairs, right, counted (non-tie) pairs
    mine = shard(list(encoded))
    per_process = -(-len(encoded) // rank_world()[1])  # the most any process has
    for i in range(0, per_process, batch_prompts):
        if not mine[i : i + batch_prompts]:  # FSDP2: every process joins every forward (a discarded one)
            if is_sharded(model):
                b = collate_groups(list(encoded)[:1], pad_id)
                sequence_rewards(model, b["input_ids"].to(device), b["attention_mask"].to(device))
            continue
        b = collate_groups(mine[i : i + batch_prompts], pad_id)
        r = sequence_rewards(model, b["input_ids"].to(device), b["attention_mask"].to(device)).cpu()
        sums += _pair_sums(r, b)
    model.train(was_training)
    sums = all_reduce_sum(sums)
    if sums[1] == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "pairs": 0}
    accuracy = float(sums[2] / sums[3]) if sums[3] > 0 else float("nan")
    return {"loss": float(sums[0] / sums[1]), "accuracy": accuracy, "pairs": int(sums[3])}


def _pair_sums(rewards: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[sum of pair losses, pairs, right pairs, non-tie pairs]`` of one batch (float64, no grad)."""
    n = len(batch["label"])
    if n == 0:
        return torch.zeros(4, dtype=torch.float64)
    head = batch.get("head")
    mean = grouped_pairwise_loss(
        rewards.detach(),
        batch["chosen_index"],
        batch["rejected_index"],
        batch["label"],
        batch["margin"],
        head,
    )
    acc, counted = pair_accuracy(
        pick(rewards, batch["chosen_index"], head).detach(),
        pick(rewards, batch["rejected_index"], head).detach(),
        batch["label"],
    )
    right = acc * counted if counted else 0.0
    return torch.tensor([float(mean) * n, n, right, counted], dtype=torch.float64)


@torch.no_grad()
def completion_rewards(
    model: nn.Module, encoded: Sequence[dict], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """Rewards of every distinct completion in ``encoded`` (for normalisation), shape ``(N,)``
    (``(N, H)`` for a labeller-conditioned model)."""
    seqs = [s for g in encoded for s in g["ids"]]
    device = next(model.parameters()).device
    out = []
    model.eval()
    for i in range(0, len(seqs), batch_size):
        b = collate_groups(
            [{"ids": seqs[i : i + batch_size], "chosen": [], "rejected": [], "label": [], "margin": []}],
            pad_id,
        )
        out.append(sequence_rewards(model, b["input_ids"].to(device), b["attention_mask"].to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def reference_stats(
    model: nn.Module, encoded: Sequence[dict], pad_id: int
) -> tuple[float, float, list[float]]:
    """The pooled output's mean and (sample) standard deviation over every completion in ``encoded``,
    and each output's mean (``[H]``; ``[]`` for a one-output model), from one scoring pass.

    Each process scores its share; ``n``, ``sum r``, ``sum r^2`` (pooled) and the per-output sums
    ``S_h`` are all-reduced, then ``mean = S1 / n``, ``std = sqrt((S2 - n * mean^2) / (n - 1))``
    (1.0 for a single completion) and ``mean_h = S_h / n``.
    """
    r = completion_rewards(model, shard(list(encoded)), pad_id).double()
    per_head = r if r.dim() == 2 else r.new_zeros(len(r), 0)
    pooled = r[:, 0] if r.dim() == 2 else r  # a labeller-conditioned model: output 0 is the pooled one
    n, s1, s2, *sums = all_reduce_sum(
        torch.cat(
            [
                torch.tensor([float(len(r)), pooled.sum(), (pooled * pooled).sum()], dtype=torch.float64),
                per_head.sum(0),
            ]
        )
    ).tolist()
    mean = s1 / max(n, 1.0)
    std = ((s2 - n * mean * mean) / (n - 1)) ** 0.5 if n > 1 and s2 > n * mean * mean else 1.0
    return mean, std, [x / max(n, 1.0) for x in sums]


def epoch_batches(n_groups: int, batch_prompts: int, epoch: int, seed: int) -> list[list[int]]:
    """The global batches (group indices) of one epoch: a permutation seeded by ``(seed, epoch)``, cut in
    slices of ``batch_prompts`` (on one process the order a shuffling DataLoader seeded the same way gives).
    A pure function of its arguments: the same on every process, after a
    resume and for any number of processes."""
    g = torch.Generator().manual_seed(seed + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the draw a DataLoader makes for worker seeds
    perm = torch.randperm(n_groups, generator=g).tolist()
    return [perm[i : i + batch_prompts] for i in range(0, n_groups, batch_prompts)]


# ----------------------------------------------------------------------------- the model


def load_reward_model(
    model_id: str,
    lora: LoraSettings | None,
    device: torch.device,
    no_dropout: bool,
    labels: Sequence[str] = ("reward",),
) -> tuple[Any, Any]:
    """``AutoModelForSequenceClassification(num_labels=len(labels))`` + tokenizer; LoRA wraps it when asked.

    A causal LM or a classifier with other labels gets a fresh head, one output per label
    (``("reward",)``: a scalar reward; ``("reward", *labellers)``: labeller-conditioned).
    """
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_id(model_id)
    tok = load_tokenizer(path)  # a clear UserError for a bad id
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), ignore_mismatched_sizes=True, dtype=default_dtype(device)
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load model {model_id!r} as a reward model ({str(e).strip().splitlines()[0][:200]})",
            fix="pass a local HF model folder or a downloaded hub id",
        ) from None
    model.config.pad_token_id = tok.pad_token_id
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    fuse_activations(model)
    if no_dropout:
        disable_dropout(model)
    if lora is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=0.0 if no_dropout else lora.dropout,
            target_modules=lora.target_modules or lora_target_modules(model),
            task_type=TaskType.SEQ_CLS,  # keeps the new head fully trainable (modules_to_save)
            fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
        )
        model = sorted_adapter_config(get_peft_model(model, cfg))
    return model.to(device), tok


def head_linear(model: nn.Module) -> nn.Linear:
    """The layer that writes the scalar reward: the last ``nn.Linear`` with one output."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    if not found:
        raise RuntimeError(f"no one-output linear head in {type(model).__name__}")
    return found[-1]


@torch.no_grad()
def normalize_head(
    model: nn.Module, mean: float, std: float, scale: bool, probe: Sequence[Sequence[int]] = ()
) -> float:
    """Make ``r' = (r - mean) / s`` (``s = std`` when ``scale``, else 1) by editing the weights, so that
    ``from_pretrained`` alone gives the normalised reward (plain transformers, ``pipeline``).

    ``r = w.h + b`` becomes ``w' = w / s`` and ``b' = (b - mean) / s``. A head without a bias (GPT-2's
    and Llama's ``score``) takes the shift ``c = -mean / s`` from the final norm before it instead
    (:func:`shift_final_norm`). Only when neither holds it (an RMSNorm without a bias) is ``c`` returned,
    as an *offset* for the model's config that ``load_reward`` adds; otherwise 0 is returned.
    ``probe``: token lists used to check the shift on the real model.
    """
    s = std if scale and std > 1e-8 else 1.0
    head = head_linear(model)
    head.weight.div_(s)
    if head.bias is not None:
        head.bias.sub_(mean).div_(s)
        return 0.0
    shift = -mean / s
    if shift == 0.0 or shift_final_norm(model, head, shift, probe):
        return 0.0
    return shift


@torch.no_grad()
def shift_final_norm(model: nn.Module, head: nn.Linear, shift: float, probe: Sequence[Sequence[int]]) -> bool:
    """Add ``shift`` to a bias-free one-output head's score through the LayerNorm that feeds it.

    The head reads ``h = LN(x) + beta`` (hidden size ``H``), so ``w . h`` gains ``w . delta`` when
    ``beta`` becomes ``beta + delta``; ``delta = shift * w / (w . w)`` (shape ``(H,)``) gives exactly
    ``shift``. The norm is the last ``nn.LayerNorm`` of width ``H`` with a bias; the rewards of
    ``probe`` before and after must differ by ``shift`` (else it is undone and False returned).
    """
    w = head.weight[0].double()
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.LayerNorm) and m.bias is not None and tuple(m.normalized_shape) == (w.numel(),)
    ]
    if not norms or not probe or float(w @ w) == 0.0:
        return False
    norm = norms[-1]
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_right([list(p) for p in probe], int(model.config.pad_token_id or 0))
    batch = (input_ids.to(device), attention_mask.to(device))
    before = sequence_rewards(model, *batch)
    delta = (shift * w / (w @ w)).to(norm.bias.dtype)
    norm.bias.add_(delta)
    after = sequence_rewards(model, *batch)
    if torch.allclose(after - before, torch.full_like(before, shift), atol=1e-4 * max(1.0, abs(shift))):
        return True
    norm.bias.sub_(delta)  # the head does not read this norm's output as it is
    return False


# ----------------------------------------------------------------------------- checkpoints
#
# checkpoints/step-N/     trainable.safetensors, optimizer.pt (AdamW, schedule, RNG), state.json
#                         (loop state, fingerprint, the best epoch's folder, size + SHA-256 of each file)
# checkpoints/best-E/     trainable.safetensors of epoch E (0-based), the best so far; state.json
# checkpoints/latest.json the newest checkpoint's loop state (for people and tools; resume scans step-*)
#
# Every folder is written to a hidden temporary folder, fsynced and renamed into place: a kill -9 at
# any moment leaves whole folders only.

CHECKPOINTS = "checkpoints"


def _save_weights(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "trainable.safetensors")


def _best_name(epoch: int) -> str:
    """The folder of the best epoch's weights (every process knows the name; the main one writes it)."""
    return f"best-{epoch}"


def _save_best(root: Path, epoch: int, weights: dict[str, torch.Tensor]) -> None:
    """``root/best-<epoch>``: the weights of the best epoch so far."""
    write_folder(root / _best_name(epoch), lambda d: _save_weights(d, weights), {"epoch": epoch})


def _save_checkpoint(
    root: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """``root/step-<step>``: trainable weights, AdamW, schedule, RNG and loop ``state`` (which names its
    best-epoch folder in ``state["best"]``). Keeps the newest ``keep`` checkpoints and the best-epoch
    folders they name; then points ``latest.json`` at it. Main process only."""

    def write(d: Path) -> None:
        _save_weights(d, weights)
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            d / "optimizer.pt",
        )

    final = write_step(root, state["step"], write, state, keep)
    named = {state.get("best")}
    for c in root.glob("step-*"):
        try:
            named.add(json.loads((c / "state.json").read_text()).get("best"))
        except (OSError, json.JSONDecodeError):
            pass  # damaged: never resumed from, so it holds nothing back
    for old in root.glob("best-*"):
        if old.name not in named:
            remove_folder(old)
    write_json_atomic(root / "latest.json", {**state, "dir": final.name})
    return final


def latest_checkpoint(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint in ``root`` and its ``state.json`` (None when there is none at all).

    A damaged one (a file truncated or altered, or its best-epoch weights damaged) is reported and
    the previous one used; when every checkpoint is damaged: a :class:`UserError`.
    """

    def check(ckpt: Path) -> dict[str, Any]:
        info = verify_folder(ckpt)
        if info.get("best"):
            try:
                verify_folder(root / info["best"])
            except ValueError as e:
                raise ValueError(f"its best epoch's weights {info['best']}: {e}") from None
        return info

    return newest_intact(root, check, "reward")


def _load_checkpoint(ckpt: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Restore the trainable weights, AdamW, schedule and RNG from a verified checkpoint."""
    saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
    if is_sharded(model):  # FSDP2: whole tensors in the file, each process keeps its shard
        from safetensors.torch import load_file

        load_full_state(model, optimizer, load_file(ckpt / "trainable.safetensors"), saved["optimizer"])
    else:
        _load_trainable(model, ckpt / "trainable.safetensors", ckpt)
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])


def _truncate_log(out: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` rows after ``step`` (and a line torn by a kill)."""
    log = out / "metrics.jsonl"
    if not log.is_file():
        return
    keep = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    tmp = log.with_name(f".{log.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log)


def _load_trainable(model: nn.Module, path: Path, where: Path | None = None) -> None:
    from safetensors.torch import load_file

    saved = load_file(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise UserError(
            "the checkpoint does not match this model (different model or LoRA settings)",
            str(where or path.parent),
            "resume with the same --model, --lora and config, or use a new --out folder",
        )
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)


# ----------------------------------------------------------------------------- training


def train_reward_model(
    pairs: str | Path | Sequence[str | Path],
    out: str | Path,
    config: RewardTrainConfig | None = None,
    *,
    eval_pairs: str | Path | None = None,
    reference: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a scalar reward model on preference pairs and save it as an HF folder in ``out``.

    Args:
        pairs: TRL-format or grouped pair file(s).
        out: output folder (the model + ``manifest.json``/``metrics.json``/``metrics.jsonl``).
        config: :class:`RewardTrainConfig`.
        eval_pairs: held-out pairs file; default: ``eval_fraction`` of the prompts.
        reference: completions whose mean reward becomes 0 (pairs, completion sets or
            ``{"prompt", "completion"}`` lines); default: every training completion.
        resume: continue from the last epoch checkpoint, or skip if finished with the same inputs.

    Returns:
        The final metrics (also in ``out/metrics.json``).
    """
    cfg = config or RewardTrainConfig()
    _check_dependent_options(cfg)  # before the run folder: nothing written
    out = Path(out)
    pair_files = [pairs] if isinstance(pairs, (str, Path)) else list(pairs)
    inputs: dict[str, Any] = {f"pairs{i or ''}": p for i, p in enumerate(pair_files)}
    inputs["model"] = resolve_model_id(cfg.model)
    if eval_pairs:
        inputs["eval_pairs"] = eval_pairs
    if reference:
        inputs["reference"] = reference
    run = start_stage(out, "reward", config=cfg, inputs=inputs, seed=cfg.seed, resume=resume)
    if run.skipped:
        return run.metrics
    with stage_guard(run):
        return _train(run, cfg, pair_files, out, eval_pairs, reference, resume)


def _train(
    run: Any,
    cfg: RewardTrainConfig,
    pair_files: list,
    out: Path,
    eval_pairs: Any,
    reference: Any,
    resume: bool,
) -> dict[str, Any]:
    from transformers import get_scheduler

    configure_threads()
    # the checkpoint to resume from, verified before anything slow; every process reads the main
    # process's checkpoints (a shared folder when on several machines)
    ckpt = out / CHECKPOINTS
    fingerprint = run.manifest["fingerprint"]
    found = latest_checkpoint(ckpt) if resume else None
    if found is not None and found[1].get("fingerprint") != fingerprint:
        raise UserError(
            "the checkpoint was made with another config or other input files",
            str(found[0]),
            "resume with the same arguments and config, or run without --resume to start over",
        )
    torch.manual_seed(cfg.seed)
    hard = cfg.labels == "hard"
    # 1. pairs, grouped by prompt; whole prompts held out; conversations as text (the chat template)
    chat_tok = use_chat_template(load_tokenizer(cfg.model), cfg.chat_template)
    data = read_pairs(pair_files, skip_bad=cfg.skip_bad, hard_labels=hard, tokenizer=chat_tok)
    if eval_pairs:
        train_groups, eval_groups = (
            data.groups,
            read_pairs(eval_pairs, skip_bad=cfg.skip_bad, hard_labels=hard, tokenizer=chat_tok).groups,
        )
    else:
        train_groups, eval_groups = split_groups(data.groups, cfg.eval_fraction, cfg.seed)
    heads = labeller_heads(train_groups) if cfg.per_labeller else {}
    if cfg.per_labeller:
        _check_per_labeller(cfg, heads, pair_files)
        say(f"[reward] per-labeller heads beside the pooled one: {', '.join(heads)}")
    skipped = dict(data.skipped)
    if skipped:
        say(f"[reward] skipped pair lines: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))}")
    n_train_pairs = sum(len(g.pairs) for g in train_groups)
    say(
        f"[reward] {n_train_pairs} training pairs over {len(train_groups)} prompts "
        f"({sum(len(g.completions) for g in train_groups)} distinct completions); "
        f"{sum(len(g.pairs) for g in eval_groups)} held-out pairs over {len(eval_groups)} prompts"
    )

    # 2. model (+ LoRA), 3. tokens
    accelerator = make_accelerator(cfg.device)
    rank, world = rank_world()
    labels = ("reward", *heads)  # output 0 the pooled reward, then one per labeller (per_labeller)
    model, tok = load_reward_model(cfg.model, cfg.lora, accelerator.device, cfg.disable_dropout, labels)
    use_chat_template(tok, cfg.chat_template)  # the saved reward model carries the template it read
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if fsdp2(accelerator):  # each process keeps 1/world of every weight, gradient and AdamW moment
        shard_model(model)
    pad_id = tok.pad_token_id
    max_length = min(cfg.max_length, model_max_length(model, tok))  # never past the position table
    train_enc = encode_groups(train_groups, model, tok, max_length, cfg.use_margin, heads, cfg.failed_label)
    eval_enc = encode_groups(eval_groups, model, tok, max_length, cfg.use_margin, heads, cfg.failed_label)
    if world > 1:
        say(
            f"[reward] {world} processes: {cfg.batch_prompts} prompts a step, about {cfg.batch_prompts // world} each"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(len(train_enc), cfg.batch_prompts, 0, cfg.seed))
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )  # not passed to accelerate.prepare: it would tick once per process; our steps are global
    model, optimizer = prepare(accelerator, model, optimizer)
    state_bytes: list[int] = []

    # resume from the newest intact checkpoint of this very run (same config and inputs), found above
    state: dict[str, Any] = {
        "step": 0,  # optimizer steps done (the data position: epochs have steps_per_epoch steps)
        "epoch": -1,  # the last finished epoch (0-based; its held-out evaluation done)
        "best_epoch": -1,
        "best_accuracy": -1.0,
        "bad_epochs": 0,
        "best": None,  # the folder holding the best epoch's weights
        "train_seconds": 0.0,
        "pairs_seen": 0,
        "epoch_seconds": 0.0,  # of the epoch under way
        "epoch_pairs": 0,
    }
    if found is not None:
        folder, saved = found
        state.update({k: saved[k] for k in state})
        _load_checkpoint(folder, accelerator.unwrap_model(model), optimizer, scheduler)
        say(
            f"[reward] resuming at step {state['step']} of {total_steps} from {folder}"
            f" (epoch {state['step'] // steps_per_epoch + 1}; best held-out accuracy so far"
            f" {state['best_accuracy']:.3f})"
        )
    barrier()  # every process has read the checkpoint before the main process changes the folder
    if accelerator.is_main_process:
        if resume:
            _truncate_log(out, state["step"])  # rows logged after the checkpoint are logged again
        else:
            shutil.rmtree(ckpt, ignore_errors=True)

    def checkpoint(epoch_done: bool) -> None:
        """Best-epoch weights (at the end of an improving epoch) and a checkpoint; every process calls it."""
        weights = trainable_state(accelerator, model)  # every process: gathers sharded weights
        # FSDP2: the whole AdamW state too (every process), so the checkpoint holds whole tensors
        opt_state = full_optimizer_state(model, optimizer) if is_sharded(model) else optimizer.state_dict()
        new_best = epoch_done and state["best_epoch"] == state["epoch"]
        if new_best:  # on every process: each loads the best weights at the end
            state["best"] = _best_name(state["epoch"])
        if accelerator.is_main_process:
            if new_best:
                _save_best(ckpt, state["epoch"], weights)
            _save_checkpoint(
                ckpt,
                weights,
                opt_state,
                scheduler,
                {**state, "fingerprint": fingerprint},
                cfg.keep_checkpoints,
            )
        barrier()

    # 4.-5. epochs of grouped batches, held-out accuracy, early stop, checkpoints
    stopped_early = False
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        if cfg.patience and state["bad_epochs"] >= cfg.patience:
            stopped_early = True
            break
        model.train()
        done = state["step"] - epoch * steps_per_epoch  # > 0: resumed inside this epoch
        if done == 0:
            state.update(epoch_seconds=0.0, epoch_pairs=0)
        batches = epoch_batches(len(train_enc), cfg.batch_prompts, epoch, cfg.seed)
        t0 = time.perf_counter()
        for batch_idx in progress(
            batches[done:],
            total=len(batches) - done,
            desc=f"reward epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
        ):
            global_pairs = sum(len(train_enc[i]["chosen"]) for i in batch_idx)
            mine = shard(batch_idx, rank, world)
            # a process without a group in a short last batch still joins the gradient all-reduce
            scale = 1.0 if mine else 0.0
            batch = collate_groups([train_enc[i] for i in (mine or batch_idx[:1])], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            rewards = sequence_rewards(
                model, batch["input_ids"], batch["attention_mask"]
            )  # one forward per completion
            local = grouped_pairwise_loss(
                rewards, batch["chosen_index"], batch["rejected_index"], batch["label"], batch["margin"],
                batch["head"],
            )  # fmt: skip
            if cfg.labeller_shrink:
                local = local + cfg.labeller_shrink * shrink_penalty(rewards)
            # sum of local pair losses * world / global pairs: DDP's mean of the gradients is then the
            # gradient of the global batch's mean loss, whatever the number of processes
            loss = local * (scale * len(batch["label"]) * world / max(global_pairs, 1))
            accelerator.backward(loss)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if not state_bytes:  # this process's parameters + gradients + AdamW moments (FSDP2: ~1/world)
                state_bytes.append(model_state_bytes(model, optimizer)["total"])
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["epoch_pairs"] += global_pairs
            sums = all_reduce_sum(_pair_sums(rewards.cpu(), {k: v.cpu() for k, v in batch.items()}) * scale)
            run.log(
                state["step"],
                epoch=epoch + 1,
                loss=float(sums[0] / max(sums[1], 1)),
                accuracy=float(sums[2] / sums[3]) if sums[3] > 0 else float("nan"),
                lr=scheduler.get_last_lr()[0],
            )
            # inside the epoch (the epoch's last step is checkpointed after its evaluation, below)
            inside = state["step"] < (epoch + 1) * steps_per_epoch
            if inside and cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                state["epoch_seconds"] += time.perf_counter() - t0
                checkpoint(epoch_done=False)
                t0 = time.perf_counter()  # the time spent writing is not training time
        seconds = state["epoch_seconds"] + time.perf_counter() - t0
        state["train_seconds"] += seconds
        state["pairs_seen"] += state["epoch_pairs"]
        ev = evaluate_groups(accelerator.unwrap_model(model), eval_enc, pad_id) if eval_enc else None
        score = ev["accuracy"] if ev else -epoch  # no held-out set: the last epoch is the best
        if ev and heads and cfg.labeller_select != "all":
            by_head = {
                h: evaluate_groups(accelerator.unwrap_model(model), only_head(eval_enc, h, h), pad_id)[
                    "accuracy"
                ]
                for h in (0, *heads.values())
            }
            score = select_score(by_head, cfg.labeller_select)
        improved = state["best_epoch"] < 0 or score > state["best_accuracy"]
        if improved:
            state.update(best_epoch=epoch, best_accuracy=score, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        row = {"epoch": epoch + 1, "pairs_per_second": state["epoch_pairs"] / max(seconds, 1e-9)}
        if ev:
            row.update(eval_loss=ev["loss"], eval_accuracy=ev["accuracy"])
            if heads and cfg.labeller_select != "all":
                row.update(eval_select_accuracy=score)
        run.log(state["step"], **row)
        say(
            f"[reward] epoch {epoch + 1}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
        )
        state.update(epoch_seconds=0.0, epoch_pairs=0)
        checkpoint(epoch_done=True)
    else:
        stopped_early = False

    # the best epoch's weights; LoRA folded into the base so the folder loads anywhere
    if is_sharded(model):  # FSDP2: the rest works on a whole copy (every process gathers the weights)
        whole = full_state_dict(model, everywhere=True)
        model = load_reward_model(cfg.model, cfg.lora, accelerator.device, cfg.disable_dropout, labels)[0]
        model.load_state_dict(whole)
    model = accelerator.unwrap_model(model)
    if state["best"] is not None:
        _load_trainable(model, ckpt / state["best"] / "trainable.safetensors")
    barrier()  # every process has read the best epoch before the main process deletes the checkpoints
    if cfg.lora is not None:
        model = model.merge_and_unload()
    model.eval()
    final_eval = evaluate_groups(model, eval_enc, pad_id) if eval_enc else {}
    train_eval = evaluate_groups(model, train_enc, pad_id)

    # 6. reference completions -> mean reward 0 (and std 1 with normalize=mean_std)
    ref_enc = (
        encode_groups(_reference_groups(reference, tok), model, tok, max_length) if reference else train_enc
    )
    mean, std, means = reference_stats(model, ref_enc, pad_id)
    offset, offsets = 0.0, []
    if heads:  # several outputs cannot share one folded shift: each output's -mean is stored
        offsets = [0.0 if cfg.normalize == "none" else -m for m in means]
        offset = offsets[0]
    elif cfg.normalize != "none":
        probe = [ids for g in ref_enc[:4] for ids in g["ids"]][:8]
        offset = normalize_head(model, mean, std, scale=cfg.normalize == "mean_std", probe=probe)
        if offset:
            say(
                f"[reward] {type(model).__name__} has no bias to hold the mean shift: scores outside alignloop "
                f"need + {offset:.6g} (config.json alignloop_reward.offset)"
            )
    model.config.alignloop_reward = {
        "input": "prompt + completion, joined with nothing in between (alignloop.records.full_text)",
        "offset": offset,
        "normalize": cfg.normalize,
        "reference_mean_before": mean,
        "reference_std_before": std,
    }
    if heads:
        model.config.alignloop_reward.update(labellers=list(heads), offsets=offsets)

    # length correction (optional): the within-prompt slope of reward per word on the training completions
    slope = fitted = 0.0
    if cfg.length_correction:
        fitted = within_slope(
            completion_rewards(model, train_enc, pad_id).tolist(),
            [word_length(c) for g in train_groups for c in g.completions],
            [n for n, g in enumerate(train_groups) for _ in g.completions],
        )
        slope = partial_slope(fitted, cfg.length_correction_strength)
        model.config.alignloop_reward["length_slope"] = slope
        say(
            f"[reward] length correction: {slope:+.4f} per word subtracted from every score"
            f" ({cfg.length_correction_strength:g} x the fitted {fitted:+.4f})"
        )
    # the length diagnostic: correlation of the (final, corrected) reward with completion length, held out
    held_groups, held_enc = (eval_groups, eval_enc) if eval_enc else (train_groups, train_enc)
    held_len = [word_length(c) for g in held_groups for c in g.completions]
    held_r = completion_rewards(model, held_enc, pad_id)
    held_r = (held_r[:, 0] if held_r.dim() == 2 else held_r).tolist()  # the pooled output
    length_corr = pearson([r - slope * n for r, n in zip(held_r, held_len, strict=True)], held_len)
    # on world prompts: how often the held-out labels and the reward model agree with the gold judge
    gold = heldout_gold_agreement(eval_groups, [r - slope * n for r, n in zip(held_r, held_len, strict=True)])

    # 7. HF folder + metrics
    if accelerator.is_main_process:
        model.save_pretrained(out)
        # what plain transformers and pipeline(...) batch with: right padding keeps GPT-2's absolute positions
        # as alignloop scores them (the head reads the last non-pad token), left truncation keeps the end
        tok.padding_side, tok.truncation_side = "right", "left"
        tok.save_pretrained(out)
    metrics = {
        "eval_accuracy": final_eval.get("accuracy"),
        "eval_loss": final_eval.get("loss"),
        "eval_pairs": final_eval.get("pairs", 0),
        "train_accuracy": train_eval["accuracy"],
        "train_loss": train_eval["loss"],
        "train_pairs": n_train_pairs,
        "train_prompts": len(train_groups),
        "eval_prompts": len(eval_groups),
        "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"] + 1,
        "stopped_early": stopped_early,
        "pairs_per_second": state["pairs_seen"] / max(state["train_seconds"], 1e-9),
        "reference_mean_before": mean,
        "reference_std_before": std,
        "length_correlation": length_corr,  # Pearson(reward, words) over held-out completions
        "length_slope": slope,  # subtracted per word when length_correction is on
        "length_slope_fitted": fitted,  # before length_correction_strength scales it
        **(gold or {}),  # eval_gold_pairs, eval_labels_gold_agreement, eval_gold_agreement (world prompts)
        "skipped": skipped,
        "processes": world,
    }
    if heads:  # held-out accuracy on each labeller's own pairs: their output and the pooled one
        metrics["labellers"] = {
            name: {
                "own_head": evaluate_groups(model, only_head(eval_enc, h, h), pad_id).get("accuracy"),
                "pooled_head": evaluate_groups(model, only_head(eval_enc, h, 0), pad_id).get("accuracy"),
            }
            for name, h in heads.items()
        }
    if state_bytes:
        metrics["model_state_bytes"] = state_bytes[0]
    if final_eval:
        lc = "n/a" if length_corr is None else f"{length_corr:+.2f}"
        agree = (
            f"agreement with gold {gold['eval_gold_agreement']:.3f} (the labels' {gold['eval_labels_gold_agreement']:.3f}"
            f" on {gold['eval_gold_pairs']} pairs gold does not tie); "
            if gold
            else ""
        )
        say(
            f"[reward] held-out accuracy {final_eval['accuracy']:.3f} on {final_eval['pairs']} pairs; "
            f"{agree}reward-length correlation {lc}; saved {out}"
        )
    metrics = run.finish(metrics)
    if accelerator.is_main_process:  # after metrics.json: a kill before this leaves a finished run
        shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def only_head(encoded: Sequence[dict], made_for: int, score_with: int) -> list[dict]:
    """The pair entries of ``encoded`` entered for output ``made_for`` (a labeller's own pairs), scored
    with output ``score_with`` instead: to compare a labeller's output with the pooled one on their pairs."""
    keys = ("chosen", "rejected", "label", "margin")
    out = []
    for g in encoded:
        keep = [i for i, h in enumerate(g["head"]) if h == made_for]
        if keep:
            out.append(
                {
                    "ids": g["ids"],
                    **{k: [g[k][i] for i in keep] for k in keys},
                    "head": [score_with] * len(keep),
                }
            )
    return out


def partial_slope(fitted: float, strength: float) -> float:
    """The per-word slope a length-corrected model subtracts: ``strength * fitted``.

    ``fitted``: the reward's within-prompt slope per word (``evaluation.metrics.within_slope``);
    ``strength`` in (0, 1]: 1 removes the whole within-prompt length trend, 0.5 half of it.
    """
    return strength * fitted


def _check_dependent_options(cfg: RewardTrainConfig) -> None:
    """An option set without the mode it tunes (it would do nothing): one clear error."""
    needs = [
        ("length_correction_strength", cfg.length_correction_strength != 1.0, "length_correction"),
        ("labeller_shrink", cfg.labeller_shrink != 0.0, "per_labeller"),
        ("labeller_select", cfg.labeller_select != "all", "per_labeller"),
    ]
    for option, given, mode in needs:
        if given and not getattr(cfg, mode):
            raise UserError(
                f"{option} tunes {mode}, which is off",
                f"--set {option}={getattr(cfg, option)}",
                f"add --set {mode}=true, or drop {option}",
            )


def select_score(by_head: dict[int, float], select: str) -> float:
    """The held-out score a labeller-conditioned model's best epoch is chosen on.

    ``by_head``: ``{output: accuracy}``, output 0 the pooled one on every pair and output ``h >= 1``
    a labeller's own output on their own pairs (nan when they have none). ``pooled``: ``by_head[0]``;
    ``labellers``: ``mean_{h >= 1} by_head[h]`` over the labellers with a number (each labeller
    counts once, whatever their number of pairs); nan when none has one.
    """
    if select == "pooled":
        return by_head[0]
    if select == "labellers":
        own = [a for h, a in by_head.items() if h >= 1 and a == a]
        return sum(own) / len(own) if own else float("nan")
    raise ValueError(f"unknown labeller_select {select!r}")


def _check_per_labeller(cfg: RewardTrainConfig, heads: dict[str, int], pair_files: list) -> None:
    """One clear error for what a labeller-conditioned model cannot do."""
    if not heads:
        raise UserError(
            "per_labeller needs pairs that name one labeller each, and none does",
            ", ".join(map(str, pair_files)),
            "export each labeller's own pairs: alignloop feedback export --consensus none (TRL format)",
        )
    if cfg.normalize == "mean_std" or cfg.length_correction:
        raise UserError(
            "per_labeller works with normalize=mean or none and without length_correction",
            "--set per_labeller=true",
            "drop normalize=mean_std / length_correction=true",
        )


def heldout_gold_agreement(groups: Sequence[Group], rewards: Sequence[float]) -> dict[str, Any] | None:
    """The held-out labels' and reward model's agreement with the embedded world's gold judge.

    ``rewards``: one per completion of ``groups``, in order. For every pair the labels do not tie,
    ``gold(preferred) - gold(other)`` and ``r(preferred) - r(other)`` go to
    :func:`~alignloop.evaluation.metrics.gold_agreement`. None unless the world is installed and every
    held-out prompt is one of its prompts (only then is there a gold judge to ask).
    """
    try:
        from alignloop.world import judge_batch
        from alignloop.world.judge import parse_prompt
    except ImportError:
        return None
    if not groups or any(parse_prompt(g.prompt) is None for g in groups):
        return None
    margins: list[float] = []
    diffs: list[float] = []
    k = 0
    for g in groups:
        gold = [j.score for j in judge_batch([g.prompt] * len(g.completions), g.completions)]
        r = rewards[k : k + len(g.completions)]
        k += len(g.completions)
        for p in g.pairs:
            if p.label == 0.5:
                continue
            a, b = (p.chosen, p.rejected) if p.label > 0.5 else (p.rejected, p.chosen)
            margins.append(gold[a] - gold[b])
            diffs.append(r[a] - r[b])
    labels, model = gold_agreement(margins), gold_agreement(margins, diffs)
    if labels is None or model is None:
        return None
    return {
        "eval_gold_pairs": sum(abs(m) > 1e-9 for m in margins),
        "eval_labels_gold_agreement": labels,
        "eval_gold_agreement": model,
    }


def _reference_groups(path: str | Path, tokenizer: Any) -> list[Group]:
    """Reference completions from pairs, completion sets or ``{"prompt", "completion"}`` lines
    (conversations as text through ``tokenizer``'s chat template)."""
    from alignloop.chat import as_text
    from alignloop.records import adopt_text_convention, iter_jsonl

    lines = []
    for n, obj in iter_jsonl(path):
        obj = as_text(tokenizer, obj, f"{path}:{n}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise UserError("reference line without a 'prompt' string", f"{path}:{n}")
        texts: list[Any] = []
        if isinstance(obj.get("completions"), list):
            texts = [c.get("text") if isinstance(c, dict) else c for c in obj["completions"]]
        for key in ("completion", "chosen", "rejected", "text"):
            if key in obj:
                texts.append(obj[key])
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError(
                "reference line without completion text",
                f"{path}:{n}",
                "give 'completion', 'completions' or chosen/rejected",
            )
        lines.append((n, {"prompt": prompt, "completions": texts}))
    adopt_text_convention(lines, path)  # old files (no space between prompt and completion) converted
    groups: dict[str, Group] = {}
    for _, line in lines:
        g = groups.setdefault(line["prompt"], Group(line["prompt"]))
        for t in line["completions"]:
            if t.strip():
                g.index(t)
    return [g for g in groups.values() if g.completions]
