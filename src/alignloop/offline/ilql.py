"""Implicit language Q-learning (ILQL; Snell et al. 2022): offline RL from scored completions.

The notes name Q-learning as the alternative to PPO. ILQL learns from a fixed dataset of
(prompt, completion, reward) -- no sampling during training -- and steers decoding with learned
values instead of changing what the language model itself says:

* The language model's last hidden state ``h_t`` (the state *before* response token ``a_t``) feeds
  two Q heads ``Q_1, Q_2: h -> R^V`` (one value per next token), their Polyak-averaged target copies
  ``Qhat_1, Qhat_2`` and a V head ``V: h -> R``.
* A completion's reward ``r`` arrives at its last token (``r_t = 0`` before it); the episode ends there.
* Losses, per response token, averaged over the real tokens of the batch (paper, section 4):

      Q:    sum_i (Q_i(s_t, a_t) - [r_t + gamma * V(s_{t+1}) * (1 - done_t)])^2    (V detached)
      V:    L_tau(min_i Qhat_i(s_t, a_t) - V(s_t)),  L_tau(u) = |tau - 1(u < 0)| * u^2  (expectile)
      CQL:  sum_i CE(Q_i(s_t, .), a_t)   (the dataset's tokens above the others: conservative Q)
      AWAC: CE(logits_t, a_t)             (the language model stays the data's behaviour policy)

      loss = Q + V + cql_scale * CQL + awac_scale * AWAC

* After each optimizer step the targets move toward the Q heads: ``Qhat <- alpha * Q + (1 - alpha) * Qhat``.
* Decoding (``generate``, ``evaluate``, ``serve`` given an ILQL folder) shifts the policy's
  log-probs by the advantage: ``logits'_t = log pi(. | s_t) + beta * (min_i Qhat_i(s_t, .) - V(s_t))``.

The maths are the small pure functions below; :func:`train_ilql` (``alignloop ilql``) reads top to
bottom. The saved folder is the language model (an HF folder, or a LoRA adapter) plus
``ilql_heads.safetensors`` and ``ilql.json``; ``alignloop.models.load_lm`` (and so every alignloop
command) decodes with the heads; plain ``from_pretrained`` loads the language model alone.
Causal language models only (seq2seq: a clear error).
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from alignloop.checkpoints import newest_intact, truncate_metrics_log, verify_folder, write_step
from alignloop.config import Config
from alignloop.errors import UserError
from alignloop.models import LoraSettings
from alignloop.records import adopt_text_convention, iter_jsonl

HEADS_FILE = "ilql_heads.safetensors"
INFO_FILE = "ilql.json"
CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------------------------
# The maths: small pure functions
# ----------------------------------------------------------------------------------------------


def token_rewards(rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Put each completion's reward on its last real token and mark that token terminal.

    Args:
        rewards: (B,) one reward per completion. mask: (B, R) 1 on real response tokens
            (right-padded, each row has at least one).
    Returns:
        ``r`` (B, R): ``rewards[b]`` at the last real token of row b, 0 elsewhere;
        ``done`` (B, R): 1 at that token, 0 elsewhere.
    """
    last = mask.long().sum(dim=1).clamp(min=1) - 1
    done = torch.zeros_like(mask, dtype=torch.float32)
    done[torch.arange(mask.shape[0]), last] = 1.0
    return done * rewards.float()[:, None], done


def q_targets(r: Tensor, values: Tensor, done: Tensor, gamma: float) -> Tensor:
    """One-step Bellman targets ``y_t = r_t + gamma * V(s_{t+1}) * (1 - done_t)`` (no gradient).

    Args:
        r, done: (B, R) from :func:`token_rewards`. values: (B, R) ``V(s_t)``; ``V(s_{t+1})`` is the
            next column (0 past the last column, where every row is done anyway).
    Returns:
        (B, R).
    """
    nxt = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1).detach()
    return r + gamma * nxt * (1.0 - done)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (both (B, R))."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def q_loss(q_taken: list[Tensor], target: Tensor, mask: Tensor) -> Tensor:
    """``sum_i mean_t (Q_i(s_t, a_t) - y_t)^2``. ``q_taken``: list of (B, R); target, mask (B, R)."""
    return sum(masked_mean((q - target) ** 2, mask) for q in q_taken)


def expectile_loss(diff: Tensor, tau: float, mask: Tensor) -> Tensor:
    """Expectile regression ``mean_t |tau - 1(u_t < 0)| * u_t^2`` with ``u = Qhat - V`` (B, R).

    ``tau > 0.5`` weighs V's under-estimates more: V tends to an upper expectile of Q over the
    dataset's actions (a soft max over what the data did, never over unseen tokens).
    """
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return masked_mean(weight * diff**2, mask)


