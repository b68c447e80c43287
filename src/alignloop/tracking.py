"""Experiment trackers: a stage's config, lineage, step metrics, final metrics and tables, sent to
TensorBoard, Weights & Biases, MLflow and/or trackio beside ``metrics.jsonl``.

One option chooses them, ``report_to``: ``none`` or a list of :data:`TRACKERS` (default:
``tensorboard``). It is set once per process -- ``--report-to`` on the command line, the recipe key
``report_to`` -- with :func:`configure`; :func:`alignloop.runs.start_stage` opens the trackers and
every ``run.log`` / ``run.finish`` / ``run.table`` reaches them. Nothing else in alignloop talks to
a tracker.

Offline first, nothing leaves the machine unless the user's own environment says so:

==============  =====================================================================================
tensorboard     event files in ``<stage>/tensorboard`` (``tensorboard --logdir RUN``)
wandb           offline mode (``WANDB_MODE`` overrides), files in ``<root>/wandb``; ``wandb sync`` later
mlflow          a local SQLite store ``<root>/mlflow.db`` (``MLFLOW_TRACKING_URI`` overrides)
trackio         its local store ``<root>/trackio`` (``TRACKIO_DIR`` overrides); ``trackio show``
==============  =====================================================================================

``<root>`` is the recipe's run folder under ``alignloop run`` (its stages are one group, runs named
``<group>/<stage>``), else the stage's own folder. A tracker that cannot start or fails while
logging prints one line and is dropped; the run goes on with ``metrics.jsonl``. Only the main
process reports (the caller checks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignloop.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PROJECT = "alignloop"  # the W&B project, MLflow experiment and trackio project
EXTRA = "pip install 'alignloop[trackers]'"
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


@dataclass
class Settings:
    report_to: tuple[str, ...] = ("tensorboard",)
    explicit: bool = False  # the user asked (a missing package is then an error, not a shrug)
    group: str | None = None  # the recipe run these stages belong to
    root: Path | None = None  # where the wandb / mlflow / trackio local stores live


_SETTINGS = Settings()


def parse_report_to(value: str | Sequence[str] | None, where: str = "--report-to") -> tuple[str, ...]:
    """``"none"`` -> ``()``; ``"wandb,mlflow"`` or ``["wandb", "mlflow"]`` -> ``("wandb", "mlflow")``.

    An unknown name is a :class:`UserError` naming the choices.
    """
    if value is None:
        return ()
    items = value.replace(",", " ").split() if isinstance(value, str) else [str(v) for v in value]
    names = [v.strip().lower() for v in items if v.strip()]
    if names in ([], ["none"]):
        return ()
    for n in names:
        if n not in TRACKERS:
            raise UserError(f"unknown tracker {n!r}", where, f"choose none or any of {', '.join(TRACKERS)}")
    return tuple(dict.fromkeys(names))


def installed(name: str) -> bool:
    """Whether tracker ``name``'s package can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(_MODULE[name]) is not None
    except (ImportError, ValueError):  # ValueError: a module present in sys.modules as None
        return False


def require_installed(names: Iterable[str], where: str = "--report-to") -> None:
    """One line naming the extra when a tracker asked for is not installed."""
    for n in names:
        if not installed(n):
            raise UserError(f"tracker {n!r} is not installed", where, f"{EXTRA} (or pip install {n})")


def configure(
    report_to: str | Sequence[str] | None = None,
    *,
    group: str | None = None,
    root: str | Path | None = None,
    where: str = "--report-to",
) -> None:
    """Choose the trackers for the stages this process runs (``report_to=None`` keeps the choice).

    Checked here, before any stage starts: an unknown name or a tracker asked for by name whose
    package is missing is a :class:`UserError` (one line, nothing run yet).
    """
    global _SETTINGS
    if report_to is not None:
        names = parse_report_to(report_to, where)
        require_installed(names, where)
        _SETTINGS.report_to, _SETTINGS.explicit = names, True
    if group is not None:
        _SETTINGS.group = group
    if root is not None:
        _SETTINGS.root = Path(root)


