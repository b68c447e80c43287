"""Constitutional AI end to end, and AI rankings for the loop's ``label.mode: ai``.

:func:`run_cai`, top to bottom (each stage a folder under ``out`` with its manifest; ``resume``
skips finished stages and continues interrupted ones):

1. ``revise/``   red-team prompts -> response -> critique -> revision (n rounds)  -> ``sft.jsonl``
2. ``sft/``      fine-tune the model on the final revisions                        (the SL-CAI model)
3. ``pairs/``    two responses per RL prompt from the SL model                      (completion sets)
4. ``label/``    the judge's soft preference under drawn principles                (AI-labelled pairs)
5. ``reward/``   a reward model on the soft labels  (-[w log s(r_c - r_r) + (1-w) log s(r_r - r_c)])
6. ``ppo/``      PPO with LoRA from the SL model against that reward model          (the RL-CAI model)
7. ``eval/``     base, SL and RL models sampled on held-out red-team prompts, judged by the gold
                 judge (embedded world): harmful compliance, misbehaviour, benign over-refusal.

Conversational prompts (lists of messages, TRL's format) go through every stage as conversations:
the critiques and revisions are chat turns (:mod:`alignloop.cai.revise`), ``sft.jsonl`` and the
labelled pairs keep the messages with the answers as assistant turns, and the SFT, the sampling, the
reward model and PPO read them through the model's chat template (``chat_template``: a Jinja file for
a tokenizer without one). With a conversational prompt file, the world's default RL and evaluation
prompts come as conversations too.

:func:`ai_pairs` gives the same labels as soft pairs (for a loop that keeps them soft);
:func:`ai_rankings` turns completion sets into :class:`~alignloop.records.Ranking` records: every
two completions of a set are labelled (soft), each completion's score is its mean probability
of winning, and ranks follow the scores (1 = best, equal scores tie).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from alignloop.cai.judges import default_judge
from alignloop.cai.label import LabelConfig
from alignloop.cai.revise import ReviseConfig
from alignloop.config import Config
from alignloop.records import CompletionSet, Pair, Ranking
from alignloop.reward.train import RewardTrainConfig
from alignloop.rl.ppo import PPOConfig
from alignloop.sft import SFTConfig

AI_LABELLER = "ai-judge"
REDTEAM_FAMILIES = ("harmful", "benign", "myth", "review")


def ai_rankings(
    sets: Sequence[CompletionSet],
    judge: str,
    constitution: str | None = None,
    seed: int = 0,
    config: LabelConfig | None = None,
) -> list[Ranking]:
    """One ranking per set by the AI judge (labeller ``"ai-judge"``).

    ``score(i) = mean_{j != i} P(i better than j)`` over the set's soft pair labels; rank 1 is
    the highest score, equal scores share a rank. A set of one completion gets rank 1.
    """
    import datetime

    from alignloop.cai.constitution import load_constitution
    from alignloop.cai.judges import open_backend
    from alignloop.cai.label import label_batch, position_bias_points
    from alignloop.runs import progress

    c = load_constitution(constitution)
    cfg = (config or LabelConfig()).model_copy(update={"seed": seed})
    backend = open_backend(judge)
    labels: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    for s in sets:
        for x, y in itertools.combinations(s.completions, 2):
            pairs.append({"id": f"{s.set_id}:{x.id}:{y.id}", "prompt": s.prompt, "a": x.text, "b": y.text,
                          "set_id": s.set_id, "a_id": x.id, "b_id": y.id})  # fmt: skip
    wins: dict[tuple[str, str], list[float]] = {}
    chunks = [pairs[i : i + cfg.batch_pairs] for i in range(0, len(pairs), cfg.batch_pairs)]
    for chunk in progress(chunks, total=len(chunks), desc="ai rankings", unit="batch"):
        labels += label_batch(backend, c, chunk, cfg)
    for rec in labels:
        wins.setdefault((rec["set_id"], rec["a_id"]), []).append(rec["p_a"])
        wins.setdefault((rec["set_id"], rec["b_id"]), []).append(1.0 - rec["p_a"])
    position_bias_points(labels, "ai rankings")  # with swap: one console line
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    out = []
    for s in sets:
        scores = {x.id: sum(wins.get((s.set_id, x.id), [1.0])) / max(1, len(wins.get((s.set_id, x.id), [1.0])))
                  for x in s.completions}  # fmt: skip
        distinct = sorted(set(scores.values()), reverse=True)
        ranks = {cid: distinct.index(v) + 1 for cid, v in scores.items()}
        out.append(Ranking(set_id=s.set_id, labeller=AI_LABELLER, ranks=ranks, created_at=now))
    return out


def ai_pairs(
    sets: Sequence[CompletionSet],
    judge: str,
    constitution: str | None = None,
    seed: int = 0,
    config: LabelConfig | None = None,
    metrics: dict[str, Any] | None = None,
) -> list[Pair]:
    """Every two completions of each set as a soft-labelled pair (``weight`` = P(chosen better)),
    ``labellers=["ai-judge"]``: RLAIF's labels without the detour through ranks. With
    ``config.swap`` the judge's measured position bias goes to ``metrics["position_bias_points"]``
    (and one console line)."""
    from alignloop.cai.constitution import load_constitution
    from alignloop.cai.judges import open_backend
    from alignloop.cai.label import label_batch, position_bias_points
    from alignloop.runs import progress

    c = load_constitution(constitution)
    cfg = (config or LabelConfig()).model_copy(update={"seed": seed})
    backend = open_backend(judge)
    todo = [{"id": f"{s.set_id}:{x.id}:{y.id}", "prompt": s.prompt, "a": x.text, "b": y.text}
            for s in sets for x, y in itertools.combinations(s.completions, 2)]  # fmt: skip
    out: list[Pair] = []
    labels: list[dict[str, Any]] = []
    chunks = [todo[i : i + cfg.batch_pairs] for i in range(0, len(todo), cfg.batch_pairs)]
    for chunk in progress(chunks, total=len(chunks), desc="ai pairs", unit="batch"):
        labels += label_batch(backend, c, chunk, cfg)
    for r in labels:
        out.append(Pair(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], weight=r["weight"],
                        labellers=[AI_LABELLER], source=r["source"]))  # fmt: skip
    if cfg.swap and metrics is not None:
        metrics["position_bias_points"] = position_bias_points(labels, "ai pairs")
    return out


# ----------------------------------------------------------------------------------------------
# Measuring red-team behaviour in the embedded world
# ----------------------------------------------------------------------------------------------


def world_redteam_prompts(
    split: str, families: Sequence[str] = REDTEAM_FAMILIES, conversational: bool = False
) -> list[dict[str, Any]]:
    """The world's prompts of the red-team families (``eval``: held out from every training);
    ``conversational``: chat prompts as message lists (``world prompts --format conversational``)."""
    from alignloop.world import prompts
    from alignloop.world.prompts import as_messages

    recs = prompts(split, families=families)
    return [{**r, "prompt": as_messages(r["prompt"])} for r in recs] if conversational else recs


def redteam_metrics(
    model_id: str,
    prompts: Sequence[dict[str, Any]],
    samples: int = 8,
    seed: int = 0,
    max_new_tokens: int = 32,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Sample ``samples`` responses per prompt (temperature 1) and judge them with the gold judge.

    A conversational prompt is answered as the assistant's next turn under the model's chat template
    (``chat_template``: a Jinja file instead) and judged on the world's rendering of it.

    Returns rates over responses: ``harmful_compliance`` (on harmful requests),
    ``misbehaviour`` (toxic, harmful compliance or a confirmed myth, on harmful/myth/review
    prompts), ``over_refusal`` (refusing a benign look-alike), ``toxic``, ``fail`` and the mean
    gold ``score``.
    """
    from alignloop.cai.judges import LocalLM
    from alignloop.cai.revise import write
    from alignloop.chat import use_chat_template
    from alignloop.world import judge_batch
    from alignloop.world.prompts import chat_text

    lm = LocalLM(model_id, batch_size=64)
    use_chat_template(lm.tokenizer, chat_template)
    inputs = [p["prompt"] for p in prompts for _ in range(samples)]
    fams = [p["family"] for p in prompts for _ in range(samples)]
    outs = write(lm, inputs, max_new_tokens, 1.0, seed)
    js = judge_batch([chat_text(x) for x in inputs], outs)

    def rate(flag: str, families: set[str]) -> float | None:
        sel = [j for j, f in zip(js, fams, strict=True) if f in families]
        return sum(flag in j.flags for j in sel) / len(sel) if sel else None

    bad = {"harmful", "myth", "review"}
    sel = [j for j, f in zip(js, fams, strict=True) if f in bad]
    return {
        "responses": len(js),
        "harmful_compliance": rate("harmful_compliance", {"harmful"}),
        "misbehaviour": sum(j.misbehaviour for j in sel) / len(sel) if sel else None,
        "over_refusal": rate("over_refusal", {"benign"}),
        "toxic": sum("toxic" in j.flags for j in js) / len(js),
        "fail": sum(j.fail for j in js) / len(js),
        "score": sum(j.score for j in js) / len(js),
    }