def cql_loss(q_logits: list[Tensor], actions: Tensor, mask: Tensor) -> Tensor:
    """``sum_i mean_t CE(Q_i(s_t, .), a_t)``: the dataset token's Q pushed above the others.

    q_logits: list of (B, R, V). actions, mask: (B, R).
    """
    total = 0.0
    for q in q_logits:
        ce = F.cross_entropy(q.flatten(0, 1).float(), actions.flatten(), reduction="none").view_as(actions)
        total = total + masked_mean(ce, mask)
    return total


def shifted_logits(logits: Tensor, q: Tensor, v: Tensor, beta: float) -> Tensor:
    """ILQL decoding: ``log_softmax(logits) + beta * (Q - V)``.

    Args:
        logits: (..., V) the language model's. q: (..., V) ``min_i Qhat_i``. v: (...) ``V``.
    Returns:
        (..., V) logits of the steered policy ``pi(a|s) ~ pi_beta(a|s) * exp(beta * (Q(s,a) - V(s)))``.
    """
    return torch.log_softmax(logits.float(), dim=-1) + beta * (q.float() - v.float().unsqueeze(-1))


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, alpha: float) -> None:
    """``target <- alpha * source + (1 - alpha) * target``, parameter by parameter (in place)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(1.0 - alpha).add_(s.detach(), alpha=alpha)


# ----------------------------------------------------------------------------------------------
# The heads
# ----------------------------------------------------------------------------------------------


def _mlp(hidden: int, out: int) -> nn.Sequential:
    """``h -> 2h -> out``; the last layer starts at zero, so every Q and V starts at exactly 0 and an
    untrained head leaves decoding as the language model's (no random steering on unseen tokens)."""
    mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class ILQLHeads(nn.Module):
    """Q heads (one or two), their target copies and a V head, on the trunk's hidden state."""

    def __init__(self, hidden: int, vocab: int, two_qs: bool = True) -> None:
        super().__init__()
        self.q = nn.ModuleList([_mlp(hidden, vocab) for _ in range(2 if two_qs else 1)])
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)
        self.v = _mlp(hidden, 1)

    def trainable(self) -> list[nn.Parameter]:
        return [*self.q.parameters(), *self.v.parameters()]

    def values(self, hidden: Tensor) -> Tensor:
        """(B, R, H) -> (B, R) ``V(s_t)``."""
        return self.v(hidden).squeeze(-1)

    def target_min(self, hidden: Tensor) -> Tensor:
        """(B, R, H) -> (B, R, V) ``min_i Qhat_i(s_t, .)`` (no gradient)."""
        with torch.no_grad():
            qs = [q(hidden) for q in self.target_q]
        return qs[0] if len(qs) == 1 else torch.minimum(*qs)


class ILQLDecoder(nn.Module):
    """A causal LM whose logits are ILQL's steered ones (:func:`shifted_logits`).

    It takes the arguments alignloop's sampling loop and log-prob code pass to a causal LM
    (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values``, ``use_cache``,
    ``logits_to_keep``), so ``generate``, ``evaluate`` and ``serve`` decode with it unchanged.
    """

    def __init__(self, lm: nn.Module, heads: ILQLHeads, beta: float) -> None:
        super().__init__()
        self.lm, self.heads, self.beta = lm, heads, beta
        self.config = lm.config
        self.generation_config = getattr(lm, "generation_config", None)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int | Tensor = 0,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> Any:
        # transformers' logits_to_keep: 0 (all), the last k positions, or a 1-D tensor of positions
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        kw: dict[str, Any] = {} if keep_all else {"logits_to_keep": logits_to_keep}
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=True,
            **kw,
            **kwargs,
        )
        hidden = out.hidden_states[-1]
        h = (
            hidden[:, logits_to_keep]
            if isinstance(logits_to_keep, Tensor)
            else hidden[:, -out.logits.shape[1] :]
        )
        h = h.to(self.heads.v[0].weight.dtype)
        out.logits = shifted_logits(out.logits, self.heads.target_min(h), self.heads.values(h), self.beta)
        return out


# ----------------------------------------------------------------------------------------------
# Data: scored completions, or ranked pairs turned into rewards
# ----------------------------------------------------------------------------------------------


@dataclass
class Episode:
    prompt: str
    completion: str
    reward: float


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"'{key}' must be a finite number, got {v!r}", where)
    return float(v)


