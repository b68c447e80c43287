"""Supervised fine-tuning on prompt/response records, loss on the response tokens only.

Records (JSONL, CSV or Parquet): ``{"prompt": ..., "response": ...}`` (``"completion"`` is
accepted for ``"response"``). For a causal model the loss is

    L = - (1 / N) * sum_i sum_t log pi(r_i,t | prompt_i, r_i,<t)        N = response tokens in the batch

(prompt tokens are context, never targets); for a seq2seq model the prompt is the encoder input
and the response the decoder target. LoRA (``--lora``) or every weight. The run folder gets the
trained model (an HF folder: the adapter with LoRA, merged with ``merge: true``), its tokenizer,
``manifest.json``, ``metrics.json`` and per-step ``metrics.jsonl``; ``checkpoint/`` lets an
interrupted run continue with ``--resume``.

Under ``accelerate launch`` / torchrun each process takes ``batch[rank::world]`` of every step's
global batch and its summed token losses are divided by the *global* token count (times the
number of processes, which DDP's gradient mean divides out again), so N processes train like one
at the same ``batch_size`` (see :mod:`alignloop.distributed`); only the main process writes.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from alignloop.checkpoints import remove_folder
from alignloop.config import Config
from alignloop.distributed import (
    all_reduce_sum,
    barrier,
    fsdp2,
    full_state_dict,
    is_sharded,
    load_sharded_step,
    make_accelerator,
    model_state_bytes,
    prepare,
    rank_world,
    save_sharded_step,
    shard,
    shard_model,
    trainable_state,
    uses_sharded_weights,
)
from alignloop.errors import UserError
from alignloop.models import (
    LoraSettings,
    Policy,
    context_length,
    enable_gradient_checkpointing,
    encode_pairs,
    load_policy,
    load_tokenizer,
    make_optimizer,
    token_logprobs,
)

CHECKPOINT = "checkpoint"
SHARDED = (
    "checkpoints"  # FSDP2 runs: step folders, each process's shard in each (distributed.save_sharded_step)
)


class SFTConfig(Config):
    """Supervised fine-tuning settings."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16  # examples per optimizer step, over all processes
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | constant | linear
    grad_clip: float = 1.0
    max_length: int | None = None  # prompt + response tokens (None: the model's context)
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory
    merge: bool = False  # save the LoRA adapter merged into the base (a plain HF model)
    eval_fraction: float = 0.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    # Jinja chat template file for conversational records (default: the tokenizer's own; alignloop.chat)
    chat_template: str | None = None
    device: str | None = None


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def read_sft_records(path: str | Path, tokenizer: Any = None) -> list[dict[str, Any]]:
    """``[{"prompt", "response"}]`` from a JSONL/CSV/Parquet file; a bad row is a UserError.

    A conversational row (TRL's prompt-completion format: ``prompt`` a message list, the response an
    assistant message list or its text) is rendered through ``tokenizer``'s chat template
    (:func:`alignloop.chat.as_text`): the response is the assistant turn with the template's
    end-of-turn, so the loss falls on the assistant's tokens only; it is marked ``"conversational"``
    (no EOS added: the end-of-turn ends it).

    A ``{"messages": [...]}`` row (TRL's conversational language-modelling format: a whole multi-turn
    transcript) becomes ``{"text", "spans"}``: its rendering and where its assistant turns are; the loss
    then falls on every assistant turn (content + end-of-turn) and on nothing else."""
    from alignloop.chat import as_text
    from alignloop.generation import read_table
    from alignloop.records import adopt_text_convention, check_messages, is_conversational

    rows = read_table(path)
    out = []
    for i, row in enumerate(rows):
        where = f"{path}:{row.get('_line', i + 1)}"
        if "prompt" not in row and "messages" in row:  # TRL's conversational language-modelling format
            out.append(_transcript_record(row["messages"], tokenizer, where))
            continue
        response = row.get("response", row.get("completion"))
        if "prompt" not in row or response is None:
            have = ", ".join(k for k in row if not k.startswith("_")) or "none"
            raise UserError(
                "an SFT record needs 'prompt' and 'response' (or 'completion')",
                where,
                f"its keys are: {have}",
            )
        if is_conversational(row["prompt"]):
            try:
                check_messages(row["prompt"], "prompt")
                check_messages(response, "completion")
            except ValueError as e:
                raise UserError(str(e), where) from None
            if isinstance(response, str) and not response.strip():
                raise UserError("empty response", where, "remove the record or fill in the response")
            if tokenizer is None:
                raise UserError("a conversational SFT record needs the model's tokenizer to render it", where)
            r = as_text(tokenizer, {"prompt": row["prompt"], "completion": response}, where)
            out.append({"prompt": r["prompt"], "response": r["completion"], "conversational": True})
            continue
        if not isinstance(row["prompt"], str) or not isinstance(response, str):
            raise UserError("'prompt' and 'response' must be strings (or TRL message lists)", where)
        if not response.strip():
            raise UserError("empty response", where, "remove the record or fill in the response")
        out.append({"prompt": row["prompt"], "response": response})
    if not out:
        raise UserError("no SFT records", str(path), "is the file empty?")
    adopt_text_convention(  # text rows only: a rendered conversation is the template's own text
        [
            (row.get("_line", i + 1), o)
            for i, (row, o) in enumerate(zip(rows, out, strict=True))
            if not o.get("conversational") and "text" not in o
        ],
        path,
    )
    return out


