"""The loop: run the stages a recipe lists, each in its own subfolder of one run folder.

    prompts -> generate -> label -> export -> reward -> ppo (+ variants) -> grpo -> dpo -> evaluate

Each stage reads the files the previous one wrote and writes its own, with a ``manifest.json``
(see :mod:`alignloop.runs`); with ``--resume`` a stage whose inputs and config are unchanged is
skipped. The label stage is ``simulated`` (the world's labellers), ``human`` (the labelling app
is served and the run waits until every set has its k labels) or ``ai`` (a judge model under a
constitution, i.e. RLAIF). ``rounds: N`` repeats generate -> label -> reward -> ppo from the
current policy, so feedback keeps coming as the model changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from alignloop.config import Config, load_config
from alignloop.errors import UserError
from alignloop.generation import SamplingSettings
from alignloop.offline.dpo import DPOConfig
from alignloop.offline.ilql import ILQLConfig
from alignloop.records import CompletionSet, Pair, Ranking, read, write_jsonl
from alignloop.reward.train import RewardTrainConfig
from alignloop.rl.grpo import GRPOConfig
from alignloop.rl.online_dpo import OnlineDPOConfig
from alignloop.rl.ppo import PPOConfig
from alignloop.runs import say, stage_guard, start_stage, write_json_atomic

STAGES = (
    "prompts", "generate", "label", "export", "reward", "ppo", "grpo", "online_dpo", "dpo", "ilql", "evaluate",
)  # fmt: skip
RECIPES = Path(__file__).resolve().parent / "recipes"


class PromptsSection(Config):
    """Where prompts come from: the embedded world, or files / hub datasets."""

    source: Literal["world", "files", "pairs"] = "world"  # pairs: the prompts of a preference dataset
    families: list[str] | None = None  # world: keep only these families
    # world: conversational = chat prompts as TRL message lists (the world's chat template renders them
    # to the same text; reviews and summaries stay text), so every stage runs its chat-template path
    format: Literal["text", "conversational"] = "text"
    n_train: int = Field(300, ge=1)  # world: prompts for generate/PPO/DPO
    n_eval: int = Field(100, ge=1)  # world: held-out prompts for the evaluation
    train: str | None = None  # files: JSONL/CSV/Parquet path or a `datasets` name
    eval: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    prompt_column: str = "prompt"
    id_column: str = "id"
    template: str | None = None  # e.g. "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
    reference_column: str | None = None  # copied to "reference" for ROUGE-L
    limit_train: int | None = None
    limit_eval: int | None = None
    max_prompt_words: int | None = None  # keep only the first words (e.g. IMDB review openings)


class GenerateSection(Config):
    k: int = Field(4, ge=2)
    batch_size: int = Field(64, ge=1)
    distinct: int = Field(0, ge=0)  # resampling rounds for repeated texts in a set (generate --distinct)
    chat_template: str | None = None  # Jinja file for conversational prompts (generate --chat-template)
    sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings(max_new_tokens=32))


class LabelSection(Config):
    mode: Literal["simulated", "human", "ai"] = "simulated"
    per_set: int = Field(3, ge=1)  # labellers per set (k)
    labellers: list[str] | None = None  # simulated: profile names/kinds of the world panel
    project_mode: Literal["rank", "thumbs"] = "rank"
    db: str | None = None  # default: sqlite file in the stage folder
    host: str = "127.0.0.1"  # human mode: where the app is served
    port: int = 8000
    max_body_mb: float = Field(1.0, gt=0)  # human mode: larger request bodies get 413 unread
    invite: list[str] = Field(default_factory=lambda: ["labeller-1", "labeller-2", "labeller-3"])
    poll_seconds: float = 2.0
    lease_seconds: float = Field(1800.0, gt=0)  # human mode: a reserved set goes back to the pool after this
    judge: str | None = None  # ai mode: judge model id (default: the policy; world:base's is world:judge)
    swap: bool = False  # ai mode: ask both answer orders and average (cancels and measures position bias)
    constitution: str | None = None  # ai mode: constitution YAML (default: the notes' principles)
    # scarce labels (label import --budget/--select): send only `budget` of the generated sets, chosen at
    # random (default) or where the current reward model is least sure (the previous round's reward model;
    # round 1: select_reward, else reward.spec, else a random round), with random_share drawn at random
    budget: int | None = Field(None, ge=1)
    select: Literal["random", "uncertainty"] = "random"
    random_share: float = Field(0.2, ge=0.0, le=1.0)
    select_reward: str | None = None  # reward SPEC round 1 selects with


class ExportSection(Config):
    # import existing preference pairs (HH-RLHF transcripts or prompt/chosen/rejected; a file or a
    # `datasets` name) instead of exporting the label stage's consensus
    import_pairs: str | None = None
    import_split: str = "train"
    import_limit: int | None = None
    # the consensus of `alignloop feedback export --consensus` (ranked_pairs and bradley_terry are
    # accepted as the old spellings of tideman and bradley-terry)
    method: Literal["majority", "tideman", "bradley-terry", "none"] = "majority"
    exclude_flagged: bool = True
    soft_ties: bool = False
    keep_failed: bool = True  # F completions lose to every ranked completion of their set

    @field_validator("method", mode="before")
    @classmethod
    def _old_spellings(cls, v: Any) -> Any:
        return {"ranked_pairs": "tideman", "bradley_terry": "bradley-terry"}.get(v, v)


class RewardSection(Config):
    spec: str | None = None  # use this reward SPEC instead of training one (e.g. a classifier)
    # members trained with seeds seed..seed+K-1 into one ensemble folder (alignloop.reward.ensemble);
    # ppo/grpo `config.ensemble: mean_std | min` then optimise a conservative reward
    ensemble: int = Field(1, ge=1)
    # rounds: 2+: round N's reward model trains on the pairs of rounds 1..N (labels are never thrown away,
    # as in iterated online RLHF); false: on round N's pairs only
    all_rounds: bool = True
    train: RewardTrainConfig = Field(default_factory=RewardTrainConfig)


class PPOSection(Config):
    lora: bool = True
    config: PPOConfig = Field(default_factory=PPOConfig)
    # extra PPO runs with --set style overrides, e.g. {"beta0": ["kl.beta=0", "kl.adaptive=false"]}
    variants: dict[str, list[str]] = Field(default_factory=dict)


class GRPOSection(Config):
    """The critic-free family (``config.algorithm``: grpo, dr_grpo, rloo, reinforce_pp) on the PPO stage's
    policy, reward and prompts; a listed stage, never run by default."""

    lora: bool = True
    config: GRPOConfig = Field(default_factory=GRPOConfig)
    # extra runs of the family with --set style overrides, named by their key, e.g. {"rloo": ["algorithm=rloo"]}
    variants: dict[str, list[str]] = Field(default_factory=dict)


class OnlineDPOSection(Config):
    """Online DPO on the PPO stage's policy, reward and prompts (fresh pairs each step); a listed stage."""

    lora: bool = True
    config: OnlineDPOConfig = Field(default_factory=OnlineDPOConfig)