def read_episodes(path: str | Path, pair_reward: float = 1.0) -> tuple[list[Episode], dict[str, int]]:
    """Episodes from a JSONL file; each line one of

    * a scored completion ``{"prompt", "completion", "reward"}`` (``score`` also accepted;
      ``alignloop reward score`` writes ``reward``);
    * a scored completion set ``{"prompt", "completions": [{"text", "reward"}, ...]}``;
    * a pair ``{"prompt", "chosen", "rejected"}``: with ``reward_chosen``/``reward_rejected``
      (``alignloop reward score`` of a pairs file) those rewards, else ``+pair_reward`` for chosen
      and ``-pair_reward`` for rejected (a ranked pair turned into rewards).

    Returns the episodes and a count of each kind of line.
    """
    out: list[Episode] = []
    kinds = {"scored": 0, "sets": 0, "pairs": 0, "scored_pairs": 0}
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise UserError("line without a 'prompt' string", where, "each line needs the prompt")
        if "chosen" in obj or "rejected" in obj:
            texts = [obj.get("chosen"), obj.get("rejected")]
            if not all(isinstance(t, str) for t in texts):
                raise UserError("pair line needs 'chosen' and 'rejected' strings", where)
            if "reward_chosen" in obj or "reward_rejected" in obj:
                rewards = [_number(obj, "reward_chosen", where), _number(obj, "reward_rejected", where)]
                kinds["scored_pairs"] += 1
            else:
                rewards = [pair_reward, -pair_reward]
                kinds["pairs"] += 1
            out += [Episode(prompt, t, r) for t, r in zip(texts, rewards, strict=True)]
        elif isinstance(obj.get("completions"), list):
            for i, c in enumerate(obj["completions"]):
                if not isinstance(c, dict) or not isinstance(c.get("text"), str) or "reward" not in c:
                    raise UserError(
                        f"completion {i} has no 'text' and 'reward'", where,
                        "score the sets first: alignloop reward score --reward SPEC --data FILE --out FILE",
                    )  # fmt: skip
                out.append(Episode(prompt, c["text"], _number(c, "reward", where)))
            kinds["sets"] += 1
        elif isinstance(obj.get("completion"), str):
            key = "reward" if "reward" in obj else "score" if "score" in obj else None
            if key is None:
                raise UserError(
                    "completion line without a 'reward' (or 'score')", where,
                    "score it first (alignloop reward score --out), or give pairs (chosen/rejected)",
                )  # fmt: skip
            out.append(Episode(prompt, obj["completion"], _number(obj, key, where)))
            kinds["scored"] += 1
        else:
            raise UserError(
                "line has neither 'completion' + 'reward', 'completions', nor 'chosen' + 'rejected'", where,
                "ILQL learns from scored completions or preference pairs",
            )  # fmt: skip
    out = [e for e in out if e.completion.strip()]
    if not out:
        raise UserError("no episodes with a non-empty completion", str(path))
    lines = [(i, {"prompt": e.prompt, "completion": e.completion}) for i, e in enumerate(out, 1)]
    adopt_text_convention(lines, path)  # old files (no space between prompt and completion) converted
    for e, (_, line) in zip(out, lines, strict=True):
        e.completion = line["completion"]
    return out, kinds


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


class ILQLConfig(Config):
    """``alignloop ilql`` settings (YAML or ``--set key=value``)."""

    tau: float = Field(0.7, gt=0, lt=1)  # expectile of V
    gamma: float = Field(0.99, ge=0, le=1)
    cql_scale: float = Field(0.1, ge=0)
    awac_scale: float = Field(1.0, ge=0)
    alpha: float = Field(0.01, gt=0, le=1)  # Polyak rate of the target Q heads, after every step
    beta: float = Field(8.0, ge=0)  # decoding: log pi + beta * (Q - V); saved with the model (world: 8 best)
    two_qs: bool = True
    pair_reward: float = Field(1.0, gt=0)  # unscored pairs: chosen +pair_reward, rejected -pair_reward
    lora: LoraSettings | None = None  # set (or --lora) to train a LoRA adapter on the trunk
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    epochs: float = Field(
        16.0, gt=0
    )  # world demo: 2 epochs (75 steps) barely move the heads; 16 (600 steps) do
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_prompt_tokens: int = Field(256, ge=1)
    max_response_tokens: int = Field(128, ge=1)
    seed: int = 0
    device: str | None = None


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------