def _transcript_record(messages: Any, tokenizer: Any, where: str) -> dict[str, Any]:
    """One ``{"messages": [...]}`` row (a whole multi-turn conversation) as ``{"text", "spans"}``: the
    template's rendering and its assistant turns' character spans (:func:`alignloop.chat.transcript`),
    the loss then on every assistant turn and nothing else."""
    from alignloop.chat import transcript
    from alignloop.records import check_messages

    if not isinstance(messages, list):
        raise UserError("'messages' must be a list of {role, content} messages", where)
    try:
        check_messages(messages, "transcript")
    except ValueError as e:
        raise UserError(str(e), where) from None
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            "the transcript has no assistant turn: nothing to learn", where, "add the assistant's turns"
        )
    if tokenizer is None:
        raise UserError("a conversational SFT record needs the model's tokenizer to render it", where)
    text, spans = transcript(tokenizer, messages, where)
    return {"text": text, "spans": spans, "conversational": True}


def fit_example(
    prompt: list[int], response: list[int], max_length: int | None, seq2seq: bool
) -> tuple[list[int], list[int], bool]:
    """Cut an example to ``max_length`` tokens: causal -- the prompt's start first (keep >= 1 token),
    then the response's end; seq2seq -- each side to ``max_length``. Returns (prompt, response, cut)."""
    if max_length is None:
        return prompt, response, False
    if seq2seq:
        cut = len(prompt) > max_length or len(response) > max_length
        return prompt[:max_length], response[:max_length], cut
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    keep_prompt = max(1, max_length - len(response))
    prompt = prompt[-keep_prompt:]
    response = response[: max(1, max_length - len(prompt))]
    return prompt, response, True


