"""Evaluate policies on the same held-out prompts: sample, score, compare with intervals.

The algorithm, top to bottom (:func:`evaluate_policies`):

1. Read the prompts; check every policy's config loads *before* any sampling (fail fast).
2. For each policy: sample ``samples_per_prompt`` completions per prompt for each seed. The
   seeds are the same for every policy (common random numbers: two identical policies give
   identical samples; set ``independent_samples`` to give each policy its own stream, e.g.
   to check that a policy compared with itself shows no difference).
3. Score every completion: the reward model (``reward_spec``), the toxicity classifier
   (probability of its toxic label), the world's gold judge (score, helpful/honest/harmless,
   F = fail, behaviour flags), ROUGE-L against the prompt's ``reference`` when prompts have one,
   and its length.
4. KL to the reference per completion: ``KL_seq = sum_t log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t)``
   over the sampled tokens (a Monte-Carlo estimate of KL(pi || ref), exact in expectation for
   samples from pi); per token = ``sum KL_seq / sum tokens`` within a prompt.
5. Reduce to one value per prompt per metric (mean over that prompt's samples and seeds, or a
   per-prompt statistic: max toxicity, distinct-n among the prompt's samples), then report each
   policy's mean with a bootstrap 95% interval and, for each policy after the first (the
   baseline), the paired difference, its interval and the % change.

Everything sampled is written to ``samples.jsonl`` (one line per completion with all its
scores) as soon as a policy is done, so a later failure loses nothing finished.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignloop.errors import UserError
from alignloop.evaluation.metrics import distinct_n, mean_ci, paired_difference, pearson, rouge_l, word_length
from alignloop.evaluation.overoptimization import best_of_n_curve, find_checkpoints, gold_peak
from alignloop.evaluation.toxicity import DEFAULT_SPEC as DEFAULT_TOXICITY
from alignloop.evaluation.toxicity import THRESHOLD, toxicity_scores
from alignloop.records import JsonlAppender, Prompt, is_conversational, read
from alignloop.runs import progress, say

GOLD_AXES = ("helpful", "honest", "harmless")
SAMPLE_TABLE_ROWS = 12


@dataclass
class PolicySamples:
    """Every completion of one policy, flat lists aligned by index (prompt-major is not assumed)."""

    name: str
    model: str
    prompt_index: list[int] = field(default_factory=list)
    seed: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # ended on a stop token (not cut at max_new_tokens)
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)
    flags: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.text)


# ----------------------------------------------------------------------------- inputs


def load_prompts(
    prompts: str | Path | Sequence[Mapping[str, Any] | Prompt],
    limit: int | None = None,
    tokenizer: Any = None,
) -> list[dict]:
    """Prompt records from a JSONL file or a list; an empty or bad file is a UserError. With a
    ``tokenizer``, a conversation (a message list) becomes its chat-template rendering with the
    generation prompt (:func:`alignloop.chat.prompt_text`): what the policies sample after and what the
    rewards and judges read."""
    if isinstance(prompts, (str, Path)):
        records = [p.model_dump() for p in read(prompts, Prompt, tokenizer=tokenizer)]
        where = str(prompts)
    else:
        records = [p.model_dump() if isinstance(p, Prompt) else dict(p) for p in prompts]
        where = "the prompt list"
        for i, r in enumerate(records):
            if not str(r.get("prompt", "")).strip():
                raise UserError(f"prompt {i} has no text", where, "every record needs a non-empty 'prompt'")
            r.setdefault("id", str(i))
            if tokenizer is not None and is_conversational(r["prompt"]):
                from alignloop.chat import prompt_text

                r["prompt"] = prompt_text(tokenizer, r["prompt"], f"{where}: prompt {i}")
    if not records:
        raise UserError(
            "no prompts to evaluate", where, "give a JSONL file with one {'id', 'prompt'} per line"
        )
    return records[:limit] if limit else records


def chat_tokenizer(model_ids: Sequence[Any], chat_template: str | Path | None = None) -> Any:
    """The tokenizer whose chat template renders conversational prompts for every policy: the first
    policy's (``chat_template``: a Jinja file instead). Policies whose own templates differ from it
    would each read another text: a UserError (evaluate such policies apart)."""
    from alignloop.chat import use_chat_template
    from alignloop.models import load_tokenizer

    toks = [load_tokenizer(str(m)) for m in model_ids]
    if chat_template is None and len({getattr(t, "chat_template", None) for t in toks}) > 1:
        raise UserError(
            "the policies carry different chat templates, so a conversation would be a different text for each",
            fix="evaluate them apart, or pass one template (--chat-template FILE)",
        )
    return use_chat_template(toks[0], chat_template)


def render_conversations(
    prompts: Any, limit: int | None, records: list[dict], model_ids: Sequence[Any], chat_template: Any = None
) -> tuple[list[dict], frozenset[str], str]:
    """``records`` (from :func:`load_prompts`) with their conversations rendered by one template
    (:func:`chat_tokenizer`), the rendered prompts that were conversations, and the template's
    end-of-turn (:func:`alignloop.chat.turn_end`): a reward model reads a finished answer to one of
    them with it (:func:`alignloop.chat.sampled_texts`). Text prompts: as they are, none, ``""``."""
    if not any(is_conversational(r["prompt"]) for r in records):
        return records, frozenset(), ""
    from alignloop.chat import turn_end

    tok = chat_tokenizer(model_ids, chat_template)
    rendered = load_prompts(prompts, limit, tok)
    chat = frozenset(
        r["prompt"] for r, g in zip(rendered, records, strict=True) if is_conversational(g["prompt"])
    )
    return rendered, chat, turn_end(tok)


def check_references(records: Sequence[Mapping[str, Any]], rouge: bool | None, where: str) -> bool:
    """Whether to compute ROUGE-L: ``rouge=None`` -> when the prompts have references.

    Raises UserError when ROUGE-L is asked for (or some prompts have references) and a prompt
    has none, naming the first such prompt. Prompts that carry a ``family`` (the world's: only
    its summaries have references) are scored on those with a reference.
    """
    has = [bool(str(r.get("reference") or "").strip()) for r in records]
    if rouge is False or (rouge is None and not any(has)):
        return False
    by_family = rouge is None and all("family" in r for r in records)
    if not all(has) and not by_family:
        missing = records[has.index(False)]
        raise UserError(
            f"prompt {missing.get('id')!r} has no 'reference' summary for ROUGE-L"
            + (" (other prompts have one)" if any(has) else ""),
            where,
            "add a 'reference' to every prompt record, or evaluate without ROUGE-L (--no-rouge)",
        )
    return True


def check_policy(name: str, model_id: str) -> None:
    """Fail fast, before any sampling, when a policy's config cannot be loaded."""
    from alignloop.models import is_seq2seq, resolve_model_id

    try:
        is_seq2seq(resolve_model_id(model_id))
    except UserError as e:
        raise UserError(f"policy {name!r} cannot be loaded: {e.what}", e.where, e.fix) from None


