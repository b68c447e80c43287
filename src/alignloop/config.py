"""Typed configs: pydantic models, YAML files, and ``--set section.key=value`` overrides.

Every stage declares its config as a subclass of :class:`Config`. Unknown keys are
rejected with a message that names the key and the nearest valid one::

    >>> class PPO(Config):
    ...     learning_rate: float = 1e-5
    >>> load_config(PPO, overrides=["learnig_rate=3e-5"])
    Traceback (most recent call last):
    UserError: unknown config key 'learnig_rate' in --set learnig_rate=3e-5: did you mean 'learning_rate'?

A section named partly (``--set ppo.steps=5``, or ``ppo: {steps: 5}`` in a file) keeps the
section's own defaults for the keys not named: a section whose default sets tuned values (e.g.
``CAIConfig.ppo``) keeps them.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from alignloop.errors import UserError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every problem into one clear :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}", fix="check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise UserError(f"invalid YAML ({getattr(e, 'problem', e)})", where, "fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("a config file must hold a mapping of keys to values", str(p))
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"ppo.kl.beta=0.05"`` -> ``(["ppo", "kl", "beta"], 0.05)``; values are parsed as YAML."""
    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}", fix="e.g. --set ppo.learning_rate=1e-5")
    key, _, raw = text.partition("=")
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise UserError(f"--set has an empty key in {text!r}", fix="e.g. --set ppo.learning_rate=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.path=value`` override applied."""
    out = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return out


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    data: dict[str, Any] | None = None,
    overrides: typing.Iterable[str] = (),
    where: str | None = None,
) -> C:
    """Build ``cls`` from a YAML file and/or a dict, then ``--set`` overrides, validated.

    Raises :class:`UserError` naming the bad key (and the nearest valid key) or the bad value.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        merged.update(read_yaml(path))
        where = where or str(path)
    if data:
        merged.update(_deep_copy(data))
    overrides = list(overrides)
    for text in overrides:
        check_override(cls, text)
    merged = with_section_defaults(cls, apply_overrides(merged, overrides))
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        loc = [str(x) for x in e.errors()[0]["loc"] if not isinstance(x, int)]
        culprit = next((t for t in reversed(overrides) if _same_branch(parse_override(t)[0], loc)), None)
        source = f"--set {culprit}" if culprit else where or ("--set" if overrides else "config")
        raise config_error(cls, e, source) from None


def _same_branch(a: list[str], b: list[str]) -> bool:
    """One key path is a prefix of the other (``ppo.config`` and ``ppo.config.kl.beta``)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def with_section_defaults(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each section it names (a nested config) merged over that section's default.

    Only the values the default set explicitly are merged in (``exclude_unset``), so the result
    validates to the same object as writing those tuned values out, and ``model_fields_set``
    still tells what a user (or a tuned default) chose.
    """
    out = dict(data)
    for name, value in data.items():
        field = cls.model_fields.get(name)
        sub = _model_in(field.annotation) if field is not None else None
        if sub is None or not isinstance(value, dict):
            continue
        default = field.get_default(call_default_factory=True, validated_data={})
        base = default.model_dump(exclude_unset=True) if isinstance(default, BaseModel) else {}
        out[name] = with_section_defaults(sub, _deep_merge(base, value))
    return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_override(cls: type[BaseModel], text: str) -> None:
    """Raise a :class:`UserError` naming ``--set`` when ``text``'s key is not in ``cls``'s schema,
    with the nearest full key (``ppo.kl.beta`` -> ``did you mean 'ppo.config.kl.beta'?``)."""
    keys, _ = parse_override(text)
    model: Any = cls
    for i, k in enumerate(keys):
        if not _is_model(model):
            return  # a mapping or a value below here: the validation judges it
        field = model.model_fields.get(k)
        if field is None:
            if model.model_config.get("extra") != "forbid":
                return
            raise UserError(
                f"unknown config key '{'.'.join(keys[: i + 1])}'", f"--set {text}", _suggest(cls, keys, i)
            )
        model = _model_in(field.annotation)


def _suggest(cls: type[BaseModel], keys: list[str], bad: int) -> str:
    """The full key the user most likely meant: one that ends with the keys from the bad one on
    (``kl.beta``) below the part that was right (``ppo``), else the closest full key."""
    paths = all_keys(cls)
    head, tail = ".".join(keys[:bad]), ".".join(keys[bad:])
    ends = [p for p in paths if p.startswith(head) and (p == tail or p.endswith("." + tail))]
    if not ends:
        ends = [p for p in paths if p.startswith(head) and p.endswith("." + keys[-1])]
        ends = difflib.get_close_matches(".".join(keys), ends, n=1, cutoff=0.0) if ends else []
    close = ends[:1] or difflib.get_close_matches(".".join(keys), paths, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    valid = valid_keys(cls, keys[:bad])
    return f"valid keys here: {', '.join(sorted(valid))}" if valid else "see the config's keys"


def all_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``cls``'s schema, sections and their keys (``ppo.config.kl.beta``)."""
    out: list[str] = []
    for name, field in cls.model_fields.items():
        out.append(prefix + name)
        sub = _model_in(field.annotation)
        if sub is not None:
            out += all_keys(sub, f"{prefix}{name}.")
    return out


def validate(cls: type[C], data: dict[str, Any], where: str) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise config_error(cls, e, where) from None


def config_error(cls: type[BaseModel], err: ValidationError, where: str) -> UserError:
    first = err.errors()[0]
    loc = [str(x) for x in first["loc"] if not isinstance(x, int)]
    dotted = ".".join(loc)
    if first["type"] == "extra_forbidden":
        return UserError(f"unknown config key '{dotted}'", where, _suggest(cls, loc, len(loc) - 1))
    if first["type"] == "missing":
        return UserError(f"missing config key '{dotted}'", where, "add it to the config or pass --set")
    value = first.get("input")
    return UserError(f"bad value {value!r} for config key '{dotted}' ({first['msg']})", where)


def valid_keys(cls: type[BaseModel], path: list[str]) -> list[str]:
    """The field names of the (nested) model reached by ``path`` from ``cls``."""
    model: Any = cls
    for name in path:
        field = model.model_fields.get(name) if _is_model(model) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields) if _is_model(model) else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if _is_model(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_model(x: Any) -> bool:
    return isinstance(x, type) and issubclass(x, BaseModel)


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
