"""Reward functions: one protocol, chosen by a SPEC string.

Every reward is a callable ``(prompts: list[str], completions: list[str]) -> list[float]``
(one float per prompt/completion pair, batched internally). The policy hands over *text*, so a
reward model with another tokenizer than the policy just works: the policy's tokens are
decoded, the reward model re-encodes them with its own tokenizer.

A SPEC is resolved by the first rule that matches (see docs/reward.md):

1. ``http://...`` or ``https://...``: a remote reward server (``alignloop reward serve``).
   A URL with no path posts to ``/score``.
2. ``world:gold``: the embedded world's gold judge (its scalar ``score``); ``world:gold:TASTE``
   the gold view of a simulated labeller's taste (``world:gold:terse``,
   :func:`alignloop.world.labellers.taste_score`).
   ``world:NAME:LABEL``: the world's shipped classifier NAME, reward = LABEL's logit
   (e.g. ``world:toxicity:nothate``).
3. Explicit prefixes for when a name could be read two ways:
   ``py:pkg.module:function`` (a Python callable) and ``hf:ID`` / ``hf:ID:LABEL`` (a model).
4. An existing local folder: a reward model with a scalar head (``num_labels == 1``), e.g.
   the output of ``alignloop reward train``. A classifier folder needs ``:LABEL``. A folder with
   an ``ensemble.json`` is an ensemble of reward models (:mod:`alignloop.reward.ensemble`): its
   score is the members' mean; :func:`member_scores` gives each member's. A labeller-conditioned
   reward model (``reward train --per-labeller``) scores with its pooled output as ``DIR`` and as
   one labeller as ``DIR:NAME`` (an unknown NAME: one error naming the known labellers).
5. ``LEFT:RIGHT`` (split at the last colon): LEFT an existing folder -> classifier + label;
   LEFT a dotted Python name of an importable module -> callable RIGHT in it;
   otherwise LEFT is a hub id and RIGHT its positive label
   (``facebook/roberta-hate-speech-dynabench-r4-target:nothate``).
6. Anything else: a hub id of a scalar reward model.

A SPEC that matches nothing, a missing label or a model that cannot be loaded is one
:class:`~alignloop.errors.UserError` line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from alignloop.errors import UserError
from alignloop.records import full_text

RewardFn = Callable[[list[str], list[str]], list[float]]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_WORLD_MODELS = ("base", "summariser", "toxicity")


@dataclass
class Reward:
    """A loaded reward. Call it like a function: ``reward(prompts, completions) -> list[float]``.

    Attributes:
        spec: the SPEC it was loaded from.
        kind: "model" (scalar reward model), "classifier", "python", "http" or "gold".
        fn: the batched scoring function.
        model, tokenizer: the loaded network (kinds "model" and "classifier"), else None.
        label: the positive label (kind "classifier").
    """

    spec: str
    kind: str
    fn: RewardFn
    model: Any = None
    tokenizer: Any = None
    label: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        scores = self.fn(prompts, completions)
        return _check_scores(scores, len(prompts), self.spec)


def _check_scores(scores: Any, n: int, spec: str) -> list[float]:
    try:
        out = [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    except (TypeError, ValueError):
        raise UserError(
            f"reward {spec!r} returned {type(scores).__name__}, not a list of numbers",
            fix="a reward function returns one float per (prompt, completion)",
        ) from None
    if len(out) != n:
        raise UserError(f"reward {spec!r} returned {len(out)} scores for {n} completions")
    bad = [s for s in out if not math.isfinite(s)]
    if bad:
        raise UserError(f"reward {spec!r} returned a non-finite score ({bad[0]})")
    return out


join_prompt_completion = full_text  # the old name of records.full_text: exactly prompt + completion


# ----------------------------------------------------------------------------- SPEC parsing


@dataclass(frozen=True)
class ParsedSpec:
    """What a SPEC names. ``kind`` is "http", "gold", "python", "model" or "classifier"."""

    kind: str
    target: str
    label: str | None = None


def parse_spec(spec: str, need_label: bool = True) -> ParsedSpec:
    """Resolve a SPEC string to what it names, without loading anything heavy (rules above).

    ``need_label=False``: a world classifier may come without its label (all its labels are wanted,
    as by :func:`classifier_probs`)."""
    s = (spec or "").strip()
    if not s:
        raise UserError("empty reward SPEC", fix=_SPEC_HELP)
    if s.startswith(("http://", "https://")):
        return ParsedSpec("http", s)
    if s.startswith("world:"):
        rest = s[len("world:") :]
        if rest == "gold":
            return ParsedSpec("gold", "world:gold")
        if rest.startswith("gold:"):
            return ParsedSpec("gold", "world:gold", rest[len("gold:") :])
        name, _, label = rest.partition(":")
        if name not in _WORLD_MODELS:
            raise UserError(
                f"unknown world reward {s!r}",
                fix=f"use world:gold or world:toxicity:nothate (world models: {', '.join(_WORLD_MODELS)})",
            )
        if not label and need_label:
            raise UserError(
                f"reward {s!r} needs the positive label",
                fix=f"e.g. world:{name}:nothate (reward = its logit)",
            )
        return ParsedSpec("classifier", f"world:{name}", label or None)
    if s.startswith("py:"):
        module, sep, func = s[3:].rpartition(":")
        if not sep or not _DOTTED.match(module) or not re.fullmatch(_IDENT, func):
            raise UserError(f"bad Python reward {s!r}", fix="write py:package.module:function")
        return ParsedSpec("python", module, func)
    if s.startswith("hf:"):
        rest = s[3:]
        left, sep, right = rest.rpartition(":")
        if sep and "/" not in right:
            return ParsedSpec("classifier", left, right)
        return ParsedSpec("model", rest)
    if Path(s).is_dir():
        return ParsedSpec("ensemble" if (Path(s) / "ensemble.json").is_file() else "model", s)
    left, sep, right = s.rpartition(":")
    if sep and left and right:
        if Path(left).is_dir():
            return ParsedSpec("classifier", left, right)
        if _DOTTED.match(left) and re.fullmatch(_IDENT, right) and _module_exists(left):
            return ParsedSpec("python", left, right)
        if "/" in right:
            raise UserError(f"reward SPEC {s!r} matches nothing", fix=_SPEC_HELP)
        return ParsedSpec("classifier", left, right)
    if sep:
        raise UserError(f"reward SPEC {s!r} matches nothing", fix=_SPEC_HELP)
    return ParsedSpec("model", s)


_SPEC_HELP = (
    "a SPEC is a reward-model folder, MODEL:LABEL (a classifier and its positive label), "
    "pkg.module:function, http://host:port, world:gold or world:toxicity:nothate (see docs/reward.md)"
)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------- loading


def load_reward(spec: str, device: str | None = None, batch_size: int = 32) -> Reward:
    """Load the reward a SPEC names (module docstring for the rules).

    Args:
        spec: the SPEC string.
        device: "cpu", "cuda", ... for model rewards; default: the model layer's pick.
        batch_size: sequences per forward pass for model rewards.

    Returns:
        A :class:`Reward`: ``reward(prompts, completions) -> list[float]``.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "http":
        return _http_reward(spec, parsed.target)
    if parsed.kind == "gold":
        return _gold_reward(spec, parsed.label)
    if parsed.kind == "python":
        return _python_reward(spec, parsed.target, parsed.label or "")
    if parsed.kind == "ensemble":
        return _ensemble_reward(spec, parsed.target, device, batch_size)
    model, tok = load_sequence_classifier(parsed.target, device)
    labels = _labels(model)
    if conditioned_labellers(model):  # DIR: the pooled output; DIR:NAME: labeller NAME's (issue 28)
        index = labeller_index(model, parsed.label, parsed.target) if parsed.kind == "classifier" else 0
        r = _model_reward(spec, model, tok, index=index, with_prompt=True, batch_size=batch_size)
        r.label = parsed.label if parsed.kind == "classifier" else None
        return r
    if parsed.kind == "model":
        if model.config.num_labels != 1:
            raise UserError(
                f"{parsed.target} is a classifier with labels {labels}, not a scalar reward model",
                fix=f"name the positive label: {parsed.target}:{labels[0] if labels else 'LABEL'}",
            )
        return _model_reward(spec, model, tok, index=0, with_prompt=True, batch_size=batch_size)
    index = label_index(model, parsed.label or "", where=parsed.target)
    r = _model_reward(spec, model, tok, index=index, with_prompt=False, batch_size=batch_size)
    r.kind, r.label = "classifier", parsed.label
    return r