class DPOSection(Config):
    lora: bool = True
    config: DPOConfig = Field(default_factory=DPOConfig)


class ILQLSection(Config):
    # scored: the generate stage's sets scored by the run's reward (the reward model PPO uses);
    # pairs: the exported preference pairs (chosen +pair_reward, rejected -pair_reward)
    data: Literal["scored", "pairs"] = "scored"
    lora: bool = True
    config: ILQLConfig = Field(default_factory=ILQLConfig)


class EvaluateSection(Config):
    samples_per_prompt: int = Field(4, ge=1)
    toxicity: str | None = "world:toxicity"
    gold: bool | None = None  # None: when the prompts are the world's
    max_new_tokens: int = 32
    seed: int = 1234
    n_boot: int = 1000
    # gold and proxy reward against sqrt(KL) for every training run that saved snapshots (ppo
    # config.snapshot_every), in the report with the step where gold peaks; samples per prompt per snapshot
    overoptimization_samples: int = Field(2, ge=0)  # 0: no curve


class Recipe(Config):
    name: str = "run"
    seed: int = 0
    # experiment trackers for every stage: none | [tensorboard, wandb, mlflow, trackio] (alignloop.tracking);
    # None: the default (tensorboard), or --report-to
    report_to: str | list[str] | None = None
    policy: str = "world:base"
    stages: list[str] = Field(
        default_factory=lambda: [s for s in STAGES if s not in ("grpo", "online_dpo", "ilql")]
    )
    rounds: int = Field(1, ge=1)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    label: LabelSection = Field(default_factory=LabelSection)
    export: ExportSection = Field(default_factory=ExportSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    ppo: PPOSection = Field(default_factory=PPOSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    online_dpo: OnlineDPOSection = Field(default_factory=OnlineDPOSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    ilql: ILQLSection = Field(default_factory=ILQLSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe; unknown keys and stages are one-line errors."""
    recipe = load_config(Recipe, path=path, overrides=overrides or [])
    from alignloop.tracking import parse_report_to, require_installed

    require_installed(parse_report_to(recipe.report_to, f"{path} (report_to)"), f"{path} (report_to)")
    for s in recipe.stages:
        if s not in STAGES:
            raise UserError(f"unknown stage {s!r}", str(path), f"stages are: {', '.join(STAGES)}")
    needs = {"generate": "prompts", "label": "generate", "export": "label", "ppo": "prompts", "dpo": "export"}
    needs["grpo"] = needs["online_dpo"] = "prompts"
    needs["ilql"] = "generate" if recipe.ilql.data == "scored" else "export"
    if recipe.export.import_pairs is not None:
        del needs["export"]
    for s, dep in needs.items():
        if s in recipe.stages and dep not in recipe.stages:
            raise UserError(f"stage {s!r} needs stage {dep!r}", str(path), f"add {dep!r} to stages")
    lab = recipe.label
    if lab.swap and lab.mode != "ai":
        raise UserError(
            f"label.swap asks an AI judge both answer orders; label.mode is {lab.mode!r}", str(path),
            "set label.mode: ai, or drop label.swap",
        )  # fmt: skip
    if lab.select == "uncertainty" and "label" in recipe.stages:
        if lab.budget is None:
            raise UserError(
                "label.select=uncertainty needs label.budget", str(path), "set label.budget: N sets"
            )
        if recipe.rounds == 1 and lab.select_reward is None and recipe.reward.spec is None:
            raise UserError(
                "label.select=uncertainty needs a reward model to select with",
                str(path),
                "set label.select_reward (a reward SPEC), or rounds: 2+ (round 1 selects at random)",
            )
    if "reward" in recipe.stages and recipe.reward.spec is None and "export" not in recipe.stages:
        raise UserError(
            "stage 'reward' trains on exported pairs", str(path), "add 'export' or set reward.spec"
        )
    for s in ("ppo", "grpo", "online_dpo"):
        if s == "online_dpo" and recipe.online_dpo.config.judge is not None:
            continue  # an AI judge labels online DPO's pairs
        if s in recipe.stages and "reward" not in recipe.stages and recipe.reward.spec is None:
            raise UserError(f"stage {s!r} needs a reward", str(path), "add stage 'reward' or set reward.spec")
    if "grpo" in recipe.stages:
        from alignloop.rl.grpo import check_config

        check_config(recipe.grpo.config, f"{path}: grpo.config")
    if "online_dpo" in recipe.stages:
        from alignloop.rl.online_dpo import check_config as check_online

        check_online(recipe.online_dpo.config, f"{path}: online_dpo.config")
    return recipe


# ----------------------------------------------------------------------------------------------
# Stages. Each takes the recipe and the run state (paths the earlier stages produced).
# ----------------------------------------------------------------------------------------------


def stage_prompts(recipe: Recipe, folder: Path, resume: bool) -> dict[str, Path]:
    cfg = recipe.prompts
    train, evalp = folder / "train.jsonl", folder / "eval.jsonl"
    inputs = {k: v for k, v in {"train": cfg.train, "eval": cfg.eval}.items() if v}
    run = start_stage(folder, "prompts", config=cfg, inputs=inputs, seed=recipe.seed, resume=resume)
    if run.skipped:
        return {"train": train, "eval": evalp}
    with stage_guard(run):
        if cfg.source == "world":
            from alignloop.world import prompts as world_prompts

            tr = world_prompts("train", n=cfg.n_train, seed=recipe.seed, families=cfg.families)
            ev = world_prompts("eval", n=cfg.n_eval, seed=recipe.seed, families=cfg.families)
            if cfg.format == "conversational":
                from alignloop.world.prompts import as_messages

                tr, ev = ([{**r, "prompt": as_messages(r["prompt"])} for r in recs] for recs in (tr, ev))
        else:
            if not cfg.train or not cfg.eval:
                raise UserError(
                    f"prompts.source={cfg.source} needs prompts.train and prompts.eval", fix="set both"
                )
            tr = _table_prompts(cfg, cfg.train, cfg.train_split, cfg.limit_train)
            ev = _table_prompts(cfg, cfg.eval, cfg.eval_split, cfg.limit_eval)
        write_jsonl(train, tr)
        write_jsonl(evalp, ev)
        run.finish({"train": len(tr), "eval": len(ev)})
    return {"train": train, "eval": evalp}


def _table_prompts(cfg: PromptsSection, source: str, split: str, limit: int | None) -> list[dict]:
    """Prompt records from a file or `datasets` dataset (or the prompts of a preference dataset)."""
    from alignloop.generation import load_prompts, read_table

    if cfg.source == "pairs":
        from alignloop.preference.imports import split_hh

        recs = []
        for i, row in enumerate(read_table(source, split)[:limit]):
            try:
                prompt = row["prompt"] if "prompt" in row else split_hh(row["chosen"], row["rejected"])[0]
            except (KeyError, ValueError) as e:
                say(f"[prompts] skipped row {i} of {source}: {e}")
                continue
            recs.append({"id": str(row.get("id", i)), "prompt": prompt})
        problems: list[str] = []
    else:
        recs, problems = load_prompts(
            source, prompt_column=cfg.prompt_column, id_column=cfg.id_column, template=cfg.template,
            split=split, limit=limit, skip_bad=True,
        )  # fmt: skip
    for p in problems[:5]:
        say(f"[prompts] skipped: {p}")
    if problems:
        say(f"[prompts] {len(problems)} bad rows skipped in {source}")
    if not recs:
        raise UserError("no usable prompts", source, "check the prompt column and the file")
    for r in recs:
        if cfg.max_prompt_words:
            r["prompt"] = " ".join(r["prompt"].split()[: cfg.max_prompt_words])
        if cfg.reference_column:
            if cfg.reference_column not in r:
                raise UserError(f"prompt {r['id']!r} has no column {cfg.reference_column!r}", source)
            r["reference"] = r[cfg.reference_column]
    return recs


def stage_generate(recipe: Recipe, policy: str, prompts: Path, folder: Path, resume: bool) -> Path:
    from alignloop.generation import generate_completions

    cfg = recipe.generate
    out = folder / "sets.jsonl"
    run = start_stage(
        folder,
        "generate",
        config=cfg,
        inputs={"policy": policy, "prompts": prompts},
        seed=recipe.seed,
        resume=resume,
    )
    if run.skipped:
        return out
    with stage_guard(run):
        if not resume and out.exists():
            out.unlink()
        recs = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
        stats = generate_completions(
            policy,
            recs,
            out,
            k=cfg.k,
            settings=cfg.sampling,
            seed=recipe.seed,
            batch_size=cfg.batch_size,
            distinct=cfg.distinct,
            chat_template=cfg.chat_template,
        )
        run.finish(stats)
    return out


def stage_label(
    recipe: Recipe, sets_path: Path, folder: Path, resume: bool, policy: str, select_with: str | None = None
) -> dict[str, Path]:
    """Label the generated sets (``label.budget`` of them, chosen by ``label.select``; ``select_with``:
    the reward SPEC uncertainty selection asks, i.e. the current reward model)."""
    from alignloop.preference import selection

    cfg = recipe.label
    rankings_path, sets_out = folder / "rankings.jsonl", folder / "sets.jsonl"
    method = cfg.select
    if cfg.budget is not None and method == "uncertainty" and select_with is None:
        say("[label] no reward model yet to select with: this round's sets are chosen at random")
        method = "random"
    inputs: dict[str, Any] = {"sets": sets_path}
    if method == "uncertainty" and cfg.budget is not None:
        inputs["select_with"] = select_with
    if cfg.mode == "ai":  # the judge decides every label: a changed judge is a changed stage
        from alignloop.cai.judges import default_judge

        inputs["judge"] = cfg.judge or default_judge(str(policy))
    run = start_stage(folder, "label", config=cfg, inputs=inputs, seed=recipe.seed, resume=resume)
    result = {"rankings": rankings_path, "sets": sets_out}
    if run.skipped:
        ai = folder / "ai_pairs.jsonl"
        return {**result, "ai_pairs": ai} if ai.is_file() else result
    with stage_guard(run):
        sets = read(sets_path, CompletionSet)
        pool = len(sets)
        sets, picked = selection.choose(
            sets, str(sets_path), cfg.budget, method, select_with, cfg.random_share, recipe.seed
        )
        chosen = selection.summary(picked, pool) if picked else None
        if picked:
            write_jsonl(folder / "selection.jsonl", picked)
            say(f"[label] {method} selection: {chosen}")
        if cfg.mode == "ai":  # RLAIF: the judge's soft preferences become the pairs directly
            from alignloop.cai.label import LabelConfig
            from alignloop.cai.pipeline import ai_pairs

            judged: dict[str, Any] = {}
            pairs = ai_pairs(sets, judge=inputs["judge"], constitution=cfg.constitution, seed=recipe.seed,
                             config=LabelConfig(swap=cfg.swap), metrics=judged)  # fmt: skip
            write_jsonl(folder / "ai_pairs.jsonl", pairs)
            write_jsonl(sets_out, sets)
            run.finish({"ai_pairs": len(pairs), **judged, **({"selection": chosen} if chosen else {})})
            return {**result, "ai_pairs": folder / "ai_pairs.jsonl"}
        else:
            from alignloop.feedback import store

            db = cfg.db or f"sqlite:///{(folder / 'labels.db').resolve()}"
            if not resume and cfg.db is None and (folder / "labels.db").exists():
                store.close_store(db)  # drop pooled connections and cached set texts first
                for suffix in ("", "-wal", "-shm", ".writer-lock"):
                    Path(f"{folder / 'labels.db'}{suffix}").unlink(missing_ok=True)
            store.create_project(db, recipe.name, mode=cfg.project_mode, per_set=cfg.per_set, exist_ok=True)
            imported = store.import_sets(db, sets, project=recipe.name)
            if imported["collapsed"]:
                say(
                    f"[label] {imported['collapsed']} duplicate completions collapsed (same text twice in a set)"
                )
            if cfg.mode == "simulated":
                from alignloop.feedback.simulate import simulate, world_panel

                counts = simulate(
                    world_panel(cfg.labellers, seed=recipe.seed), db_url=db, project=recipe.name
                )
            else:
                counts = _label_by_humans(db, recipe.name, cfg)
            sets, rankings, _ = store.load_labels(db, recipe.name)
        write_jsonl(sets_out, sets)
        write_jsonl(rankings_path, rankings)
        run.finish(
            {
                "rankings": len(rankings), "per_labeller": counts, "collapsed": imported["collapsed"],
                **({"selection": chosen} if chosen else {}),
            }
        )  # fmt: skip
    return result


def _label_by_humans(db: str, project: str, cfg: LabelSection) -> dict[str, int]:
    """Serve the labelling app, print the login links, and wait until every set has k labels."""
    import threading

    import uvicorn

    from alignloop.feedback import store
    from alignloop.feedback.app import create_app

    base = f"http://{cfg.host}:{cfg.port}"
    for name in cfg.invite:
        link = store.invite(db, name, project=project, base_url=base, new_link=True)["link"]
        print(f"  login link for {name}: {link}", flush=True)
    max_body = max(1, int(cfg.max_body_mb * (1 << 20)))
    app = create_app(db, max_body_bytes=max_body, lease_seconds=cfg.lease_seconds)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    say(f"[label] labelling app at {base}; waiting for every set to have {cfg.per_set} labels")
    try:
        while True:
            prog = store.project_progress(db, project)
            say(f"[label] {prog['labels']}/{prog['labels_needed']} labels")
            if prog["complete"]:
                break
            time.sleep(cfg.poll_seconds)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return {row["name"]: row["done"] for row in prog.get("labellers", [])}


def stage_export(
    recipe: Recipe, label: dict[str, Path], folder: Path, resume: bool, model: str | None = None
) -> Path:
    """Consensus pairs of the label stage's rankings and the feedback report (``folder/feedback``);
    ``model``: the run's current reward model, against which the report places each labeller."""
    from alignloop.preference.export import export_pairs
    from alignloop.preference.report import feedback_report, reward_scores, write_report

    cfg = recipe.export
    out = folder / "pairs.jsonl"
    inputs: dict[str, Any] = dict(label) if cfg.import_pairs is None else {"import": cfg.import_pairs}
    if model is not None and cfg.import_pairs is None and "ai_pairs" not in label:
        inputs["reward_model"] = model
    run = start_stage(folder, "export", config=cfg, inputs=inputs, seed=recipe.seed, resume=resume)
    if run.skipped:
        return out
    if cfg.import_pairs is not None:
        with stage_guard(run):
            run.finish(_import_pairs(cfg, out))
        return out
    if "ai_pairs" in label:  # AI labels are already soft pairs: no consensus to form
        with stage_guard(run):
            n = write_jsonl(out, read(label["ai_pairs"], Pair))
            run.finish({"pairs": n, "source": "ai-judge", "flagged": []})
        return out
    with stage_guard(run):
        sets = read(label["sets"], CompletionSet)
        rankings = read(label["rankings"], Ranking)
        scores, own = reward_scores(model, sets) if "reward_model" in inputs else (None, None)
        report = feedback_report(sets, rankings, scores=scores, own=own, reward=inputs.get("reward_model"))
        write_report(report, folder / "feedback")
        flagged = {f["name"] for f in report["flagged"]}
        for f in report["flagged"]:
            say(f"[export] flagged labeller {f['name']}: {f['reason']}")
        rows, counts = export_pairs(
            sets, rankings, recipe.export.method,
            exclude_labellers=flagged if cfg.exclude_flagged else set(),
            soft_ties=cfg.soft_ties, keep_failed=cfg.keep_failed,
        )  # fmt: skip
        if not rows:
            raise UserError("the labels gave no preference pairs", str(label["rankings"]), "label more sets")
        write_jsonl(out, rows)
        run.finish({**counts, "flagged": sorted(flagged), "alpha": report["alpha"]["value"]})
    return out


def _import_pairs(cfg: ExportSection, out: Path) -> dict[str, Any]:
    """Existing preference data (HH-RLHF or plain pairs, a file or a `datasets` name) -> pairs.jsonl."""
    from alignloop.generation import read_table
    from alignloop.preference.imports import import_preferences

    assert cfg.import_pairs is not None
    rows = read_table(cfg.import_pairs, cfg.import_split)[: cfg.import_limit]
    raw = out.with_name("imported-raw.jsonl")
    write_jsonl(raw, ({k: v for k, v in r.items() if k != "_line"} for r in rows))
    pairs, problems = import_preferences(raw)
    for p in problems[:5]:
        say(f"[export] skipped: {p}")
    write_jsonl(out, pairs)
    return {"pairs": len(pairs), "skipped": len(problems)}


def stage_reward(recipe: Recipe, pairs: Path | list[Path], folder: Path, resume: bool, policy: str) -> str:
    from alignloop.reward.ensemble import train_ensemble

    cfg = recipe.reward.train
    if "model" not in recipe.reward.train.model_fields_set:
        cfg = cfg.model_copy(update={"model": policy})
    if recipe.label.mode == "ai" and "labels" not in recipe.reward.train.model_fields_set:
        cfg = cfg.model_copy(update={"labels": "soft"})  # AI feedback: P(chosen better) as the target
    train_ensemble(pairs, folder, cfg, recipe.reward.ensemble, resume=_resumable(folder, cfg, resume))
    return str(folder)


def stage_ppo(
    recipe: Recipe, policy: str, reward: str, prompts: Path, folder: Path, resume: bool
) -> dict[str, Path]:
    from alignloop.config import apply_overrides, validate
    from alignloop.rl.ppo import run_ppo

    cfg = _anchored(recipe.ppo.config, policy, recipe)
    if cfg.heldout is None and recipe.prompts.source == "world":
        cfg = cfg.model_copy(update={"heldout": "world:gold"})
    runs = {"ppo": folder}
    for name in recipe.ppo.variants:
        runs[f"ppo-{name}"] = folder.parent / f"ppo-{name}"
    out: dict[str, Path] = {}
    for name, run_dir in runs.items():
        this = cfg
        if name != "ppo":
            data = apply_overrides(cfg.model_dump(), recipe.ppo.variants[name.removeprefix("ppo-")])
            this = validate(PPOConfig, data, f"ppo.variants.{name.removeprefix('ppo-')}")
        say(f"[{name}] PPO on {policy} against {reward}")
        run_ppo(
            policy,
            reward,
            prompts,
            run_dir,
            lora=recipe.ppo.lora,
            config=this,
            resume=_resumable(run_dir, {**this.model_dump(mode="json"), "lora_on": recipe.ppo.lora}, resume),
        )
        out[name] = run_dir
    return out


def _anchored(cfg: Any, policy: str, recipe: Recipe) -> Any:
    """A PPO/GRPO run that continues an earlier round's LoRA adapter measures its KL against the base model
    under it (``kl.reference: base``) unless the recipe sets ``kl.reference`` itself. Measured (docs/reward.md,
    "A second round of labels", seeds 0-2): round 2's PPO anchored to the base ends at gold 0.717 / 0.675 /
    0.704 and F 9.8 / 7.2 / 7.5%, anchored to round 1's policy at 0.656 / 0.559 / 0.623 and 12.5-15.0%.
    A fully fine-tuned policy does not know its base: it stays its own reference (``start``)."""
    from alignloop.models import is_adapter_folder

    if policy == recipe.policy or "reference" in cfg.kl.model_fields_set or not is_adapter_folder(policy):
        return cfg
    return cfg.model_copy(update={"kl": cfg.kl.model_copy(update={"reference": "base"})})


def stage_grpo(
    recipe: Recipe, policy: str, reward: str, prompts: Path, folder: Path, resume: bool
) -> dict[str, Path]:
    """The grpo section's run (named "grpo") and each of its variants (named by their key)."""
    from alignloop.config import apply_overrides, validate
    from alignloop.rl.grpo import check_config, run_grpo

    base = _anchored(recipe.grpo.config, policy, recipe)
    if base.heldout is None and recipe.prompts.source == "world":
        base = base.model_copy(update={"heldout": "world:gold"})
    runs = {"grpo": (folder, base)}  # the section's own run is "grpo" whatever its algorithm (as "ppo")
    for name, sets in recipe.grpo.variants.items():
        cfg = validate(GRPOConfig, apply_overrides(base.model_dump(), sets), f"grpo.variants.{name}")
        check_config(cfg, f"grpo.variants.{name}")
        runs[name] = (folder.parent / name, cfg)
    out: dict[str, Path] = {}
    for name, (run_dir, cfg) in runs.items():
        say(f"[{name}] {cfg.algorithm} on {policy} against {reward}")
        fingerprint = {**cfg.model_dump(mode="json"), "lora_on": recipe.grpo.lora}
        run_grpo(
            policy, reward, prompts, run_dir, lora=recipe.grpo.lora, config=cfg,
            resume=_resumable(run_dir, fingerprint, resume),
        )  # fmt: skip
        out[name] = run_dir
    return out


def stage_online_dpo(
    recipe: Recipe, policy: str, reward: str | None, prompts: Path, folder: Path, resume: bool
) -> Path:
    from alignloop.rl.online_dpo import run_online_dpo

    cfg = recipe.online_dpo.config
    if cfg.heldout is None and recipe.prompts.source == "world":
        cfg = cfg.model_copy(update={"heldout": "world:gold"})
    say(f"[online_dpo] on {policy} against {cfg.judge or reward}")
    fingerprint = {**cfg.model_dump(mode="json"), "lora_on": recipe.online_dpo.lora}
    resume = _resumable(folder, fingerprint, resume)
    run_online_dpo(policy, reward, prompts, folder, lora=recipe.online_dpo.lora, config=cfg, resume=resume)
    return folder


def stage_dpo(recipe: Recipe, policy: str, pairs: Path, folder: Path, resume: bool) -> Path:
    from alignloop.models import LoraSettings
    from alignloop.offline.dpo import train_dpo

    cfg = recipe.dpo.config
    if recipe.dpo.lora and cfg.lora is None:
        cfg = cfg.model_copy(update={"lora": LoraSettings()})
    train_dpo(policy, pairs, folder, cfg, resume=_resumable(folder, cfg, resume))
    return folder


def stage_ilql(
    recipe: Recipe, policy: str, sets: Path | None, pairs: Path | None, reward: str | None, folder: Path,
    resume: bool,
) -> Path:  # fmt: skip
    """ILQL offline: on the generated sets scored by the run's reward, or on the exported pairs."""
    from alignloop.offline.ilql import train_ilql

    cfg = recipe.ilql
    if cfg.data == "scored":
        if sets is None or reward is None:
            raise UserError(
                "ilql.data=scored needs the generate stage and a reward", fix="or ilql.data=pairs"
            )
        from alignloop.reward.score import score_file

        data = folder / "scored_sets.jsonl"
        if not (resume and data.is_file()):
            folder.mkdir(parents=True, exist_ok=True)
            score_file(reward, sets, out=data)
    else:
        assert pairs is not None
        data = pairs
    conf = cfg.config
    if cfg.lora and conf.lora is None:
        from alignloop.models import LoraSettings

        conf = conf.model_copy(update={"lora": LoraSettings()})
    train_ilql(policy, data, folder, conf, resume=_resumable(folder, conf, resume))
    return folder


def stage_evaluate(
    recipe: Recipe, policies: dict[str, str], prompts: Path, reward: str | None, training: dict[str, Path],
    folder: Path, resume: bool,
) -> dict[str, Any]:  # fmt: skip
    from alignloop.evaluation import evaluate_policies, write_report
    from alignloop.evaluation.report import evaluation_table

    cfg = recipe.evaluate
    inputs = {"prompts": prompts, **{f"policy:{k}": v for k, v in policies.items()}}
    run = start_stage(folder, "evaluate", config=cfg, inputs=inputs, seed=cfg.seed, resume=resume)
    if run.skipped:
        return json.loads((folder / "evaluation.json").read_text())
    with stage_guard(run):
        curves = overoptimization_runs(cfg, prompts, reward, training)
        evaluation = evaluate_policies(
            policies, prompts, reward_spec=reward, toxicity_spec=cfg.toxicity,
            samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed, gold=cfg.gold,
            max_new_tokens=cfg.max_new_tokens, n_boot=cfg.n_boot, out=folder / "samples",
            overoptimization=curves or None, overoptimization_samples=cfg.overoptimization_samples,
        )  # fmt: skip
        write_json_atomic(folder / "evaluation.json", evaluation)
        report = write_report(
            folder, evaluation, {k: str(v) for k, v in training.items()}, title=f"alignloop: {recipe.name}"
        )
        run.table("evaluation", *evaluation_table(evaluation))
        run.finish({"report": str(report)})
    return evaluation


def overoptimization_runs(
    cfg: EvaluateSection, prompts: Path, reward: str | None, training: dict[str, Path]
) -> dict[str, Path]:
    """The training runs whose snapshots the evaluation puts on the gold-vs-KL plot: runs with two or more
    model checkpoints (PPO/GRPO ``snapshot_every``), when there is a proxy (the run's reward) and a gold judge."""
    from alignloop.evaluation.evaluate import load_prompts, world_available
    from alignloop.evaluation.overoptimization import find_checkpoints

    if not cfg.overoptimization_samples or reward is None or cfg.gold is False:
        return {}
    if cfg.gold is None and not (world_available() and any("family" in r for r in load_prompts(prompts))):
        return {}
    return {name: d for name, d in training.items() if len(find_checkpoints(d)) > 1}


def _resumable(folder: Path, config: Any, resume: bool) -> bool:
    """For stages that keep their own checkpoints: resume only what was run with the same config and
    inputs; a stage whose config or inputs changed starts over (its old folder is removed)."""
    import shutil

    from alignloop.runs import unchanged_since

    if not resume:
        return False
    same = unchanged_since(folder, config)
    if same is False:
        say(f"[{folder.name}] config or inputs changed since the last run: starting this stage over")
        shutil.rmtree(folder)
        return False
    return True


def _model_folder(run_dir: Path) -> str:
    """The trained policy inside a PPO/DPO run folder (``model/`` if present, else the folder)."""
    return str(run_dir / "model") if (run_dir / "model").is_dir() else str(run_dir)


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


def run_recipe(
    path: str | Path, out: str | Path | None = None, overrides: list[str] | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run every stage the recipe lists into ``out``; return a summary (also ``out/summary.json``)."""
    recipe = load_recipe(path, overrides)
    out = Path(out or f"runs/{recipe.name}")
    return run_loaded(recipe, out, resume=resume, recipe_path=Path(path))


def run_loaded(
    recipe: Recipe, out: Path, resume: bool = False, recipe_path: Path | None = None
) -> dict[str, Any]:
    from alignloop import tracking

    # the stages report as one group named after the run folder, their local stores in it
    with tracking.grouped(out.resolve().name, out, recipe.report_to, where="recipe key report_to"):
        return _run_and_summarise(recipe, out, resume)


def _run_and_summarise(recipe: Recipe, out: Path, resume: bool) -> dict[str, Any]:
    """Run the recipe's stages into ``out``; ``out/summary.json`` is written even when a stage fails,
    with every stage's status, time and outputs (read from the manifests the stages wrote)."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(_dump(recipe))
    summary: dict[str, Any] = {"recipe": recipe.name, "out": str(out), "stages": {}}
    try:
        _run_stages(recipe, out, resume, summary)
    finally:
        summary["stages"] = stage_statuses(out)
        summary["seconds"] = round(time.time() - t0, 1)
        write_json_atomic(out / "summary.json", {k: v for k, v in summary.items() if k != "evaluation"})
    return summary


def stage_statuses(out: Path) -> dict[str, dict[str, Any]]:
    """``{"reward": {"status", "seconds", "outputs"}, "round-2/ppo": ...}`` from the stage manifests."""
    found: dict[str, dict[str, Any]] = {}
    folders = [d for d in sorted(out.iterdir()) if d.is_dir()]
    folders += [d for r in folders if r.name.startswith("round-") for d in sorted(r.iterdir()) if d.is_dir()]
    for d in folders:
        m = d / "manifest.json"
        if not m.is_file():
            continue
        try:
            manifest = json.loads(m.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        found[str(d.relative_to(out))] = {
            "status": manifest.get("status"),
            "seconds": manifest.get("seconds"),
            **({"error": manifest["error"]} if manifest.get("error") else {}),
            "outputs": sorted(x.name for x in d.iterdir() if x.name not in ("manifest.json", "tensorboard")),
        }
    return found


def _run_stages(recipe: Recipe, out: Path, resume: bool, summary: dict[str, Any]) -> None:
    st = set(recipe.stages)
    prompts = stage_prompts(recipe, out / "prompts", resume) if "prompts" in st else None
    policy = recipe.policy
    reward = recipe.reward.spec
    pairs: Path | None = None
    round_pairs: list[Path] = []  # every round's exported pairs so far
    sets: Path | None = None
    training: dict[str, Path] = {}
    policies: dict[str, str] = {"base": recipe.policy}
    for r in range(1, recipe.rounds + 1):
        base = out if recipe.rounds == 1 else out / f"round-{r}"
        if "generate" in st:
            assert prompts is not None
            sets = stage_generate(recipe, policy, prompts["train"], base / "generate", resume)
            if "label" in st:
                # the current reward model: the previous round's (round 1: label.select_reward or reward.spec)
                select_with = (recipe.label.select_reward or reward) if r == 1 else reward
                label = stage_label(recipe, sets, base / "label", resume, policy, select_with)
                if "export" in st:  # the report places each labeller against the current reward model
                    pairs = stage_export(recipe, label, base / "export", resume, select_with)
                    round_pairs.append(pairs)
        elif "export" in st and recipe.export.import_pairs is not None and pairs is None:
            pairs = stage_export(recipe, {}, base / "export", resume)
        if "reward" in st and recipe.reward.spec is None:
            assert pairs is not None
            train_on = round_pairs if recipe.reward.all_rounds and len(round_pairs) > 1 else pairs
            reward = stage_reward(recipe, train_on, base / "reward", resume, recipe.policy)
        if "ppo" in st:
            assert prompts is not None and reward is not None
            runs = stage_ppo(recipe, policy, reward, prompts["train"], base / "ppo", resume)
            training.update(runs)
            for name, d in runs.items():
                policies[name if recipe.rounds == 1 else f"{name}-r{r}"] = _model_folder(d)
            policy = _model_folder(runs["ppo"])  # the next round starts from the current policy
        if "grpo" in st:
            assert prompts is not None and reward is not None
            start = recipe.policy if "ppo" in st else policy  # beside PPO, from the same base policy
            family = stage_grpo(recipe, start, reward, prompts["train"], base / "grpo", resume)
            training.update(family)
            for name, d in family.items():
                policies[name if recipe.rounds == 1 else f"{name}-r{r}"] = _model_folder(d)
            if "ppo" not in st:  # the next round starts from the current policy
                policy = _model_folder(family["grpo"])
        if "online_dpo" in st:
            assert prompts is not None
            start = recipe.policy if ({"ppo", "grpo"} & st) else policy  # beside them, from the base policy
            d = stage_online_dpo(recipe, start, reward, prompts["train"], base / "online_dpo", resume)
            training["online_dpo"] = d
            policies["online_dpo" if recipe.rounds == 1 else f"online_dpo-r{r}"] = _model_folder(d)
    if "dpo" in st:
        assert pairs is not None
        d = stage_dpo(recipe, recipe.policy, pairs, out / "dpo", resume)
        training["dpo"] = d
        policies["dpo"] = _model_folder(d)
    if "ilql" in st:
        d = stage_ilql(recipe, recipe.policy, sets, pairs, reward, out / "ilql", resume)
        training["ilql"] = d
        policies["ilql"] = str(d)
    if "evaluate" in st:
        assert prompts is not None
        evaluation = stage_evaluate(
            recipe, policies, prompts["eval"], reward, training, out / "evaluate", resume
        )
        summary["evaluation"] = evaluation
        summary["report"] = str(out / "evaluate" / "report.html")
    summary["policies"] = policies
    summary["training"] = {k: str(v) for k, v in training.items()}


def _dump(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def run_demo(
    out: str | Path,
    human: bool = False,
    resume: bool = False,
    overrides: list[str] | None = None,
    seeds: int = 1,
    compare: bool = False,
) -> dict[str, Any]:
    """``alignloop demo``: recipes/demo.yaml on the embedded world, then a short table.

    ``compare``: recipes/compare.yaml instead (PPO, GRPO, RLOO, online DPO, DPO and ILQL on the same
    prompts, labels, reward model and evaluation).

    ``seeds > 1``: the whole demo once per seed (the recipe's seed, +1, ...) in ``out/seed-N``,
    then the table of each metric's mean and spread over the seeds (``out/seeds.json``).
    """
    extra = ["label.mode=human"] if human else []
    overrides = [*extra, *(overrides or [])]
    recipe = RECIPES / ("compare.yaml" if compare else "demo.yaml")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}", "--seeds")
    if seeds == 1:
        summary = run_recipe(recipe, out=out, overrides=overrides, resume=resume)
        print(demo_table(summary, Path(out)))
        return summary
    first = load_recipe(recipe, overrides).seed
    runs: dict[int, dict[str, Any]] = {}
    for seed in range(first, first + seeds):
        folder = Path(out) / f"seed-{seed}"
        say(f"[demo] seed {seed} ({seed - first + 1} of {seeds}) in {folder}")
        runs[seed] = run_recipe(recipe, out=folder, overrides=[*overrides, f"seed={seed}"], resume=resume)
        print(demo_table(runs[seed], folder), flush=True)
    spread = seeds_spread({s: r.get("evaluation") or {} for s, r in runs.items()})
    write_json_atomic(Path(out) / "seeds.json", spread)
    print(seeds_table(spread))
    return {"seeds": spread, "runs": runs}


DEMO_COLUMNS = (
    ("gold", "gold_score"), ("toxicity", "toxicity"), ("toxic", "rate_toxic"),
    ("harm-comply", "rate_harmful_compliance"), ("myth-conf", "rate_myth_confirmed"), ("F rate", "f_rate"),
    ("KL/token", "kl_per_token"),
)  # fmt: skip


def demo_table(summary: dict[str, Any], out: Path) -> str:
    """The demo's closing table: base / PPO / DPO side by side, plus what was flagged."""
    evaluation = summary.get("evaluation") or {}
    lines = [f"{'policy':<14}" + "".join(f"{c:>12}" for c, _ in DEMO_COLUMNS)]
    for name, pol in evaluation.get("policies", {}).items():
        metrics = pol.get("metrics", {})
        cells = []
        for _, key in DEMO_COLUMNS:
            m = metrics.get(key) or {}
            v = m.get("mean")
            cells.append(f"{v:>12.3f}" if isinstance(v, (int, float)) else f"{'-':>12}")
        lines.append(f"{name:<14}" + "".join(cells))
    export = out / "export" / "metrics.json"
    if export.is_file():
        flagged = json.loads(export.read_text()).get("flagged", [])
        lines.append(f"flagged labellers: {', '.join(flagged) or 'none'}")
    for name, d in summary.get("training", {}).items():
        m = Path(d) / "metrics.json"
        if m.is_file():
            warns = json.loads(m.read_text()).get("warnings") or {}
            if warns:
                kinds = ", ".join(f"{k} x{n}" for k, n in warns.items())
                lines.append(f"{name}: reward hacking flagged ({kinds})")
    lines.append(f"report: {summary.get('report', '(no evaluate stage)')}")
    return "\n".join(lines)


def spread(values: list[float]) -> dict[str, float]:
    """``{"mean", "sd", "min", "max", "n"}`` of one metric over seeds; ``sd`` is the sample
    standard deviation ``sqrt(sum (x - mean)^2 / (n - 1))`` (0 for one value)."""
    import statistics

    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": statistics.fmean(values),
        "sd": sd,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def seeds_spread(evaluations: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The demo's metrics over several seeds: ``{"seeds", "policies": {name: {metric: spread + "values"}}}``.

    ``evaluations`` maps a seed to its ``evaluation.json``; a policy or metric missing from a
    seed's run is left out of that metric's values.
    """
    per: dict[str, dict[str, list[float]]] = {}
    for seed in sorted(evaluations):
        for name, pol in evaluations[seed].get("policies", {}).items():
            for _, key in DEMO_COLUMNS:
                v = (pol.get("metrics", {}).get(key) or {}).get("mean")
                if isinstance(v, (int, float)):
                    per.setdefault(name, {}).setdefault(key, []).append(float(v))
    return {
        "seeds": sorted(evaluations),
        "policies": {
            name: {key: {**spread(vals), "values": vals} for key, vals in metrics.items()}
            for name, metrics in per.items()
        },
    }


def seeds_table(result: dict[str, Any]) -> str:
    """The demo's table over seeds: each cell ``mean +- sd`` (sample sd over the seeds)."""
    seeds = result["seeds"]
    lines = [
        f"over {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean +- sample standard deviation",
        f"{'policy':<14}" + "".join(f"{c:>16}" for c, _ in DEMO_COLUMNS),
    ]
    for name, metrics in result["policies"].items():
        cells = []
        for _, key in DEMO_COLUMNS:
            m = metrics.get(key)
            cells.append(f"{m['mean']:>9.3f} +-{m['sd']:>5.3f}" if m else f"{'-':>16}")
        lines.append(f"{name:<14}" + "".join(cells))
    return "\n".join(lines)