def _load(name: str, model_id: str, device: str | None) -> tuple[Any, Any]:
    from alignloop.models import load_lm

    try:
        return load_lm(model_id, device=device)
    except UserError as e:
        raise UserError(f"policy {name!r} cannot be loaded: {e.what}", e.where, e.fix) from None
    except (OSError, ValueError, RuntimeError) as e:  # e.g. weights that do not match the config
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"policy {name!r} cannot be loaded ({first})", model_id, "check the model folder"
        ) from None


# ----------------------------------------------------------------------------- sampling


def sample_seed(seed: int, sample: int, chunk: int, stream: int = 0) -> int:
    """The generator seed of one batch: fixed by (evaluation seed, sample index, prompt chunk, stream)."""
    return (seed * 1_000_003 + stream * 10_007 + sample * 101 + chunk) % (2**63 - 1)


def sample_policy(
    name: str,
    model_id: str,
    prompts: Sequence[str],
    samples_per_prompt: int,
    seeds: Sequence[int],
    settings: Any,
    batch_size: int = 32,
    device: str | None = None,
    stream: int = 0,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> tuple[PolicySamples, Any, Any]:
    """Sample ``samples_per_prompt`` completions per prompt for each seed (batched by prompt chunks).

    Returns the samples and the loaded ``(model, tokenizer)`` (for the log-probs that follow).
    """
    from alignloop.generation import sample

    model, tok = model_and_tokenizer or _load(name, model_id, device)
    out = PolicySamples(name, model_id)
    chunks = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    jobs = [(s, j, c) for s in seeds for j in range(samples_per_prompt) for c in range(len(chunks))]
    for s, j, c in progress(jobs, desc=f"sample {name}", unit="batch"):
        idx = chunks[c]
        got = sample(model, tok, [prompts[i] for i in idx], settings, seed=sample_seed(s, j, c, stream))
        out.prompt_index += idx
        out.seed += [s] * len(idx)
        out.text += got.texts
        out.finished += got.finished
        out.prompt_ids += got.prompt_ids
        out.response_ids += got.response_ids
    return out, model, tok


def response_logprobs(
    model: Any, tokenizer: Any, ps: PolicySamples, batch_size: int, temperature: float
) -> np.ndarray:
    """(N,) summed log-probs of each sampled response under ``model`` (same tokenizer assumed)."""
    import torch

    from alignloop.models import build_batch, token_logprobs

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    start = getattr(model.config, "decoder_start_token_id", None)
    pad = int(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out = np.zeros(len(ps), dtype=float)
    order = sorted(range(len(ps)), key=lambda i: len(ps.prompt_ids[i]) + len(ps.response_ids[i]))
    t = temperature if temperature > 0 else 1.0
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            batch = build_batch(
                [ps.prompt_ids[i] for i in idx],
                [ps.response_ids[i] for i in idx],
                pad,
                seq2seq,
                int(start) if start is not None else (pad if seq2seq else None),
            ).to(device)
            out[idx] = token_logprobs(model, batch, temperature=t).sum(dim=-1).double().cpu().numpy()
    return out


def same_tokenizer(a: Any, b: Any) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


# ----------------------------------------------------------------------------- scoring


def score_samples(
    ps: PolicySamples,
    records: Sequence[Mapping[str, Any]],
    reward: Any,
    toxicity_spec: str | None,
    gold: bool,
    rouge: bool,
    chat: frozenset[str] = frozenset(),
    turn_end: str = "",
) -> None:
    """Fill ``ps.scores`` (reward, toxicity, gold axes, fail, rouge_l, length) and ``ps.flags``.

    ``chat``: the prompt texts rendered from conversations, whose finished samples a reward model reads
    with the template's end-of-turn ``turn_end`` (:func:`alignloop.chat.sampled_texts`, as in PPO)."""
    from alignloop.chat import sampled_texts

    prompts = [records[i]["prompt"] for i in ps.prompt_index]
    ps.scores["length"] = [float(word_length(t)) for t in ps.text]
    if reward is not None:
        ps.scores["reward"] = list(
            reward(prompts, sampled_texts(reward, prompts, ps.text, ps.finished, chat, turn_end))
        )
    if toxicity_spec:
        ps.scores["toxicity"] = toxicity_scores(ps.text, toxicity_spec)
    if rouge:  # NaN for a prompt without a reference (a world prompt that is not a summary)
        refs = [str(records[i].get("reference") or "").strip() for i in ps.prompt_index]
        scored = iter(rouge_l([t for t, r in zip(ps.text, refs, strict=True) if r], [r for r in refs if r]))
        ps.scores["rouge_l"] = [next(scored) if r else math.nan for r in refs]
    if gold:
        from alignloop.world import judge_batch

        judgements = judge_batch(prompts, ps.text)
        ps.scores["gold_score"] = [float(j.score) for j in judgements]
        for axis in GOLD_AXES:
            ps.scores[f"gold_{axis}"] = [float(getattr(j, axis)) for j in judgements]
        ps.scores["fail"] = [float(bool(j.fail)) for j in judgements]
        # "misbehaviour" (toxic, harmful compliance or a confirmed myth) counted like a flag
        ps.flags = [
            sorted(j.flags) + (["misbehaviour"] if getattr(j, "misbehaviour", False) else [])
            for j in judgements
        ]
    else:
        ps.flags = [[] for _ in ps.text]


def world_available() -> bool:
    try:
        import alignloop.world  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- reduction


def per_prompt_metrics(
    ps: PolicySamples, n_prompts: int, flags: Sequence[str]
) -> dict[str, dict[int, np.ndarray]]:
    """``{metric: {seed: (P,) per-prompt values}}`` (NaN where a prompt has no sample)."""
    seeds = sorted(set(ps.seed))
    groups: dict[tuple[int, int], list[int]] = {}
    for n, (s, p) in enumerate(zip(ps.seed, ps.prompt_index, strict=True)):
        groups.setdefault((s, p), []).append(n)
    out: dict[str, dict[int, np.ndarray]] = {}

    def put(metric: str, s: int, p: int, value: float) -> None:
        out.setdefault(metric, {k: np.full(n_prompts, np.nan) for k in seeds})[s][p] = value

    for (s, p), idx in groups.items():
        sc = {k: np.asarray([v[i] for i in idx], dtype=float) for k, v in ps.scores.items()}
        if "reward" in sc:
            put("reward", s, p, sc["reward"].mean())
        for k in ("gold_score", *(f"gold_{a}" for a in GOLD_AXES)):
            if k in sc:
                put(k, s, p, sc[k].mean())
        if "fail" in sc:
            put("f_rate", s, p, sc["fail"].mean())
            for f in flags:
                put(f"rate_{f}", s, p, float(np.mean([f in ps.flags[i] for i in idx])))
        if "toxicity" in sc:
            tox = sc["toxicity"]
            put("toxicity", s, p, tox.mean())
            put("expected_max_toxicity", s, p, tox.max())
            put("toxicity_probability", s, p, float(tox.max() >= THRESHOLD))
        if "kl" in sc:
            put("kl_per_token", s, p, sc["kl"].sum() / max(1.0, sc["tokens"].sum()))
            put("kl_sequence", s, p, sc["kl"].mean())
        if "rouge_l" in sc:
            put("rouge_l", s, p, sc["rouge_l"].mean())
        texts = [ps.text[i] for i in idx]
        put("distinct_1", s, p, distinct_n(texts, 1))
        put("distinct_2", s, p, distinct_n(texts, 2))
        put("mean_length", s, p, sc["length"].mean())
    return out


METRIC_ORDER = (
    "reward", "gold_score", "gold_helpful", "gold_honest", "gold_harmless", "f_rate",
    "toxicity", "expected_max_toxicity", "toxicity_probability", "kl_per_token", "kl_sequence",
    "rouge_l", "distinct_1", "distinct_2", "mean_length",
)  # fmt: skip


def _seed_mean(by_seed: Mapping[int, np.ndarray]) -> np.ndarray:
    """(P,) mean over seeds of per-prompt values (NaN-aware)."""
    stack = np.stack(list(by_seed.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a prompt with no value in any seed stays NaN
        return np.nanmean(stack, axis=0)


def _nanmean(x: np.ndarray) -> float | None:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else None


# ----------------------------------------------------------------------------- the evaluation


def evaluate_policies(
    policies: Mapping[str, str | Path],
    prompts: str | Path | Sequence[Mapping[str, Any] | Prompt],
    *,
    reward_spec: str | None = None,
    toxicity_spec: str | None = DEFAULT_TOXICITY,
    reference: str | Path | None = None,
    samples_per_prompt: int = 4,
    seed: int | Sequence[int] = 0,
    out: str | Path | None = None,
    gold: bool | None = None,
    rouge: bool | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    limit: int | None = None,
    independent_samples: bool = False,
    n_boot: int = 2000,
    device: str | None = None,
    overoptimization: Mapping[str, str | Path] | None = None,
    overoptimization_samples: int | None = None,
    proxy_spec: str | None = None,
    gold_spec: str | None = None,
    best_of_n: int = 0,
    chat_template: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``policies`` (``{name: model id or folder}``, the first is the baseline) on ``prompts``.

    Args:
        prompts: a prompt JSONL file (``{"id", "prompt", "reference"?}``) or a list of records.
        reward_spec: reward-model SPEC for the "reward" metric (None: no reward metric).
        toxicity_spec: toxicity classifier (``world:toxicity``, a hub id, ``MODEL:LABEL``); None: off.
        reference: the model KL is measured against; default the first policy.
        samples_per_prompt: completions per prompt per seed. ``seed``: one seed or several.
        gold: the world's gold judge; None = when the world is installed and the prompts are the
            world's (they carry a ``family``).
        rouge: ROUGE-L against each prompt's ``reference``; None = when prompts have references.
        independent_samples: each policy its own random stream (else common random numbers).
        overoptimization: ``{name: training run folder}`` whose checkpoints are evaluated for the
            gold-vs-KL plot; ``best_of_n`` > 1 adds best-of-n from the reference with that many
            samples per prompt. ``proxy_spec``/``gold_spec`` default to ``reward_spec``/``world:gold``.
        overoptimization_samples: samples per prompt for each checkpoint (default ``samples_per_prompt``).
        out: folder for ``samples.jsonl`` and ``per_prompt.json`` (``metrics.json``/``report.html``
            are written by the command, or by :func:`~alignloop.evaluation.write_report`).
        chat_template: a Jinja file rendering conversational prompts (default: the policies' own
            template, which must be the same for all; see :func:`chat_tokenizer`).

    Returns:
        A JSON-able dict: ``settings``, ``baseline``, ``metric_names``, ``policies`` (per policy:
        ``model``, ``metrics`` {metric: mean/ci_low/ci_high/n}, ``per_seed`` {metric: [means]}),
        ``differences`` (per non-baseline policy: {metric: paired difference}), ``samples``
        (a table of completions side by side), ``notes``, ``overoptimization`` (when asked).
    """
    from alignloop.generation import SamplingSettings

    if not policies:
        raise UserError("no policy to evaluate", fix="give at least one --policy ID")
    if samples_per_prompt < 1:
        raise UserError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    if not seeds:
        raise UserError("no seed given", fix="give at least one seed")
    where = str(prompts) if isinstance(prompts, (str, Path)) else "the prompt list"
    records = load_prompts(prompts, limit)
    do_rouge = check_references(records, rouge, where)
    if gold is None:
        gold = world_available() and any("family" in r for r in records)
    elif gold and not world_available():
        raise UserError("the gold judge needs the embedded world (alignloop.world), which is not installed")
    names = list(policies)
    models = {n: str(policies[n]) for n in names}
    ref_id = str(reference) if reference is not None else models[names[0]]
    for n in names:
        check_policy(n, models[n])
    check_policy("reference", ref_id)
    records, chat, end = render_conversations(prompts, limit, records, list(models.values()), chat_template)
    if toxicity_spec:  # e.g. world:toxicity in an unbuilt world: say so before any sampling
        from alignloop.evaluation.toxicity import split_spec
        from alignloop.models import resolve_model_id

        resolve_model_id(split_spec(toxicity_spec)[0])
    settings = SamplingSettings(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
    )
    reward = None
    if reward_spec:
        from alignloop.reward import load_reward

        reward = load_reward(reward_spec, device=device)
    prompt_texts = [r["prompt"] for r in records]
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples.jsonl").unlink(missing_ok=True)
    notes: list[str] = []

    # 2-3. sample and score each policy; keep its log-probs of its own samples for the KL
    all_samples: dict[str, PolicySamples] = {}
    own_logp: dict[str, np.ndarray] = {}
    tokenizers: dict[str, Any] = {}
    for k, n in enumerate(names):
        say(f"[evaluate] {n}: {len(records)} prompts x {samples_per_prompt} samples x {len(seeds)} seed(s)")
        ps, model, tok = sample_policy(
            n, models[n], prompt_texts, samples_per_prompt, seeds, settings, batch_size, device,
            stream=k if independent_samples else 0,
        )  # fmt: skip
        own_logp[n] = response_logprobs(model, tok, ps, batch_size, temperature)
        tokenizers[n] = tok
        del model
        gc.collect()
        score_samples(ps, records, reward, toxicity_spec, gold, do_rouge, chat, end)
        ps.scores["tokens"] = [float(len(r)) for r in ps.response_ids]
        all_samples[n] = ps

    # 4. KL to the reference, one reference load for all policies
    ref_model, ref_tok = _load("reference", ref_id, device)
    for n in progress(names, desc="KL to reference", unit="policy"):
        ps = all_samples[n]
        if not same_tokenizer(tokenizers[n], ref_tok):
            notes.append(f"KL of {n!r} not computed: its tokenizer differs from the reference's ({ref_id}).")
            continue
        ref_logp = response_logprobs(ref_model, ref_tok, ps, batch_size, temperature)
        ps.scores["kl"] = list(own_logp[n] - ref_logp)
    del ref_model
    gc.collect()
    if out_dir is not None:
        _write_samples(out_dir / "samples.jsonl", all_samples, records)

    # 5. per-prompt values -> means with intervals, paired differences against the baseline
    flags = sorted({f for ps in all_samples.values() for fl in ps.flags for f in fl})
    if gold and "misbehaviour" not in flags:
        flags.append("misbehaviour")  # reported (as 0) even when nobody misbehaved
    per_prompt = {n: per_prompt_metrics(all_samples[n], len(records), flags) for n in names}
    metric_names = [m for m in METRIC_ORDER if any(m in per_prompt[n] for n in names)]
    metric_names += [f"rate_{f}" for f in flags]
    result: dict[str, Any] = {
        "settings": {
            "prompts": len(records),
            "prompt_file": where,
            "samples_per_prompt": samples_per_prompt,
            "seeds": seeds,
            "reward": reward_spec,
            "toxicity": toxicity_spec,
            "toxic_threshold": THRESHOLD,
            "reference": ref_id,
            "gold_judge": bool(gold),
            "rouge_l": do_rouge,
            "sampling": settings.model_dump(),
            "independent_samples": independent_samples,
            "bootstrap_resamples": n_boot,
        },
        "baseline": names[0],
        "metric_names": metric_names,
        "policies": {},
        "differences": {},
        "notes": notes,
    }
    flat = {n: {m: _seed_mean(v) for m, v in per_prompt[n].items()} for n in names}
    for n in names:
        result["policies"][n] = {
            "model": models[n],
            "metrics": {
                m: mean_ci(flat[n][m], n_boot=n_boot, seed=seeds[0]) for m in metric_names if m in flat[n]
            },
            "per_seed": {
                m: [_nanmean(per_prompt[n][m][s]) for s in seeds] for m in metric_names if m in flat[n]
            },
            # the length diagnostic: how much each score follows completion length (words), all samples
            "length_correlation": {
                k: pearson(all_samples[n].scores[k], all_samples[n].scores["length"])
                for k in ("reward", "gold_score")
                if k in all_samples[n].scores
            },
        }
    for n in names[1:]:
        result["differences"][n] = {
            m: paired_difference(flat[names[0]][m], flat[n][m], n_boot=n_boot, seed=seeds[0])
            for m in metric_names
            if m in flat[n] and m in flat[names[0]]
        }
    if gold:
        result["by_family"] = by_family(records, flat, names, n_boot, seeds[0])
    result["samples"] = _sample_table(all_samples, records, names)
    if out_dir is not None:
        from alignloop.runs import write_json_atomic

        write_json_atomic(
            out_dir / "per_prompt.json",
            {
                "prompt_ids": [r["id"] for r in records],
                "policies": {
                    n: {m: [None if math.isnan(x) else x for x in v.tolist()] for m, v in flat[n].items()}
                    for n in names
                },
            },
        )
    if overoptimization or best_of_n > 1:
        result["overoptimization"] = overoptimization_curves(
            ref_id,
            records,
            runs=overoptimization or {},
            proxy_spec=proxy_spec or reward_spec,
            gold_spec=gold_spec or ("world:gold" if gold else None),
            samples_per_prompt=overoptimization_samples or samples_per_prompt,
            best_of_n=best_of_n,
            settings=settings,
            seed=seeds[0],
            batch_size=batch_size,
            device=device,
        )
    return result


FAMILY_METRICS = ("gold_score", "f_rate", "rate_misbehaviour", "rate_toxic", "rate_harmful_compliance",
                  "rate_myth_confirmed", "rouge_l", "reward", "toxicity", "kl_sequence")  # fmt: skip


def by_family(
    records: Sequence[Mapping[str, Any]], flat: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str],
    n_boot: int, seed: int,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``{family: {"prompts": n, "policies": {policy: {metric: mean/ci}}}}`` over each family's prompts."""
    families = [str(r.get("family", "")) for r in records]
    out: dict[str, dict[str, Any]] = {}
    for fam in sorted(set(families) - {""}):
        mask = np.array([f == fam for f in families])
        per_policy = {
            n: {
                m: mean_ci(flat[n][m][mask], n_boot=n_boot, seed=seed) for m in FAMILY_METRICS if m in flat[n]
            }
            for n in names
        }
        out[fam] = {"prompts": int(mask.sum()), "policies": per_policy}
    return out


def _write_samples(
    path: Path, all_samples: Mapping[str, PolicySamples], records: Sequence[Mapping[str, Any]]
) -> None:
    with JsonlAppender(path) as f:
        for n, ps in all_samples.items():
            for i in range(len(ps)):
                rec = records[ps.prompt_index[i]]
                row = {
                    "policy": n,
                    "model": ps.model,
                    "prompt_id": rec["id"],
                    "seed": ps.seed[i],
                    "text": ps.text[i],
                }
                row.update({k: v[i] for k, v in ps.scores.items()})
                row["flags"] = ps.flags[i]
                f.write(row)


def _sample_table(
    all_samples: Mapping[str, PolicySamples], records: Sequence[Mapping[str, Any]], names: Sequence[str]
) -> list[dict[str, Any]]:
    """The first completion of each policy for the first prompts, side by side."""
    first: dict[str, dict[int, str]] = {}
    for n in names:
        ps = all_samples[n]
        first[n] = {}
        for i in range(len(ps)):
            first[n].setdefault(ps.prompt_index[i], ps.text[i])
    rows = []
    for p in range(min(SAMPLE_TABLE_ROWS, len(records))):
        row = {
            "prompt_id": records[p]["id"],
            "prompt": records[p]["prompt"],
            "completions": {n: first[n].get(p, "") for n in names},
        }
        if records[p].get("reference"):
            row["reference"] = records[p]["reference"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- over-optimization


def overoptimization_curves(
    reference: str | Path,
    prompts: str | Path | Sequence[Mapping[str, Any] | Prompt],
    *,
    runs: Mapping[str, str | Path] | None = None,
    proxy_spec: str | None,
    gold_spec: str | None = "world:gold",
    samples_per_prompt: int = 4,
    best_of_n: int = 16,
    max_new_tokens: int = 48,
    settings: Any = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Proxy and gold score against sqrt(KL) for best-of-n and for each run's checkpoints.

    Args:
        reference: the starting policy (best-of-n samples from it; KL is measured to it).
        runs: ``{name: run folder}``; each checkpoint found by
            :func:`~alignloop.evaluation.overoptimization.find_checkpoints` becomes one point,
            with the reference itself at step 0.
        proxy_spec: the reward the policy was optimised for. gold_spec: the "true" reward.
        best_of_n: samples per prompt from the reference for the best-of-n curve (0/1: none).
        settings: the :class:`~alignloop.generation.SamplingSettings` (default: plain sampling,
            ``max_new_tokens`` new tokens).

    Returns:
        ``{"best_of_n": [points], "series": {name: [points]}, "peaks": {name: point}}`` where a
        point is ``{"n" | "step", "kl", "sqrt_kl", "proxy", "gold", "model"?}``.
    """
    from alignloop.generation import SamplingSettings
    from alignloop.reward import load_reward

    if not proxy_spec or not gold_spec:
        raise UserError(
            "the over-optimization plot needs a proxy reward and a gold reward",
            fix="pass --reward SPEC (the proxy) and --gold-reward SPEC (world:gold in the world)",
        )
    from alignloop.chat import sampled_texts

    records, chat, end = render_conversations(prompts, limit, load_prompts(prompts, limit), [reference])
    texts = [r["prompt"] for r in records]
    settings = settings or SamplingSettings(max_new_tokens=max_new_tokens)
    proxy, gold = load_reward(proxy_spec, device=device), load_reward(gold_spec, device=device)
    out: dict[str, Any] = {"proxy": proxy_spec, "gold": gold_spec, "best_of_n": [], "series": {}, "peaks": {}}
    ref_id = str(reference)
    check_policy("reference", ref_id)
    ref_model, ref_tok = _load("reference", ref_id, device)
    if best_of_n > 1:
        ps, _, _ = sample_policy("best-of-n", ref_id, texts, best_of_n, [seed], settings, batch_size, device,
                                 stream=7, model_and_tokenizer=(ref_model, ref_tok))  # fmt: skip
        prompts_of = [texts[i] for i in ps.prompt_index]
        p_scores = np.asarray(
            proxy(prompts_of, sampled_texts(proxy, prompts_of, ps.text, ps.finished, chat, end))
        )
        p_scores = p_scores.reshape(-1)
        g_scores = np.asarray(gold(prompts_of, ps.text)).reshape(-1)
        P = np.zeros((len(texts), best_of_n))
        G = np.zeros((len(texts), best_of_n))
        filled = [0] * len(texts)
        for i, p in enumerate(ps.prompt_index):
            P[p, filled[p]], G[p, filled[p]] = p_scores[i], g_scores[i]
            filled[p] += 1
        out["best_of_n"] = best_of_n_curve(P, G)
        out["peaks"]["best-of-n"] = gold_peak(out["best_of_n"])
    for name, folder in (runs or {}).items():
        checkpoints = find_checkpoints(folder)
        if not checkpoints:
            raise UserError(
                f"no model checkpoints found for {name!r}",
                str(folder),
                "give a training run folder with HF model folders (step-N/, checkpoints/step-N/ or final/)",
            )
        points = [{"step": 0, "model": ref_id, "kl": 0.0, "sqrt_kl": 0.0}]
        for step, path in checkpoints:
            points.append({"step": step, "model": str(path)})
        for pt in progress(points, desc=f"checkpoints {name}", unit="ckpt"):
            is_ref = pt["model"] == ref_id
            mt = (ref_model, ref_tok) if is_ref else None
            ps, model, tok = sample_policy(f"{name}@{pt['step']}", pt["model"], texts, samples_per_prompt, [seed],
                                           settings, batch_size, device, model_and_tokenizer=mt)  # fmt: skip
            prompts_of = [texts[i] for i in ps.prompt_index]
            read = sampled_texts(proxy, prompts_of, ps.text, ps.finished, chat, end)  # a chat turn, ended
            pt["proxy"] = float(np.mean(proxy(prompts_of, read)))
            pt["gold"] = float(np.mean(gold(prompts_of, ps.text)))
            if not is_ref:
                if not same_tokenizer(tok, ref_tok):
                    raise UserError(
                        f"checkpoint {pt['model']} does not share the reference's tokenizer", ref_id
                    )
                t = settings.temperature
                kl = response_logprobs(model, tok, ps, batch_size, t) - response_logprobs(
                    ref_model, ref_tok, ps, batch_size, t
                )
                pt["kl"] = float(kl.mean())
                pt["sqrt_kl"] = math.sqrt(max(0.0, pt["kl"]))  # a noisy estimate can dip below 0
                del model
                gc.collect()
        out["series"][name] = points
        out["peaks"][name] = gold_peak(points)
    return out