def transcript_example(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """A transcript record (:func:`_transcript_record`) as ``(prompt, response, mask)``: the ids before
    the first assistant token are the prompt, the rest the response, ``mask[t]`` 1 where response
    token t belongs to an assistant turn (its loss counts) and 0 in the user turns and headers between."""
    from alignloop.chat import assistant_mask

    ids, flags = assistant_mask(tokenizer, record["text"], record["spans"])
    first = flags.index(1) if 1 in flags else len(ids)
    if first == len(ids):
        raise UserError("a transcript's assistant turns tokenize to nothing", fix="check the chat template")
    return ids[:first], ids[first:], flags[first:]


def tokenize(
    policy: Policy, records: list[dict[str, Any]], max_length: int | None
) -> tuple[list[tuple[list[int], ...]], int]:
    """Token ids of every example (response + EOS) and how many were truncated; a multi-turn
    transcript's example carries a third item, the 0/1 loss mask over its response tokens."""
    tok = policy.tokenizer
    pairs = [r for r in records if "text" not in r]
    prompts, responses = encode_pairs(
        tok, [r["prompt"] for r in pairs], [r["response"] for r in pairs], policy.is_seq2seq,
        chat=[bool(r.get("conversational")) for r in pairs],
    ) if pairs else ([], [])  # fmt: skip
    encoded = iter(zip(prompts, responses, strict=True))
    filler = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    examples: list[tuple[list[int], ...]] = []
    cut = 0
    for rec in records:
        if "text" in rec:
            if policy.is_seq2seq:
                raise UserError(
                    "multi-turn transcripts ({'messages': [...]}) train decoder-only models",
                    fix="give a seq2seq model prompt/completion records",
                )
            p, r, mask = transcript_example(tok, rec)
        else:
            (p, r), mask = next(encoded), None
        if not policy.is_seq2seq and not p:
            p = [int(filler)]  # a causal model needs a token to condition on
        p, r, was_cut = fit_example(p, r, max_length, policy.is_seq2seq)
        examples.append(
            (p, r) if mask is None else (p, r, mask[: len(r)])
        )  # a cut keeps the response's start
        cut += was_cut
    return examples, cut


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then constant, linear or cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The shuffled example order of one epoch (depends only on seed and epoch: resumable)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_at(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimiser step ``step``: consecutive slices of per-epoch shuffles."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(n, epoch, seed)
    return order[k * batch_size : (k + 1) * batch_size]


def sft_loss(
    policy: Policy, examples: list[tuple[list[int], list[int]]], model: Any = None
) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the response tokens (prompt tokens are not targets).

    ``loss = -sum_{b,t} m[b,t] log pi(r[b,t] | prompt, r[b,<t]) / N``, ``m`` (B, R) the response mask
    times a transcript's loss mask (its third item: 0 on the user turns between assistant turns),
    ``N = sum m``. ``model``: what runs the forward (the DDP-wrapped ``policy.model`` when distributed).
    Returns ``(loss, N)``.
    """
    batch = policy.batch([e[0] for e in examples], [e[1] for e in examples])
    logps = token_logprobs(model if model is not None else policy.model, batch)  # (B, R), zero at padding
    mask = batch.response_mask
    if any(len(e) > 2 for e in examples):  # multi-turn transcripts: assistant tokens only
        keep = torch.zeros_like(mask)
        for b, e in enumerate(examples):
            keep[b, : len(e[1])] = torch.as_tensor(e[2] if len(e) > 2 else [1] * len(e[1]), dtype=mask.dtype)
        mask = mask * keep
    n = int(mask.sum())
    return -(logps * mask).sum() / max(1, n), n


@torch.no_grad()
def eval_loss(policy: Policy, examples: list[tuple[list[int], list[int]]], batch_size: int) -> float:
    """Token-mean loss over ``examples``; each process scores its share, the sums are all-reduced."""
    sums = torch.zeros(2, dtype=torch.float64)  # loss x tokens, tokens
    was = policy.model.training
    policy.model.eval()
    mine = shard(examples)
    per_process = math.ceil(len(examples) / rank_world()[1])  # the most any process has
    for i in range(0, per_process, batch_size):
        if not mine[i : i + batch_size]:  # FSDP2: every process joins every forward (a discarded one)
            if is_sharded(policy.model):
                sft_loss(policy, examples[:1])
            continue
        loss, n = sft_loss(policy, mine[i : i + batch_size])
        sums += torch.tensor([float(loss.detach()) * n, n], dtype=torch.float64)
    policy.model.train(was)
    total, tokens = all_reduce_sum(sums).tolist()
    return total / max(1.0, tokens)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _trainable_state(policy: Policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def save_checkpoint(
    out: Path,
    policy: Policy,
    optimizer: Any,
    scheduler: Any,
    step: int,
    fingerprint: str,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Trainable weights + optimiser + scheduler + step, written to a temp folder then renamed.

    ``weights``: the trainable weights when the caller gathered them (ZeRO-3 / FSDP); default: the policy's.
    """
    tmp = out / f".{CHECKPOINT}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "step": step,
            "fingerprint": fingerprint,
            "weights": weights if weights is not None else _trainable_state(policy),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        tmp / "state.pt",
    )
    final = out / CHECKPOINT
    remove_folder(final)
    tmp.rename(final)


def load_checkpoint(out: Path, policy: Policy, optimizer: Any, scheduler: Any, fingerprint: str) -> int:
    """Restore a checkpoint of the same run (same fingerprint); returns the step to continue at."""
    path = out / CHECKPOINT / "state.pt"
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise UserError(
            "the checkpoint was written by a run with other inputs or settings",
            str(path),
            "use another --out, or drop --resume to start over",
        )
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def load_sharded_checkpoint(out: Path, model: Any, optimizer: Any, scheduler: Any, fingerprint: str) -> int:
    """Restore the newest intact sharded checkpoint of this run (FSDP2); the step to continue at (0: none)."""
    from alignloop.checkpoints import newest_intact, verify_folder

    hit = newest_intact(out / SHARDED, verify_folder, "sft")
    if hit is None:
        return 0
    folder, state = hit
    if state.get("fingerprint") != fingerprint:
        raise UserError(
            "the checkpoint was written by a run with other inputs or settings",
            str(folder),
            "use another --out, or drop --resume to start over",
        )
    load_sharded_step(folder, model, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train_sft(
    model_id: str,
    data: str | Path,
    out: str | Path,
    config: SFTConfig | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_id`` on ``data``; writes the model and run records to ``out``.

    Args:
        model_id: hub id, local folder, ``world:base`` or a LoRA adapter folder (trained further).
        data: prompt/response records (JSONL, CSV, Parquet).
        out: run folder; the trained model is saved in it (an HF folder).
        config: :class:`SFTConfig`.
        resume: continue from ``out/checkpoint``; a finished run with the same inputs is skipped.
        stop_after: stop after this many steps in this call (simulates an interruption in tests).

    Returns:
        Metrics: ``train_loss`` (last ``log_every`` steps), ``eval_loss`` (with ``eval_fraction``),
        ``steps``, ``examples``, ``truncated``, ``tokens_per_second``.
    """
    from alignloop.runs import progress, say, stage_guard, start_stage

    cfg = config or SFTConfig()
    out = Path(out)
    from alignloop.chat import use_chat_template

    chat_tok = use_chat_template(load_tokenizer(model_id), cfg.chat_template)  # conversations -> text
    records = read_sft_records(data, chat_tok)  # bad data fails here, before any model is loaded
    run = start_stage(
        out, "sft", config=cfg, inputs={"model": model_id, "data": data}, seed=cfg.seed, resume=resume
    )
    if run.skipped:
        return run.metrics
    fp = run.manifest["fingerprint"]  # a checkpoint only resumes the same inputs and settings
    with stage_guard(run):
        accelerator = make_accelerator(cfg.device)
        rank, world = rank_world()
        if cfg.merge and uses_sharded_weights(accelerator):
            raise UserError(
                "merge: true cannot merge a LoRA adapter whose base is sharded (ZeRO-3 / FSDP)",
                fix="drop --set merge=true (the adapter is saved) and merge afterwards on one process",
            )
        torch.manual_seed(cfg.seed)  # LoRA initialisation
        policy = load_policy(
            model_id,
            lora=cfg.lora,
            value_head=False,
            reference=False,
            no_dropout=False,
            device=accelerator.device,
        )
        use_chat_template(policy.tokenizer, cfg.chat_template)  # saved with the template it trained on
        if cfg.gradient_checkpointing:  # the recompute replays the same dropout masks (RNG state kept)
            enable_gradient_checkpointing(policy.model)
        if fsdp2(accelerator):  # each process keeps 1/world of every weight, gradient and AdamW moment
            shard_model(policy.model)
        ctx = context_length(policy.model)
        max_length = cfg.max_length or ctx
        if max_length is None and policy.is_seq2seq:
            limit = getattr(policy.tokenizer, "model_max_length", None)
            max_length = int(limit) if isinstance(limit, int) and limit < 1_000_000 else None
        examples, cut = tokenize(policy, records, max_length)
        if cut:
            say(f"[sft] {cut} of {len(examples)} examples longer than {max_length} tokens were truncated")
        rng = random.Random(cfg.seed)
        heldout: list[tuple[list[int], list[int]]] = []
        if cfg.eval_fraction > 0:
            idx = list(range(len(examples)))
            rng.shuffle(idx)
            n_eval = max(1, int(len(idx) * cfg.eval_fraction))
            heldout = [examples[i] for i in idx[:n_eval]]
            examples = [examples[i] for i in idx[n_eval:]]
        bs = min(cfg.batch_size, len(examples))
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(examples) / bs)))
        params = policy.trainable_parameters()
        optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.lr_schedule)
        )
        if not resume:
            start = 0
            if accelerator.is_main_process:  # no stale shards of an earlier run in this folder
                shutil.rmtree(out / SHARDED, ignore_errors=True)
        elif is_sharded(policy.model):  # FSDP2: this process's shard of the newest intact checkpoint
            start = load_sharded_checkpoint(out, policy.model, optimizer, scheduler, fp)
        else:
            start = load_checkpoint(out, policy, optimizer, scheduler, fp)  # every process
        if start:
            say(f"[sft] resuming at step {start} of {total} from {out / CHECKPOINT}")
        if world > 1:
            say(f"[sft] {world} processes: {bs} examples a step, about {bs // world} each")
        # the scheduler stays outside prepare(): accelerate would tick it once per process
        model, optimizer = prepare(accelerator, policy.model, optimizer)
        state_bytes = None
        policy.model.train()
        recent: list[float] = []
        tokens, t0 = 0, time.perf_counter()
        for step in progress(range(start, total), total=total - start, desc="sft", unit="step"):
            idx = batch_at(step, len(examples), bs, cfg.seed)  # the global batch, the same on every process
            mine = shard(idx, rank, world)
            # dropout masks depend on the step (and process) only: resumable
            torch.manual_seed(cfg.seed * 1_000_003 + step + 7919 * rank)
            # a process left without an example (a batch smaller than the world) still joins the all-reduce
            loss, n = sft_loss(policy, [examples[i] for i in (mine or idx[:1])], model)
            n = n if mine else 0
            loss_sum, n_global = all_reduce_sum(
                torch.tensor([float(loss.detach()) * n, n], dtype=torch.float64)
            ).tolist()
            if not torch.isfinite(loss) or not math.isfinite(loss_sum):
                raise UserError(
                    f"the SFT loss became {float(loss)} at step {step}", str(out), "lower learning_rate"
                )
            optimizer.zero_grad(set_to_none=True)
            # sum of this process's token losses * world / global tokens: DDP's gradient mean over the
            # processes is then the gradient of the global batch's token-mean loss
            accelerator.backward(loss * (n * world / max(1.0, n_global)))
            grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if state_bytes is None:  # this process's parameters + gradients + AdamW moments (FSDP2: ~1/world)
                state_bytes = model_state_bytes(model, optimizer)["total"]
            scheduler.step()
            tokens += int(n_global)
            loss_value = loss_sum / max(1.0, n_global)
            recent = (recent + [loss_value])[-cfg.log_every :]
            if step % cfg.log_every == 0 or step == total - 1:
                run.log(
                    step,
                    loss=loss_value,
                    grad_norm=None if grad_norm is None else float(grad_norm),  # DeepSpeed clips itself
                    lr=scheduler.get_last_lr()[0],
                    tokens=int(n_global),
                )
            stopping = stop_after is not None and step + 1 - start >= stop_after and step + 1 < total
            periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total
            if (periodic or stopping) and is_sharded(model):  # every process writes its shard
                info = {"step": step + 1, "fingerprint": fp, "scheduler": scheduler.state_dict()}
                save_sharded_step(out / SHARDED, step + 1, model, optimizer, info, keep=2)
            elif periodic or stopping:
                weights = trainable_state(accelerator, model)  # every process: gathers sharded weights
                if accelerator.is_main_process:
                    save_checkpoint(out, policy, optimizer, scheduler, step + 1, fp, weights)
                barrier()
            if stopping:
                return {"stopped_at": step + 1}
        seconds = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "train_loss": sum(recent) / max(1, len(recent)),
            "steps": total,
            "examples": len(examples),
            "truncated": cut,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "processes": world,
        }
        if state_bytes is not None:
            metrics["model_state_bytes"] = state_bytes
        if heldout:
            metrics["eval_loss"] = eval_loss(policy, heldout, bs)
        policy.model.eval()
        # ZeRO-3 / FSDP: every process takes part in gathering the whole weights; the main one saves them
        if is_sharded(model):
            full = full_state_dict(model)
        else:
            full = accelerator.get_state_dict(model) if uses_sharded_weights(accelerator) else None
        if accelerator.is_main_process:
            save_model(policy, out, merge=cfg.merge, state_dict=full)
            if (out / CHECKPOINT).exists():
                shutil.rmtree(out / CHECKPOINT)
            shutil.rmtree(out / SHARDED, ignore_errors=True)
        return run.finish(metrics)


def save_model(policy: Policy, out: Path, merge: bool = False, state_dict: dict | None = None) -> None:
    """The trained model as an HF folder in ``out`` (LoRA: the adapter, or merged with ``merge``).

    ``state_dict``: the gathered weights of a ZeRO-3 / FSDP run (the local model holds only shards).
    """
    model = policy.model
    if state_dict is not None:
        model.save_pretrained(out, state_dict=state_dict)  # PEFT keeps the adapter's own tensors of it
        policy.tokenizer.save_pretrained(out)
        return
    if policy.is_lora and merge:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