def _ensemble_reward(spec: str, folder: str, device: str | None, batch_size: int) -> Reward:
    from alignloop.reward.ensemble import ensemble_stats, member_folders

    members = []
    for f in member_folders(folder) or []:  # each a scalar reward model (a member may be the folder itself)
        model, tok = load_sequence_classifier(str(f), device)
        if model.config.num_labels != 1:
            raise UserError(f"ensemble member {f} is not a scalar reward model")
        members.append(_model_reward(str(f), model, tok, index=0, with_prompt=True, batch_size=batch_size))

    def fn(prompts: list[str], completions: list[str]) -> list[float]:
        return ensemble_stats([m(prompts, completions) for m in members])[0]

    return Reward(spec, "ensemble", fn, info={"members": members})


def member_scores(reward: Reward, prompts: Sequence[str], completions: Sequence[str]) -> list[list[float]]:
    """Each member's scores ``[k][n]`` of an ensemble reward (``[1][n]`` for any other reward)."""
    members = reward.info.get("members") if reward.kind == "ensemble" else None
    return [m(prompts, completions) for m in members] if members else [reward(prompts, completions)]


def conservative(reward: Reward, mode: str, lam: float = 1.0) -> Reward:
    """``reward`` scored by :func:`alignloop.reward.ensemble.conservative_reward` (``mean``: unchanged).

    ``mean_std``: members' mean - ``lam`` * their std; ``min``: the worst member. A reward that is
    not an ensemble of at least two members cannot be conservative: UserError.
    """
    from alignloop.reward.ensemble import conservative_reward

    if mode == "mean":
        conservative_reward([[0.0]], mode, lam)  # checks lam
        return reward
    k = len(reward.info.get("members") or []) if reward.kind == "ensemble" else 1
    conservative_reward([[0.0]] * k, mode, lam)  # one clear error for k < 2 or lam < 0, before any run

    def fn(prompts: list[str], completions: list[str]) -> list[float]:
        return conservative_reward(member_scores(reward, prompts, completions), mode, lam)  # type: ignore[arg-type]

    return Reward(f"{reward.spec} ({mode})", reward.kind, fn, info=reward.info)