@contextlib.contextmanager
def grouped(
    group: str, root: str | Path, report_to: str | Sequence[str] | None = None, where: str = "recipe"
) -> Iterator[None]:
    """The stages run inside report as one group (a recipe run), with their local stores in
    ``root``; ``report_to`` applies unless ``--report-to`` was given. The settings are restored after."""
    global _SETTINGS
    saved = _SETTINGS
    _SETTINGS = dataclasses.replace(saved)
    try:
        if not saved.explicit:
            configure(report_to, where=where)
        configure(group=group, root=root)
        yield
    finally:
        _SETTINGS = saved


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Settings changed inside (one command's ``--report-to``) are undone on leaving."""
    global _SETTINGS
    saved = _SETTINGS
    _SETTINGS = dataclasses.replace(saved)
    try:
        yield
    finally:
        _SETTINGS = saved


def reset() -> None:
    """Back to the default (tensorboard, no group): for tests that run stages in one process."""
    global _SETTINGS
    _SETTINGS = Settings()


def current() -> Settings:
    return _SETTINGS


# ------------------------------------------------------------------------------------------------
# What a stage sends
# ------------------------------------------------------------------------------------------------


def numeric(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) metrics mapping, flattened with ``/``: ``{"a": {"b": 1}}`` ->
    ``{"a/b": 1.0}``. Strings, lists and None are left out (they stay in the JSON files)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(numeric(v, f"{key}/"))
        elif isinstance(v, (int, float)):
            out[key] = float(v)
    return out


def flat_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"kl.beta": "0.05", ...}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flat_params(v, f"{key}."))
        else:
            out[key] = json.dumps(v, default=str) if not isinstance(v, str) else v
    return out


