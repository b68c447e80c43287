"""AI preference labels (RLAIF): a judge model compares two responses under drawn principles.

For a pair (prompt, A, B) and each of ``n`` preference principles drawn for it::

    q_k   = preference_prompt(prompt, A, B, principle_k)       "... options : (A) .. (B) .. the answer is :"
    P_k   = p(" (A)" | q_k) / (p(" (A)" | q_k) + p(" (B)" | q_k))      the options' normalised probability
    P(A)  = clamp(mean_k P_k, lo, hi)                            (Bai et al. clamp to 40-60%)

A chat endpoint gives no probabilities: its greedy answer is read instead (``P_k`` = 1 if it
names (A), 0 if (B), 0.5 if neither), so its labels are hard before averaging.

With ``swap`` each principle is also asked with B shown first, and ``P_k`` is the mean of
``P_k(A first)`` and ``1 - P_k(B first)`` (:func:`swap_average`): the judge's position bias
cancels. Asked both ways, the bias is also measured (:func:`position_bias`): each label gets its
``position_bias`` and the run's mean goes to its metrics (``position_bias_points``) and one
console line.

A conversational prompt (a list of messages) is laid out in the question as the judge's chat template
renders it with the generation prompt (a local judge; on the world that is the text prompt itself),
or as ``role: content`` lines for an HTTP judge; its answers are the assistants' contents, and its
pair comes out in TRL's conversational format (``chosen`` / ``rejected`` as assistant messages).

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
from alignloop.records import JsonlAppender, adopt_text_convention, check_messages, iter_jsonl


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
    completions) or pair records (``chosen``/``rejected``, or ``a``/``b``). A conversational prompt
    stays a message list; its answers (texts or assistant message lists) become the contents."""
    out: list[dict[str, Any]] = []
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        prompt = obj.get("prompt")
        if isinstance(prompt, list):
            obj = _contents(obj, where)
        elif not isinstance(prompt, str) or not prompt.strip():
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
    text = [(i, p) for i, p in enumerate(out, 1) if isinstance(p["prompt"], str)]
    adopt_text_convention(text, path)  # old files (no space before completions) converted
    return out


def swap_average(p_first: float, p_first_swapped: float) -> float:
    """P(A better) from both answer orders::

        P(A) = (p + 1 - p') / 2

    ``p``: P(the judge picks the first-shown option) with A shown first; ``p'``: the same with B
    shown first. A judge with a pull ``c`` toward the first position (``p = q + c``,
    ``p' = 1 - q + c``) gives ``q``: the pull cancels.
    """
    return (p_first + 1.0 - p_first_swapped) / 2.0


def position_bias(p_first: Sequence[float], p_first_swapped: Sequence[float]) -> float:
    """How much more often the judge answers (A) than a balanced judge would, over N questions
    each asked in both orders (``p_i``, ``p'_i`` as in :func:`swap_average`)::

        bias = mean_i (p_i + p'_i) / 2 - 0.5          in [-0.5, 0.5]  (x100: points)

    A balanced judge (``p'_i = 1 - p_i``: the same verdict whichever side a response is on) has 0,
    whether it is right or wrong; one that always answers (A) has +0.5, always (B) -0.5. With hard
    picks (0/1) it is the share of (A) answers minus one half.
    """
    if len(p_first) != len(p_first_swapped) or not p_first:
        raise ValueError(
            f"position_bias: {len(p_first)} and {len(p_first_swapped)} answers (need equal, > 0)"
        )
    return sum(a + b for a, b in zip(p_first, p_first_swapped, strict=True)) / (2 * len(p_first)) - 0.5


def position_bias_points(labels: Sequence[dict[str, Any]], tag: str) -> float | None:
    """The mean ``position_bias`` of labels asked both ways, in points (None without swap), and
    one console line saying it."""
    from alignloop.runs import say

    xs = [r["position_bias"] for r in labels if r.get("position_bias") is not None]
    if not xs:
        return None
    points = round(100 * sum(xs) / len(xs), 2)
    say(f"[{tag}] judge position bias {points:+.2f} points: it answers (A) that much more often than a "
        f"balanced judge would ({len(xs)} pairs asked both ways; swap averaging cancelled it)")  # fmt: skip
    return points