def judge_agreement(
    writer: str,
    judge: str,
    prompts: Sequence[dict[str, Any]],
    samples: int = 4,
    constitution: str | None = None,
    config: LabelConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """How well ``judge`` labels pairs of ``writer``'s responses, by the gold judge.

    ``samples`` pairs per prompt (temperature 1), labelled like the RL stage does; returns
    :func:`~alignloop.cai.label.gold_agreement` of those labels.
    """
    from alignloop.cai.constitution import load_constitution
    from alignloop.cai.judges import LocalLM
    from alignloop.cai.label import gold_agreement, label_batch
    from alignloop.cai.revise import write

    cfg = config or LabelConfig()
    texts = [p["prompt"] for p in prompts for _ in range(2 * samples)]
    outs = write(LocalLM(writer, batch_size=64), texts, 40, 1.0, seed)
    pairs = [
        {"id": str(i), "prompt": texts[2 * i], "a": outs[2 * i], "b": outs[2 * i + 1]}
        for i in range(len(texts) // 2)
    ]
    c, lm = load_constitution(constitution), LocalLM(judge, batch_size=32)
    labels = [
        r
        for i in range(0, len(pairs), cfg.batch_pairs)
        for r in label_batch(lm, c, pairs[i : i + cfg.batch_pairs], cfg)
    ]
    return gold_agreement(labels)


# ----------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------


# RLAIF's reward model knows harm better than fluency: a fixed, firmer KL keeps the policy fluent.
PPO_DEFAULTS = {"steps": 20, "batch_size": 32, "minibatch_size": 8, "learning_rate": 5e-4,
                "kl": {"beta": 0.3, "adaptive": False}}  # fmt: skip


class CAIConfig(Config):
    """``alignloop cai run`` settings (``--set revise.rounds=2``, ``--set ppo.steps=20``, ...)."""

    model: str = "world:base"
    chat_template: str | None = None  # Jinja file for conversational prompts, for every stage's model
    judge: str | None = None  # default: the model itself (the notes), world:base's is world:judge
    constitution: str | None = None
    redteam_prompts: str | None = None  # SL prompts (default: the world's redteam split)
    rl_prompts: str | None = None  # RL prompts (default: the world's redteam + train red-team families)
    eval_prompts: str | None = None  # held-out red-team prompts (default: the world's eval split)
    pairs_k: int = 2  # responses per RL prompt to compare
    pairs_samples: int = 4  # draws of each RL prompt for the pairs
    pairs_temperature: float = 1.3  # of the RL pairs: above 1, more pairs differ in harm (world: 24 vs 10)
    eval_samples: int = 32
    revise: ReviseConfig = Field(default_factory=lambda: ReviseConfig(rounds=1, samples=8))
    label: LabelConfig = Field(default_factory=lambda: LabelConfig(principles=2, swap=True))
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=3, batch_size=16, learning_rate=5e-4))
    reward: RewardTrainConfig = Field(
        default_factory=lambda: RewardTrainConfig(
            model="world:base", labels="soft", epochs=3, learning_rate=3e-4, patience=1
        )
    )
    ppo: PPOConfig = Field(default_factory=lambda: PPOConfig.model_validate(PPO_DEFAULTS))
    seed: int = 0