@dataclass
class Trackers:
    """The trackers open for one stage; every call goes to each and a failing one is dropped."""

    live: list[Any]

    def _each(self, what: str, *args: Any) -> None:
        for t in list(self.live):
            try:
                getattr(t, what)(*args)
            except Exception as e:  # a tracker's failure never stops training
                _warn(f"{t.name} failed while logging ({type(e).__name__}: {e}); going on without it")
                self.live.remove(t)
                with contextlib.suppress(Exception):
                    t.close()

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        values = numeric({k: v for k, v in row.items() if k not in ("step", "time")})
        if values:
            self._each("log", step, values)

    def summary(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = numeric(metrics)
        if values:
            self._each("summary", step, values)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self._each("table", name, columns, rows)

    def close(self) -> None:
        self._each("close")
        self.live = []


def open_trackers(stage_dir: Path, stage: str, config: Mapping[str, Any], resume: bool) -> Trackers:
    """Start the configured trackers for one stage (main process only; the caller checks).

    ``config`` is what the tracker shows as the run's config: the stage's config, its lineage
    (the manifest's inputs with their hashes), the seed and the package versions.
    """
    s = _SETTINGS
    run_name = f"{s.group}/{stage_dir.name}" if s.group else stage_dir.name
    root = s.root or stage_dir
    live = []
    for name in s.report_to:
        if not installed(name):
            if s.explicit:  # configure() checked; a package removed since then
                _warn(f"{name} is not installed ({EXTRA}); going on without it")
            continue  # the default (tensorboard) on an install without it: metrics.jsonl only
        try:
            with _stdout_to_stderr():
                live.append(_OPEN[name](stage_dir, root, run_name, stage, s.group, dict(config), resume))
        except Exception as e:
            _warn(f"{name} could not start ({type(e).__name__}: {e}); going on with metrics.jsonl")
    return Trackers(live)


def _warn(msg: str) -> None:
    print(f"alignloop: tracker: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Trackers chat on stdout; alignloop's stdout is its result (JSON a script reads). Under
    ``--quiet`` the chatter goes nowhere."""
    from alignloop.runs import is_quiet

    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(os.devnull, "w")) if is_quiet() else sys.stderr  # noqa: SIM115
        stack.enter_context(contextlib.redirect_stdout(sink))
        yield


def _ids_path(stage_dir: Path) -> Path:
    return stage_dir / "trackers.json"


def _remember(stage_dir: Path, key: str, value: str) -> None:
    """Tracker run ids, so ``--resume`` continues the same tracker run."""
    p = _ids_path(stage_dir)
    ids = json.loads(p.read_text()) if p.is_file() else {}
    ids[key] = value
    p.write_text(json.dumps(ids, indent=1) + "\n")


def _recall(stage_dir: Path, key: str) -> str | None:
    p = _ids_path(stage_dir)
    return json.loads(p.read_text()).get(key) if p.is_file() else None


# ------------------------------------------------------------------------------------------------
# The four trackers: start(...) -> an object with log / summary / table / close
# ------------------------------------------------------------------------------------------------


class _TensorBoard:
    """Event files through tensorboard's own writer (no torch, no TensorFlow needed)."""

    name = "tensorboard"

    def __init__(self, stage_dir, root, run_name, stage, group, config, resume):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._w = EventFileWriter(str(stage_dir / "tensorboard"))
        self._text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def _event(self, step: int, summary: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._w.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def _text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._event(step, text_pb(tag, text))

    def log(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._event(step, Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()]))
        self._w.flush()

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.log(step, {f"final/{k}": v for k, v in values.items()})

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
        self._text(name, "\n".join(lines), 0)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class _WandB:
    name = "wandb"

    def __init__(self, stage_dir, root, run_name, stage, group, config, resume):
        import wandb

        root.mkdir(parents=True, exist_ok=True)
        old = _recall(stage_dir, "wandb") if resume else None
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_name,
            group=group,
            job_type=stage,
            dir=str(root),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
            id=old,
            resume="allow" if old else None,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        _remember(stage_dir, "wandb", self._run.id)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def summary(self, step: int, values: dict[str, float]) -> None:
        self._run.summary.update(values)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self._run.log({name: wandb.Table(columns=columns, data=rows)})

    def close(self) -> None:
        self._run.finish()


class _MLflow:
    name = "mlflow"

    def __init__(self, stage_dir, root, run_name, stage, group, config, resume):
        from mlflow.tracking import MlflowClient

        root.mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        # our own store keeps its artifacts beside it (MLflow's default is ./mlruns in the cwd)
        artifacts = None if uri else (root / "mlartifacts").resolve().as_uri()
        self._c = MlflowClient(tracking_uri=uri or f"sqlite:///{(root / 'mlflow.db').resolve()}")
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        exp = self._c.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self._c.create_experiment(name, artifacts)
        old = _recall(stage_dir, "mlflow") if resume else None
        if old is not None:
            self._id = old
            self._c.update_run(old, status="RUNNING")
        else:
            tags = {"alignloop.stage": stage, **({"alignloop.group": group} if group else {})}
            self._id = self._c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            _remember(stage_dir, "mlflow", self._id)
            from mlflow.entities import Param

            params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params
                self._c.log_batch(self._id, params=params[i : i + 100])
        self._c.log_dict(self._id, config, "config.json")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self._c.log_batch(self._id, metrics=[Metric(_mlflow_key(k), v, ms, step) for k, v in values.items()])

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.log(step, {f"final/{k}": v for k, v in values.items()})

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self._c.log_table(self._id, {c: [r[i] for r in rows] for i, c in enumerate(columns)}, f"{name}.json")

    def close(self) -> None:
        self._c.set_terminated(self._id)


def _mlflow_key(k: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . space : /``; others become ``_``."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in k)


class _Trackio:
    name = "trackio"

    def __init__(self, stage_dir, root, run_name, stage, group, config, resume):
        saved_dir = os.environ.get("TRACKIO_DIR")
        want = Path(os.environ.get("TRACKIO_DIR") or (root / "trackio")).resolve()
        if "trackio" not in sys.modules:  # trackio reads TRACKIO_DIR once, when it is imported
            os.environ["TRACKIO_DIR"] = str(want)
            try:
                import trackio
            finally:  # not left behind for later stages or child processes of this process
                if saved_dir is None:
                    os.environ.pop("TRACKIO_DIR", None)
                else:
                    os.environ["TRACKIO_DIR"] = saved_dir
        import trackio
        from trackio.utils import TRACKIO_DIR

        if Path(TRACKIO_DIR).resolve() != want:
            raise RuntimeError(f"trackio already stores in {TRACKIO_DIR} in this process, not {want}")

        self._run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", PROJECT),
            name=run_name,
            group=group,
            config=config,
            resume="allow" if resume else "never",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.log(step, {f"final/{k}": v for k, v in values.items()})

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import trackio

        self._run.log({name: trackio.Table(columns=columns, data=rows)})

    def close(self) -> None:
        import trackio

        with _stdout_to_stderr():
            trackio.finish()  # the current run is this one (stages run one after another)


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