def _contents(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """A record with a conversational prompt, checked, its answers as the assistants' contents."""
    try:
        check_messages(obj["prompt"], "prompt")
        for key in ("a", "b", "chosen", "rejected"):
            check_messages(obj.get(key), "completion")
    except ValueError as e:
        raise UserError(str(e), where) from None

    def content(x: Any) -> Any:
        if isinstance(x, list):
            return " ".join(m["content"].strip() for m in x)
        return x.strip() if isinstance(x, str) else x

    out = {k: content(v) if k in ("a", "b", "chosen", "rejected") else v for k, v in obj.items()}
    if isinstance(obj.get("completions"), list):
        out["completions"] = [{**c, "text": content(c.get("text"))} if isinstance(c, dict) else c
                              for c in obj["completions"]]  # fmt: skip
    return out


def layout(judge: LocalLM | OpenAIClient, prompt: Any) -> str:
    """The prompt as the judge's question shows it: a text as it is; a conversation as the judge's chat
    template renders it with the generation prompt (a local judge), else as ``role: content`` lines."""
    if not isinstance(prompt, list):
        return prompt
    tok = getattr(judge, "tokenizer", None)
    if tok is not None and getattr(tok, "chat_template", None):
        from alignloop.chat import prompt_text

        return prompt_text(tok, prompt, f"{judge.name}: a conversation to judge")
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _turn(prompt: Any, answer: str) -> Any:
    """An answer as the pair file holds it: text after a text prompt, the assistant's turn after a conversation."""
    return [{"role": "assistant", "content": answer}] if isinstance(prompt, list) else answer


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
                texts.append(preference_prompt(c, layout(judge, p["prompt"]), a, b, c.preferences[k]))
    if getattr(judge, "api", "completions") == "chat":  # text answers: hard labels (0.5 if unreadable)
        firsts = [answer_choice(a, opt_a, opt_b) for a in judge.answers(texts)]
    else:
        logps = judge.continuation_logprobs(
            [t for t in texts for _ in (0, 1)], [o for _ in texts for o in (opt_a, opt_b)]
        )
        firsts = [soft_preference(logps[2 * q], logps[2 * q + 1]) for q in range(len(texts))]
    per_pair: list[dict[str, dict[bool, float]]] = [{} for _ in pairs]  # principle -> {swapped: P(first)}
    for q, (i, k, swapped) in enumerate(questions):
        per_pair[i].setdefault(c.preferences[k].name, {})[swapped] = firsts[q]
    out = []
    for p, scores in zip(pairs, per_pair, strict=True):
        per_principle = {
            name: swap_average(v[False], v[True]) if cfg.swap else v[False] for name, v in scores.items()
        }
        p_a = sum(per_principle.values()) / len(per_principle)
        raw = p_a
        if cfg.clamp is not None:
            p_a = min(max(p_a, cfg.clamp[0]), cfg.clamp[1])
        a_wins = p_a >= 0.5
        rec = {
            "id": p["id"],
            "prompt": p["prompt"],
            "chosen": _turn(p["prompt"], p["a"] if a_wins else p["b"]),
            "rejected": _turn(p["prompt"], p["b"] if a_wins else p["a"]),
            "weight": round(p_a if a_wins else 1.0 - p_a, 6),
            "p_a": round(p_a, 6),
            "p_a_raw": round(raw, 6),
            "per_principle": {k: round(v, 6) for k, v in per_principle.items()},
            "source": f"ai:{judge.name}",
        }
        if cfg.swap:
            vs = list(scores.values())
            rec["position_bias"] = round(position_bias([v[False] for v in vs], [v[True] for v in vs]), 6)
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
    if cfg.swap:  # over every label in the file (a resumed run's earlier labels too)
        stats["position_bias_points"] = position_bias_points([r for _, r in iter_jsonl(out)], "cai label")
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
    from alignloop.world.prompts import chat_text

    def text(x: Any) -> str:  # a conversational pair's answer: the assistant's content
        return " ".join(m["content"] for m in x) if isinstance(x, list) else x

    n = agree = hn = hagree = 0
    for r in labels:
        prompt = chat_text(r["prompt"])  # a conversation as the world's template renders it
        jc, jr = judge(prompt, text(r["chosen"])), judge(prompt, text(r["rejected"]))
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