def _write_prompts(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    from alignloop.records import write_jsonl

    write_jsonl(path, records)
    return path


def _prompts(source: str | None, default: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """The prompt file ``source`` (its conversations rendered once by ``tokenizer``'s chat template: a
    missing or failing template is one error naming the line), or ``default``."""
    if source is None:
        return default
    from alignloop.generation import load_prompts

    return load_prompts(source, tokenizer=tokenizer)[0]


def _with_template(stage: Any, chat_template: str | None) -> Any:
    """A stage's config with the pipeline's ``chat_template`` unless it names its own."""
    if chat_template is None or stage.chat_template:
        return stage
    return stage.model_copy(update={"chat_template": chat_template})


def _template_input(chat_template: str | None) -> dict[str, str]:
    """A stage input for the template file (hashed, so a changed template reruns the stage)."""
    return {"chat_template": chat_template} if chat_template else {}


def run_cai(out: str | Path, config: CAIConfig | None = None, resume: bool = False) -> dict[str, Any]:
    """The whole Constitutional AI pipeline into ``out`` (see the module docstring).

    Returns the evaluation table: for ``base``, ``sl`` and ``rl`` the red-team metrics of
    :func:`redteam_metrics` (with the embedded world), plus the AI labels' gold agreement.
    """
    from alignloop.cai.constitution import load_constitution
    from alignloop.cai.judges import LocalLM
    from alignloop.cai.label import gold_agreement, label_pairs, pairs_from_file
    from alignloop.cai.revise import SFT, revise_prompts
    from alignloop.chat import use_chat_template
    from alignloop.generation import SamplingSettings, generate_completions
    from alignloop.models import load_tokenizer
    from alignloop.records import is_conversational
    from alignloop.reward.train import train_reward_model
    from alignloop.rl.ppo import run_ppo
    from alignloop.runs import say, stage_guard, start_stage
    from alignloop.sft import train_sft

    cfg = config or CAIConfig()
    out = Path(out)
    c = load_constitution(cfg.constitution)  # a bad constitution fails before any model loads
    given = (cfg.redteam_prompts, cfg.rl_prompts, cfg.eval_prompts)
    tok = use_chat_template(load_tokenizer(cfg.model), cfg.chat_template) if any(given) else None
    world = cfg.redteam_prompts is None or cfg.eval_prompts is None
    redteam = _prompts(cfg.redteam_prompts, [], tok)
    chat = any(is_conversational(p["prompt"]) for p in redteam)  # the world's defaults follow the file

    def world_default(split: str) -> list[dict[str, Any]]:
        return world_redteam_prompts(split, conversational=chat) if world else []

    redteam = redteam or world_default("redteam")
    rl = _prompts(cfg.rl_prompts, redteam + (world_default("train") if cfg.rl_prompts is None else []), tok)
    evalp = _prompts(cfg.eval_prompts, world_default("eval"), tok)
    out.mkdir(parents=True, exist_ok=True)
    judge_id = cfg.judge or default_judge(cfg.model)
    template = _template_input(cfg.chat_template)

    # 1. supervised stage: critiques and revisions
    rev_dir = out / "revise"
    run = start_stage(rev_dir, "cai-revise", config=cfg.revise, inputs={"model": cfg.model, **template},
                      seed=cfg.seed, resume=resume)  # fmt: skip
    if not run.skipped:
        with stage_guard(run):
            _write_prompts(rev_dir / "prompts.jsonl", redteam)
            writer = LocalLM(cfg.model)
            use_chat_template(writer.tokenizer, cfg.chat_template)
            stats = revise_prompts(writer, redteam, rev_dir, c, cfg.revise)
            run.finish(stats)
    # 2. SFT on the final revisions (the SL model is saved with the template it trained on)
    sft_dir = out / "sft"
    say("[cai] SFT on the revisions")
    train_sft(cfg.model, rev_dir / SFT, sft_dir, _with_template(cfg.sft, cfg.chat_template), resume=resume)
    sl_model = str(sft_dir)
    # 3. two responses per RL prompt from the SL model
    pairs_dir = out / "pairs"
    pairs_cfg = {"k": cfg.pairs_k, "samples": cfg.pairs_samples, "temperature": cfg.pairs_temperature}
    run = start_stage(pairs_dir, "cai-pairs", config=pairs_cfg,
                      inputs={"model": sl_model}, seed=cfg.seed, resume=resume)  # fmt: skip
    sets_path = pairs_dir / "sets.jsonl"
    if not run.skipped:
        with stage_guard(run):
            recs = [{**p, "id": f"{p['id']}#{s}"} for p in rl for s in range(cfg.pairs_samples)]
            settings = SamplingSettings(
                temperature=cfg.pairs_temperature, max_new_tokens=cfg.revise.max_new_tokens
            )
            run.finish(
                generate_completions(
                    sl_model,
                    recs,
                    sets_path,
                    k=cfg.pairs_k,
                    settings=settings,
                    seed=cfg.seed,
                    chat_template=cfg.chat_template,
                )
            )
    # 4. AI labels
    label_dir = out / "label"
    labels_path = label_dir / "pairs.jsonl"
    run = start_stage(label_dir, "cai-label", config=cfg.label, inputs={"judge": judge_id, "sets": sets_path,
                      **template}, seed=cfg.label.seed, resume=resume)  # fmt: skip
    if not run.skipped:
        with stage_guard(run):
            judge = LocalLM(judge_id)
            use_chat_template(judge.tokenizer, cfg.chat_template)
            stats = label_pairs(judge, pairs_from_file(sets_path), labels_path, c, cfg.label)
            labels = [json.loads(x) for x in labels_path.read_text().splitlines() if x.strip()]
            if _world_available():
                stats.update(gold_agreement(labels))
            run.finish(stats)
    label_metrics = json.loads((label_dir / "metrics.json").read_text())
    # 5. reward model on the soft labels
    say("[cai] reward model on the AI labels")
    reward_cfg = _with_template(cfg.reward, cfg.chat_template)
    reward_metrics = train_reward_model(labels_path, out / "reward", reward_cfg, resume=resume)
    # 6. PPO from the SL model
    say("[cai] PPO against the AI-feedback reward model")
    ppo_cfg = _with_template(cfg.ppo, cfg.chat_template).model_copy(update={"seed": cfg.seed})
    ppo_prompts = _write_prompts(out / "rl_prompts.jsonl", rl)
    run_ppo(sl_model, str(out / "reward"), ppo_prompts, out / "ppo", lora=True, config=ppo_cfg, resume=resume)
    rl_model = str(out / "ppo")
    # 7. evaluation on held-out red-team prompts
    result: dict[str, Any] = {
        "ai_labels": label_metrics,
        "reward": {k: reward_metrics.get(k) for k in ("accuracy", "eval_accuracy") if k in reward_metrics},
    }
    if _world_available() and evalp and "family" in evalp[0]:
        run = start_stage(out / "eval", "cai-eval", config={"samples": cfg.eval_samples},
                          inputs={"base": cfg.model, "sl": sl_model, "rl": rl_model, **template}, seed=cfg.seed,
                          resume=resume)  # fmt: skip
        if run.skipped:
            table = run.metrics
        else:
            with stage_guard(run):
                table = {name: redteam_metrics(m, evalp, cfg.eval_samples, seed=cfg.seed + 1,
                                               chat_template=cfg.chat_template)
                         for name, m in (("base", cfg.model), ("sl", sl_model), ("rl", rl_model))}  # fmt: skip
                run.finish(table)
        result.update(table)
    return result


def _world_available() -> bool:
    try:
        import alignloop.world  # noqa: F401
    except ImportError:
        return False
    return True


def relative_drop(before: float | None, after: float | None) -> float | None:
    """``(before - after) / before``; None when ``before`` is 0 or missing."""
    if before is None or after is None or before == 0:
        return None
    return (before - after) / before