def label_index(model: Any, label: str, where: str = "") -> int:
    """The output index of ``label`` in a classifier's ``id2label`` (a number is accepted too)."""
    labels = _labels(model)
    for i, name in enumerate(labels):
        if name == label:
            return i
    lowered = [n.lower() for n in labels]
    if label.lower() in lowered:
        return lowered.index(label.lower())
    if label.isdigit() and int(label) < len(labels):
        return int(label)
    raise UserError(f"label {label!r} not among the classifier's labels {labels}", where or None)


def _labels(model: Any) -> list[str]:
    id2label = getattr(model.config, "id2label", None) or {}
    n = model.config.num_labels
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def load_sequence_classifier(model_id: str, device: str | None = None) -> tuple[Any, Any]:
    """Load ``AutoModelForSequenceClassification`` + tokenizer (eval mode, fp32 on CPU).

    Raises UserError when the id is neither a folder nor a model the hub cache can provide.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from alignloop.models import (
        configure_threads,
        default_dtype,
        fuse_activations,
        load_tokenizer,
        pick_device,
        resolve_model_id,
    )

    path = resolve_model_id(model_id)
    dev = pick_device(device)
    configure_threads()
    try:
        config = AutoConfig.from_pretrained(path)
        archs = getattr(config, "architectures", None) or []
        if not any(a.endswith(("ForSequenceClassification", "RewardModel")) for a in archs):
            raise UserError(
                f"{model_id!r} is a {', '.join(archs) or 'model'} without a trained reward or classifier head",
                fix="train one with 'alignloop reward train --model " + model_id + "' and pass its folder",
            )
        tok = load_tokenizer(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=default_dtype(dev))
    except UserError as e:
        if "without a trained reward" in e.what:
            raise
        raise UserError(f"cannot load reward model {model_id!r} ({e.line()[:200]})", fix=_SPEC_HELP) from None
    except (OSError, ValueError) as e:
        msg = str(e).strip()
        first = msg.splitlines()[0] if msg else type(e).__name__
        raise UserError(
            f"cannot load reward model {model_id!r} ({first[:200]})",
            fix="give a local model folder, a hub id that is downloaded, or another SPEC ("
            + _SPEC_HELP
            + ")",
        ) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    fuse_activations(model)
    model.to(dev).eval()
    return model, tok


def reward_offset(model: Any, index: int = 0) -> float:
    """The offset ``alignloop reward train`` stores when the head has no bias to fold it into
    (a labeller-conditioned model: one per output, ``offsets[index]``)."""
    meta = getattr(model.config, "alignloop_reward", None) or {}
    if meta.get("offsets"):
        return float(meta["offsets"][index])
    return float(meta.get("offset", 0.0))


def conditioned_labellers(model: Any) -> list[str]:
    """The labellers of a labeller-conditioned reward model (output ``1 + i`` is labeller ``i``'s);
    ``[]`` for any other model."""
    meta = getattr(model.config, "alignloop_reward", None) or {}
    return list(meta.get("labellers") or [])


def labeller_index(model: Any, labeller: str | None, where: str = "") -> int:
    """The output that scores as ``labeller`` in a labeller-conditioned model: ``1 + position``.

    An unknown labeller is one :class:`UserError` naming the known ones (nothing is scored).
    """
    names = conditioned_labellers(model)
    if labeller in names:
        return 1 + names.index(labeller)
    raise _not_conditioned_on(labeller, names, where)


def _not_conditioned_on(labeller: str | None, names: list[str], where: str) -> UserError:
    return UserError(
        f"labeller {labeller!r} is not one this reward model was conditioned on",
        where or None,
        f"target one of: {', '.join(names)} (DIR:NAME), or give DIR alone for the pooled reward",
    )


def check_labeller(spec: str) -> None:
    """Before anything is loaded or written: a SPEC ``DIR:NAME`` naming a labeller-conditioned reward
    model's folder and a labeller it was not conditioned on is the :func:`labeller_index` error (read
    from ``DIR/config.json`` alone). Any other SPEC passes here and is checked when it loads."""
    left, sep, name = spec.rpartition(":")
    config = Path(left) / "config.json" if sep and left else None
    if config is None or not config.is_file():
        return
    try:
        meta = json.loads(config.read_text(encoding="utf-8")).get("alignloop_reward") or {}
    except (OSError, ValueError, AttributeError):
        return  # not ours to judge here: loading says what is wrong with it
    names = list(meta.get("labellers") or []) if isinstance(meta, dict) else []
    if names and name not in names:
        raise _not_conditioned_on(name, names, left)


def encode_texts(model: Any, tok: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut from the left to ``max_length`` (the end is always read).

    Encoder-decoder classifiers (T5) read the reward at an EOS token: one is appended when
    the tokenizer did not add it.
    """
    tok.truncation_side = "left"
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    eos = tok.eos_token_id
    if getattr(model.config, "is_encoder_decoder", False) and eos is not None:
        ids = [s if s and s[-1] == eos else s[: max_length - 1] + [eos] for s in ids]
    return ids


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Right-pad token lists: ``(input_ids, attention_mask)``, both ``(len(seqs), longest)`` long tensors."""
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


def score_texts(model: Any, tok: Any, texts: list[str], batch_size: int = 32, max_length: int | None = None):
    """Logits of a sequence classifier for ``texts``: a float tensor of shape ``(len(texts), num_labels)``.

    Texts are sorted by length and batched (right padding, truncation from the left so the end
    of a completion is always read).
    """
    import torch

    ids = encode_texts(model, tok, texts, max_length or model_max_length(model, tok))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = pad_right([ids[i] for i in idx], tok.pad_token_id)
            out[idx] = (
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            )
    return out


def model_max_length(model: Any, tok: Any) -> int:
    """The longest input the model's positions (and tokenizer) allow; 512 when neither says."""
    limits = [getattr(model.config, k, None) for k in ("max_position_embeddings", "n_positions", "n_ctx")] + [
        tok.model_max_length if tok.model_max_length < 1_000_000 else None
    ]
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    n = min(limits) if limits else 512
    if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        n -= 2  # RoBERTa's positions start after the padding index
    return n


