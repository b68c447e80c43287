"""Which completion sets to send to labellers when labels are scarce (no torch).

Random selection (the default) draws ``budget`` sets uniformly. Uncertainty selection sends
the sets where the current reward model is least sure which completion is best, plus a share
of random sets for calibration (so the labelled data still covers what the model already gets
right, and the reward model does not learn only from borderline cases):

    sureness(set) = margin between the two highest rewards in the set   (one reward model)
                  = -spread of that margin over an ensemble's members     (an ensemble)
    n_random      = round(random_share * budget)      drawn uniformly from the pool
    n_uncertain   = budget - n_random                  the lowest sureness among the rest

The selector only sees ``{set_id: sureness}`` (lower = less sure), so an ensemble's spread
plugs in through :func:`ensemble_sureness` without touching it.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence

from alignloop.errors import UserError
from alignloop.records import CompletionSet

METHODS = ("random", "uncertainty")
DEFAULT_RANDOM_SHARE = 0.2


def top_margin(rewards: Sequence[float]) -> float:
    """How sure one reward model is about a set: ``r_(1) - r_(2)``, the gap between its two
    highest rewards (``rewards``: one float per completion, shape ``[K]``). A set with fewer than
    two completions teaches nothing: ``inf``."""
    if len(rewards) < 2:
        return math.inf
    first, second = sorted(rewards, reverse=True)[:2]
    return first - second


def ensemble_sureness(member_rewards: Sequence[Sequence[float]]) -> float:
    """How sure an ensemble is about a set: ``-std_m(top_margin computed by member m on the
    members' mean-best pair)``; ``member_rewards`` has shape ``[M members][K completions]``.

    The pair is the two completions the ensemble's mean ranks highest; each member's margin on that
    pair is ``r_m[best] - r_m[second]``. Members that disagree (large spread) give low sureness.
    One member, or fewer than two completions: the plain :func:`top_margin` of that member.
    """
    if len(member_rewards) < 2 or len(member_rewards[0]) < 2:
        return top_margin(member_rewards[0]) if member_rewards else math.inf
    k = len(member_rewards[0])
    mean = [statistics.fmean(m[i] for m in member_rewards) for i in range(k)]
    best, second = sorted(range(k), key=lambda i: -mean[i])[:2]
    return -statistics.pstdev([m[best] - m[second] for m in member_rewards])


def select_sets(
    set_ids: Sequence[str],
    budget: int,
    method: str = "random",
    sureness: Mapping[str, float] | None = None,
    random_share: float = DEFAULT_RANDOM_SHARE,
    seed: int = 0,
) -> list[dict]:
    """Pick ``budget`` of ``set_ids``: ``[{"set_id", "why": "random" | "uncertain", "sureness"?}]``,
    in the order picked (the random share first, then the least sure first).

    ``method`` "random": a seeded uniform draw. "uncertainty": ``round(random_share * budget)``
    uniform draws, then the rest by ascending ``sureness[set_id]`` (ties by pool order).
    """
    check_selection(len(set_ids), budget, method, sureness is not None, random_share)
    rng = random.Random(seed)
    if method == "random":
        return [{"set_id": s, "why": "random"} for s in rng.sample(list(set_ids), budget)]
    assert sureness is not None
    n_random = round(random_share * budget)
    picked = rng.sample(list(set_ids), n_random)
    taken = set(picked)
    rest = sorted((s for s in set_ids if s not in taken), key=lambda s: sureness[s])  # stable: pool order
    out = [{"set_id": s, "why": "random", "sureness": sureness[s]} for s in picked]
    out += [{"set_id": s, "why": "uncertain", "sureness": sureness[s]} for s in rest[: budget - n_random]]
    return out


def check_selection(
    pool: int, budget: int | None, method: str, has_reward: bool, random_share: float, where: str = "--budget"
) -> None:
    """One clear :class:`UserError` for a selection that cannot be made (before anything is written)."""
    if method not in METHODS:
        raise UserError(f"unknown selection {method!r}", "--select", f"choose from {', '.join(METHODS)}")
    if budget is not None and budget < 1:
        raise UserError(
            f"the budget must be at least 1 set, got {budget}", where, "give --budget N with N >= 1"
        )
    if budget is not None and budget > pool:
        raise UserError(
            f"a budget of {budget} sets is more than the {pool} sets in the pool",
            where,
            f"give --budget {pool} or less, or generate more sets",
        )
    if not 0.0 <= random_share <= 1.0:
        raise UserError(f"the random share must be 0 to 1, got {random_share}", "--random-share")
    if method == "uncertainty" and budget is None:
        raise UserError("--select uncertainty needs a budget", where, "give --budget N (sets to send)")
    if method == "uncertainty" and not has_reward:
        raise UserError(
            "--select uncertainty needs the current reward model to tell which sets it is unsure of",
            "--reward",
            "pass --reward SPEC (e.g. the last round's reward-model folder), or --select random",
        )


def choose(
    sets: Sequence[CompletionSet],
    sets_path: str,
    budget: int | None,
    method: str = "random",
    reward: str | None = None,
    random_share: float = DEFAULT_RANDOM_SHARE,
    seed: int = 0,
) -> tuple[list[CompletionSet], list[dict]]:
    """The sets to send (in pool order) and the selection record (:func:`select_sets`'s rows).

    ``budget`` None: every set, nothing scored. ``method`` "uncertainty" scores the completions of
    ``sets_path`` with the reward SPEC ``reward`` (the current reward model) and uses
    :func:`top_margin` as the sureness.
    """
    ids = [cs.set_id for cs in sets]
    check_selection(len(ids), budget, method, reward is not None, random_share)
    if budget is None:
        return list(sets), []
    sureness = None
    if method == "uncertainty":
        from alignloop.reward.score import set_rewards  # torch only when a model scores

        assert reward is not None
        rewards = set_rewards(reward, sets_path)
        sureness = {  # over distinct texts: a set of copies of one text is not uncertain, it is empty
            cs.set_id: top_margin(
                list({c.text: r for c, r in zip(cs.completions, rewards[cs.set_id], strict=True)}.values())
            )
            for cs in sets
        }
    rows = select_sets(ids, budget, method, sureness, random_share, seed)
    keep = {r["set_id"] for r in rows}
    return [cs for cs in sets if cs.set_id in keep], rows


def summary(rows: Sequence[dict], pool: int) -> dict:
    """``{"pool", "selected", "random", "uncertain", "mean_sureness_uncertain", "mean_sureness_random"}``."""
    out: dict = {"pool": pool, "selected": len(rows)}
    for why in ("random", "uncertain"):
        part = [r for r in rows if r["why"] == why]
        out[why] = len(part)
        vals = [r["sureness"] for r in part if "sureness" in r and math.isfinite(r["sureness"])]
        if vals:
            out[f"mean_sureness_{why}"] = round(statistics.fmean(vals), 4)
    return out
