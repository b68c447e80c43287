"""Preference data from the embedded world, the way the loop makes it.

Prompts of a split -> K responses drawn from the base model's behaviour mixture (the world
grammar) -> each set ranked by the default panel of three simulated labellers -> consensus
pairs (``alignloop.preference.export``, majority). The gold judge then says which side of
each pair is truly better.
"""

from __future__ import annotations

import random
from pathlib import Path

from alignloop.preference.export import export_pairs
from alignloop.records import Completion, CompletionSet, Ranking
from alignloop.world import default_panel, judge_batch, prompts, rank
from alignloop.world import grammar as g
from alignloop.world.judge import parse_prompt


def world_sets(split: str, n: int, k: int = 4, seed: int = 0, families=None) -> list[CompletionSet]:
    """``n`` prompts of ``split``, each with ``k`` responses from the base behaviour mixture."""
    rng = random.Random(seed)
    families = families or [f for f in g.FAMILIES if f != "summary"]
    out = []
    for rec in prompts(split, n=n, seed=seed, families=families):
        wp = parse_prompt(rec["prompt"])
        texts: list[str] = []
        while len(texts) < k:  # distinct texts: a set of identical completions teaches nothing
            _, text = g.sample_response(wp, rng)
            if text not in texts or len(set(texts)) + 1 < k // 2:
                texts.append(text)
        comps = [Completion(id=f"{rec['id']}-{i}", text=t) for i, t in enumerate(texts)]
        out.append(
            CompletionSet(prompt_id=rec["id"], prompt=rec["prompt"], completions=comps, model="world-grammar")
        )
    return out


def world_pairs(sets: list[CompletionSet], seed: int = 0, method: str = "majority") -> list[dict]:
    """Consensus pairs (TRL rows) of the default panel's rankings of ``sets``."""
    rng = random.Random(seed)
    rankings = [
        Ranking(
            set_id=s.set_id,
            labeller=p.name,
            ranks=rank(p, s.prompt, [c.model_dump() for c in s.completions], rng),
        )
        for s in sets
        for p in default_panel(seed)
    ]
    rows, _ = export_pairs(sets, rankings, method)
    return rows


def gold_margin(rows: list[dict]) -> list[float]:
    """gold(chosen) - gold(rejected) for each pair."""
    prompts_ = [r["prompt"] for r in rows]
    c = judge_batch(prompts_, [r["chosen"] for r in rows])
    j = judge_batch(prompts_, [r["rejected"] for r in rows])
    return [a.score - b.score for a, b in zip(c, j, strict=True)]


def world_tokenizer(path: Path):
    """A word-level tokenizer over the world's lexicon (what the shipped models use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from alignloop.world.corpus import tokenizer_texts
    from alignloop.world.judge import normalize

    words = sorted(
        {w for t in tokenizer_texts() for w in normalize(t)}
        | {w for t in tokenizer_texts() for w in t.split()}
    )
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "<bos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    fast.save_pretrained(path)
    return fast


def agreement(margins: list[float], reward_diffs: list[float] | None = None) -> float:
    """Share of pairs (gold not tied) whose order agrees with gold: the labels' own
    (``reward_diffs=None``: chosen is better) or the reward's (``r_chosen - r_rejected``)."""
    from alignloop.evaluation.metrics import gold_agreement

    return gold_agreement(margins, reward_diffs)


def measure_reward_model(model_id: str, out: Path, n_train: int = 600, n_eval: int = 200, **settings) -> dict:
    """Train a reward model on world consensus pairs; its agreement with gold on held-out pairs.

    Held out twice: 10% of the ``train`` split's prompts (the training run's ``--eval-pairs``)
    and pairs on the ``eval`` split's prompts (topics never seen in training). For each, the
    consensus labels' own agreement with gold is measured on the same pairs.
    """
    import json

    from alignloop.reward import load_reward
    from alignloop.reward.train import RewardTrainConfig, train_reward_model

    rows = world_pairs(world_sets("train", n_train, seed=0), seed=0)
    prompts_ = sorted({r["prompt"] for r in rows})
    held = set(random.Random(0).sample(prompts_, max(1, len(prompts_) // 10)))
    train_rows = [r for r in rows if r["prompt"] not in held]
    held_rows = [r for r in rows if r["prompt"] in held]
    eval_rows = world_pairs(world_sets("eval", n_eval, seed=1), seed=1)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, part in (("train", train_rows), ("heldout", held_rows)):
        files[name] = out.parent / f"{out.name}-{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    metrics = train_reward_model(
        files["train"], out, RewardTrainConfig(model=model_id, **settings), eval_pairs=files["heldout"]
    )
    reward = load_reward(str(out))
    result = {
        "train_pairs": len(train_rows),
        "epochs_run": metrics["epochs_run"],
        "pairs_per_second": metrics["pairs_per_second"],
    }
    for name, part in (("heldout", held_rows), ("eval_split", eval_rows)):
        ps = [r["prompt"] for r in part]
        rc = reward(ps, [r["chosen"] for r in part])
        rr = reward(ps, [r["rejected"] for r in part])
        margins = gold_margin(part)
        result[name] = {
            "pairs": len(part),
            "consensus_gold": agreement(margins),
            "reward_gold": agreement(margins, [a - b for a, b in zip(rc, rr, strict=True)]),
            "reward_consensus": sum(a > b for a, b in zip(rc, rr, strict=True)) / len(part),
        }
    return result


def polite_toxic_pairs(split: str = "eval", n: int = 300, seed: int = 2) -> list[tuple[str, str, str]]:
    """``(prompt, polite, toxic)`` for every set pairing a non-toxic with a toxic response (gold flags)."""
    out = []
    for s in world_sets(split, n, k=4, seed=seed):
        texts = [c.text for c in s.completions]
        js = judge_batch([s.prompt] * len(texts), texts)
        polite = [t for t, j in zip(texts, js, strict=True) if "toxic" not in j.flags and not j.fail]
        toxic = [t for t, j in zip(texts, js, strict=True) if "toxic" in j.flags]
        out += [(s.prompt, p, t) for p in polite for t in toxic]
    return out
