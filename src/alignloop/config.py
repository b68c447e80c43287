"""Typed configs: pydantic models, YAML files, and ``--set section.key=value`` overrides.

Every stage declares its config as a subclass of :class:`Config`. Unknown keys are
rejected with a message that names the key and the nearest valid one::

    >>> class PPO(Config):
    ...     learning_rate: float = 1e-5
    >>> load_config(PPO, overrides=["learnig_rate=3e-5"])
    Traceback (most recent call last):
    UserError: unknown config key 'learnig_rate' in --set: did you mean 'learning_rate'?
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
    merged = apply_overrides(merged, overrides)
    return validate(cls, merged, where or ("--set" if overrides else "config"))


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
        valid = valid_keys(cls, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        fix = (
            f"did you mean '{'.'.join(loc[:-1] + close)}'?"
            if close
            else f"valid keys here: {', '.join(sorted(valid))}"
        )
        return UserError(f"unknown config key '{dotted}'", where, fix)
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