def _model_reward(spec: str, model: Any, tok: Any, index: int, with_prompt: bool, batch_size: int) -> Reward:
    offset = reward_offset(model, index) if with_prompt else 0.0
    # a reward model trained with length_correction: score - slope * words of the completion
    slope = float((getattr(model.config, "alignloop_reward", None) or {}).get("length_slope", 0.0))

    def fn(prompts: list[str], completions: list[str]) -> list[float]:
        texts = (
            [full_text(p, c) for p, c in zip(prompts, completions, strict=True)]
            if with_prompt
            else completions
        )
        logits = score_texts(model, tok, texts, batch_size=batch_size)
        scores = (logits[:, index] + offset).tolist()
        if slope:
            scores = [r - slope * len(c.split()) for r, c in zip(scores, completions, strict=True)]
        return scores

    return Reward(spec, "model", fn, model=model, tokenizer=tok)


def classifier_probs(
    spec_or_model: str | tuple[Any, Any] | Reward, texts: Sequence[str], batch_size: int = 32
) -> list[dict[str, float]]:
    """Softmax probabilities of every label for each text: ``[{"nothate": 0.9, "hate": 0.1}, ...]``.

    ``spec_or_model`` is a model id or folder (``world:toxicity``, a hub id; a trailing
    ``:LABEL`` is ignored), a loaded ``(model, tokenizer)`` or a classifier :class:`Reward`.
    Toxicity as in the notes = the mean of the "hate" probability over completions.
    """
    import torch

    if isinstance(spec_or_model, Reward):
        model, tok = spec_or_model.model, spec_or_model.tokenizer
        if model is None:
            raise UserError(f"reward {spec_or_model.spec!r} is not a classifier")
    elif isinstance(spec_or_model, tuple):
        model, tok = spec_or_model
    else:
        target = spec_or_model
        if not Path(target).is_dir():
            parsed = parse_spec(target, need_label=False) if ":" in target else ParsedSpec("model", target)
            if parsed.kind not in ("model", "classifier"):
                raise UserError(f"{target!r} does not name a classifier", fix="e.g. world:toxicity")
            target = parsed.target
        model, tok = _cached_classifier(target, _stamp(target))
    texts = list(texts)
    if not texts:
        return []
    labels = _labels(model)
    probs = torch.softmax(score_texts(model, tok, texts, batch_size=batch_size), dim=-1)
    return [dict(zip(labels, row, strict=True)) for row in probs.tolist()]