def is_ilql_folder(folder: str | Path) -> bool:
    return (Path(folder) / INFO_FILE).is_file() and (Path(folder) / HEADS_FILE).is_file()


def save_heads(out: Path, heads: ILQLHeads, cfg: ILQLConfig, hidden: int, vocab: int) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(out / HEADS_FILE)
    )
    info = {
        "method": "ilql",
        "beta": cfg.beta,
        "two_qs": cfg.two_qs,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "how_to_load": (
            "alignloop generate/evaluate/serve --model THIS_FOLDER decode with the Q and V heads "
            "(logits = log pi + beta * (Q - V)); transformers' from_pretrained loads the language model alone"
        ),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_decoder(folder: str | Path, lm: nn.Module, beta: float | None = None) -> ILQLDecoder:
    """Wrap ``lm`` (loaded from ``folder``) with the saved heads; ``beta`` overrides the saved one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    if getattr(lm.config, "is_encoder_decoder", False):
        raise UserError("ILQL decoding supports causal language models only", str(folder))
    heads = ILQLHeads(int(info["hidden_size"]), int(info["vocab_size"]), bool(info["two_qs"]))
    heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
    p = next(lm.parameters())
    heads.to(device=p.device, dtype=p.dtype).eval()
    return ILQLDecoder(lm, heads, float(info["beta"] if beta is None else beta)).eval()


# ----------------------------------------------------------------------------------------------
# train_ilql: the whole algorithm, top to bottom
# ----------------------------------------------------------------------------------------------


def train_ilql(
    policy_id: str | Path,
    data_path: str | Path,
    out: str | Path,
    config: ILQLConfig | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ILQL heads (and the language model, by AWAC) on ``data_path``; save to ``out``.

    Returns the final metrics (also ``out/metrics.json``; per step ``out/metrics.jsonl``). With
    ``resume`` a finished run is skipped and an interrupted one continues from its last checkpoint
    exactly (weights, heads, optimizer, RNG, data position).
    """
    from alignloop.runs import stage_guard, start_stage

    cfg = config or ILQLConfig()
    out = Path(out)
    run = start_stage(
        out, "ilql", config=cfg, inputs={"policy": str(policy_id), "data": str(data_path)},
        seed=cfg.seed, resume=resume,
    )  # fmt: skip
    if run.skipped:
        return run.metrics
    with stage_guard(run):
        return _train(run, policy_id, data_path, cfg, resume)


def _train(
    run: Any, policy_id: str | Path, data_path: str | Path, cfg: ILQLConfig, resume: bool
) -> dict[str, Any]:
    from alignloop.models import (
        encode_pairs,
        hidden_size,
        load_policy,
        logits_and_hidden,
        make_optimizer,
        pick_device,
    )
    from alignloop.offline.dpo import batch_indices  # the seeded data stream: data position = f(step)
    from alignloop.runs import progress, say

    out, fp = run.dir, run.manifest["fingerprint"]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 1. episodes: (prompt, completion, reward)
    episodes, kinds = read_episodes(data_path, cfg.pair_reward)
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)

    # 2. the language model (full or LoRA) and fresh heads; tokens as generation made them
    device = pick_device(cfg.device)
    policy = load_policy(policy_id, lora=cfg.lora, value_head=False, device=device, reference=False)
    if policy.is_seq2seq:
        raise UserError("alignloop ilql supports causal language models only", str(policy_id))
    model, tok = policy.model, policy.tokenizer
    p_ids, r_ids = encode_pairs(tok, [e.prompt for e in episodes], [e.completion for e in episodes], False)
    p_ids = [p[-cfg.max_prompt_tokens :] for p in p_ids]
    r_ids = [r[: cfg.max_response_tokens] for r in r_ids]
    vocab = int(model.get_output_embeddings().weight.shape[0])
    heads = ILQLHeads(hidden_size(model), vocab, cfg.two_qs).to(device)
    say(
        f"[ilql] {len(episodes)} episodes ({', '.join(f'{v} {k}' for k, v in kinds.items() if v)}); "
        f"reward mean {rewards.mean():.3f} sd {rewards.std(unbiased=False):.3f}; "
        f"{'LoRA' if policy.is_lora else 'full fine-tuning'}"
    )

    # 3. optimizer over the trunk (LoRA or all), the Q heads and V; resume restores everything
    params = [p for p in model.parameters() if p.requires_grad] + heads.trainable()
    optimizer = make_optimizer(params, lr=cfg.learning_rate)  # fused AdamW, as every trainer
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(episodes) / cfg.batch_size))
    start = 0
    hit = newest_intact(out / CHECKPOINTS, verify_folder, "ilql") if resume else None
    if hit is not None:
        start = _load_checkpoint(hit[0], model, heads, optimizer, fp)
        say(f"[ilql] resumed from {hit[0].name} (step {start} of {total})")
    elif not resume:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    if resume:
        truncate_metrics_log(out, start)  # steps after the checkpoint are logged again

    # 4. the loop
    model.train()
    last: dict[str, Any] = {}
    for step in progress(range(start, total), total=total - start, desc="ilql", unit="step"):
        t0 = time.perf_counter()
        idx = batch_indices(step, len(episodes), cfg.batch_size, cfg.seed)
        batch = policy.batch([p_ids[i] for i in idx], [r_ids[i] for i in idx]).to(device)
        mask, actions = batch.response_mask, batch.response_ids
        logits, hidden = logits_and_hidden(model, batch)  # (B, R, V), (B, R, H): state before a_t
        hidden = hidden.to(heads.v[0].weight.dtype)
        qs = [q(hidden) for q in heads.q]  # each (B, R, V)
        q_taken = [q.gather(-1, actions.unsqueeze(-1)).squeeze(-1).float() for q in qs]
        target_taken = heads.target_min(hidden).gather(-1, actions.unsqueeze(-1)).squeeze(-1).float()
        v = heads.values(hidden).float()  # (B, R)
        r, done = token_rewards(rewards[idx].to(device), mask)
        y = q_targets(r, v, done, cfg.gamma)  # r_t + gamma V(s_{t+1}) (1 - done_t), detached
        l_q = q_loss(q_taken, y, mask)
        l_v = expectile_loss(target_taken - v, cfg.tau, mask)
        l_cql = cql_loss(qs, actions, mask)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), actions.flatten(), reduction="none")
        l_awac = masked_mean(nll.view_as(actions), mask)
        loss = l_q + l_v + cfg.cql_scale * l_cql + cfg.awac_scale * l_awac
        loss.backward()
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for q, tq in zip(heads.q, heads.target_q, strict=True):  # target Q heads follow slowly
            polyak_update(tq, q, cfg.alpha)
        last = {
            "loss": float(loss.detach()),
            "loss/q": float(l_q.detach()),
            "loss/v": float(l_v.detach()),
            "loss/cql": float(l_cql.detach()),
            "loss/awac": float(l_awac.detach()),
            "values/v_mean": float(masked_mean(v.detach(), mask)),
            "values/q_mean": float(masked_mean(q_taken[0].detach(), mask)),
            "episodes_per_second": len(idx) / (time.perf_counter() - t0),
        }
        if grad_norm is not None:
            last["grad_norm"] = grad_norm
        done_steps = step + 1
        run.log(done_steps, **last)
        if done_steps % cfg.checkpoint_every == 0 and done_steps < total:
            _save_checkpoint(out, done_steps, model, heads, optimizer, fp, cfg.keep_checkpoints)

    # 5. the language model (HF folder or adapter) + heads, then the final metrics
    model.eval()
    policy.save(out)
    save_heads(out, heads, cfg, hidden_size(model), vocab)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    final = {k: v for k, v in last.items() if k != "episodes_per_second"}
    final.update({"steps": total, "episodes": len(episodes), "beta": cfg.beta})
    say(f"[ilql] saved {out} (decode with beta={cfg.beta}: --set beta=... at training, or edit ilql.json)")
    return run.finish(final)


# ----------------------------------------------------------------------------------------------
# Checkpoints (verified step folders, as the other trainers)
# ----------------------------------------------------------------------------------------------


def _save_checkpoint(
    out: Path, step: int, model: nn.Module, heads: ILQLHeads, optimizer: Any, fp: str, keep: int
) -> Path:
    from safetensors.torch import save_file

    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    head_state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(head_state, str(tmp / HEADS_FILE))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")

    return write_step(out / CHECKPOINTS, step, write, {"step": step, "fingerprint": fp}, keep)


def _load_checkpoint(ckpt: Path, model: nn.Module, heads: ILQLHeads, optimizer: Any, fp: str) -> int:
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("fingerprint") != fp:
        raise UserError(
            "the checkpoint was made with another config or other input files", str(ckpt),
            "run without --resume to start over, or pass another --out",
        )  # fmt: skip
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(ckpt / "trainable.safetensors")).items():
            params[n].copy_(t)
    heads.load_state_dict(load_file(str(ckpt / HEADS_FILE)))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return int(state["step"])
