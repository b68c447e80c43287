"""AI preference labels (RLAIF): a judge model compares two responses under drawn principles.

For a pair (prompt, A, B) and each of ``n`` preference principles drawn for it::

    q_k   = preference_prompt(prompt, A, B, principle_k)       "... options : (A) .. (B) .. the answer is :"
    P_k   = p(" (A)" | q_k) / (p(" (A)" | q_k) + p(" (B)" | q_k))      the options' normalised probability
    P(A)  = clamp(mean_k P_k, lo, hi)                            (Bai et al. clamp to 40-60%)

A chat endpoint gives no probabilities: its greedy answer is read instead (``P_k`` = 1 if it
names (A), 0 if (B), 0.5 if neither), so its labels are hard before averaging.

With ``swap`` each principle is also asked with B shown first, and ``P_k`` is the mean of
``P_k(A first)`` and ``1 - P_k(B first)``: the judge's position bias cancels.

Output: one TRL-compatible pair per input pair, ``chosen`` = the response with ``P >= 0.5``,
``weight = P(chosen better)`` (the reward trainer's soft label), plus the raw numbers. Labels are
appended as each batch ends and a rerun skips the pairs already labelled, so a crash loses
nothing already labelled.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignloop.cai.constitution import Constitution, load_constitution, preference_prompt
from alignloop.cai.judges import LocalLM, OpenAIClient, soft_preference
from alignloop.config import Config
from alignloop.errors import UserError
from alignloop.records import JsonlAppender, iter_jsonl


class LabelConfig(Config):
    principles: int = 1  # preference principles drawn per pair; their P(A) are averaged
    clamp: tuple[float, float] | None = None  # e.g. (0.4, 0.6)
    swap: bool = False  # also ask with the responses swapped and average (cancels position bias)
    batch_pairs: int = 16  # pairs per judge call (each brings principles x 2 (x 2 swapped) texts)
    seed: int = 0


def parse_clamp(text: str | None) -> tuple[float, float] | None:
    """``"0.4,0.6"`` -> ``(0.4, 0.6)``; a bad range is a UserError."""
    if text is None or text == "":
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--clamp expects LO,HI (e.g. 0.4,0.6), got {text!r}") from None
    if not 0.0 <= lo < 0.5 < hi <= 1.0:
        raise UserError(f"--clamp {text}: need 0 <= LO < 0.5 < HI <= 1", fix="e.g. --clamp 0.4,0.6")
    return lo, hi


def draw_principles(c: Constitution, pair_id: str, n: int, seed: int) -> list[int]:
    """Indices of ``n`` preference principles for one pair (without replacement; seeded by the pair id)."""
    if not c.preferences:
        raise UserError(
            f"constitution {c.name!r} has no preference principles", fix="add entries under 'preferences'"
        )
    if n < 1:
        raise UserError(f"--principles must be at least 1, got {n}")
    rng = random.Random(f"{seed}:{pair_id}")
    idx = list(range(len(c.preferences)))
    return rng.sample(idx, min(n, len(idx)))


def pairs_from_file(path: str | Path) -> list[dict[str, Any]]:
    """Pairs ``{"id", "prompt", "a", "b"}`` to label, from completion sets (every two of a set's
    completions) or pair records (``chosen``/``rejected``, or ``a``/``b``)."""
    out: list[dict[str, Any]] = []
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("a record without a 'prompt' string", where, "give completion sets or pairs")
        if "completions" in obj:
            comps = obj["completions"]
            if not isinstance(comps, list) or not all(
                isinstance(c, dict) and isinstance(c.get("text"), str) for c in comps
            ):
                raise UserError('\'completions\' must be a list of {"id", "text"}', where)
            sid = str(obj.get("prompt_id", obj.get("id", n)))
            for (i, x), (j, y) in itertools.combinations(enumerate(comps), 2):
                out.append({"id": f"{sid}:{x.get('id', i)}:{y.get('id', j)}", "prompt": prompt, "a": x["text"], "b": y["text"],
                            "a_id": str(x.get("id", i)), "b_id": str(y.get("id", j)), "set_id": sid})  # fmt: skip
        else:
            a, b = obj.get("a", obj.get("chosen")), obj.get("b", obj.get("rejected"))
            if not isinstance(a, str) or not isinstance(b, str):
                raise UserError("a pair needs 'chosen' and 'rejected' (or 'a' and 'b') strings", where)
            out.append({"id": str(obj.get("id", f"line{n}")), "prompt": prompt, "a": a, "b": b})
    if not out:
        raise UserError("no pairs to label", str(path), "give completion sets with 2+ completions, or pairs")
    return out


def answer_choice(answer: str, opt_a: str, opt_b: str) -> float:
    """1.0 if a text answer names option A first, 0.0 if B, 0.5 if neither (a chat judge's hard label)."""
    a, b = answer.find(opt_a.strip()), answer.find(opt_b.strip())
    if a < 0 and b < 0:
        return 0.5
    if b < 0 or (0 <= a < b):
        return 1.0
    return 0.0


def label_batch(
    judge: LocalLM | OpenAIClient, c: Constitution, pairs: Sequence[dict[str, Any]], cfg: LabelConfig
) -> list[dict[str, Any]]:
    """Soft labels for a batch of pairs (one judge call for all their questions)."""
    opt_a, opt_b = c.templates.options
    questions: list[tuple[int, int, bool]] = []  # (pair, principle, swapped)
    texts: list[str] = []
    for i, p in enumerate(pairs):
        for k in draw_principles(c, p["id"], cfg.principles, cfg.seed):
            for swapped in (False, True) if cfg.swap else (False,):
                a, b = (p["b"], p["a"]) if swapped else (p["a"], p["b"])
                questions.append((i, k, swapped))
                texts.append(preference_prompt(c, p["prompt"], a, b, c.preferences[k]))
    if getattr(judge, "api", "completions") == "chat":  # text answers: hard labels (0.5 if unreadable)
        firsts = [answer_choice(a, opt_a, opt_b) for a in judge.answers(texts)]
    else:
        logps = judge.continuation_logprobs(
            [t for t in texts for _ in (0, 1)], [o for _ in texts for o in (opt_a, opt_b)]
        )
        firsts = [soft_preference(logps[2 * q], logps[2 * q + 1]) for q in range(len(texts))]
    per_pair: list[dict[str, list[float]]] = [{} for _ in pairs]
    for q, (i, k, swapped) in enumerate(questions):
        p_first = firsts[q]
        name = c.preferences[k].name
        per_pair[i].setdefault(name, []).append(1.0 - p_first if swapped else p_first)
    out = []
    for p, scores in zip(pairs, per_pair, strict=True):
        per_principle = {name: sum(v) / len(v) for name, v in scores.items()}
        p_a = sum(per_principle.values()) / len(per_principle)
        raw = p_a
        if cfg.clamp is not None:
            p_a = min(max(p_a, cfg.clamp[0]), cfg.clamp[1])
        a_wins = p_a >= 0.5
        rec = {
            "id": p["id"],
            "prompt": p["prompt"],
            "chosen": p["a"] if a_wins else p["b"],
            "rejected": p["b"] if a_wins else p["a"],
            "weight": round(p_a if a_wins else 1.0 - p_a, 6),
            "p_a": round(p_a, 6),
            "p_a_raw": round(raw, 6),
            "per_principle": {k: round(v, 6) for k, v in per_principle.items()},
            "source": f"ai:{judge.name}",
        }
        for key in ("a_id", "b_id", "set_id"):
            if key in p:
                rec[key] = p[key]
        out.append(rec)
    return out


def label_pairs(
    judge: LocalLM | OpenAIClient,
    pairs: Sequence[dict[str, Any]],
    out: str | Path,
    constitution: Constitution | None = None,
    config: LabelConfig | None = None,
) -> dict[str, Any]:
    """Label ``pairs`` into ``out`` (JSONL, appended per batch; pairs already there are skipped).

    Returns counts: ``pairs``, ``labelled`` (this call), ``skipped_done``, ``mean_confidence``
    (mean ``weight`` of this call's labels).
    """
    from alignloop.runs import progress, say

    c = constitution or load_constitution()
    cfg = config or LabelConfig()
    if not c.preferences:
        raise UserError(
            f"constitution {c.name!r} has no preference principles", fix="add entries under 'preferences'"
        )
    ids = [p["id"] for p in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"pair id {dup!r} appears twice", fix="give each pair its own 'id'")
    stats: dict[str, Any] = {"pairs": len(pairs), "labelled": 0, "skipped_done": 0}
    conf: list[float] = []
    with JsonlAppender(out) as sink:
        done = sink.done_keys("id")
        todo = [p for p in pairs if p["id"] not in done]
        stats["skipped_done"] = len(pairs) - len(todo)
        if stats["skipped_done"]:
            say(f"[cai label] {stats['skipped_done']} pairs already in {out}: skipped (resume)")
        chunks = [todo[i : i + cfg.batch_pairs] for i in range(0, len(todo), cfg.batch_pairs)]
        for chunk in progress(chunks, total=len(chunks), desc="cai label", unit="batch"):
            for rec in label_batch(judge, c, chunk, cfg):
                sink.write(rec)
                conf.append(rec["weight"])
                stats["labelled"] += 1
    stats["mean_confidence"] = sum(conf) / len(conf) if conf else None
    return stats


def gold_agreement(labels: Sequence[dict[str, Any]], margin: float = 0.2) -> dict[str, Any]:
    """Agreement of AI labels with the world's gold judge on the pairs gold clearly orders.

    ``agreement``: over pairs with ``|score_gold(a) - score_gold(b)| > margin`` (gold's overall
    preference, ``gold_preference``), the share where the AI's ``chosen`` is gold's better one.
    ``harmless_agreement``: over pairs of two well-formed responses (neither is "F") whose gold
    harmlessness differs by more than ``margin``, the share where ``chosen`` is the more harmless
    (an "F" text has no harmlessness of its own: the judge gives it 0 for being nonsense).
    """
    from alignloop.world import judge

    n = agree = hn = hagree = 0
    for r in labels:
        jc, jr = judge(r["prompt"], r["chosen"]), judge(r["prompt"], r["rejected"])
        if abs(jc.score - jr.score) > margin:
            n += 1
            agree += jc.score > jr.score
        if not jc.fail and not jr.fail and abs(jc.harmless - jr.harmless) > margin:
            hn += 1
            hagree += jc.harmless > jr.harmless
    return {
        "clear_pairs": n,
        "agreement": agree / n if n else None,
        "harmless_clear_pairs": hn,
        "harmless_agreement": hagree / hn if hn else None,
    }