@lru_cache(maxsize=4)
def _cached_classifier(target: str, stamp: float) -> tuple[Any, Any]:
    return load_sequence_classifier(target, None)


def _stamp(target: str) -> float:
    """Modification time of a local model's config (so a retrained folder is reloaded)."""
    from alignloop.models import resolve_model_id

    cfg = Path(resolve_model_id(target)) / "config.json"
    return cfg.stat().st_mtime if cfg.is_file() else 0.0


def _python_reward(spec: str, module_name: str, func_name: str) -> Reward:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"cannot import {module_name!r} for reward {spec!r} ({e})", fix="check PYTHONPATH"
        ) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(
            f"{module_name} has no function {func_name!r}", fix=f"define {func_name}(prompts, completions)"
        )
    return Reward(spec, "python", fn)


def _gold_reward(spec: str, taste: str | None = None) -> Reward:
    try:
        from alignloop.world import judge_batch
        from alignloop.world.labellers import TASTES, taste_score
    except ImportError:
        raise UserError(
            "world:gold needs the embedded world (alignloop.world), which is not installed"
        ) from None
    if taste is not None and taste not in TASTES:
        raise UserError(
            f"unknown labeller taste {taste!r} in {spec!r}",
            fix=f"use world:gold or world:gold:{'|'.join(sorted(TASTES))}",
        )

    def fn(prompts: list[str], completions: list[str]) -> list[float]:
        if taste is not None:
            return [taste_score(taste, p, c) for p, c in zip(prompts, completions, strict=True)]
        return [j.score for j in judge_batch(prompts, completions)]

    return Reward(spec, "gold", fn)


# ----------------------------------------------------------------------------- remote


def score_url(url: str) -> str:
    """The scoring endpoint of a reward-server URL: a URL with no path posts to ``/score``."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/score")
    return urllib.parse.urlunsplit(parts)


def post_json(url: str, payload: dict[str, Any], timeout: float = 120.0, retries: int = 3) -> dict[str, Any]:
    """POST JSON and return the decoded reply; connection problems are retried with back-off."""
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")[:300]
            raise UserError(f"reward server {url} answered HTTP {e.code}: {body}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            if attempt == retries - 1:
                reason = getattr(e, "reason", e)
                raise UserError(
                    f"no reward server at {url} ({reason})",
                    fix="start one with 'alignloop reward serve --reward SPEC' or check the URL",
                ) from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def get_json(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET a JSON document (the reward server's ``/health``); UserError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as e:
        raise UserError(
            f"no reward server at {url} ({getattr(e, 'reason', e)})",
            fix="start one with 'alignloop reward serve --reward SPEC' or check the URL",
        ) from None


def _http_reward(spec: str, url: str, chunk: int = 512) -> Reward:
    endpoint = score_url(url)
    health = get_json(urllib.parse.urljoin(endpoint, "/health"))

    def fn(prompts: list[str], completions: list[str]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(prompts), chunk):
            reply = post_json(
                endpoint, {"prompts": prompts[i : i + chunk], "completions": completions[i : i + chunk]}
            )
            if not isinstance(reply, dict) or "scores" not in reply:
                raise UserError(f"reward server {endpoint} replied without 'scores'")
            scores.extend(reply["scores"])
        return scores

    return Reward(spec, "http", fn, info={"endpoint": endpoint, "server": health})
